""".venv/bin/python bench/lambda_search.py [--out FILE] [--png FILE]

The assembly-weight search on merge/examples/chimera.yml (zen-tiny + zen-r1-tiny, linear weights
merged by RegMean), checked on held-out text. `zenith-merge search` chooses its weights on the demo's
calibration text; this script runs it at several allowed losses, then scores the uniform sweep,
each chosen candidate, the same sweep with plain interpolation (assembly.regmean removed) and the
R1T Chimera recipe (R1's routed experts in V3's body) on the held-out text the search never saw:

    code vs base = code_bpb / code_bpb(zen-tiny) - 1
    gap closed   = (maths(zen-tiny) - maths) / (maths(zen-tiny) - maths(zen-r1-tiny))

and draws the held-out frontier (bench/lambda_search.png by default).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml
from merge_quality import emit, report_head

from zenith_merge.checks.plots import lambda_sweep_plot
from zenith_merge.config import parse_config
from zenith_merge.demo import heldout_text
from zenith_merge.search import CandidateScorer, check_searchable, run_search

ROOT = Path(__file__).resolve().parents[1]
CHIMERA = ROOT / "merge" / "examples" / "chimera.yml"
MAX_LOSSES = (0.02, 0.025, 0.03)
R1T = {"default": [1.0, 0.0], "routed_experts": [0.0, 1.0]}


WORK = ROOT / "bench" / "out" / "lambda_search"


def heldout_scorer(data: dict) -> tuple[CandidateScorer, tuple[float, float], tuple[float, float]]:
    """A candidate scorer on the held-out code (keep) and maths (gain), with both parents' scores."""
    cfg = parse_config(data)
    scorer = CandidateScorer(cfg, CHIMERA.parent, check_searchable(cfg), WORK)
    scorer.texts = {"keep": heldout_text("code"), "gain": heldout_text("maths")}
    return scorer, scorer({"default": [1.0, 0.0]}), scorer({"default": [0.0, 1.0]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    ap.add_argument("--png", type=Path, default=ROOT / "bench" / "lambda_search.png", help="the held-out plot")
    args = ap.parse_args()
    t_start = time.perf_counter()
    data = yaml.safe_load(CHIMERA.read_text())
    plain = {**data, "assembly": {k: v for k, v in data["assembly"].items() if k != "regmean"}}
    held, first, second = heldout_scorer(data)
    held_plain = heldout_scorer(plain)[0]

    def on_heldout(weights: dict, scorer: CandidateScorer = held) -> tuple[float, float]:
        keep, gain = scorer(weights)
        return 100 * (keep / first[0] - 1), 100 * (first[1] - gain) / (first[1] - second[1])

    rows, chosen = [], []
    for max_loss in MAX_LOSSES:
        t0 = time.perf_counter()
        result = run_search(parse_config({**data, "search": {**data["search"], "max_loss": max_loss}}),
                            config_dir=CHIMERA.parent, progress=False, work_dir=WORK)
        seconds = time.perf_counter() - t0
        best = result.best
        h = on_heldout(best.candidate.weights(result.given))
        chosen.append((max_loss, h))
        lams = " ".join(f"{c} {lam:g}" for c, lam in best.candidate.lambdas)
        rows.append(f"| search, max_loss {100 * max_loss:g}% ({best.candidate.origin}; {len(result.scores)} "
                    f"candidates, {seconds:.0f} s): {lams} | {100 * best.loss:+.2f}% | {100 * best.gap:.1f}% | "
                    f"{h[0]:+.2f}% | {h[1]:.1f}% |")
    sweep = []
    for s in result.sweep():
        lam = s.candidate.lambdas[0][1]
        h = on_heldout(s.candidate.weights(result.given))
        sweep.append((lam, *h))
        rows.append(f"| RegMean, uniform lambda {lam:g} | {100 * s.loss:+.2f}% | {100 * s.gap:.1f}% | {h[0]:+.2f}% | "
                    f"{h[1]:.1f}% |")
    interpolated = []
    for s in result.sweep():
        lam = s.candidate.lambdas[0][1]
        h = on_heldout(s.candidate.weights(result.given), held_plain)
        interpolated.append((lam, *h))
        rows.append(f"| plain interpolation, uniform lambda {lam:g} | | | {h[0]:+.2f}% | {h[1]:.1f}% |")
    r1t = on_heldout(R1T)
    rows.append(f"| R1T Chimera recipe: routed experts from zen-r1-tiny, rest zen-tiny | | | {r1t[0]:+.2f}% | "
                f"{r1t[1]:.1f}% |")
    lambda_sweep_plot(args.png, sweep=sweep, refined=[h for _, h in chosen[1:]], best=chosen[0][1], max_loss=3.0,
                      keep_name="held-out code", gain_name="held-out maths", marked={"R1T recipe": r1t},
                      sweep_label="RegMean, uniform lambda (every class)",
                      baseline=("plain interpolation, uniform lambda", interpolated),
                      labels=("search's choice at max_loss " + ", ".join(f"{100 * m:g}%" for m, _ in chosen[1:]),
                              f"search's choice at max_loss {100 * chosen[0][0]:g}% (chimera.yml)"))
    report = "\n".join([
        *report_head(".venv/bin/python bench/lambda_search.py", t_start),
        "",
        "| candidate | search text: code vs zen-tiny | search text: gap closed | held-out: code vs zen-tiny | "
        "held-out: gap closed |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"held-out: {len(heldout_text('code').encode())} bytes of code, {len(heldout_text('maths').encode())} bytes "
        f"of maths; zen-tiny {first[0]:.4f} / {first[1]:.4f}, zen-r1-tiny {second[0]:.4f} / {second[1]:.4f} bits per "
        f"byte (code / maths). Plot: {args.png.name} (the star: the search at max_loss 2%, chimera.yml's weights).",
    ])
    emit(report, args.out)


if __name__ == "__main__":
    main()
