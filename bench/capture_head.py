"""What skipping the output head saves in a calibration capture pass (forward/calibration.head_skipping).

    .venv/bin/python bench/capture_head.py                 # 5 interleaved repeats, 8 chunks of 512 tokens
    .venv/bin/python bench/capture_head.py --repeats 3 --chunks 4

A capture pass reads hidden states, never logits. Without `logits_to_keep=1` every chunk of n tokens also
multiplies by the (vocab x hidden) head and holds an n x vocab logits tensor. Each run is a child process:
it loads `deepseek-v3-tiny` (the DeepSeek-V3 release layout with the real 129,280-token vocabulary,
hidden 64, 2 layers, 8 experts; built on first use) with `load_for_calibration`, then captures every
decoder layer's output over `--chunks` chunks of 512 tokens of the demo code corpus. It reports the wall
time of the captures and the peak RSS (VmHWM) above the RSS after loading. The two modes, `skip` (as
merged) and `full` (head_skipping returning nothing, as before), alternate in each repeat. The report
gives medians.

What it shows: the memory is the logits tensor, n x vocab in the model's dtype, and that does not depend
on the hidden width. The time ratio does depend on it. At hidden 64 the head is most of this model's
work. At full depth the head's share of a token's multiply-adds is vocab x hidden / active parameters:
about 2.5% for DeepSeek-V3 (129,280 x 7,168 / 37 B) and about 9% for Qwen3-30B-A3B (151,936 x 2,048 /
3.3 B).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, re, sys, time
import zenith_merge.forward.calibration as cal
from zenith_merge.demo import calibration_text
from zenith_merge.demo.release_models import release_tiny_model
from zenith_merge.forward.loading import load_for_calibration

mode, chunks = sys.argv[1], int(sys.argv[2])
if mode == "full":
    cal.head_skipping = lambda model, points: {}
def rss(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
model, tok = load_for_calibration(release_tiny_model("deepseek-v3-tiny"))
points = [cal.CapturePoint.output_of(f"model.layers.{i}") for i in range(model.config.num_hidden_layers)]
text = calibration_text("code")
loaded = rss("VmRSS")
t0 = time.perf_counter()
n = sum(len(c.ends) for c in cal.capture_hidden(model, tok, [text], points, max_tokens_per_text=512,
                                                 max_total_tokens=512 * chunks, progress=False))
print(json.dumps({"wall": time.perf_counter() - t0, "tokens": n, "peak_above_load": rss("VmHWM") - loaded,
                  "dtype": str(next(model.parameters()).dtype), "vocab": model.config.vocab_size}))
"""


def run(mode: str, chunks: int) -> dict:
    """One child process's measurement."""
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(chunks)], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from graft import machine

    run("skip", 1)  # builds the model on first use, and warms the page cache
    results: dict[str, list[dict]] = {"skip": [], "full": []}
    for i in range(args.repeats):
        for mode in (("skip", "full") if i % 2 == 0 else ("full", "skip")):
            results[mode].append(run(mode, args.chunks))
    first = results["skip"][0]
    print(f"machine: {machine()}")
    print(f"deepseek-v3-tiny (vocab {first['vocab']}, {first['dtype']}), {first['tokens']} tokens in chunks of 512, "
          f"{args.repeats} interleaved repeats, medians")
    print("| head | capture wall (s) | peak RSS above the loaded model (MB) |")
    print("|---|---|---|")
    for mode, label in (("full", "every position (before)"), ("skip", "last position (logits_to_keep=1)")):
        wall = statistics.median(r["wall"] for r in results[mode])
        peak = statistics.median(r["peak_above_load"] for r in results[mode]) / 1e6
        print(f"| {label} | {wall:.2f} | {peak:.0f} |")
    ratio = statistics.median(r["wall"] for r in results["full"]) / statistics.median(r["wall"] for r in results["skip"])
    print(f"wall ratio before / after: {ratio:.1f}x")


if __name__ == "__main__":
    main()
