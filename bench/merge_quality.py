""".venv/bin/python bench/merge_quality.py [--out FILE]

Merge quality on the demo models: held-out bits per byte of each source and each merge.

    .venv/bin/python bench/merge_quality.py                    # prints a markdown report
    .venv/bin/python bench/merge_quality.py --out /tmp/mq.md   # also writes it there

Runs the same-family merges (zen-tiny + zen-r1-tiny: the R1T Chimera recipe, the searched RegMean weights
of merge/examples/chimera.yml and the same weights plainly interpolated, interpolation variants, and
merge/examples/chimera_concat.yml;
then an ablation taking one tensor class at a time from zen-r1-tiny, to see where its maths
advantage lives, and a check that all-zen-r1-tiny weights reproduce zen-r1-tiny)
and the cross-architecture graft of merge/config.yml (zen-tiny + 4 experts of qwen3-moe-tiny)
with a random-router control, each into a temporary folder. Every model is loaded in float32
and scored on the held-out code, maths and Qwen-chat maths text (DESIGN.md "Quality yardstick"):

    gap closed = (base - merged) / (base - donor), in bits per byte on the donor's domain
    code vs base = merged_code / base_code - 1

The donor is zen-r1-tiny for same-family merges and qwen3-moe-tiny for the graft. The base is
zen-tiny throughout. The controls (the donor's experts replaced by random ones of equal norm,
`experts[].random_experts`; a base-only adapter) and the full method table are in
bench/method_table.py.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from zenith_merge.config import parse_config
from zenith_merge.demo import bits_per_byte, ensure_demo, heldout_text
from zenith_merge.pipeline import run_merge

ROOT = Path(__file__).resolve().parents[1]
BASE, SAME_DONOR, CROSS_DONOR = "zen-tiny", "zen-r1-tiny", "qwen3-moe-tiny"
TEXTS = ("code", "maths", "maths_chat")
SAME_TARGET_GAP, SAME_TARGET_CODE, CROSS_TARGET_CODE = 60.0, 3.0, 2.0  # DESIGN.md "Quality yardstick", in %


@dataclass
class Merge:
    """One merge: a config file, optionally edited, and the donor its gap is measured against."""

    label: str
    config: Path
    family: str  # "same" (donor zen-r1-tiny) or "cross" (donor qwen3-moe-tiny)
    edit: Callable[[dict], None] | None = None
    note: str = ""


def _weights(weights: dict[str, list[float]], regmean: bool = False) -> Callable[[dict], None]:
    """These assembly weights, plainly interpolated (chimera.yml's RegMean removed) unless `regmean`."""
    def edit(d: dict) -> None:
        d["assembly"]["weights"] = weights
        if not regmean:
            d["assembly"].pop("regmean", None)
    return edit


def _plain(d: dict) -> None:
    d["assembly"].pop("regmean", None)


def _gate(mode: str) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        d["gate_mode"] = mode
    return edit


CHIMERA = ROOT / "merge" / "examples" / "chimera.yml"
def _then(*edits: Callable[[dict], None]) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        for e in edits:
            e(d)
    return edit


def _calibrated(d: dict) -> None:
    d["router"] = {"calibrate": True}


def _trained(steps: int, calibrate: bool = False) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        d["router"] = {"calibrate": calibrate, "train_steps": steps, "lr": 1e-2}
    return edit


MERGES = [
    Merge("chimera (R1 routed experts, rest zen-tiny)", CHIMERA, "same",
          _weights({"default": [1.0, 0.0], "routed_experts": [0.0, 1.0]})),
    Merge("merge/examples/chimera.yml (RegMean, per-class weights from zenith-merge search)", CHIMERA, "same"),
    Merge("chimera.yml's weights, plainly interpolated (no RegMean)", CHIMERA, "same", _plain),
    Merge("assembly: RegMean, all classes 0.7/0.3", CHIMERA, "same", _weights({"default": [0.7, 0.3]}, regmean=True)),
    Merge("assembly: routed experts 0.5/0.5, rest zen-tiny", CHIMERA, "same",
          _weights({"default": [1.0, 0.0], "routed_experts": [0.5, 0.5]})),
    Merge("assembly: R1 routed experts + R1 router", CHIMERA, "same",
          _weights({"default": [1.0, 0.0], "routed_experts": [0.0, 1.0], "router": [0.0, 1.0]})),
    Merge("assembly: all tensors 0.5/0.5", CHIMERA, "same", _weights({"default": [0.5, 0.5]})),
    Merge("assembly: all tensors 0.3/0.7", CHIMERA, "same", _weights({"default": [0.3, 0.7]})),
    Merge("concat: 16 experts, merge/examples/chimera_concat.yml (hidden router rows)",
          ROOT / "merge" / "examples" / "chimera_concat.yml", "same"),
    # per-class ablation: zen-tiny everywhere but one tensor class, taken from zen-r1-tiny
    *(Merge(f"ablation: only {c} from zen-r1-tiny", CHIMERA, "same",
            _weights({"default": [1.0, 0.0], c: [0.0, 1.0]}))
      for c in ("embeddings", "lm_head", "norms", "attention", "router", "shared_experts", "dense_mlp")),
    Merge("ablation: all but routed experts from zen-r1-tiny", CHIMERA, "same",
          _weights({"default": [0.0, 1.0], "routed_experts": [1.0, 0.0]})),
    Merge("check: all tensors from zen-r1-tiny (should equal it)", CHIMERA, "same", _weights({"default": [0.0, 1.0]})),
    Merge("graft: merge/config.yml (uniform_random router rows)", ROOT / "merge" / "config.yml", "cross"),
    Merge("graft: transfer router rows (uncalibrated)", ROOT / "merge" / "config.yml", "cross",
          _then(_gate("transfer"), _trained(0))),
    Merge("graft control: random router rows", ROOT / "merge" / "config.yml", "cross", _gate("random")),
    Merge("graft: transfer rows, calibrated offsets (router.calibrate)", ROOT / "merge" / "config.yml", "cross",
          _then(_gate("transfer"), _calibrated)),
    Merge("graft: transfer rows + 100 router-training steps (donor rows, lr 1e-2)", ROOT / "merge" / "config.yml",
          "cross", _then(_gate("transfer"), _trained(100))),
    Merge("graft: calibrated offsets + 100 router-training steps", ROOT / "merge" / "config.yml", "cross",
          _then(_gate("transfer"), _trained(100, calibrate=True))),
]


@dataclass
class Row:
    label: str
    family: str  # "source", "same", "cross"
    bpb: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None


def machine() -> str:
    """nproc, memory, CPU model and torch version, in one line."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"nproc {os.cpu_count()}, {mem:.0f} GiB RAM, {cpu}, {platform.system()} {platform.release()}, "
            f"torch {torch.__version__}")


def score(folder: Path, texts: dict[str, str]) -> dict[str, float]:
    """Held-out bits per byte of the model in `folder` (loaded in float32) on each text."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    return {k: bits_per_byte(model, tok, t) for k, t in texts.items()}


def run_one(m: Merge, out: Path) -> None:
    """Merge `m` into `out` through the library (config dict edited, then validated)."""
    data = yaml.safe_load(m.config.read_text())
    data = copy.deepcopy(data)
    if m.edit:
        m.edit(data)
    cfg = parse_config(data, where=f"{m.config.relative_to(ROOT)} ({m.label})")
    run_merge(cfg, config_dir=m.config.parent, output_dir=out, progress=False)


def gap(base: float, merged: float, donor: float) -> float:
    return 100.0 * (base - merged) / (base - donor)


def table(rows: list[Row]) -> str:
    by = {r.label: r for r in rows}
    base = by[BASE].bpb
    lines = ["| model / merge | merge s | code bpb | maths bpb | maths (Qwen chat) bpb | code vs base | "
             "maths gap closed | maths (chat) gap closed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        secs = "" if r.seconds is None else f"{r.seconds:.1f}"
        if r.error:
            lines.append(f"| {r.label} | {secs} | failed: {r.error} | | | | | |")
            continue
        b = r.bpb
        cells = [f"{b[k]:.4f}" for k in TEXTS]
        code = f"{100 * (b['code'] / base['code'] - 1):+.2f}%"
        if r.family == "source":
            g1 = g2 = ""
        else:
            donor = by[SAME_DONOR if r.family == "same" else CROSS_DONOR].bpb
            g1 = f"{gap(base['maths'], b['maths'], donor['maths']):.1f}%"
            g2 = f"{gap(base['maths_chat'], b['maths_chat'], donor['maths_chat']):.1f}%"
        name = r.label if r.family == "source" else f"{r.label} [donor {SAME_DONOR if r.family == 'same' else CROSS_DONOR}]"
        lines.append(f"| {name} | {secs} | " + " | ".join(cells) + f" | {code} | {g1} | {g2} |")
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> str:
    by = {r.label: r for r in rows}
    base = by[BASE].bpb
    out = []
    for fam, donor_name in (("same", SAME_DONOR), ("cross", CROSS_DONOR)):
        donor = by[donor_name].bpb
        for r in rows:
            if r.family != fam or r.label.startswith(("ablation", "check")):
                continue
            if r.error:
                out.append(f"- {r.label}: merge failed ({r.error})")
                continue
            code = 100 * (r.bpb["code"] / base["code"] - 1)
            g = gap(base["maths"], r.bpb["maths"], donor["maths"])
            if fam == "same":
                ok_g, ok_c = g >= SAME_TARGET_GAP, code <= SAME_TARGET_CODE
                out.append(f"- {r.label}: maths gap closed {g:.1f}% (target >= {SAME_TARGET_GAP:.0f}%: "
                           f"{'met' if ok_g else 'MISSED'}), code {code:+.2f}% (target <= +{SAME_TARGET_CODE:.0f}%: "
                           f"{'met' if ok_c else 'MISSED'})")
            else:
                gc = gap(base["maths_chat"], r.bpb["maths_chat"], donor["maths_chat"])
                ok_c = code <= CROSS_TARGET_CODE
                out.append(f"- {r.label}: code {code:+.2f}% (target <= +{CROSS_TARGET_CODE:.0f}%: "
                           f"{'met' if ok_c else 'MISSED'}); maths gap closed {g:.1f}% plain, {gc:.1f}% Qwen chat "
                           f"(no target without training)")
    out.append("- controls (random donor experts, a base-only adapter) and alignment training: bench/method_table.py")
    return "\n".join(out)


def report_args(description: str) -> argparse.Namespace:
    """The arguments of a quality report: --out (markdown copy) and --keep (where merged models go)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    ap.add_argument("--keep", type=Path, help="write the merged models under this folder instead of a temporary one")
    return ap.parse_args()


def heldout_texts() -> dict[str, str]:
    """The held-out texts every quality report scores: code, maths, maths in Qwen chat format."""
    return {"code": heldout_text("code"), "maths": heldout_text("maths"),
            "maths_chat": heldout_text("maths", style="qwen_chat")}


def text_sizes(texts: dict[str, str]) -> str:
    """The held-out texts' sizes, as a report says them."""
    return (f"held-out text: {len(texts['code'].encode())} bytes of code, {len(texts['maths'].encode())} bytes of "
            f"maths, {len(texts['maths_chat'].encode())} bytes of maths as Qwen chat.")


def report_head(command: str, t_start: float) -> list[str]:
    """The machine and the command (with its total wall time since `t_start`) that open a report."""
    return [f"machine: {machine()}", f"command: `{command}`, total wall {time.perf_counter() - t_start:.0f} s"]


def emit(report: str, out: Path | None) -> None:
    """Print a report, and write it to `out` when given."""
    print(report)
    if out:
        out.write_text(report + "\n")


def main() -> None:
    args = report_args("Held-out bits per byte of the demo sources and of same-family and cross-architecture "
                       "merges of them (DESIGN.md 'Quality yardstick').")
    t_start = time.perf_counter()
    texts = heldout_texts()
    rows = [Row(name, "source", score(ensure_demo(name, progress=False), texts))
            for name in (BASE, SAME_DONOR, CROSS_DONOR)]
    with tempfile.TemporaryDirectory(prefix="zenith-merge-quality-") as tmp:
        parent = args.keep or Path(tmp)
        for i, m in enumerate(MERGES):
            out = parent / f"merge{i}"
            row = Row(m.label, m.family)
            t0 = time.perf_counter()
            try:
                run_one(m, out)
                row.seconds = time.perf_counter() - t0
                row.bpb = score(out, texts)
            except Exception as err:  # report and go on: one broken merge should not hide the others
                row.seconds = time.perf_counter() - t0
                row.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                traceback.print_exc()
            rows.append(row)
    report = "\n".join([
        f"date: {datetime.date.today().isoformat()}",
        f"machine: {machine()}",
        f"cache: {ensure_demo(BASE, progress=False).parent}",
        f"command: `.venv/bin/python bench/merge_quality.py`, total wall {time.perf_counter() - t_start:.0f} s",
        "", table(rows), "",
        f"{text_sizes(texts)} Gap closed is against {SAME_DONOR} for same-family merges, {CROSS_DONOR} for "
        f"grafts; base {BASE}.",
        "", "Against DESIGN.md's targets:", verdicts(rows),
    ])
    emit(report, args.out)


if __name__ == "__main__":
    main()
