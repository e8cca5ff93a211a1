"""Wall time and peak RSS of each smoke-test check, on a given folder or on a generated DeepSeek-V3.

    .venv/bin/python bench/smoke_memory.py                     # release widths, 2 layers + MTP: ~3.8 GB
    .venv/bin/python bench/smoke_memory.py --folder OUT        # any model folder (never written)
    .venv/bin/python bench/smoke_memory.py --release deepseek-v3   # release layout, FP8, hidden 2048: 2.5 GB
    .venv/bin/python bench/smoke_memory.py --max-memory 1GB --no-generate --out /tmp/smoke.md

The claim checked (issue: "a smoke test that scales"): the checks that read weights stream them a slab of rows
at a time, so their peak is about the interpreter plus a slab; the checks that run the model (loading,
generation, thinking, bits per byte) stay within `--max-memory` (a model over it is streamed from disk, module
by module), or are skipped with a note.

Inputs, without --folder:
- default: zenith_merge.demo.release_layout's DeepSeek-V3 at the release's widths (hidden 7168, MLA ranks
  1536/512, 128 heads, dense MLP 18432, experts of 2048) in BF16, `--layers` decoder layers (the first
  dense, the others with 8 routed experts and a shared one) and the release's MTP layer, with the demo Zen
  tokenizer (vocabulary 2048): every tensor as large as the release's but the vocabulary matrices; the
  largest is a dense-MLP projection (7168 x 18432, 264 MB);
- `--release FAMILY`: zenith_merge.demo.release_layout's checkpoint with `--overrides` (default: DeepSeek-V3
  in block FP8, at hidden 2048 with the release vocabulary and tokenizer: the vocabulary matrices, 530 MB
  each, are the largest tensors).

Measurement: the smoke test runs in one child process (`run_smoke_test`, no report written); at each check's
start the child resets its peak RSS (`echo 5 > /proc/self/clear_refs`) and at its end reads VmHWM, so each
row is that check's own peak (the interpreter and whatever earlier checks left resident included). The whole
run's peak is the largest of those (not the child's ru_maxrss: that counts the parent it was forked from).
The page cache is not dropped (no root needed): the first run after generating is warm too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
MB = 10**6

# DeepSeek-V3's release config (release_layout) with 8 routed experts in groups of 4 per MoE layer
WIDE_OVERRIDES = {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
                  "first_k_dense_replace": 1, "max_position_embeddings": 4096}
# --release deepseek-v3: the release layout (FP8, MTP layer, release tokenizer and vocabulary) at hidden 2048
RELEASE_OVERRIDES = {"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_routed_experts": 16,
                     "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1024,
                     "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": 768,
                     "kv_lora_rank": 256}
def write_wide_deepseek(path: Path, *, hidden: int, vocab: int, layers: int, mtp: bool, tokenizer_from: Path,
                        seed: int = 0) -> Path:
    """A DeepSeek-V3 release-layout folder (zenith_merge.demo.release_layout) of BF16 weights at `hidden` x
    `vocab`, `layers` decoder layers (the first dense) and, with `mtp`, the release's MTP layer after them, with
    the tokenizer files of `tokenizer_from`; cached at `path`."""
    from zenith_merge.demo.release_layout import write_release_checkpoint

    if (path / "config.json").is_file():
        return path
    special = json.loads((tokenizer_from / "config.json").read_text())
    overrides = {**WIDE_OVERRIDES, "hidden_size": hidden, "vocab_size": vocab, "num_hidden_layers": layers,
                 "num_nextn_predict_layers": 1 if mtp else 0,
                 **{k: special[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_release_checkpoint(partial, "deepseek-v3", overrides=overrides, fp8=False, seed=seed, tokenizer=False)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "generation_config.json":
            shutil.copyfile(f, partial / f.name)
    return partial.rename(path)


def folder_summary(folder: Path) -> tuple[int, int, str]:
    """(bytes of weights, bytes of the largest tensor, its name)."""
    from zenith_merge.io.safetensors_format import read_header

    total, largest, name = 0, 0, ""
    for file in folder.glob("*.safetensors"):
        total += file.stat().st_size
        for n, e in read_header(file).tensors.items():
            if e.end - e.begin > largest:
                largest, name = e.end - e.begin, n
    return total, largest, name


def child(folder: str, generate: bool, max_memory: int | None, result: str) -> None:
    """Run the smoke test on `folder` in this process; per-check wall and peak RSS go to `result` (json)."""
    import re

    from zenith_merge.checks.smoke import run_smoke_test

    def hwm() -> int:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    def reset() -> None:
        Path("/proc/self/clear_refs").write_text("5")

    rows: list[dict] = []
    start = time.perf_counter()
    baseline = hwm()

    def progress(name: str) -> None:
        now = time.perf_counter()
        if rows:
            rows[-1].update(wall_s=now - rows[-1].pop("t0"), peak_rss=hwm())
        rows.append({"check": name, "t0": now})
        reset()

    report = run_smoke_test(folder, generate=generate, progress=progress, max_memory=max_memory)
    now = time.perf_counter()
    rows[-1].update(wall_s=now - rows[-1].pop("t0"), peak_rss=hwm())
    results = {c.name: c for c in report.checks}
    for row in rows:
        c = results.get(row["check"])
        row["result"] = "?" if c is None else "skip" if c.skipped else "pass" if c.ok else "FAIL"
        row["detail"] = "" if c is None else c.detail
    peak = max([baseline] + [r["peak_rss"] for r in rows])
    Path(result).write_text(json.dumps({"rows": rows, "wall_s": now - start, "import_peak_rss": baseline,
                                        "peak_rss": peak, "ok": report.ok}))


def run(folder: Path, generate: bool, max_memory: int | None, work: Path) -> dict:
    """The smoke test on `folder` in a child process: per-check rows, total wall and peak RSS."""
    result = work / "smoke-memory-result.json"
    cmd = [sys.executable, __file__, "--child", str(folder), "--result", str(result)]
    cmd += [] if generate else ["--no-generate"]
    cmd += [] if max_memory is None else ["--max-memory", str(max_memory)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    status = subprocess.run(cmd, env=env, cwd=work).returncode
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"the smoke-test child failed (exit {status})")
    data = json.loads(result.read_text())
    data.update(process_wall_s=wall)
    return data


def table(folder: Path, data: dict, max_memory: int | None) -> str:
    """Markdown: the input, then one row per check."""
    import torch
    import transformers

    total, largest, name = folder_summary(folder)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               "?")
    cap = "default" if max_memory is None else f"{max_memory / MB:,.0f} MB"
    lines = [f"Smoke test of `{folder}`: {total / MB:,.0f} MB of weights, largest tensor {name} "
             f"{largest / MB:,.0f} MB; max_memory {cap}",
             f"Machine: {os.cpu_count()} cores ({cpu}), {platform.platform()}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}", "",
             "| check | result | wall s | peak RSS MB | detail |", "| --- | --- | ---: | ---: | --- |"]
    for row in data["rows"]:
        detail = row["detail"].replace("|", "/")
        lines.append(f"| {row['check']} | {row['result']} | {row['wall_s']:.1f} | "
                     f"{row['peak_rss'] / MB:,.0f} | {detail[:110]} |")
    lines += ["", f"Whole run: {data['process_wall_s']:.1f} s wall (checks {data['wall_s']:.1f} s), peak RSS "
              f"{data['peak_rss'] / MB:,.0f} MB (at start: {data['import_peak_rss'] / MB:,.0f} MB); "
              f"{'ok' if data['ok'] else 'FAILED'}"]
    return "\n".join(lines)


def parse_size(text: str) -> int:
    """'2GB', '512MB', '1.5GiB' or a byte count."""
    from zenith_merge.checks.smoke import parse_memory

    return parse_memory(text)


def main() -> int:
    """Generate (or take) a folder, run the smoke test on it in a child, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, help="a model folder to check (default: generate one in --work)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/zenith-smoke-memory"), help="where to generate")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--vocab", type=int, default=2048, help="(the demo tokenizer has 2048 tokens)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (the first dense, the rest MoE)")
    ap.add_argument("--no-mtp", action="store_true", help="generate without the MTP layer")
    ap.add_argument("--release", metavar="FAMILY",
                    help="zenith_merge.demo.release_layout's checkpoint instead (deepseek-v3 or qwen3-moe), "
                         "with --overrides")
    ap.add_argument("--overrides", type=json.loads, default=RELEASE_OVERRIDES,
                    help="config overrides of the release checkpoint, JSON (default: DeepSeek-V3 at hidden "
                         "2048 with the release vocabulary, 3 layers, 16 experts: 2.5 GB in FP8; "
                         '\'{"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_routed_experts": 16}\' '
                         "is the release width: ~11 GB)")
    ap.add_argument("--max-memory", type=parse_size, help="the smoke test's memory cap (default: its own)")
    ap.add_argument("--no-generate", action="store_true", help="structure checks only")
    ap.add_argument("--out", type=Path, help="also write the table here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, not args.no_generate, args.max_memory, args.result)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.folder
    if folder is None and args.release:
        from zenith_merge.demo.release_layout import write_release_checkpoint  # another module's fixtures

        tag = hashlib.sha256(json.dumps(args.overrides, sort_keys=True).encode()).hexdigest()[:8]
        folder = args.work / f"release-{args.release}-{tag}"
        if not (folder / "config.json").is_file():
            t0 = time.perf_counter()
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            write_release_checkpoint(partial, args.release, overrides=args.overrides).rename(folder)
            print(f"input {folder} ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    elif folder is None:
        from zenith_merge.demo import ensure_demo

        mtp = "" if args.no_mtp else "-mtp"
        folder = args.work / f"wide-h{args.hidden}-v{args.vocab}-l{args.layers}{mtp}"
        t0 = time.perf_counter()
        write_wide_deepseek(folder, hidden=args.hidden, vocab=args.vocab, layers=args.layers,
                            mtp=not args.no_mtp, tokenizer_from=ensure_demo("zen-tiny", progress=False))
        print(f"input {folder} ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    data = run(folder.resolve(), not args.no_generate, args.max_memory, args.work)
    text = table(folder, data, args.max_memory)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
