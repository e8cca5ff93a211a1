"""Copy a checkpoint through mergekit's own I/O (LazyTensorLoader -> TensorWriter): the baseline our
reader and writer are measured against in bench/passthrough.py.

    .venv/bin/python bench/mergekit_copy.py SRC_DIR OUT_DIR [MAX_SHARD_BYTES]
"""

import json
import sys
from pathlib import Path

from mergekit.io import LazyTensorLoader, TensorWriter


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    max_shard = int(sys.argv[3]) if len(sys.argv) > 3 else 10**9
    loader = LazyTensorLoader.from_disk(str(src))
    names = list(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])
    writer = TensorWriter(str(out), max_shard_size=max_shard, safe_serialization=True)
    for name in names:
        writer.save_tensor(name, loader.get_tensor(name))
    writer.finalize()


if __name__ == "__main__":
    main()
