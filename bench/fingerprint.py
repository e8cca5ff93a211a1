""".venv/bin/python bench/fingerprint.py

The cost of a source's fingerprint (zenith_merge.plan.sources.fingerprint: config, index, headers, sizes and a
fixed sample of each shard's data) on one 2 GiB shard of random bytes written under /tmp: cold (the file's
pages dropped with posix_fadvise first) and warm, medians of 3, beside one full sha256 of the same file, cold.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import struct
import tempfile
import time
from pathlib import Path

from zenith_merge.plan.sources import fingerprint

SIZE = 2**31


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="zenith-fingerprint-", dir="/tmp"))
    try:
        header = json.dumps({"w": {"dtype": "U8", "shape": [SIZE], "data_offsets": [0, SIZE]}}).encode()
        shard = folder / "model.safetensors"
        with open(shard, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            for _ in range(SIZE // 2**26):
                f.write(os.urandom(2**26))
        (folder / "config.json").write_text("{}")
        fd = os.open(shard, os.O_RDONLY)

        def drop_cache() -> None:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

        times: dict[str, list[float]] = {"fingerprint, cold": [], "fingerprint, warm": []}
        for _ in range(3):
            drop_cache()
            t = time.perf_counter()
            fingerprint(folder)
            times["fingerprint, cold"].append(time.perf_counter() - t)
            t = time.perf_counter()
            fingerprint(folder)
            times["fingerprint, warm"].append(time.perf_counter() - t)
        drop_cache()
        t, digest = time.perf_counter(), hashlib.sha256()
        with open(shard, "rb") as f:
            while chunk := f.read(2**24):
                digest.update(chunk)
        times["full sha256, cold"] = [time.perf_counter() - t]
        os.close(fd)
        for what, ts in times.items():
            print(f"{what}: {1000 * statistics.median(ts):.1f} ms")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
