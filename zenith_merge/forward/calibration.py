"""Calibration forward passes: run text through a source model and capture hidden states, in bounded memory.

    model, tokenizer = load_for_calibration(folder, max_memory={"cpu": "2GiB"})   # forward/loading.py
    points = [CapturePoint.input_of("model.layers.2.mlp"), CapturePoint.output_of("model.layers.2")]
    for chunk in capture_hidden(model, tokenizer, texts, points):
        chunk.ends, chunk.states[points[0]]          # (n,) character offsets, (n, hidden) float32

The stages that need activations (alignment, router rows, expert usage) only see what this
module yields, so a source model is never materialised by zenith itself: transformers and
accelerate place the weights (`device_map`, `max_memory`, disk offload read back from the
safetensors files) and bitsandbytes can hold the linear layers in 8 bits.

Capture points are named, not guessed: the caller says which module to hook and whether it
wants what the module sees (`input`: for an MoE block, the normalised residual stream its
router and experts read) or what it returns (`output`: for a decoder layer, the residual
stream after it). Module names come from the architecture tables, never from here.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..errors import CalibrationError
from .loading import input_device

__all__ = ["CapturePoint", "CapturedChunk", "capture_hidden", "capture_batch", "head_skipping"]


CaptureKind = Literal["input", "output"]


@dataclass(frozen=True)
class CapturePoint:
    """One place to read activations: the `input` (first tensor argument) or `output` of a named module."""

    module: str
    kind: CaptureKind

    def __post_init__(self) -> None:
        if self.kind not in ("input", "output"):
            raise ValueError(f"CapturePoint kind must be 'input' or 'output', not {self.kind!r}")

    @classmethod
    def input_of(cls, module: str) -> CapturePoint:
        return cls(module, "input")

    @classmethod
    def output_of(cls, module: str) -> CapturePoint:
        return cls(module, "output")

    def __str__(self) -> str:
        return f"{self.kind}:{self.module}"


@dataclass
class CapturedChunk:
    """The activations of one chunk of one text (at most `max_tokens_per_text` tokens).

    `ends[i]` is the end character offset of token i in the ORIGINAL text `text_index`
    (not in the chunk), so two tokenizations of one text can be paired by offset.
    `text` is the chunk's own text: original[start:ends[-1]]. `states[point]` is a float32
    CPU tensor of shape (n_tokens, width).
    """

    text_index: int
    start: int
    text: str
    ends: torch.Tensor
    states: dict[CapturePoint, torch.Tensor]

    def __len__(self) -> int:
        return int(self.ends.numel())



def _first_tensor(value) -> torch.Tensor:
    """A module's output may be a tensor, a tuple or a ModelOutput: the hidden states come first."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"expected a tensor or a tuple starting with one, got {type(value).__name__}")


def head_skipping(model, points: Iterable[CapturePoint]) -> dict:
    """Forward keyword arguments that compute the output head for the last position only, or none.

    Why: a capture pass reads hidden states, never logits, yet a causal LM's forward multiplies every
    position by the (vocab x hidden) head: tokens x vocab x hidden multiply-adds and a tokens x vocab
    logits tensor (512 tokens of DeepSeek's 129,280-token vocabulary in float32: 265 MB; see
    bench/capture_head.py). transformers' `logits_to_keep=1` keeps the last position only. Not where a
    point reads the head itself (RegMean solving `lm_head`), nor where the forward does not take the argument.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    try:
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    if head is None or not takes:
        return {}
    return {} if any(_module(model, p.module) is head for p in points) else {"logits_to_keep": 1}


def _module(model, name: str):
    """The submodule `name` of `model`, or None where there is none (the hooks then say so)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _chunks(text: str, tokenizer, max_tokens: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(start char, ids, ends) per chunk of at most `max_tokens` tokens, cut at token boundaries.

    The whole text is tokenized once and the ids are cut, never re-tokenized, so every chunk has
    exactly the tokens (and offsets into the original text) that the full tokenization has.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    offsets = torch.tensor(enc["offset_mapping"], dtype=torch.long).reshape(-1, 2)
    for lo in range(0, ids.numel(), max_tokens):
        hi = min(lo + max_tokens, ids.numel())
        start = 0 if lo == 0 else int(offsets[lo - 1, 1])
        yield start, ids[lo:hi], offsets[lo:hi, 1].clone()


def capture_hidden(
    model,
    tokenizer,
    texts: Iterable[str],
    points: Sequence[CapturePoint],
    *,
    max_tokens_per_text: int = 512,
    max_total_tokens: int | None = None,
    stop_after: str | None = None,
    progress: bool = True,
    desc: str = "calibration",
) -> Iterator[CapturedChunk]:
    """Run texts through the model, one chunk at a time, and yield the activations at `points`.

    Why: stages need per-token activations paired with character offsets (to pair tokenizers), and
    must not keep them for a whole corpus; each chunk is yielded as soon as its forward pass ends and
    holds only float32 CPU copies of the captured tensors. Texts longer than `max_tokens_per_text`
    are cut at token boundaries into chunks that run independently (each without the previous
    chunk's context). No special tokens are added. Stops after `max_total_tokens` tokens (the last
    chunk is cut short). With `stop_after` (a module path, such as the decoder layer of the deepest
    point), each forward pass ends once that module has run: the layers after it, which no point
    needs, are never computed (nor read from disk, when offloaded). Hooks are removed when the
    generator finishes or is closed.
    """
    if max_tokens_per_text < 1:
        raise ValueError("max_tokens_per_text must be at least 1")
    points = list(dict.fromkeys(points))
    device = input_device(model)
    extra = head_skipping(model, points)
    total = 0
    bar = tqdm(total=max_total_tokens, desc=desc, unit="tok", disable=not progress, leave=False)
    try:
        with _Hooks(model, points) as hooks, _stopping_after(model, stop_after), torch.no_grad():
            for index, text in enumerate(texts):
                for start, ids, ends in _chunks(text, tokenizer, max_tokens_per_text):
                    if max_total_tokens is not None:
                        room = max_total_tokens - total
                        if room <= 0:
                            return
                        ids, ends = ids[:room], ends[:room]
                    if ids.numel() == 0:
                        continue
                    try:
                        model(input_ids=ids[None].to(device), use_cache=False, **extra)
                    except _Stopped:
                        pass
                    states = {p: t.reshape(-1, t.shape[-1]).float().cpu() for p, t in hooks.take().items()}
                    total += ids.numel()
                    bar.update(ids.numel())
                    yield CapturedChunk(index, start, text[start:int(ends[-1])], ends, states)
    finally:
        bar.close()


class _Stopped(Exception):
    """Raised once the module a forward pass stops after has run."""


@contextlib.contextmanager
def _stopping_after(model, module: str | None) -> Iterator[None]:
    """While the block runs, end every forward pass of `model` right after `module` (None: run them whole)."""
    if module is None:
        yield
        return

    def stop(_module, _args, _output):
        raise _Stopped

    try:
        handle = model.get_submodule(module).register_forward_hook(stop)
    except AttributeError:
        raise CalibrationError(f"stop_after: the model has no module {module!r}") from None
    try:
        yield
    finally:
        handle.remove()


class _Hooks:
    """Forward hooks that record what `points` see, installed for a `with` block and removed after it."""

    def __init__(self, model, points: Sequence[CapturePoint]):
        self.points = list(points)
        self.named = dict(model.named_modules())
        missing = sorted({p.module for p in self.points} - self.named.keys())
        if missing:
            raise CalibrationError(f"{type(model).__name__} has no module {', '.join(missing)} to capture")
        self.captured: dict[CapturePoint, torch.Tensor] = {}
        self.handles: list = []

    def _install(self, point: CapturePoint):
        module = self.named[point.module]
        if point.kind == "input":
            def pre(module, args, kwargs):
                value = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
                self.captured[point] = _first_tensor(value).detach()
            return module.register_forward_pre_hook(pre, with_kwargs=True)

        def post(module, args, output):
            self.captured[point] = _first_tensor(output).detach()
        return module.register_forward_hook(post)

    def __enter__(self) -> _Hooks:
        self.handles = [self._install(p) for p in self.points]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.captured.clear()

    def take(self) -> dict[CapturePoint, torch.Tensor]:
        """What the last forward pass recorded, every point present (else CalibrationError); then forget it."""
        absent = [str(p) for p in self.points if p not in self.captured]
        if absent:
            raise CalibrationError(f"the forward pass never reached {', '.join(absent)}")
        out = {p: self.captured[p] for p in self.points}
        self.captured.clear()
        return out


def capture_batch(model, tokenizer, texts: Sequence[str], points: Sequence[CapturePoint], *,
                  max_tokens_per_text: int = 512) -> list[dict[CapturePoint, torch.Tensor]]:
    """The activations at `points` for a few short texts, run together in one padded forward pass.

    Why: with weights offloaded to disk, every forward pass reads the whole model once; prompts
    (a handful of short texts) batched into one pass read it once in all. Texts are right-padded
    with an attention mask, so in a causal model no real token sees a pad; each text keeps its
    first `max_tokens_per_text` tokens. No special tokens are added. Returns, per text, float32
    CPU tensors of shape (n_tokens, width).
    """
    points = list(dict.fromkeys(points))
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens_per_text] for t in texts]
    if not texts or any(not row for row in ids):
        raise CalibrationError("capture_batch: every text needs at least one token")
    width = max(len(row) for row in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        batch[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    device = input_device(model)
    with _Hooks(model, points) as hooks, torch.no_grad():
        model(input_ids=batch.to(device), attention_mask=mask.to(device), use_cache=False,
              **head_skipping(model, points))
        captured = hooks.take()
    states = {p: t.reshape(len(ids), width, -1).float().cpu() for p, t in captured.items()}
    return [{p: states[p][i, :len(row)] for p in points} for i, row in enumerate(ids)]
