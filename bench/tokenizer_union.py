""".venv/bin/python bench/tokenizer_union.py [--out FILE] [--keep DIR]

The union vocabulary of the flagship merge (merge/config.yml: zen-tiny + qwen3-moe-tiny,
`tokenizer.source: union`), measured on the demo models:

1. the union's size and make-up, read from `<out>/.zenith/token_map.json` (tokens, padded
   embedding rows, donor tokens appended, the donor's added tokens that are plain text to the
   base, R^2 of the fitted donor-to-base row maps);
2. tokens per byte of the base, donor and union tokenizers on the held-out code and maths
   (and maths in Qwen chat), through transformers' AutoTokenizer without special tokens, and
   whether each text tokenizes to exactly the base's ids;
3. held-out bits per byte of the flagship merge with `tokenizer.slerp_t` in {0, 0.1, 0.25, 0.5, 1}
   (0 keeps the base's row for shared tokens, 1 takes the donor's, mapped), of the same merge
   with `tokenizer.source: base` (no union), of the opt-in `tokenizer.donor_merges: true` (with
   `protect: [demo:code]`), and of the two sources for reference.

    code vs base = merged_code / base_code - 1   (DESIGN.md "Quality yardstick": within 2%)
    gap closed   = (base - merged) / (base - donor), in bits per byte

Each merge runs through the library into a temporary folder; models are loaded in float32.
About 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import datetime
import json
import tempfile
import time
from pathlib import Path

import yaml
from merge_quality import (
    BASE,
    CROSS_DONOR,
    Merge,
    emit,
    gap,
    heldout_texts,
    machine,
    report_args,
    run_one,
    score,
    text_sizes,
)
from transformers import AutoTokenizer

from zenith_merge.demo import ensure_demo

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "merge" / "config.yml"
SLERP_TS = (0.0, 0.1, 0.25, 0.5, 1.0)
TEXTS = ("code", "maths", "maths_chat")
TEXT_NAMES = {"code": "code", "maths": "maths", "maths_chat": "maths (Qwen chat)"}
CROSS_TARGET_CODE = 2.0  # DESIGN.md "Quality yardstick", in %


def _slerp(t: float):
    def edit(d: dict) -> None:
        d["tokenizer"]["slerp_t"] = t
    return edit


def _base_tokenizer(d: dict) -> None:
    d["tokenizer"] = {"source": "base"}


def _donor_merges(d: dict) -> None:
    d["tokenizer"]["donor_merges"] = True
    d["tokenizer"]["protect"] = ["demo:code"]


def vocab_table(token_map: dict) -> str:
    """The union's make-up, from the token map's header (`.zenith/token_map.json`)."""
    lines = ["| union vocabulary (merge/config.yml) | value |", "| --- | ---: |",
             f"| base tokenizer tokens | {token_map['base_size']} |",
             f"| union tokenizer tokens | {token_map['size']} |",
             f"| padded embedding / lm_head rows | {token_map['padded_size']} |",
             f"| tokens appended from the donor | {token_map['appended']} |",
             f"| donor added tokens that are plain text to the base | {len(token_map['appended_added'])} "
             f"({', '.join(token_map['appended_added'])}) |"]
    for kind, n in sorted(token_map["rows"].items()):
        lines.append(f"| tokens whose row is `{kind}` | {n} |")
    lines.append(f"| donor merges added | {token_map['merges_added']} (donor_merges: "
                 f"{str(token_map['donor_merges']).lower()}) |")
    for donor, maps in token_map["maps"].items():
        for which, m in maps.items():
            r2 = "" if m.get("r2") is None else f"R^2 {m['r2']:.3f}, "
            lines.append(f"| {donor} {which} row map | {m['mode']}, {r2}{m.get('shared_tokens', '?')} shared tokens |")
    return "\n".join(lines)


def tokenization_table(folders: dict[str, Path], texts: dict[str, str]) -> str:
    toks = {name: AutoTokenizer.from_pretrained(f) for name, f in folders.items()}
    ids = {name: {k: tok(t, add_special_tokens=False, verbose=False)["input_ids"] for k, t in texts.items()}
           for name, tok in toks.items()}
    head = " | ".join(f"{TEXT_NAMES[k]} tokens/byte" for k in TEXTS)
    same = " | ".join(f"{TEXT_NAMES[k]} = base ids" for k in TEXTS)
    lines = [f"| tokenizer | tokens | {head} | {same} |", "| --- | ---: |" + " ---: |" * len(TEXTS) + " :---: |" * len(TEXTS)]
    for name, tok in toks.items():
        tpb = " | ".join(f"{len(ids[name][k]) / len(texts[k].encode()):.4f}" for k in TEXTS)
        eq = " | ".join("yes" if ids[name][k] == ids["base " + BASE][k] else "no" for k in TEXTS)
        lines.append(f"| {name} | {len(tok)} | {tpb} | {eq} |")
    return "\n".join(lines)


def bpb_table(rows: list[tuple[str, float | None, dict[str, float]]]) -> str:
    base, donor = rows[0][2], rows[1][2]
    lines = ["| model / merge | merge s | " + " | ".join(f"{TEXT_NAMES[k]} bpb" for k in TEXTS)
             + " | code vs base | maths gap closed | maths (chat) gap closed |",
             "| --- | ---: |" + " ---: |" * (len(TEXTS) + 3)]
    for label, secs, b in rows:
        cells = " | ".join(f"{b[k]:.4f}" for k in TEXTS)
        code = f"{100 * (b['code'] / base['code'] - 1):+.2f}%"
        g = "" if secs is None else f"{gap(base['maths'], b['maths'], donor['maths']):.1f}%"
        gc = "" if secs is None else f"{gap(base['maths_chat'], b['maths_chat'], donor['maths_chat']):.1f}%"
        lines.append(f"| {label} | {'' if secs is None else f'{secs:.1f}'} | {cells} | {code} | {g} | {gc} |")
    return "\n".join(lines)


def verdicts(rows: list[tuple[str, float | None, dict[str, float]]]) -> str:
    base = rows[0][2]
    out = []
    for label, _secs, b in rows[2:]:
        code = 100 * (b["code"] / base["code"] - 1)
        out.append(f"- {label}: code {code:+.2f}% (target <= +{CROSS_TARGET_CODE:.0f}%: "
                   f"{'met' if code <= CROSS_TARGET_CODE else 'MISSED'})")
    return "\n".join(out)


def main() -> None:
    args = report_args("The flagship union vocabulary: its size, tokens per byte, and held-out bits per byte "
                       "against tokenizer.slerp_t.")
    t_start = time.perf_counter()
    texts = heldout_texts()
    base_dir, donor_dir = ensure_demo(BASE, progress=False), ensure_demo(CROSS_DONOR, progress=False)
    rows: list[tuple[str, float | None, dict[str, float]]] = [
        (BASE, None, score(base_dir, texts)), (CROSS_DONOR, None, score(donor_dir, texts))]
    # merge/config.yml's own slerp_t: its output gives the token map and the union tokenizer
    flagship_t = float(yaml.safe_load(CONFIG.read_text())["tokenizer"]["slerp_t"])
    ts = sorted({*SLERP_TS, flagship_t})
    merges = [Merge("graft, tokenizer.source: base (no union)", CONFIG, "cross", _base_tokenizer)]
    merges += [Merge(f"graft, union, slerp_t {t:g}" + (" (merge/config.yml)" if t == flagship_t else ""),
                     CONFIG, "cross", _slerp(t)) for t in ts]
    merges.append(Merge(f"graft, union, slerp_t {flagship_t:g}, donor_merges: true, protect: [demo:code]",
                        CONFIG, "cross", _donor_merges))
    with tempfile.TemporaryDirectory(prefix="zenith-merge-union-") as tmp:
        parent = args.keep or Path(tmp)
        flagship = parent / f"union{1 + ts.index(flagship_t)}"
        for i, m in enumerate(merges):
            out = parent / f"union{i}"
            t0 = time.perf_counter()
            run_one(m, out)
            secs = time.perf_counter() - t0
            rows.append((m.label, secs, score(out, texts)))
        token_map = json.loads((flagship / ".zenith" / "token_map.json").read_text())
        tok_table = tokenization_table({f"base {BASE}": base_dir, f"donor {CROSS_DONOR}": donor_dir,
                                        "union (merged output)": flagship,
                                        "union, donor_merges: true": parent / f"union{len(merges) - 1}"}, texts)
    report = "\n".join([
        f"date: {datetime.date.today().isoformat()}",
        f"machine: {machine()}",
        f"cache: {base_dir.parent}",
        f"command: `.venv/bin/python bench/tokenizer_union.py`, total wall {time.perf_counter() - t_start:.0f} s",
        "", vocab_table(token_map), "", tok_table, "", bpb_table(rows), "",
        f"{text_sizes(texts)} Base {BASE}, donor {CROSS_DONOR}; every merge is merge/config.yml with only the "
        "tokenizer settings changed.",
        "", "Against DESIGN.md's cross-architecture target:", verdicts(rows),
    ])
    emit(report, args.out)


if __name__ == "__main__":
    main()
