"""What the stages read besides the sources: training, calibration and protected texts, and where the
stages keep their artefacts in the output folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import MergeConfig, resolve_path
from ..errors import ConfigError
from ..plan.models import (
    Plan,
)


def union_dir(out_dir: Path) -> Path:
    """Where the tokenizer stage keeps the union tokenizer's files: `<output>/.zenith/tokenizer/`."""
    from ..stages.tokenizer import TOKENIZER_DIR

    return out_dir / ".zenith" / TOKENIZER_DIR


def alignment_dir(out_dir: Path, source: str) -> Path:
    """Where a source's fitted maps A and B are kept: `<output>/.zenith/align-<source>/`."""
    return out_dir / ".zenith" / f"align-{source}"


def check_training_inputs(plan: Plan, cfg: MergeConfig, config_dir: Path | None) -> None:
    """Refuse training text that is missing or too short for one sequence before any stage runs or any
    weight is written (training comes last, after the hours a big merge takes)."""
    if not plan.stages.train_routers:
        return
    from ..stages.router_training import check_training_text

    texts, where = training_texts(cfg, config_dir)
    check_training_text(plan, texts, where, read_texts(cfg.align.teacher_data, "align.teacher_data", config_dir))


def training_texts(cfg: MergeConfig, config_dir: Path | None) -> tuple[list[str], str]:
    """Router (and alignment) training's text, and where the config names it: `router.data`, or by default
    `align.calibration` and every expert's positive prompts."""
    if cfg.router.data:
        return read_texts(cfg.router.data, "router.data", config_dir), "router.data"
    texts = [*read_texts(cfg.align.calibration, "align.calibration", config_dir),
             *(p for e in cfg.experts for p in e.positive_prompts)]
    return texts, "router.data (empty: align.calibration and the experts' positive_prompts)"


def read_texts(items, key: str, config_dir: Path | None) -> list[str]:
    """The texts a config list names: text files (relative to the config) or demo:code / demo:maths."""
    texts = []
    for i, item in enumerate(items):
        if item.startswith("demo:"):
            from ..demo import calibration_text

            domain = item.removeprefix("demo:")
            if domain not in ("code", "maths"):
                raise ConfigError(f"{key}.{i}: unknown demo text {item!r}; use demo:code or demo:maths")
            texts.append(calibration_text(domain))
            continue
        path = resolve_path(item, config_dir)
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"{key}.{i}: cannot read {path} ({err.strerror})") from None
    return texts


def calibration_texts(cfg: MergeConfig, config_dir: Path | None) -> list[str]:
    """The alignment's calibration text: `align.calibration` (files, or demo:<domain>), else every prompt."""
    texts = read_texts(cfg.align.calibration, "align.calibration", config_dir)
    if not texts:
        texts = [p for e in cfg.experts for p in (*e.positive_prompts, *e.negative_prompts)]
    if not texts:
        raise ConfigError("align.calibration: fitting the hidden-space maps needs calibration text; give text "
                          "files (or experts' prompts)")
    return texts


def calibration_load(cfg: MergeConfig) -> dict:
    """`load_for_calibration`'s options from the config: 8-bit, the CPU memory cap, the dtype."""
    dtype = cfg.calibration_dtype if cfg.calibration_dtype == "stored" else getattr(torch, cfg.calibration_dtype)
    max_memory = {"cpu": cfg.calibration_max_memory} if cfg.calibration_max_memory is not None else None
    return {"load_in_8bit": cfg.load_in_8bit, "max_memory": max_memory, "dtype": dtype}


def file_sha256(path: Path) -> str:
    from ..io.manifest import file_sha256

    return file_sha256(path)


def protect_texts(plan: Plan, config_dir: Path | None) -> list[str]:
    """The text the union tokenizer must split as the base does: `tokenizer.protect`, else the base's prompts."""
    return read_texts(plan.vocab.protect, "tokenizer.protect", config_dir) or list(plan.vocab.protect_prompts)
