"""Peak RSS and time of RegMean's statistics in one pass against bounded passes (`assembly.regmean.max_memory`).

    .venv/bin/python bench/regmean_memory.py                 # 3 repeats, max_memory 100MB
    .venv/bin/python bench/regmean_memory.py --repeats 1 --max-memory 50MB --keep --work /tmp/rm --out /tmp/rm.md

The claim checked (issue 5, RegMean for same-family assembly): with `max_memory`, a parent's float64
statistics are computed in groups that fit, one pass over the text each (each pass ending at its
group's deepest layer), so the stage holds at most one group's sums; without it, one pass holds them all.

Inputs: two same-family synthetic parents with seeded random bf16 weights (bench/graft.py's `synthetic`,
the base dimensions of bench/calibration_memory.py): DeepseekV3ForCausalLM, hidden 1024, 4 layers (the
first dense, intermediate 2816), 16 routed experts of 512, 1 shared expert, MLA (q_lora 384, 8 heads);
zen-tiny's tokenizer. The parents differ only in their seed. Config: `merge_method: assembly`, weights
0.7 / 0.3, `regmean: {data: [[demo:code], [demo:maths]], max_tokens: 1000}` on the default classes
(attention, lm_head, routed and shared experts, dense MLP): about 0.65 GB of float64 sums per parent in
one pass. Each run is `zenith-merge align CONFIG --output DIR --overwrite --no-progress` (both parents'
statistics, nothing else) under `/usr/bin/time -v`, the two variants interleaved in each repeat, medians
reported; the passes and the largest group's sums are the plan's (`zenith-merge plan --json`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from calibration_memory import BASE, CLI, ENV, MiB, timed
from graft import demo_path, machine, synthetic

from zenith_merge.config import parse_byte_size

DIMS = {**BASE, "num_hidden_layers": 4}


def write_config(work: Path, zen: Path, max_memory: int | None) -> Path:
    """The assembly config of the two synthetic parents, with or without `max_memory`."""
    a = synthetic(work / "parent-a", "DeepseekV3ForCausalLM", DIMS, zen, 1)
    b = synthetic(work / "parent-b", "DeepseekV3ForCausalLM", DIMS, zen, 2)
    cfg = work / ("bounded.yml" if max_memory else "one-pass.yml")
    bound = f", max_memory: {max_memory}" if max_memory else ""
    cfg.write_text(f"""\
base_model: {a}
gate_mode: random
experts:
  - source_model: {a}
  - source_model: {b}
merge_method: assembly
assembly:
  weights: {{default: [0.7, 0.3]}}
  regmean: {{data: [[demo:code], [demo:maths]], max_tokens: 1000{bound}}}
routing_report: false
""")
    return cfg


def plan_stage(cfg: Path, out: Path) -> dict:
    """The first parent's RegMean stage as the plan has it (passes, sum_bytes, matrices)."""
    res = subprocess.run([*CLI, "plan", str(cfg), "--output", str(out), "--json"], capture_output=True, text=True,
                         check=True, env=ENV)
    return json.loads(res.stdout)["stages"]["regmean"]["base"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-memory", default="100MB", help="the bounded variant's assembly.regmean.max_memory")
    ap.add_argument("--work", type=Path, default=Path("/tmp/zenith-regmean-memory"))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic parents and outputs")
    ap.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    subprocess.run([*CLI, "demo"], check=True, capture_output=True, env=ENV)  # builds the demo models if missing
    zen = demo_path("zen-tiny")
    t0 = time.perf_counter()
    configs = {"one pass": write_config(args.work, zen, None),
               f"max_memory {args.max_memory}": write_config(args.work, zen, parse_byte_size(args.max_memory))}
    stages = {name: plan_stage(cfg, args.work / "plan-out") for name, cfg in configs.items()}
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in configs}
    for r in range(args.repeats):
        for name, cfg in (list(configs.items()) if r % 2 == 0 else list(configs.items())[::-1]):
            out = args.work / f"out-{cfg.stem}"
            wall, rss, _, _ = timed([*CLI, "align", str(cfg), "--output", str(out), "--overwrite", "--no-progress"],
                                    args.work / f"{cfg.stem}-{r}.log")
            runs[name].append((wall, rss))
            print(f"{name} repeat {r + 1}: {wall:.1f} s, {rss / MiB:.0f} MiB", flush=True)
    files = {name: (args.work / f"out-{cfg.stem}" / ".zenith" / "regmean-base.safetensors").read_bytes()
             for name, cfg in configs.items()}
    same = len(set(files.values())) == 1
    one = list(configs)[0]
    med = {name: (statistics.median(w for w, _ in rs), statistics.median(m for _, m in rs)) for name, rs in runs.items()}
    lines = [f"machine: {machine()}",
             f"command: `.venv/bin/python bench/regmean_memory.py --repeats {args.repeats} --max-memory "
             f"{args.max_memory}`, total wall {time.perf_counter() - t0:.0f} s", "",
             "| variant | passes per parent | float64 sums at once (plan) | median wall s | vs one pass | "
             "median peak RSS MiB | vs one pass | each run: wall s / peak MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, rs in runs.items():
        st, (wall, rss) = stages[name], med[name]
        lines.append(f"| {name} | {st['passes']} | {st['sum_bytes'] / MiB:.0f} MiB | {wall:.1f} | "
                     f"{wall / med[one][0]:.2f}x | {rss / MiB:.0f} | {rss / med[one][1]:.2f}x | "
                     + ", ".join(f"{w:.1f} / {m / MiB:.0f}" for w, m in rs) + " |")
    lines += ["", f"statistics files of the two variants byte-identical: {'yes' if same else 'NO'} "
                  f"({stages[one]['matrices']} matrices per parent)"]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
