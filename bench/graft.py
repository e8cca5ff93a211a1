"""Graft merge vs `cp -r` of its inputs: wall time and peak RSS, on the demo models and on synthetic checkpoints.

    .venv/bin/python bench/graft.py                                   # every case, 3 interleaved repeats
    .venv/bin/python bench/graft.py --repeats 5 --out bench/out/graft.md
    .venv/bin/python bench/graft.py --cases demo a-1GB a-4GB          # skip the forward-pass case (b)
    .venv/bin/python bench/graft.py --keep-inputs                     # keep the synthetic models for a rerun

Cases (each timed against `cp -r` of its two input folders, and `cp -r` followed by `sync`, since
zenith-merge fsyncs every shard and cp does not):
- `demo`: `zenith-merge merge merge/config.yml`, the flagship on the demo models (zen-tiny base,
  qwen3-moe-tiny donor): expert usage (keep: 4), ridge alignment on demo:code + demo:maths, then the writer.
  `zenith-merge demo` builds the demo models first if they are not cached.
- `a-1GB`, `a-4GB`: a synthetic DeepseekV3 base (hidden 2048, 16 experts in 4 groups, moe_intermediate 1024)
  and a synthetic Qwen3MoE donor of the SAME width (16 experts, moe_intermediate 768), together ~1 GB or
  ~4 GB. `align.mode: identity`: no forward pass, so this measures the writer (donor experts padded to
  1024 and copied, router rows transferred). Run at two sizes to check that peak RSS stays flat.
- `b-4GB`: the same base and a donor of ANOTHER width (hidden 1536), `align: {mode: fit, max_tokens: 256}`
  on a short calibration text written by this script: two transformers forward passes, which load both
  models at once (in the stages' `calibration_dtype`), so its RSS grows with the models.

The synthetic models have random bf16 weights (std 0.02, norms 1), written with safetensors shard by
shard (at most ~400 MB in memory), a config.json built by transformers' config classes and the
tokenizer files of the demo models zen-tiny / qwen3-moe-tiny. They are written under --work and
removed at the end unless --keep-inputs. Each command runs under `/usr/bin/time -v` (peak RSS =
"Maximum resident set size"); within a repeat the cases and contenders run back to back, each after
an untimed `sync`, so the page cache is warm for all of them; medians are reported.

To time a fixed commit while zenith_merge/ is being edited, run from outside the checkout (`python -m`
puts the working folder first on sys.path) with PYTHONPATH pointing at an exported copy:
    git archive HEAD zenith_merge | tar -x -C /tmp/zsnap
    cd /tmp && PYTHONPATH=/tmp/zsnap /work/main/.venv/bin/python /work/main/bench/graft.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from common import timed, write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "zenith_merge.cli"]
MiB = 2**20

# Synthetic models. Per MoE layer: base ~216 MiB (16 experts x 12 MiB, shared expert, MLA attention),
# same-width donor ~165 MiB, narrow donor ~120 MiB. Sizes scale with the layer count.
BASE = dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1024, n_routed_experts=16,
            n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
            num_attention_heads=16, num_key_value_heads=16, q_lora_rank=768, kv_lora_rank=256,
            qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, routed_scaling_factor=2.5,
            norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", rope_interleave=True,
            max_position_embeddings=4096, tie_word_embeddings=False, vocab_size=2048)
DONOR = dict(hidden_size=2048, intermediate_size=4096, moe_intermediate_size=768, num_experts=16,
             num_experts_per_tok=4, norm_topk_prob=True, num_attention_heads=16, num_key_value_heads=4,
             head_dim=128, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096,
             tie_word_embeddings=False, vocab_size=1536)
NARROW = dict(hidden_size=1536, num_attention_heads=12)
LAYERS = {"1GB": 3, "4GB": 11}
# case -> (scale, donor width overrides, align settings)
CASES = {
    "demo": None,
    "a-1GB": ("1GB", {}, "{mode: identity}"),
    "a-4GB": ("4GB", {}, "{mode: identity}"),
    "b-4GB": ("4GB", NARROW, "{mode: fit, max_tokens: 256, calibration: [calibration.txt]}"),
}

CALIBRATION = """\
def moving_average(values, window):
    \"\"\"Mean of each run of `window` consecutive values.\"\"\"
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out

A tank holds 240 litres and drains at 8 litres a minute while a pipe fills it at 5 litres a minute.
The level falls by 8 - 5 = 3 litres each minute, so the tank is empty after 240 / 3 = 80 minutes.
Check: after 80 minutes, 640 litres have drained and 400 have flowed in; 240 + 400 - 640 = 0.

class Queue:
    def __init__(self):
        self.items = []
    def push(self, item):
        self.items.append(item)
    def pop(self):
        return self.items.pop(0)

Solve 3x + 7 = 22. Subtract 7 from both sides: 3x = 15. Divide by 3: x = 5.
"""


# ------------------------------------------------------------------ synthetic checkpoints


def demo_path(name: str) -> Path:
    out = subprocess.run([*CLI, "demo", "--print-path", name], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def synthetic(path: Path, arch_name: str, dims: dict, tokenizer_from: Path, seed: int,
              shard_bytes: int = 400 * MiB) -> Path:
    """A checkpoint with random weights, written shard by shard (one shard's tensors in memory at a time)."""
    from zenith_merge.architectures import architecture_of, expected_shape, facts, tensor_name

    special = json.loads((tokenizer_from / "config.json").read_text())
    cls = {"DeepseekV3ForCausalLM": transformers.DeepseekV3Config,
           "Qwen3MoeForCausalLM": transformers.Qwen3MoeConfig}[arch_name]
    config = cls(**dims, bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"],
                 pad_token_id=special["pad_token_id"], initializer_range=0.02, dtype="bfloat16")
    config.architectures = [arch_name]
    cfg = config.to_dict()
    arch, f = architecture_of(cfg), facts(cfg)
    attention = {"DeepseekV3ForCausalLM": ("q_a_proj", "q_a_norm", "q_b_proj", "kv_a_proj", "kv_a_norm", "kv_b_proj",
                                           "o_proj"),
                 "Qwen3MoeForCausalLM": ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}[arch_name]
    moe = ("router", "router_bias", "shared_gate", "shared_up", "shared_down") if f.n_shared_experts else ("router",)
    names = [tensor_name(arch, "embed")]
    for layer in range(f.num_layers):
        roles = ("input_norm", "post_attention_norm", *attention)
        roles += moe if layer in f.moe_layers else ("mlp_gate", "mlp_up", "mlp_down")
        names += [tensor_name(arch, r, layer) for r in roles]
        if layer in f.moe_layers:
            names += [tensor_name(arch, r, layer, e) for e in range(f.n_routed_experts)
                      for r in ("expert_gate", "expert_up", "expert_down")]
    names += [tensor_name(arch, "final_norm"), tensor_name(arch, "lm_head")]

    return write_random_checkpoint(path, config, [(n, expected_shape(cfg, n)) for n in names], seed=seed,
                                   shard_bytes=shard_bytes, tokenizer_from=tokenizer_from)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and ".zenith" not in p.parts)


def largest_tensor(path: Path) -> int:
    from zenith_merge.io.safetensors_format import read_header

    return max(e.end - e.begin for f in path.glob("*.safetensors") for e in read_header(f).tensors.values())


def prepare(case: str, work: Path) -> dict:
    """Inputs and config of one case: {config, inputs, label}."""
    zen, qwen = demo_path("zen-tiny"), demo_path("qwen3-moe-tiny")
    if case == "demo":
        return {"config": ROOT / "merge" / "config.yml", "inputs": [zen, qwen], "label": "demo (merge/config.yml)"}
    scale, donor_dims, align = CASES[case]
    layers = LAYERS[scale]
    base = synthetic(work / f"base-{scale}", "DeepseekV3ForCausalLM", {**BASE, "num_hidden_layers": layers}, zen, 1)
    width = donor_dims.get("hidden_size", DONOR["hidden_size"])
    donor = synthetic(work / f"donor{width}-{scale}", "Qwen3MoeForCausalLM",
                      {**DONOR, **donor_dims, "num_hidden_layers": layers}, qwen, 2)
    (work / "calibration.txt").write_text(CALIBRATION)
    cfg = work / f"{case}.yml"
    cfg.write_text(f"""\
base_model: {base}
architecture: DeepseekV3ForCausalLM
gate_mode: transfer
dtype: bfloat16
experts:
  - source_model: {base}
    positive_prompts: ["def main():"]
  - source_model: {donor}
    keep: all
    positive_prompts: ["Solve for x: 3x + 7 = 22."]
tokenizer:
  source: base
merge_method: concat
align: {align}
max_shard_size: 1GB
""")
    return {"config": cfg, "inputs": [base, donor], "label": f"{case} ({'identity' if 'identity' in align else 'fit'})"}


# ------------------------------------------------------------------ timing


def plan_estimate(cfg: Path, out: Path) -> tuple[int, int]:
    """(estimated peak memory: the writer's or the stages', whichever is larger; largest output tensor)
    from `zenith-merge plan --json`."""
    res = subprocess.run([*CLI, "plan", str(cfg), "--output", str(out), "--json"], capture_output=True, text=True,
                         check=True)
    est = json.loads(res.stdout)["estimates"]
    return max(est["peak_memory_bytes"], est.get("stage_memory_bytes", 0)), est["largest_tensor_bytes"]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.platform()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def run(cases: list[str], work: Path, repeats: int) -> list[dict]:
    subprocess.run([*CLI, "demo"], check=True, capture_output=True)  # builds the demo models if missing
    prepared = {c: prepare(c, work) for c in cases}
    os.sync()  # the synthetic models' dirty pages would otherwise be written back during the first repeat
    results = {c: {"cp": [], "cp+sync": [], "merge": []} for c in cases}
    out = work / "out"
    for rep in range(repeats):
        for c in cases:
            p = prepared[c]
            w = results[c]
            for name in w:
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # each contender starts with no dirty pages of the one before it
                if name == "cp":
                    out.mkdir()
                    w[name].append(timed(["cp", "-r", *map(str, p["inputs"]), str(out)]))
                elif name == "cp+sync":
                    out.mkdir()
                    w[name].append(timed(["sh", "-c", 'cp -r "$@" && sync', "sh", *map(str, p["inputs"]), str(out)]))
                else:
                    w[name].append(timed([*CLI, "merge", str(p["config"]), "--output", str(out), "--overwrite",
                                          "--no-progress"]))
                    if rep == 0:
                        p["out_bytes"], p["out_largest"] = folder_bytes(out), largest_tensor(out)
            print(f"repeat {rep + 1}/{repeats} {c}: " + ", ".join(
                f"{name} {rs[-1][0]:.1f} s / {rs[-1][1] / MiB:.0f} MiB" for name, rs in w.items()),
                file=sys.stderr, flush=True)
            shutil.rmtree(out, ignore_errors=True)
    rows = []
    for c in cases:
        p = prepared[c]
        est, _ = plan_estimate(p["config"], out)
        row = {"case": c, "label": p["label"], "in_bytes": sum(folder_bytes(i) for i in p["inputs"]),
               "out_bytes": p["out_bytes"], "largest_tensor_bytes": max(p["out_largest"],
                                                                        *(largest_tensor(i) for i in p["inputs"])),
               "plan_peak_bytes": est}
        for name, rs in results[c].items():
            row[name] = {"wall_s": statistics.median(w for w, _ in rs), "rss_bytes": statistics.median(r for _, r in rs),
                         "walls": [round(w, 2) for w, _ in rs], "rss": [r for _, r in rs]}
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | in MiB | out MiB | largest tensor MiB | contender | median wall s | speed vs cp -r "
             "| speed vs cp -r + sync | peak RSS MiB | RSS - 2x largest MiB | plan's peak estimate MiB |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    names = {"cp": "cp -r", "cp+sync": "cp -r + sync", "merge": "zenith-merge merge"}
    for r in rows:
        for name, shown in names.items():
            m = r[name]
            est = f"{r['plan_peak_bytes'] / MiB:.0f}" if name == "merge" else ""
            lines.append(f"| {r['label']} | {r['in_bytes'] / MiB:.0f} | {r['out_bytes'] / MiB:.0f} "
                         f"| {r['largest_tensor_bytes'] / MiB:.1f} | {shown} | {m['wall_s']:.2f} "
                         f"| {r['cp']['wall_s'] / m['wall_s']:.2f}x | {r['cp+sync']['wall_s'] / m['wall_s']:.2f}x "
                         f"| {m['rss_bytes'] / MiB:.0f} | {(m['rss_bytes'] - 2 * r['largest_tensor_bytes']) / MiB:.0f} "
                         f"| {est} |")
    by = {r["case"]: r["merge"]["rss_bytes"] for r in rows}
    if "a-1GB" in by and "a-4GB" in by:
        lines.append(f"\nRSS flatness (identity graft): a-4GB / a-1GB peak RSS = {by['a-4GB'] / by['a-1GB']:.2f} "
                     f"({'within' if abs(by['a-4GB'] / by['a-1GB'] - 1) <= 0.2 else 'NOT within'} 20%)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported (default 3)")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "graft",
                   help="scratch folder for synthetic models and outputs (default bench/out/graft)")
    p.add_argument("--out", type=Path, help="also write the markdown table (and a .json beside it) here")
    p.add_argument("--keep-inputs", action="store_true", help="keep the synthetic models in --work for a rerun")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        rows = run(args.cases, args.work, args.repeats)
    finally:
        shutil.rmtree(args.work / "out", ignore_errors=True)
        if not args.keep_inputs:
            shutil.rmtree(args.work, ignore_errors=True)
    text = f"machine: {machine()}\nrepeats: {args.repeats}, total {time.perf_counter() - t0:.0f} s\n\n{table(rows)}\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
