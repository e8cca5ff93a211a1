"""What counting NaN/Inf costs the writer: `finite.nonfinite_count` against the sha256 the writer already
computes over every byte, on the same 16 MiB chunks (the writer's copy chunk), one core.

    .venv/bin/python bench/nonfinite_cost.py [--repeats 15] [--mib 16]

For each float format: chunks of random finite values (the usual case: the fast any-check answers), and
chunks with one NaN (the exact count runs too). Prints GB/s of each (median of the repeats) and the
count's time as a share of the hash's. torch.isfinite's count (of the values as float32) for comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import statistics
import time

import torch

from zenith_merge.io.finite import nonfinite_count
from zenith_merge.io.safetensors_format import DTYPES


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Time each format and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--mib", type=int, default=16, help="chunk size in MiB (16: the writer's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.mib * 2**20
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, torch {torch.__version__}, one thread, chunks of {args.mib} MiB, "
          f"median of {args.repeats}\n")
    print("| format | values | sha256 GB/s | nonfinite_count GB/s | count / hash time | torch.isfinite count GB/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for code in ("BF16", "F16", "F32", "F8_E4M3"):
        dtype = DTYPES[code]
        values = (torch.randn(n // dtype.itemsize, generator=torch.Generator().manual_seed(0)) * 0.1).to(dtype)
        for label in ("finite", "one NaN"):
            if label == "one NaN":
                values = values.clone()
                values.view(-1)[n // dtype.itemsize // 2] = float("nan")
            chunk = memoryview(values.view(torch.uint8).numpy())
            hashed = _median_seconds(lambda c=chunk: hashlib.sha256(c).digest(), args.repeats)
            counted = _median_seconds(lambda c=chunk, k=code: nonfinite_count(c, k), args.repeats)
            isfinite = _median_seconds(lambda v=values: int((~torch.isfinite(v.float())).sum()),
                                       max(3, args.repeats // 5))
            print(f"| {code} | {label} | {n / hashed / 1e9:.2f} | {n / counted / 1e9:.2f} | "
                  f"{100 * counted / hashed:.0f}% | {n / isfinite / 1e9:.2f} |")


if __name__ == "__main__":
    main()
