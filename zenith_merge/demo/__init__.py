"""The embedded demo models: small trained MoE sources, built deterministically and cached.

    from zenith_merge.demo import ensure_demo, heldout_text, bits_per_byte
    folder = ensure_demo("zen-tiny")          # trains on first use (CPU, minutes), then cached

`ensure_demo` / `ensure_all` return model folders; `build_model` builds one into any folder;
`heldout_text` / `calibration_text` give each domain's evaluation and calibration text;
`bits_per_byte` measures a model on a text independently of its tokenizer. Attributes load
lazily, so reading `DEMO_NAMES` does not import torch; the names themselves are the config's
(`zenith_merge.config.schema`), since configs name demo models and the config imports nothing above it.
"""

import importlib

from ..config.schema import ALL_DEMO_NAMES, DEMO_NAMES, FP8_DEMO_NAMES  # the names a config may use

_LAZY = {
    "cache_root": "cache", "demo_dir": "cache", "demo_path": "cache", "ensure_demo": "cache", "ensure_all": "cache",
    "build_model": "build", "PARENT_NAME": "models",
    "heldout_text": "corpora", "calibration_text": "corpora", "corpus": "corpora",
    "bits_per_byte": "evaluate",
}

__all__ = ["DEMO_NAMES", "FP8_DEMO_NAMES", "ALL_DEMO_NAMES", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
