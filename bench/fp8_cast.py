""".venv/bin/python bench/fp8_cast.py [--gib 2] [--repeats 3] [--out FILE]

`zenith-merge fp8-cast` (block FP8 -> BF16) against `cp` of the same input and against the
reference algorithm (DeepSeek-V3's fp8_cast_bf16.py: each shard loaded whole, every loaded shard
kept so that scales in other shards can be found, each shard saved whole), re-implemented here in
`reference_cast` and run as its own process. Every run is timed under /usr/bin/time (wall, peak
RSS) after a `sync`, the three interleaved, medians of --repeats reported.

Input: a synthetic DeepSeek-style FP8 checkpoint of about --gib GiB: 4096 x 4096 float8_e4m3fn
weights (16 MiB each, random finite bytes) with float32 weight_scale_inv per 128 x 128 block,
a BF16 norm per weight, in shards of about 400 MiB, config.json with DeepSeek-V3's
quantization_config.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from common import timed
from merge_quality import emit, machine
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
SIDE = 4096
PER_SHARD = 24  # weights per shard: 24 x 16 MiB = 384 MiB


def build_input(folder: Path, gib: float) -> Path:
    """The synthetic FP8 checkpoint (kept between runs: built once per size)."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = max(1, round(gib * 2**30 / SIDE**2))
    g = torch.Generator().manual_seed(0)
    weight_map, shard, index = {}, {}, 0

    def flush():
        nonlocal shard, index
        if shard:
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, index = {}, index + 1

    for i in range(n):
        raw = torch.randint(0, 256, (SIDE, SIDE), dtype=torch.uint8, generator=g)
        raw[(raw & 0x7F) == 0x7F] = 0x3C  # no NaN codes
        name = f"model.layers.{i}.mlp.down_proj.weight"
        shard[name] = raw.view(torch.float8_e4m3fn)
        shard[name + "_scale_inv"] = torch.rand(SIDE // 128, SIDE // 128, generator=g) * 1e-3
        shard[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(SIDE, dtype=torch.bfloat16)
        if len(shard) >= 3 * PER_SHARD:
            flush()
    flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": SIDE,
              "num_hidden_layers": n, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                              "quant_method": "fp8", "weight_block_size": [128, 128]}}
    (tmp / "config.json").write_text(json.dumps(config))
    tmp.rename(folder)
    return folder


def reference_cast(src: Path, dst: Path) -> None:
    """The reference algorithm: shard by shard, loaded whole and kept, scales looked up across loaded shards."""
    dst.mkdir(parents=True, exist_ok=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    loaded: dict[str, dict[str, torch.Tensor]] = {}

    def tensor(name: str) -> torch.Tensor:
        file = index[name]
        if file not in loaded:
            loaded[file] = load_file(str(src / file))
        return loaded[file][name]

    new_map = {}
    for file in sorted(set(index.values())):
        state = load_file(str(src / file))
        loaded[file] = state
        out = {}
        for name, w in state.items():
            if name.endswith("_scale_inv"):
                continue
            if w.element_size() == 1:  # fp8: W = q * s per 128 x 128 block
                s = tensor(name + "_scale_inv")
                full = s.repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
                out[name] = (w.to(torch.float32) * full).to(torch.bfloat16)
            else:
                out[name] = w
            new_map[name] = file
        save_file(out, str(dst / file), metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": new_map}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--gib", type=float, default=2.0, help="input size in GiB (default 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "fp8_cast")
    ap.add_argument("--out", type=Path, help="also write the report (markdown) here")
    ap.add_argument("--reference", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)  # the timed subprocess
    args = ap.parse_args()
    if args.reference:
        reference_cast(Path(args.reference[0]), Path(args.reference[1]))
        return
    src = build_input(args.work / f"input-{args.gib:g}gib", args.gib)
    in_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    exe = str(Path(sys.executable).with_name("zenith-merge"))
    runs = {
        "cp -r": lambda d: ["cp", "-r", str(src), str(d)],
        "zenith-merge fp8-cast": lambda d: [exe, "fp8-cast", str(src), str(d), "--no-progress"],
        "reference algorithm": lambda d: [sys.executable, str(Path(__file__).resolve()), "--reference", str(src),
                                          str(d)],
    }
    results: dict[str, list[tuple[float, int, int]]] = {k: [] for k in runs}
    for r in range(args.repeats):
        order = list(runs)[r % 3:] + list(runs)[:r % 3]
        for label in order:
            dst = args.work / "output"
            shutil.rmtree(dst, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            wall, rss = timed(runs[label](dst))
            out_bytes = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
            results[label].append((wall, rss, out_bytes))
            print(f"repeat {r + 1}/{args.repeats} {label}: {wall:.1f} s, {rss / 2**20:.0f} MiB", flush=True)
    shutil.rmtree(args.work / "output", ignore_errors=True)
    med = {k: (statistics.median(w for w, _, _ in v), statistics.median(m for _, m, _ in v), v[0][2])
           for k, v in results.items()}
    cp_rate = med["cp -r"][2] / med["cp -r"][0]
    ref_wall, ref_rss = med["reference algorithm"][:2]
    lines = [f"machine: {machine()}",
             f"command: `.venv/bin/python bench/fp8_cast.py --gib {args.gib:g} --repeats {args.repeats}`",
             f"input: {in_bytes / 2**30:.2f} GiB in {len(list(src.glob('*.safetensors')))} shards; largest tensor "
             f"{SIDE}x{SIDE} FP8 = {SIDE * SIDE / 2**20:.0f} MiB, {2 * SIDE * SIDE / 2**20:.0f} MiB as BF16", "",
             "| run | median wall s | output GiB | MB/s written | vs cp | wall vs reference | median peak RSS MiB | "
             "RSS vs reference | each run: wall s / peak MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for label, (wall, rss, out_bytes) in med.items():
        rate = out_bytes / wall
        each = ", ".join(f"{w:.1f} / {m / 2**20:.0f}" for w, m, _ in results[label])
        lines.append(f"| {label} | {wall:.1f} | {out_bytes / 2**30:.2f} | {rate / 1e6:.0f} | "
                     f"{rate / cp_rate:.2f}x | {wall / ref_wall:.2f}x | {rss / 2**20:.0f} | {rss / ref_rss:.2f}x | "
                     f"{each} |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
