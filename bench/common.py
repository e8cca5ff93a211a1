"""What the benchmarks share: random-weight checkpoints written shard by shard, and timing under /usr/bin/time.

    from common import timed, write_random_checkpoint
    write_random_checkpoint(folder, config, [(name, shape), ...], make=lambda name, shape, gen: ...)
    wall_s, peak_rss_bytes = timed(["cp", "-r", src, dst])

A checkpoint folder is built under `<folder>.partial` and renamed when complete, so an interrupted
benchmark never leaves a half-written model that a later run would take for a finished one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
MakeTensor = Callable[[str, tuple[int, ...], torch.Generator], torch.Tensor]


def bf16_normal(std: float = 0.02) -> MakeTensor:
    """N(0, std) bf16 weights, norms at 1, DeepSeek's e_score_correction_bias as float32 zeros."""
    def make(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        if name.endswith("e_score_correction_bias"):
            return torch.zeros(shape, dtype=torch.float32)
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)
    return make


def write_random_checkpoint(path: Path, config, tensors: Iterable[tuple[str, tuple[int, ...]]], *, seed: int = 0,
                            shard_bytes: int = 400 * 2**20, make: MakeTensor | None = None,
                            tokenizer_from: Path | None = None) -> Path:
    """A Hugging Face folder at `path`: sharded safetensors (transformers' names), index, config, tokenizer.

    Returns at once when `path` already holds a finished checkpoint.
    """
    if (path / "model.safetensors.index.json").is_file():
        return path
    make = make or bf16_normal()
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            save_file(shard, str(tmp / f"shard-{len(shards)}.partial"), metadata={"format": "pt"})
            shards.append(list(shard))
        shard, size = {}, 0

    for name, shape in tensors:
        t = make(name, tuple(shape), gen)
        if size and size + t.nbytes > shard_bytes:
            flush()
        shard[name] = t
        size += t.nbytes
    flush()
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (tmp / f"shard-{i}.partial").rename(tmp / final)
        weight_map.update({n: final for n in names})
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(tmp)
    (tmp / "generation_config.json").unlink(missing_ok=True)
    if tokenizer_from is not None:
        for fname in TOKENIZER_FILES:
            if (tokenizer_from / fname).is_file():
                shutil.copyfile(tokenizer_from / fname, tmp / fname)
    tmp.rename(path)
    return path


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of `cmd` under /usr/bin/time -v."""
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return wall, rss_kb * 1024
