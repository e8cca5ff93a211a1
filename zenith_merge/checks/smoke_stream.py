"""transformers' own model, run with its weights left on disk: each module reads its weights as it runs.

For a model larger than the smoke test's memory cap. The model is built from its config on the meta device (no
memory), then:
- every module that owns weights (a Linear, a norm, a router) reads them from the checkpoint through the lazy
  reader just before it runs and drops them after (block-FP8 weights dequantised on read, as the merge reads
  them): one weight in memory at a time;
- the routed experts read only the experts the router picked, one at a time (transformers 5 holds a layer's
  experts as one fused tensor: 22 GB per layer at DeepSeek-V3's width);
- the input embedding reads only the rows of the tokens it is given, and the output head computes the logits
  in slabs of vocabulary rows (the release's 129,280 x 7,168 head is 1.85 GB in bfloat16);
- the rotary embedding is rebuilt on the CPU from the config.

transformers' forward, masks, RoPE, routing and `generate` (with its KV cache) run unchanged, so the numbers
are transformers' own (tests hold them equal to a normal load). The memory used is the interpreter, the
largest single weight (in a buffer reused from pass to pass, beside its FP8 bytes) and the activations,
whatever the model's size; every forward pass reads every weight it uses once (the experts: those picked), so
it is slow per pass and meant for a few.

`stream_model` also says whether each weight transformers' model has is in the checkpoint with its shape, and
which checkpoint tensors nothing reads (the same account `from_pretrained(..., output_loading_info=True)`
gives), from the same mapping the modules read through, so a streamed model that answers has read every
weight.
"""

from __future__ import annotations

import re
import weakref
from pathlib import Path

import torch
from torch import nn

from ..errors import ZenithError

STREAMABLE = ("DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM",
              "MistralForCausalLM")  # their transformers names are the checkpoint's, experts fused per layer
SLAB_BYTES = 16 * 2**20  # the output head's rows read at a time
_FUSED = re.compile(r"(?P<prefix>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)\Z")


class StreamError(ZenithError):
    """The model cannot be run streamed (an unsupported module layout)."""


class _Arena:
    """Reused memory for the weights being read: one buffer per (nesting depth, position among the module's
    tensors), grown to the largest tensor that position sees, so that a forward pass reads every weight into
    memory already mapped instead of allocating (and page-faulting) its size anew. A weight is a view into its
    buffer, valid until the next module at its depth runs: a module's own tensors never share one, and a
    module running inside another (depth + 1) uses others."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self.depth = 0
        self._buffers: dict[tuple, bytearray] = {}

    def _buffer(self, key: tuple, nbytes: int) -> memoryview:
        buf = self._buffers.get(key)
        if buf is None or len(buf) < nbytes:
            self._buffers.pop(key, None)  # free the smaller one before allocating the larger one
            buf = self._buffers[key] = bytearray(nbytes)
        return memoryview(buf)[:nbytes]

    def read(self, name: str, slot: int, dtype: torch.dtype) -> torch.Tensor:
        """Tensor `name` (block FP8 dequantised to bfloat16) as `dtype`, in buffer `slot` of this depth."""
        from ..kernels.fp8 import dequantize

        ckpt, key = self.ckpt, (self.depth, slot)
        info = ckpt.info(name)
        if ckpt.is_fp8(name):
            q = ckpt.read_stored_into(name, self._buffer(key + ("fp8",), info.shape[0] * info.shape[1]))
            out = torch.frombuffer(self._buffer(key, info.nbytes), dtype=torch.bfloat16)
            out = out.view(tuple(info.shape))
            t = dequantize(q, ckpt.read_scale(name), ckpt.fp8_block, out=out)
        else:
            t = ckpt.read_stored_into(name, self._buffer(key, max(info.nbytes, 1)))
        return t if t.dtype == dtype else t.to(dtype)


def _expert_names(prefix: str, kind: str, n: int) -> list[list[str]]:
    """The checkpoint tensors behind one fused experts parameter: per expert, [gate, up] or [down]."""
    parts = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    return [[f"{prefix}.{e}.{p}.weight" for p in parts] for e in range(n)]


def loading_info(ckpt, model: nn.Module) -> dict[str, list[str]]:
    """transformers' account of a load, without loading: the model's weights missing from the checkpoint
    (`missing_keys`), checkpoint tensors no weight reads (`unexpected_keys`), and weights whose checkpoint
    tensors have another shape (`mismatched_keys`), by the mapping `stream_model`'s modules read through."""
    names = set(ckpt.names())
    used: set[str] = set()
    missing, mismatched = [], []
    tied = getattr(model, "_tied_weights_keys", None) or {}
    tie = bool(getattr(model.config, "tie_word_embeddings", False))
    for key, t in model.state_dict(keep_vars=True).items():
        fused = _FUSED.match(key)
        if fused:
            groups = _expert_names(fused["prefix"], fused["kind"], t.shape[0])
            absent = [n for g in groups for n in g if n not in names]
            if absent:
                missing.append(key)
                continue
            rows = sum(ckpt.info(n).shape[0] for n in groups[0])
            if any(tuple(ckpt.info(n).shape) != tuple(ckpt.info(g[0]).shape) for g in groups for n in g) or \
                    (rows, ckpt.info(groups[0][0]).shape[1]) != tuple(t.shape[1:]):
                mismatched.append(key)
            used.update(n for g in groups for n in g)
            continue
        source = key if key in names or not (tie and key in tied) else tied[key]
        if source not in names:
            missing.append(key)
        elif tuple(ckpt.info(source).shape) != tuple(t.shape):
            mismatched.append(key)
        used.add(source)
    return {"missing_keys": missing, "unexpected_keys": sorted(names - used), "mismatched_keys": mismatched}


class _Rows(nn.Module):
    """The input embedding: reads the rows of the tokens it is given. Its one-element parameter on the CPU
    stands first among the model's parameters, where transformers reads the model's device and dtype."""

    def __init__(self, ckpt, name: str, dtype: torch.dtype):
        super().__init__()
        self.ckpt, self.name = ckpt, name
        self.anchor = nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of `input_ids`, from their rows only."""
        ids, inverse = torch.unique(input_ids, return_inverse=True)
        if self.ckpt.is_fp8(self.name):  # not in any release; read whole
            rows = self.ckpt.read(self.name)[ids]
        else:
            info = self.ckpt.info(self.name)
            row_bytes = info.nbytes // info.shape[0]
            buf = bytearray(row_bytes)
            rows = torch.stack([self.ckpt.read_stored_into(self.name, buf, rows=(i, i + 1))[0].clone()
                                for i in ids.tolist()])
        return rows.to(self.anchor.dtype)[inverse]


class _SlabHead(nn.Module):
    """The output head: logits computed in slabs of vocabulary rows read into one reused buffer."""

    def __init__(self, ckpt, name: str, dtype: torch.dtype, slab_bytes: int = SLAB_BYTES):
        super().__init__()
        self.ckpt, self.name, self.dtype, self.slab_bytes = ckpt, name, dtype, slab_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of `x`, slab of vocabulary rows by slab."""
        info = self.ckpt.info(self.name)
        vocab, width = info.shape
        if self.ckpt.is_fp8(self.name):
            return nn.functional.linear(x, self.ckpt.read(self.name).to(x.dtype))
        step = max(1, self.slab_bytes // (info.nbytes // vocab))
        buf = bytearray(min(step, vocab) * (info.nbytes // vocab))
        out = torch.empty(*x.shape[:-1], vocab, dtype=x.dtype)
        for r in range(0, vocab, step):
            w = self.ckpt.read_stored_into(self.name, buf, rows=(r, min(r + step, vocab)))
            out[..., r:r + len(w)] = nn.functional.linear(x, w.to(x.dtype))
        return out


class _LazyExperts(nn.Module):
    """A layer's routed experts (transformers 5's fused experts module, same call): each expert the router
    picked reads its gate, up and down projections, computes, and drops them."""

    def __init__(self, arena: _Arena, prefix: str, n: int, act_fn, dtype: torch.dtype):
        super().__init__()
        self.arena, self.prefix, self.num_experts, self.act_fn, self.dtype = arena, prefix, n, act_fn, dtype

    def _w(self, e: int, slot: int, part: str) -> torch.Tensor:
        return self.arena.read(f"{self.prefix}.{e}.{part}.weight", slot, self.dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the picked experts' outputs, as transformers' eager experts compute it."""
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:
                continue
            token_idx, top_k_pos = torch.where(top_k_index == e)
            x = hidden_states[token_idx]
            gate = nn.functional.linear(x, self._w(e, 0, "gate_proj"))
            h = self.act_fn(gate) * nn.functional.linear(x, self._w(e, 1, "up_proj"))
            h = nn.functional.linear(h, self._w(e, 2, "down_proj"))
            h = h * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's direct parameters and persistent buffers (what it reads when it runs)."""
    out = {n: p for n, p in module._parameters.items() if p is not None}
    out.update({n: b for n, b in module._buffers.items()
                if b is not None and n not in module._non_persistent_buffers_set})
    return out


def _attach_reads(arena: _Arena, module: nn.Module, path: str) -> None:
    """Hooks that give `module` its weights from the checkpoint before it runs and take them after."""
    templates = {n: (t.shape, t.dtype, n in module._parameters) for n, t in _own_tensors(module).items()}

    def give(mod, args):
        for slot, (n, (_, dtype, param)) in enumerate(templates.items()):
            t = arena.read(f"{path}.{n}" if path else n, slot, dtype)
            if param:
                mod._parameters[n] = nn.Parameter(t, requires_grad=False)
            else:
                mod._buffers[n] = t
        arena.depth += 1

    def take(mod, args, output):
        arena.depth -= 1
        for n, (shape, dtype, param) in templates.items():
            empty = torch.empty(shape, dtype=dtype, device="meta")
            if param:
                mod._parameters[n] = nn.Parameter(empty, requires_grad=False)
            else:
                mod._buffers[n] = empty

    module.register_forward_pre_hook(give)
    module.register_forward_hook(take)


def stream_model(folder: str | Path, *, dtype: torch.dtype = torch.bfloat16):
    """transformers' model of `folder` with its weights left on disk (see the module docstring), its tokenizer
    and its loading account: `(model, tokenizer, info)`. Raises StreamError for an architecture or module
    layout it does not handle."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ..io.reader import Checkpoint

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch not in STREAMABLE:
        raise StreamError(f"architecture {arch!r} is not streamed (streamed: {', '.join(STREAMABLE)})")
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # block FP8 is dequantised by the reader, not by transformers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    ckpt = Checkpoint.open(folder, check_shapes=False)
    weakref.finalize(model, ckpt.close)
    info = loading_info(ckpt, model)
    parameters = sum(p.numel() for p in model.parameters())
    arena = _Arena(ckpt)
    names = set(ckpt.names())
    embed_name = "model.embed_tokens.weight"
    head_name = "lm_head.weight" if "lm_head.weight" in names else embed_name  # tied
    model.set_input_embeddings(_Rows(ckpt, embed_name, dtype))
    model.lm_head = _SlabHead(ckpt, head_name, dtype)
    for path, module in list(model.named_modules()):
        if all(hasattr(module, a) for a in ("gate_up_proj", "down_proj", "num_experts")):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    _LazyExperts(arena, path, module.num_experts, module.act_fn, dtype))
    for path, module in list(model.named_modules()):
        if path.endswith("rotary_emb"):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, type(module)(module.config))
    for path, module in model.named_modules():
        if isinstance(module, (_Rows, _SlabHead, _LazyExperts)) or path.endswith("rotary_emb"):
            continue
        computed = [b for n, b in module._buffers.items() if n in module._non_persistent_buffers_set]
        if any(b is not None and b.is_meta for b in computed):
            raise StreamError(f"{path}: a computed buffer on the meta device; this layout is not streamed")
        if _own_tensors(module):
            _attach_reads(arena, module, path)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model._zenith_ckpt = ckpt
    model._zenith_parameters = parameters  # its own parameters are placeholders now
    return model.eval(), AutoTokenizer.from_pretrained(folder), info
