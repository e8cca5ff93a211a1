"""Build one demo model into a folder: train it, then save it as a standard Hugging Face checkpoint.

A folder holds bf16 safetensors in at least two shards with `model.safetensors.index.json`,
config.json, generation_config.json, the tokenizer files and `zenith_demo.json` (the recipe,
the loss curve, the build time). The build is deterministic: seeds are fixed, torch runs on
`BUILD_THREADS` threads with deterministic algorithms, and the global torch state (threads,
RNG, determinism flag) is restored afterwards. Same recipe, same machine: same bytes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers

from ..errors import ZenithError
from .models import PARENT_NAME, RECIPES, ModelRecipe, init_model, train
from .tokenizers import TOKENIZER_RECIPES, load_tokenizer, save_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

# One thread: CPU reductions depend on the thread count, so it is pinned for reproducible bytes, and
# torch's OpenMP threads slow down many times over when the cores are busy with other work;
# `ensure_all` runs independent builds in parallel processes instead.
BUILD_THREADS = 1
SAVE_DTYPE = torch.bfloat16  # as real checkpoints ship (bench/RESULTS.md: it costs < 0.05% bits per byte)
MIN_SHARDS = 2  # every demo model is sharded, so the sharded code paths always run


@contextlib.contextmanager
def deterministic_torch(threads: int = BUILD_THREADS) -> Iterator[None]:
    """Pin torch's thread count, fork its RNG and turn on deterministic algorithms; restore all three on exit."""
    threads_before, det_before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only_before = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(det_before, warn_only=warn_only_before)
        torch.set_num_threads(threads_before)


def shard_size(model: torch.nn.Module, dtype: torch.dtype = SAVE_DTYPE, shards: int = MIN_SHARDS) -> int:
    """A `max_shard_size` in bytes that splits the model into at least `shards` files."""
    total = sum(p.numel() for p in model.state_dict().values()) * torch.finfo(dtype).bits // 8
    return total // (shards + 1) + 1


def generation_config(recipe: ModelRecipe, tokenizer) -> transformers.GenerationConfig:
    """Greedy generation that stops at the end-of-turn token (and, for Qwen, at `<|endoftext|>` too)."""
    eos = [tokenizer.eos_token_id]
    if tokenizer.pad_token_id is not None and recipe.tokenizer == "qwen":
        eos.append(tokenizer.pad_token_id)  # Qwen3 stops on <|im_end|> and <|endoftext|>
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    return transformers.GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                         do_sample=False)


def save_model(model: torch.nn.Module, recipe: ModelRecipe, tokenizer, out_dir: Path, meta: dict) -> None:
    """Write the checkpoint folder: bf16 shards + index, configs, tokenizer, and zenith_demo.json last.

    Consumes `model` (it is cast to bf16 in place).
    """
    # DeepSeek-V3 ships e_score_correction_bias in float32 beside bf16 weights (transformers keeps it
    # float32 on load too): tiny, and it only decides which experts win, so it stays exact
    fp32 = {n: b.detach().float().clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    model = model.to(SAVE_DTYPE)
    for name, value in fp32.items():
        model.get_buffer(name).data = value
    model.config.dtype = SAVE_DTYPE
    model.generation_config = generation_config(recipe, tokenizer)
    model.save_pretrained(out_dir, max_shard_size=shard_size(model))
    if not (out_dir / "model.safetensors.index.json").is_file():
        raise ZenithError(f"{recipe.name}: expected a sharded checkpoint in {out_dir}")
    save_tokenizer(tokenizer, out_dir)
    for f in out_dir.glob("*.safetensors"):  # written through private temporary files (0600); a cache is shared
        f.chmod(0o644)
    (out_dir / "zenith_demo.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def build_model(name: str, out_dir: Path, *, steps_scale: float = 1.0, parent_dir: Path | None = None,
                tokenizer_dir: Path | None = None, progress: bool = True) -> Path:
    """Train demo model `name` (or `zen-parent`) into `out_dir` and return it.

    `steps_scale` shrinks the training steps and data (tests use it to check determinism in
    seconds). A child starts from its parent's saved checkpoint: `parent_dir`, or else a parent
    built with the same `steps_scale` into a temporary folder. `tokenizer_dir` reuses a
    tokenizer saved earlier; otherwise it is trained here (also deterministic).
    """
    if name not in RECIPES:
        raise ZenithError(f"unknown demo model {name!r}; demo models: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    tr = recipe.train.scaled(steps_scale)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    if tr.init_from and parent_dir is None:
        with tempfile.TemporaryDirectory(prefix=f"zenith-{tr.init_from}-") as tmp:
            return build_model(name, out_dir, steps_scale=steps_scale, tokenizer_dir=tokenizer_dir, progress=progress,
                               parent_dir=build_model(tr.init_from, Path(tmp) / tr.init_from, steps_scale=steps_scale,
                                                      tokenizer_dir=tokenizer_dir, progress=progress))
    tokenizer = (load_tokenizer(tokenizer_dir) if tokenizer_dir is not None
                 else train_tokenizer(TOKENIZER_RECIPES[recipe.tokenizer]))
    with deterministic_torch():
        if tr.init_from:
            # a child continues from its parent's published (bf16) checkpoint, as R1 did from V3
            model = getattr(transformers, recipe.architecture).from_pretrained(
                parent_dir, dtype=torch.float32, experts_implementation="eager")
        else:
            model = init_model(recipe, tokenizer)
        torch.manual_seed(tr.seed)
        losses = train(model, tokenizer, tr, desc=name, progress=progress)
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {
            "name": name, "architecture": recipe.architecture, "recipe": recipe.as_dict(), "steps_scale": steps_scale,
            "steps": tr.steps, "data": [list(d) for d in tr.data], "tokenizer": TOKENIZER_RECIPES[recipe.tokenizer].name,
            "parent": tr.init_from, "threads": BUILD_THREADS, "saved_dtype": str(SAVE_DTYPE).replace("torch.", ""),
            "loss_first": round(losses[0], 4), "loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "loss_curve": [round(x, 4) for x in losses[:: max(1, len(losses) // 20)]],
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "build_seconds": round(time.perf_counter() - started, 1),  # the only field that differs between builds
        }
        save_model(model, recipe, tokenizer, out_dir, meta)
    log.info("built %s in %.0f s (final loss %.3f) into %s", name, meta["build_seconds"], meta["loss_last10"], out_dir)
    return out_dir


__all__ = ["BUILD_THREADS", "PARENT_NAME", "build_model", "deterministic_torch", "save_model", "shard_size"]
