"""Passthrough merge vs `cp`: wall time and peak RSS, on a demo-sized and a ~4 GB synthetic checkpoint.

    .venv/bin/python bench/passthrough.py                 # both sizes, 3 interleaved repeats, writes bench/out/
    .venv/bin/python bench/passthrough.py --sizes demo --repeats 5

Each repeat runs, back to back: `cp` of the checkpoint's files, `zenith-merge merge` of a config
with only that base (every tensor copied bit for bit), a merge with `dtype: float32` (every
tensor decoded and converted, the slow path), and the same copy through mergekit's own
LazyTensorLoader and TensorWriter (bench/mergekit_copy.py). Each runs under `/usr/bin/time -v` for its peak RSS.
Medians are reported; the page cache is warm for all contenders after the first repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

import torch
import transformers
from common import timed, write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "zenith_merge.cli"]

SIZES = {
    # (hidden, layers, experts, moe_inter, vocab): ~5 MB and ~4 GB in bfloat16
    "demo": dict(hidden_size=128, num_hidden_layers=4, n_routed_experts=8, moe_intermediate_size=64, vocab_size=2048),
    "4GB": dict(hidden_size=2048, num_hidden_layers=10, n_routed_experts=32, moe_intermediate_size=1024, vocab_size=32000),
}


def synthetic_deepseek(path: Path, dims: dict) -> Path:
    """A DeepseekV3 checkpoint with random bf16 weights, written tensor by tensor (no model in memory)."""
    h = dims["hidden_size"]
    config = transformers.DeepseekV3Config(
        intermediate_size=4 * h, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=h // 2,
        kv_lora_rank=h // 4, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, **dims)
    config.architectures = ["DeepseekV3ForCausalLM"]
    from zenith_merge.architectures import architecture_of, classify, dim, facts, tensor_name

    cfg = config.to_dict()
    arch, f = architecture_of(cfg), facts(cfg)
    names = [tensor_name(arch, "embed")]
    for layer in range(f.num_layers):
        roles = ["input_norm", "post_attention_norm", "q_a_proj", "q_a_norm", "q_b_proj", "kv_a_proj", "kv_a_norm",
                 "kv_b_proj", "o_proj"]
        roles += ["router", "router_bias", "shared_gate", "shared_up", "shared_down"] if layer in f.moe_layers else \
            ["mlp_gate", "mlp_up", "mlp_down"]
        names += [tensor_name(arch, r, layer) for r in roles]
        if layer in f.moe_layers:
            names += [tensor_name(arch, r, layer, e) for e in range(f.n_routed_experts)
                      for r in ("expert_gate", "expert_up", "expert_down")]
    names += [tensor_name(arch, "final_norm"), tensor_name(arch, "lm_head")]

    def make(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        dtype = torch.float32 if "e_score" in name else torch.bfloat16
        return torch.randn(shape, generator=gen).to(dtype)

    shapes = [(n, tuple(dim(cfg, arch, s) for s in arch.roles[classify(arch, n).role].shape)) for n in names]
    return write_random_checkpoint(path, config, shapes, shard_bytes=500 * 2**20, make=make)


def bench_size(label: str, work: Path, repeats: int) -> dict:
    src = synthetic_deepseek(work / f"src-{label}", SIZES[label])
    files = sorted(src.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    from zenith_merge.io.safetensors_format import read_header

    largest = max(e.end - e.begin for f in files for e in read_header(f).tensors.values())
    configs = {}
    for name, extra in (("zenith copy", ""), ("zenith to-f32", "dtype: float32\n")):
        cfg = work / f"{label}-{name.replace(' ', '_')}.yml"
        cfg.write_text(f"base_model: {src}\nmax_shard_size: 1GB\n{extra}")
        configs[name] = cfg
    runs: dict[str, list[tuple[float, int]]] = {"cp": [], **{k: [] for k in configs}, "mergekit io": []}
    for _ in range(repeats):
        dst = work / "out"
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir()
        runs["cp"].append(timed(["cp", *map(str, files), str(dst)]))
        for name, cfg in configs.items():
            shutil.rmtree(dst, ignore_errors=True)
            runs[name].append(timed([*CLI, "merge", str(cfg), "--output", str(dst), "--no-progress"]))
        shutil.rmtree(dst, ignore_errors=True)
        runs["mergekit io"].append(timed([sys.executable, str(ROOT / "bench" / "mergekit_copy.py"), str(src), str(dst),
                                          str(10**9)]))
        shutil.rmtree(dst, ignore_errors=True)
    out = {"label": label, "bytes": nbytes, "largest_tensor_bytes": largest, "repeats": repeats}
    for name, rs in runs.items():
        out[name] = {"wall_s": statistics.median(w for w, _ in rs), "rss_bytes": statistics.median(r for _, r in rs),
                     "walls": [round(w, 3) for w, _ in rs]}
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.platform()}, torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = [bench_size(label, args.work, args.repeats) for label in args.sizes]
    (args.work / "passthrough.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    mb = 2**20
    print(f"machine: {machine()}\n")
    print("| checkpoint | contender | median wall s | throughput vs cp | peak RSS MiB | RSS - 2x largest tensor MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        for name in ("cp", "zenith copy", "zenith to-f32", "mergekit io"):
            m = r[name]
            print(f"| {r['label']} ({r['bytes'] / mb:.0f} MiB, largest tensor {r['largest_tensor_bytes'] / mb:.1f} MiB) "
                  f"| {name} | {m['wall_s']:.2f} | {r['cp']['wall_s'] / m['wall_s']:.2f}x | {m['rss_bytes'] / mb:.0f} "
                  f"| {(m['rss_bytes'] - 2 * r['largest_tensor_bytes']) / mb:.0f} |")


if __name__ == "__main__":
    main()
