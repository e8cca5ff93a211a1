""".venv/bin/python bench/method_plan.py [--work DIR]

Planning a mergekit-yaml TIES config over two DeepSeek-V3 releases at full size (issue 23): 61 layers + the
MTP layer, 256 experts, block FP8, 163 shards and 91,991 tensors each, laid out as the release is
(zenith_merge.demo.release_layout) but header-only: each shard is its real safetensors header followed by a
hole (a sparse file of the right length), so the folders take no disk. `zenith-merge plan` reads only headers,
so it sees what it would see on the release. Reports the plan time, the size of plan.json, the process's peak
RSS and the plan's own memory estimate, for expert_scope expert and layer, and RegMean-free assembly
beside them for comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from zenith_merge.config import parse_config
from zenith_merge.demo import release_layout as rl
from zenith_merge.plan.build import build_plan


def header_only_release(folder: Path) -> None:
    """DeepSeek-V3's release layout with holes for data: headers, index, config, custom-code stand-ins."""
    folder.mkdir(parents=True, exist_ok=True)
    config = rl.release_config("deepseek-v3")
    shards = rl.plan_shards(rl.release_tensors("deepseek-v3", config), 4_300_000_000)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = rl.shard_file_name("deepseek-v3", i + 1, len(shards))
        header = rl._header(shard)
        with open(folder / name, "wb") as f:
            f.write(header)
            f.truncate(len(header) + sum(t.nbytes for t in shard))
        weight_map.update({t.name: name for t in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    for code in ("modeling_deepseek.py", "configuration_deepseek.py"):
        (folder / code).write_text("")


def timed_plan(data: dict, root: Path) -> str:
    t0 = time.perf_counter()
    plan = build_plan(parse_config(data), config_dir=root)
    wall = time.perf_counter() - t0
    return (f"{len(plan.tensors)} output tensors in {wall:.1f} s; plan.json {len(plan.model_dump_json()) / 2**20:.0f} "
            f"MiB; peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; the plan's "
            f"peak memory estimate {plan.estimates.peak_memory_bytes / 2**30:.1f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="where the header-only releases go (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.work or Path(tmp)
        for name in ("v3", "r1"):
            if not (root / name / "model.safetensors.index.json").is_file():
                header_only_release(root / name)
        v3, r1 = str(root / "v3"), str(root / "r1")
        for scope in ("expert", "layer"):
            data = {"merge_method": "ties", "base_model": v3, "expert_scope": scope, "fp8_output": True, "models": [
                {"model": v3, "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": r1, "parameters": {"weight": 1.0, "density": [{"filter": "mlp.experts", "value": 0.3},
                                                                         {"value": 0.7}]}}]}
            print(f"ties, expert_scope {scope}: {timed_plan(data, root)}")
        data = {"base_model": v3, "merge_method": "assembly", "gate_mode": "random", "routing_report": False,
                "experts": [{"source_model": v3}, {"source_model": r1}], "fp8_output": True,
                "assembly": {"weights": {"default": [0.5, 0.5]}}}
        print(f"assembly, for comparison: {timed_plan(data, root)}")


if __name__ == "__main__":
    main()
