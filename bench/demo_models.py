"""Build the demo models and measure them: build time, and held-out bits per byte on both domains.

    .venv/bin/python bench/demo_models.py            # the cached models (built first if missing)
    .venv/bin/python bench/demo_models.py --fresh    # build everything into a temporary cache, timed

Bits per byte do not depend on the tokenizer, so models with different vocabularies compare
directly. The parent (`zen-parent`) is listed too: each child should beat it on its own domain
and stay near it on the other. Prints a markdown table; `--out FILE` also writes it there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zenith_merge.demo import PARENT_NAME, bits_per_byte, demo_dir, ensure_all, ensure_demo, heldout_text

NAMES = (PARENT_NAME, "zen-tiny", "zen-r1-tiny", "qwen3-moe-tiny")


def machine() -> str:
    """nproc, CPU model and RAM of this machine, in one line."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"torch {torch.__version__}")


def measure(folders: dict[str, Path]) -> list[dict]:
    """One row per model: recipe summary and held-out bits per byte (weights as saved, computed in float32)."""
    texts = {"code": heldout_text("code"), "maths": heldout_text("maths"),
             "maths, Qwen chat": heldout_text("maths", style="qwen_chat")}
    rows = []
    for name, folder in folders.items():
        meta = json.loads((folder / "zenith_demo.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder)
        rows.append({"name": name, "params": sum(p.numel() for p in model.parameters()), "steps": meta["steps"],
                     "lr": meta["recipe"]["train"]["lr"], "seconds": meta["build_seconds"],
                     "loss": meta["loss_last10"], **{k: bits_per_byte(model, tok, t) for k, t in texts.items()}})
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| model | parameters | steps | lr | build s | final train loss | code bpb | maths bpb | maths (Qwen chat) bpb |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['lr']:g} | {r['seconds']:.0f} | "
                     f"{r['loss']:.3f} | {r['code']:.3f} | {r['maths']:.3f} | {r['maths, Qwen chat']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fresh", action="store_true", help="build into a new temporary cache and time the whole build")
    ap.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="zenith-demo-bench-") as tmp:
        if args.fresh:
            os.environ["ZENITH_CACHE"] = tmp
        t0 = time.perf_counter()
        folders = ensure_all()
        wall = time.perf_counter() - t0
        folders = {PARENT_NAME: ensure_demo(PARENT_NAME), **folders}
        rows = measure({n: folders[n] for n in NAMES})
        report = "\n".join([
            f"machine: {machine()}",
            f"cache: {demo_dir()}",
            f"wall time of `ensure_all()` in this run: {wall:.0f} s" + ("" if args.fresh else " (0 if cached)"),
            "", table(rows), "",
            f"held-out text: {len(heldout_text('code').encode())} bytes of code, "
            f"{len(heldout_text('maths').encode())} bytes of maths (plain R1-style), "
            f"{len(heldout_text('maths', style='qwen_chat').encode())} bytes of maths as Qwen chat.",
        ])
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
