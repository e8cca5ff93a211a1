"""Build the demo models and measure them: build time, and held-out bits per byte on both domains.

    .venv/bin/python bench/demo_models.py            # the cached models (built first if missing)
    .venv/bin/python bench/demo_models.py --fresh    # build everything into a temporary cache, timed
    .venv/bin/python bench/demo_models.py --bf16-cost  # also: what saving in bf16 costs (rebuilds two in float32)

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


def bf16_cost(names=(PARENT_NAME, "qwen3-moe-tiny")) -> str:
    """Rebuild models saving float32, and compare their bits per byte with the same weights rounded to bf16."""
    from zenith_merge.demo import build

    lines = ["| model | domain | float32 bpb | bf16 weights, float32 compute | bf16 weights and compute |",
             "| --- | --- | ---: | ---: | ---: |"]
    build.SAVE_DTYPE = torch.float32
    try:
        with tempfile.TemporaryDirectory(prefix="zenith-demo-f32-") as tmp:
            for name in names:
                folder = build.build_model(name, Path(tmp) / name)
                tok = AutoTokenizer.from_pretrained(folder)
                f32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
                rounded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
                with torch.no_grad():  # as save_model does: all but e_score_correction_bias (kept float32)
                    for n, t in rounded.state_dict().items():  # saved tensors only (not rotary caches)
                        if t.is_floating_point() and not n.endswith("e_score_correction_bias"):
                            t.copy_(t.to(torch.bfloat16))
                bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
                for domain in ("code", "maths"):
                    text = heldout_text(domain)
                    bpb = [bits_per_byte(m, tok, text) for m in (f32, rounded, bf16)]
                    lines.append(f"| {name} | {domain} | " + " | ".join(f"{b:.4f}" for b in bpb) + " |")
    finally:
        build.SAVE_DTYPE = torch.bfloat16
    return "\n".join(lines)


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
    ap.add_argument("--bf16-cost", action="store_true",
                    help="also rebuild zen-parent and qwen3-moe-tiny saving float32 and compare with bf16 (~5 min)")
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
        if args.bf16_cost:
            report += "\n\nbf16 cost (same weights, float32 vs rounded to bf16):\n\n" + bf16_cost()
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
