""".venv/bin/python bench/yaml_methods.py [--out FILE] [--quick]

The same-family method table of issue 23: mergekit-yaml's methods over the two Zen children (zen-tiny:
code, zen-r1-tiny: maths with <think>), relative to their parent zen-parent where the method takes a base,
beside RegMean assembly (merge/examples/chimera.yml, weights from `zenith-merge search`).

For each method, `zenith-merge search` scores every combination of a small parameter grid (zen-r1-tiny's
weight `models.1.weight` against zen-tiny's 1.0, and the method's own parameters) on the calibration text (keep: demo:code, gain: demo:maths; the search's own split, never the held-out text)
and picks the candidate closing the most of the maths gap within 3% of zen-tiny's code (the search's
rule). That candidate is then merged by its own `zenith-merge merge` process (wall seconds and peak RSS
under /usr/bin/time) and scored on the held-out text:

    code vs base = code_bpb / code_bpb(zen-tiny) - 1
    gap closed   = (maths(zen-tiny) - maths) / (maths(zen-tiny) - maths(zen-r1-tiny))

`--quick` searches a grid of two values per parameter.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import timed
from merge_quality import emit, gap, heldout_texts, report_head, score

from zenith_merge.config import load_config
from zenith_merge.demo import ensure_demo
from zenith_merge.search import run_search

ROOT = Path(__file__).resolve().parents[1]
CHIMERA = ROOT / "merge" / "examples" / "chimera.yml"
CHILDREN = ("demo://zen-tiny", "demo://zen-r1-tiny")
PARENT = "demo://zen-parent"
MAX_LOSS = 0.03

# method -> (parameters searched with their grids: top-level names, or models.<i>.<name> for one model's; fixed
# top-level parameters; takes a base). models.0 is zen-tiny, models.1 zen-r1-tiny: their task vectors are
# weighed separately, since the merge should keep zen-tiny's code and take zen-r1-tiny's maths.
W1 = [0.25, 0.5, 0.75, 1.0]
GRIDS = {
    "linear": ({"models.1.weight": [0.2, 0.35, 0.5, 0.65, 0.8]}, {}, False),
    "task_arithmetic": ({"models.1.weight": W1, "lambda": [0.8, 1.0, 1.2]}, {}, True),
    "ties": ({"models.1.weight": W1, "density": [0.3, 0.6, 0.9]}, {}, True),
    "dare_ties": ({"models.1.weight": W1, "density": [0.3, 0.6, 0.9]}, {}, True),
    "della": ({"models.1.weight": W1, "density": [0.4, 0.6, 0.8]}, {"epsilon": 0.15}, True),
    "breadcrumbs_ties": ({"models.1.weight": W1, "density": [0.6, 0.9]}, {"gamma": 0.01}, True),
    "slerp": ({"t": [0.2, 0.35, 0.5, 0.65, 0.8]}, {}, True),
    "nuslerp": ({"models.1.weight": [0.2, 0.35, 0.5, 0.65, 0.8]}, {}, True),
    "model_stock": ({}, {}, True),
}


def config(method: str, point: dict, out: Path) -> dict:
    """The mergekit-yaml config of `method` at the searched `point`."""
    grid, fixed, with_base = GRIDS[method]
    data: dict = {"merge_method": method, "dtype": "float32", "out_dtype": "bfloat16", "output_dir": str(out),
                  "parameters": dict(fixed), "models": [{"model": c, "parameters": {}} for c in CHILDREN]}
    if method == "slerp":  # slerp takes the base (zen-tiny, t = 0) and one other (zen-r1-tiny, t = 1)
        data["base_model"] = CHILDREN[0]
    elif with_base:
        data["base_model"] = PARENT
    if method in ("linear", "nuslerp"):  # zen-tiny's weight is 1 - zen-r1-tiny's
        data["models"][0]["parameters"]["weight"] = round(1 - point.get("models.1.weight", 0.5), 4)
    elif method not in ("slerp", "model_stock"):
        data["models"][0]["parameters"]["weight"] = 1.0
    for key, value in point.items():
        if key.startswith("models."):
            _, i, name = key.split(".")
            data["models"][int(i)]["parameters"][name] = value
        else:
            data["parameters"][key] = value
    return data


def search(method: str, quick: bool, work: Path) -> tuple[dict, str]:
    """The grid point `zenith-merge search` picks for `method` (on calibration text), and an account of it."""
    grid, _, _ = GRIDS[method]
    if not grid:
        return {}, "no parameter"
    if quick:
        grid = {k: v[:: max(1, len(v) // 2)][:2] for k, v in grid.items()}
    if method in ("linear", "nuslerp"):  # zen-tiny's weight follows zen-r1-tiny's (1 - w): one config per point
        return _sweep_pairs(method, grid, work)
    data = config(method, {k: v[0] for k, v in grid.items()}, work / "unused") | {
        "search": {"keep": ["demo:code"], "gain": ["demo:maths"], "max_loss": MAX_LOSS, "parameters": grid}}
    path = work / f"{method}.yml"
    path.write_text(yaml.safe_dump(data))
    result = run_search(load_config(path), config_dir=work, progress=False, work_dir=work / f"{method}-search")
    best = result.best
    return dict(best.candidate.lambdas), _account(len(result.scores), best.loss, best.gap, best.feasible)


def _account(n: int, loss: float, gap: float, feasible: bool) -> str:
    return (f"{n} candidates; calibration: keep {100 * loss:+.2f}%, gap {100 * gap:.1f}%"
            + ("" if feasible else f" (none within {100 * MAX_LOSS:g}%: least loss)"))


def _sweep_pairs(method: str, grid: dict, work: Path) -> tuple[dict, str]:
    from zenith_merge.search import CandidateScorer, one_parent

    scores = []
    for w in grid["models.1.weight"]:
        path = work / f"{method}-{w}.yml"
        path.write_text(yaml.safe_dump(config(method, {"models.1.weight": w}, work / "unused")
                                       | {"search": {"keep": ["demo:code"], "gain": ["demo:maths"]}}))
        cfg = load_config(path)
        scorer = CandidateScorer(cfg, work, cfg.search, work / f"{method}-work")
        keep, gain = scorer.score(cfg)
        first, second = scorer.score(one_parent(cfg, 0)), scorer.score(one_parent(cfg, 1))
        scores.append((w, keep / first[0] - 1, (first[1] - gain) / (first[1] - second[1])))
    feasible = [x for x in scores if x[1] <= MAX_LOSS]
    w, loss, g = max(feasible, key=lambda x: x[2]) if feasible else min(scores, key=lambda x: x[1])
    return {"models.1.weight": w}, _account(len(scores), loss, g, bool(feasible))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also write the report to this file")
    ap.add_argument("--quick", action="store_true", help="two values per searched parameter")
    ap.add_argument("--methods", nargs="*", default=list(GRIDS))
    args = ap.parse_args()
    t0 = time.perf_counter()
    for name in ("zen-tiny", "zen-r1-tiny", "zen-parent"):
        ensure_demo(name, progress=False)
    texts = heldout_texts()
    base = score(ensure_demo("zen-tiny", progress=False), texts)
    donor = score(ensure_demo("zen-r1-tiny", progress=False), texts)
    parent = score(ensure_demo("zen-parent", progress=False), texts)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for method in args.methods:
            point, how = search(method, args.quick, work)
            out = work / f"{method}-out"
            path = work / f"{method}-best.yml"
            path.write_text(yaml.safe_dump(config(method, point, out)))
            wall, rss = timed([sys.executable, "-m", "zenith_merge.cli", "merge", str(path), "--no-progress"])
            s = score(out, texts)
            rows.append((method, ", ".join(f"{k} {v:g}" for k, v in sorted(point.items())) or "-", how, s, wall, rss))
            print(f"{method}: {rows[-1][1]} -> code {s['code']:.4f}, maths {s['maths']:.4f}", file=sys.stderr)
        out = work / "chimera-out"
        wall, rss = timed([sys.executable, "-m", "zenith_merge.cli", "merge", str(CHIMERA), "--output", str(out),
                           "--no-progress"])
        rows.append(("assembly + RegMean (chimera.yml)", "searched class weights", "zenith-merge search",
                     score(out, texts), wall, rss))
    lines = report_head(shlex.join(sys.argv), t0) + [
        "", "| method | parameters (picked on calibration text) | search | code bpb | maths bpb | code vs base | "
            "maths gap closed | merge s | peak RSS MiB |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, params, how, s, wall, rss in rows:
        lines.append(f"| {method} | {params} | {how} | {s['code']:.4f} | {s['maths']:.4f} | "
                     f"{100 * (s['code'] / base['code'] - 1):+.2f}% | {gap(base['maths'], s['maths'], donor['maths']):.1f}% "
                     f"| {wall:.1f} | {rss / 2**20:.0f} |")
    lines += ["", f"zen-tiny: code {base['code']:.4f}, maths {base['maths']:.4f}; zen-r1-tiny: code {donor['code']:.4f}, "
                  f"maths {donor['maths']:.4f}; zen-parent: code {parent['code']:.4f}, maths {parent['maths']:.4f} "
                  f"bits per byte (held-out text)."]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
