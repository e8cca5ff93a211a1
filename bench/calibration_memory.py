"""Peak RSS of the merge's calibration stages against the number of layers, with and without the memory caps.

    .venv/bin/python bench/calibration_memory.py          # 2 and 8 layers, capped and uncapped, 3 repeats
    .venv/bin/python bench/calibration_memory.py --repeats 1 --keep --work /tmp/cm --out /tmp/cm.md

The claim checked (issue 5): with `calibration_max_memory` (accelerate offloads the forward passes'
weights and reads them from disk layer by layer) and `align.max_memory` (the alignment fit's float64
statistics, 8 (d_base + d_donor)^2 bytes per layer pair, fitted in groups of pairs that fit, one pass
over the calibration text per group), the peak RSS of `zenith-merge align` does not grow with depth.

Inputs: a synthetic cross-architecture pair with seeded random bf16 weights (std 0.02, norms 1), written
tensor by tensor with safetensors (bench/common.py via bench/graft.py's `synthetic`), at each depth in
--layers and otherwise identical:
- base: DeepseekV3ForCausalLM, hidden 1024, first layer dense (intermediate 2816), the others MoE with
  16 routed experts of 512 in 4 groups, top-4, 1 shared expert, MLA; zen-tiny's tokenizer (vocab 2048);
- donor: Qwen3MoeForCausalLM, hidden 768, every layer MoE with 16 experts of 512, top-4, GQA 12/4 heads;
  qwen3-moe-tiny's tokenizer (vocab 1536).
At 8 layers the base is ~400 MiB and the donor ~300 MiB; at 2 layers about a quarter of that.

Config: the donor's experts grafted into the base (`keep: all`, `gate_mode: random`, `tokenizer.source:
base`), `align: {mode: fit, calibration: [demo:code], max_tokens: 2000}`: one layer pair per base MoE
layer (1 at 2 layers, 7 at 8 layers), two models' forward passes over the same text. Two variants:
- `capped`: `calibration_max_memory: 1MB` and `align.max_memory` = one layer pair's statistics
  (8 (1024 + 768)^2 = 24.5 MiB), so each pair is fitted in its own pass over the text;
- `uncapped`: neither key: both models resident, all pairs' statistics in one pass.
Each run is `zenith-merge align CONFIG --output DIR --overwrite --no-progress` under `/usr/bin/time -v`
(peak RSS = "Maximum resident set size"; beside it RssAnon / RssFile from /proc/PID/status at the
largest of samples taken every 50 ms: anonymous memory vs mapped files such as checkpoint pages), after
an untimed `sync`, into a freshly removed folder; the four (depth, variant) runs are interleaved in each
repeat (order rotated) and medians reported. The stage estimate of `zenith-merge plan CONFIG` ("stages
(forward passes) hold about ...") is shown beside them. The work folder is removed at the end unless --keep.

To time a fixed state of zenith_merge while it is being edited, run from outside the checkout
(`python -m` puts the working folder first on sys.path) with PYTHONPATH pointing at a copy:
    cp -r zenith_merge /tmp/zsnap/ && cd /tmp && PYTHONPATH=/tmp/zsnap /work/main/.venv/bin/python \\
        /work/main/bench/calibration_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from graft import BASE as GRAFT_BASE
from graft import DONOR as GRAFT_DONOR
from graft import demo_path, machine, synthetic

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "zenith_merge.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
MiB = 2**20

# graft.py's synthetic models, made smaller (the 8-layer pair stays under 1 GB)
BASE = {**GRAFT_BASE, "hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 512,
        "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 384}
DONOR = {**GRAFT_DONOR, "hidden_size": 768, "intermediate_size": 2048, "moe_intermediate_size": 512,
         "num_attention_heads": 12, "head_dim": 64}
PAIR_BYTES = 8 * (BASE["hidden_size"] + DONOR["hidden_size"]) ** 2  # one layer pair's float64 statistics
VARIANTS = ("capped", "uncapped")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_config(work: Path, layers: int, variant: str, zen: Path, qwen: Path) -> Path:
    base = synthetic(work / f"base-{layers}L", "DeepseekV3ForCausalLM", {**BASE, "num_hidden_layers": layers}, zen, 1)
    donor = synthetic(work / f"donor-{layers}L", "Qwen3MoeForCausalLM", {**DONOR, "num_hidden_layers": layers}, qwen, 2)
    capped = variant == "capped"
    align = "{mode: fit, calibration: [demo:code], max_tokens: 2000" + (f", max_memory: {PAIR_BYTES}" if capped else "")
    cfg = work / f"{variant}-{layers}L.yml"
    cfg.write_text(f"""\
base_model: {base}
architecture: DeepseekV3ForCausalLM
gate_mode: random
dtype: bfloat16
experts:
  - source_model: {base}
  - source_model: {donor}
    keep: all
tokenizer:
  source: base
merge_method: concat
align: {align}}}
""" + ("calibration_max_memory: 1MB\n" if capped else ""))
    return cfg


def plan_stage(cfg: Path, out: Path) -> tuple[int, int]:
    """(`stage_memory_bytes`, number of aligned layer pairs) from `zenith-merge plan --json`."""
    res = subprocess.run([*CLI, "plan", str(cfg), "--output", str(out), "--json"], capture_output=True, text=True,
                         check=True, env=ENV)
    plan = json.loads(res.stdout)
    pairs = sum(len(p) for p in ((plan.get("stages") or {}).get("align") or {}).values())
    return plan["estimates"]["stage_memory_bytes"], pairs


def plan_line(cfg: Path, out: Path) -> str:
    res = subprocess.run([*CLI, "plan", str(cfg), "--output", str(out)], capture_output=True, text=True, check=True,
                         env=ENV)
    return next((line.strip() for line in res.stdout.splitlines() if "forward passes) hold about" in line), "")


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile (bytes) of a live process; {} once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|RssAnon|RssFile):\s+(\d+) kB", text, re.M)}


def timed(cmd: list[str], log: Path) -> tuple[float, int, int, int]:
    """Wall seconds and peak RSS (bytes) of `cmd` under /usr/bin/time -v, plus its anonymous and file-backed
    RSS at the largest of samples taken every 50 ms (file-backed: mapped files, e.g. checkpoint pages);
    its output kept in `log`."""
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    best: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:  # /usr/bin/time's child is the command
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        while not done.wait(0.05):
            try:
                pids = children.read_text().split()
            except OSError:
                continue
            st = _status(int(pids[0])) if pids else {}
            if st.get("VmRSS", 0) > best.get("VmRSS", 0):
                best.update(st)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}), log {log}:\n{stderr[-4000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    return wall, rss_kb * 1024, best.get("RssAnon", 0), best.get("RssFile", 0)


def run(work: Path, layer_counts: list[int], repeats: int) -> list[dict]:
    subprocess.run([*CLI, "demo"], check=True, capture_output=True, env=ENV)  # builds the demo models if missing
    zen, qwen = demo_path("zen-tiny"), demo_path("qwen3-moe-tiny")
    t0 = time.perf_counter()
    cases = [(n, v) for n in layer_counts for v in VARIANTS]
    cfgs = {c: write_config(work, *c, zen, qwen) for c in cases}
    print(f"inputs ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    os.sync()
    out, logs = work / "out", work / "logs"
    logs.mkdir(exist_ok=True)
    times: dict = {c: [] for c in cases}
    for rep in range(repeats):
        order = cases[rep % len(cases):] + cases[:rep % len(cases)]
        for c in order:
            shutil.rmtree(out, ignore_errors=True)
            times[c].append(timed([*CLI, "align", str(cfgs[c]), "--output", str(out), "--overwrite", "--no-progress"],
                                  logs / f"{c[1]}-{c[0]}L-{rep}.log"))
            w, rss, anon, file = times[c][-1]
            print(f"repeat {rep + 1}/{repeats} {c[0]} layers {c[1]}: {w:.1f} s, {rss / MiB:.0f} MiB "
                  f"(sampled peak: anon {anon / MiB:.0f}, file {file / MiB:.0f})", file=sys.stderr, flush=True)
    shutil.rmtree(out, ignore_errors=True)
    rows = []
    for c in cases:
        layers, variant = c
        est, pairs = plan_stage(cfgs[c], out)
        col = list(zip(*times[c]))  # walls, peak RSS, sampled anon, sampled file
        rows.append({
            "layers": layers, "variant": variant, "pairs": pairs,
            "base_bytes": folder_bytes(work / f"base-{layers}L"),
            "donor_bytes": folder_bytes(work / f"donor-{layers}L"),
            "plan_stage_bytes": est, "plan_line": plan_line(cfgs[c], out),
            "wall_s": statistics.median(col[0]), "rss_bytes": statistics.median(col[1]),
            "anon_bytes": statistics.median(col[2]), "file_bytes": statistics.median(col[3]),
            "walls": [round(w, 2) for w in col[0]], "rss": list(col[1]),
        })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| layers | pairs | base + donor MiB | variant | median peak RSS MiB | sampled peak: anon / file MiB "
             "| median wall s | plan's stage estimate MiB | peak RSS MiB, each run | wall s, each run |",
             "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["variant"], r["layers"])):
        lines.append(
            f"| {r['layers']} | {r['pairs']} | {(r['base_bytes'] + r['donor_bytes']) / MiB:.0f} | {r['variant']} "
            f"| {r['rss_bytes'] / MiB:.0f} | {r['anon_bytes'] / MiB:.0f} / {r['file_bytes'] / MiB:.0f} "
            f"| {r['wall_s']:.1f} | {r['plan_stage_bytes'] / MiB:.0f} "
            f"| {', '.join(f'{x / MiB:.0f}' for x in r['rss'])} | {', '.join(f'{w:.1f}' for w in r['walls'])} |")
    by = {(r["layers"], r["variant"]): r["rss_bytes"] for r in rows}
    lo, hi = min(r["layers"] for r in rows), max(r["layers"] for r in rows)
    if lo != hi:
        lines.append("")
        for v in VARIANTS:
            d = by[hi, v] - by[lo, v]
            lines.append(f"{v}: peak RSS at {hi} layers - at {lo} layers = {d / MiB:+.0f} MiB "
                         f"({by[hi, v] / by[lo, v]:.2f}x)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8], help="depths to compare (default 2 8)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported (default 3)")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "calibration_memory",
                   help="scratch folder for the synthetic models, configs, outputs and logs")
    p.add_argument("--out", type=Path, help="also write the markdown table (and a .json beside it) here")
    p.add_argument("--keep", action="store_true", help="keep --work (models, configs, logs) for a rerun")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        rows = run(args.work, args.layers, args.repeats)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    text = (f"machine: {machine()}\nrepeats: {args.repeats}, total {time.perf_counter() - t0:.0f} s\n"
            f"align.max_memory (capped): {PAIR_BYTES} bytes = one layer pair's statistics\n\n{table(rows)}\n")
    print(text)
    for r in rows:
        print(f"plan, {r['layers']} layers {r['variant']}: {r['plan_line']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
