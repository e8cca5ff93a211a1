"""Deterministic text corpora for the demo models: Python source code and step-by-step maths.

Everything is generated from seeded templates (`random.Random`), so every machine makes
the same text and nothing is read from disk or downloaded. Each domain has three
disjoint splits: `train` (models learn from it), `calibration` (merges may look at it:
router statistics, alignment maps, lambda search) and `heldout` (only evaluation reads
it). The splits use different seeds and are filtered against each other (no held-out
document also appears in training text), see `corpus`.

Maths comes in three styles: `plain` (a question, a DeepSeek-R1-style `<think>` trace,
the answer), `r1_chat` (the same inside DeepSeek's `<｜User｜>` / `<｜Assistant｜>` turn)
and `qwen_chat` (a Qwen3 chat turn with the `/think` or `/no_think` soft switch).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from functools import lru_cache
from typing import Literal

from .corpus_code import code_sample
from .corpus_maths import STYLES, Style, maths_doc

Domain = Literal["code", "maths"]
Split = Literal["train", "calibration", "heldout"]
DOMAINS: tuple[str, ...] = ("code", "maths")
SPLITS: tuple[str, ...] = ("train", "calibration", "heldout")
_SPLIT_SEEDS = {"train": 1_000, "calibration": 2_000, "heldout": 3_000}
_DOMAIN_SEEDS = {"code": 11, "maths": 23}
_STYLE_SEEDS = {"plain": 0, "r1_chat": 3, "qwen_chat": 5}
HELDOUT_CHARS = 32_000
CALIBRATION_CHARS = 32_000


def _iter_docs(domain: str, split: str, style: str) -> Iterator[tuple[bytes, str]]:
    """Endless seeded documents of one split, each with its identity key (code: the text; maths: the question)."""
    r = random.Random(_SPLIT_SEEDS[split] * 7919 + _DOMAIN_SEEDS[domain] * 31 + _STYLE_SEEDS[style])
    while True:
        if domain == "code":
            doc = code_sample(r) + "\n\n"
            key = doc
        else:
            key, doc = maths_doc(r, style)
        yield hashlib.blake2b(key.encode(), digest_size=8).digest(), doc


def _take(docs: Iterator[tuple[bytes, str]], n_chars: int, exclude: frozenset[bytes] = frozenset()) -> list[tuple[bytes, str]]:
    out, size = [], 0
    for key, doc in docs:
        if size >= n_chars:
            break
        if key not in exclude:
            out.append((key, doc))
            size += len(doc)
    return out


@lru_cache(maxsize=4)
def _reserved(domain: str) -> frozenset[bytes]:
    """Keys of every held-out and calibration document of a domain (all styles): training never emits them."""
    styles = STYLES if domain == "maths" else ("plain",)
    return frozenset(key for split, n in (("heldout", HELDOUT_CHARS), ("calibration", CALIBRATION_CHARS))
                     for style in styles for key, _ in _take(_iter_docs(domain, split, style), n))


def corpus(domain: Domain, split: Split, n_chars: int, *, style: Style = "plain") -> str:
    """At least `n_chars` characters of one domain and split; same arguments, same text on every machine.

    `style` only applies to maths. Training text skips every document (for maths: every
    question) that the held-out or calibration text of any style contains, so evaluation
    measures generalisation rather than recall.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; domains: {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    exclude = _reserved(domain) if split == "train" else frozenset()
    docs = _iter_docs(domain, split, style if domain == "maths" else "plain")
    return "".join(doc for _, doc in _take(docs, n_chars, exclude))


def heldout_text(domain: Domain, *, style: Style = "plain") -> str:
    """Held-out evaluation text of a domain (about 32 KB; never trained on, never used to calibrate)."""
    return corpus(domain, "heldout", HELDOUT_CHARS, style=style)


def calibration_text(domain: Domain, *, style: Style = "plain") -> str:
    """Calibration text of a domain (about 32 KB), disjoint from the training and held-out text."""
    return corpus(domain, "calibration", CALIBRATION_CHARS, style=style)
