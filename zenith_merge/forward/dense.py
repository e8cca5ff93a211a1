"""A forward pass of Llama-family decoders (Llama, Mistral, Qwen2, Qwen3, and their MoE forms Mixtral, Qwen2-MoE,
Qwen3-MoE) over a few prompts, layer by layer, straight from the checkpoint: the MLP (or MoE block) inputs that
prompt-based router rows and the routing report need, without transformers.

Why: mergekit-moe's `hidden` gate mode runs the base on each expert's prompts. Loading transformers'
model classes for that costs seconds of imports and holds the whole model; this pass reads one
layer's weights at a time through the lazy reader (memory: one layer plus the prompts' states)
and imports only torch and tokenizers. It covers the plain case (default RoPE, SiLU MLP, no
sliding window reached, optional q/k norms and biases); anything else returns None and the caller
uses transformers. A test holds it equal to transformers' forward.

Per layer l, for the states h (tokens, hidden):
    x = rmsnorm(h) * w_in;  h = h + o(attn(rope(q(x)), rope(k(x)), v(x)))      (causal, GQA)
    m = rmsnorm(h) * w_post  <- captured: the MLP's input;  h = h + down(silu(gate(m)) * up(m))
with rmsnorm(x) = x / sqrt(mean(x^2) + eps), computed in float32 as transformers does. An MoE layer replaces
the MLP by sum_{e in topk} w_e expert_e(m) (the family's routing rule, maths/routing.py), plus Qwen2-MoE's
shared expert sigmoid(g . m) shared(m).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..architectures import ARCHITECTURES, optional_tensor_name, tensor_name
from ..io.reader import Checkpoint
from ..maths.routing import RoutingSpec, route, routing_spec

# Tokens per sequence the callers pass (prompts are cut, long texts chunked); `supported` checks that no
# sliding window is reached within it.
PLAIN_MAX_TOKENS = 512


def _rope_theta(config: dict[str, Any]) -> float | None:
    """The RoPE base of a default-RoPE config (transformers 4 or 5 keys); None for scaled or other RoPE."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type", "default")) != "default" or config.get("partial_rotary_factor"):
        return None
    return float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)


def supported(config: dict[str, Any], max_tokens: int) -> bool:
    """True when the plain pass computes what transformers would for prompts of up to `max_tokens` tokens."""
    arch = ARCHITECTURES.get((config.get("architectures") or [None])[0])
    if arch is None or not arch.plain_forward or _rope_theta(config) is None:
        return False
    if config.get("hidden_act", "silu") != "silu" or config.get("pretraining_tp", 1) != 1:
        return False
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", arch.model_type == "mistral")
    return not (window and uses_window and window < max_tokens)


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class _Layer:
    """One decoder layer's weights, read from the checkpoint in the compute dtype. A routed expert is read
    when a token picks it (`expert(e)`), one at a time; `mlp=False` reads no MLP at all (a last layer whose
    MLP input is all that is wanted)."""

    def __init__(self, ckpt: Checkpoint, arch, layer: int, dtype: torch.dtype, *, mlp: bool = True):
        def get(role: str, suffix: str = "") -> torch.Tensor | None:
            name = optional_tensor_name(arch, role, layer)
            if name is not None and suffix:
                name = name.removesuffix("weight") + suffix
            return ckpt.read(name).to(dtype) if name is not None and name in ckpt else None

        self.w_in, self.w_post = get("input_norm"), get("post_attention_norm")
        self.q, self.k, self.v, self.o = get("q_proj"), get("k_proj"), get("v_proj"), get("o_proj")
        self.qb, self.kb, self.vb, self.ob = (get(r, "bias") for r in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.q_norm, self.k_norm = get("q_norm"), get("k_norm")
        mlp_get = get if mlp else (lambda role, suffix="": None)
        self.gate, self.up, self.down = mlp_get("mlp_gate"), mlp_get("mlp_up"), mlp_get("mlp_down")
        self.gate_b, self.up_b, self.down_b = (mlp_get(r, "bias") for r in ("mlp_gate", "mlp_up", "mlp_down"))
        self.router = mlp_get("router")
        self.shared = tuple(mlp_get(r) for r in ("shared_gate", "shared_up", "shared_down"))
        self.shared_router = mlp_get("shared_router")
        self._ckpt, self._arch, self._layer, self._dtype = ckpt, arch, layer, dtype

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routed expert e's (gate, up, down), read now in the compute dtype."""
        return tuple(self._ckpt.read(tensor_name(self._arch, role, self._layer, e)).to(self._dtype)
                     for role in ("expert_gate", "expert_up", "expert_down"))


def _attention(L: _Layer, x: torch.Tensor, lengths: Sequence[int], cos: torch.Tensor, sin: torch.Tensor,
               heads: int, kv_heads: int, eps: float) -> torch.Tensor:
    """Causal self-attention over sequences laid end to end in x (each its own context, `lengths` tokens each):
    the projections run on every token at once, the attention itself sequence by sequence."""
    n = x.shape[0]
    hd = L.q.shape[0] // heads
    q = F.linear(x, L.q, L.qb).view(n, heads, hd)
    k = F.linear(x, L.k, L.kb).view(n, kv_heads, hd)
    v = F.linear(x, L.v, L.vb).view(n, kv_heads, hd)
    if L.q_norm is not None:  # Qwen3: RMSNorm over each head's features, before RoPE
        q, k = _rmsnorm(q, L.q_norm, eps), _rmsnorm(k, L.k_norm, eps)
    q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    rep = heads // kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = []
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        m = qs.shape[0]
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * hd ** -0.5
        scores = scores.masked_fill(~torch.ones(m, m, dtype=torch.bool).tril(), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(qs.dtype)
        out.append(torch.einsum("hqk,khd->qhd", probs, vs).reshape(m, heads * hd))
    return F.linear(torch.cat(out), L.o, L.ob)


def _mlp(L: _Layer, m: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """The layer's MLP, or its MoE block: the routed experts' weighted sum plus a shared expert where it has one."""
    if L.router is None:
        return F.linear(F.silu(F.linear(m, L.gate, L.gate_b)) * F.linear(m, L.up, L.up_b), L.down, L.down_b)
    idx, weights = route(F.linear(m, L.router), spec)
    out = torch.zeros_like(m)
    for e in range(L.router.shape[0]):
        rows, slot = (idx == e).nonzero(as_tuple=True)
        if len(rows):
            gate, up, down = L.expert(e)
            x = m[rows]
            out.index_add_(0, rows, F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
                           * weights[rows, slot, None].to(m.dtype))
    if L.shared[0] is not None:
        shared = F.linear(F.silu(F.linear(m, L.shared[0])) * F.linear(m, L.shared[1]), L.shared[2])
        out = out + (torch.sigmoid(F.linear(m, L.shared_router)) * shared if L.shared_router is not None else shared)
    return out


def mlp_inputs(folder: str | Path, texts: Sequence[str], layers: Sequence[int], *,
               dtype: torch.dtype = torch.float32, max_tokens: int = 512) -> list[dict[int, torch.Tensor]]:
    """Per text, per layer in `layers`: the MLP's input (the normalised state after attention), float32.

    Texts are tokenised with the model's tokenizer.json, no special tokens added, each cut to its
    first `max_tokens` tokens (as `capture_batch` does).
    """
    return layer_states(folder, [ids[:max_tokens] for ids in token_ids(folder, texts)], layers, dtype=dtype)


def token_ids(folder: str | Path, texts: Sequence[str]) -> list[list[int]]:
    """The texts tokenised with the model's tokenizer.json, no special tokens added."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    return [tok.encode(t, add_special_tokens=False).ids for t in texts]


def layer_states(folder: str | Path, ids: Sequence[Sequence[int]], layers: Sequence[int], *,
                 dtype: torch.dtype = torch.float32) -> list[dict[int, torch.Tensor]]:
    """`mlp_inputs` for token id sequences (each its own context)."""
    folder = Path(folder)
    with Checkpoint.open(folder, check_shapes=False) as ckpt:
        config = ckpt.config
        arch = ARCHITECTURES[config["architectures"][0]]
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        eps = float(config.get("rms_norm_eps", 1e-6))
        embed = ckpt.read(tensor_name(arch, "embed"))
        lengths = [len(row) for row in ids]
        # every sequence's tokens end to end: the projections and the MLP / MoE block act on each token alone,
        # so each weight is read from memory once per layer, not once per sequence
        h = embed[torch.tensor([t for row in ids for t in row], dtype=torch.long)].to(dtype)
        del embed
        positions = torch.cat([torch.arange(n) for n in lengths]).float()
        wanted = set(layers)
        out: list[dict[int, torch.Tensor]] = [{} for _ in ids]
        theta = _rope_theta(config)
        spec = routing_spec(config)
        rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        last = max(layers)
        for layer in range(last + 1):
            L = _Layer(ckpt, arch, layer, dtype, mlp=layer < last)
            hd = L.q.shape[0] // heads
            if hd not in rope:
                inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
                freqs = positions[:, None] * inv[None]
                emb = torch.cat((freqs, freqs), dim=-1)
                rope[hd] = emb.cos().to(dtype), emb.sin().to(dtype)
            h = h + _attention(L, _rmsnorm(h, L.w_in, eps), lengths, *rope[hd], heads, kv_heads, eps)
            mlp_in = _rmsnorm(h, L.w_post, eps)
            if layer in wanted:
                for i, piece in enumerate(mlp_in.split(lengths)):
                    out[i][layer] = piece.float()
            if layer == last:
                break
            h = h + _mlp(L, mlp_in, spec)
    return out


def bos_text(folder: str | Path) -> str:
    """The text of the model's BOS token from its tokenizer files ('' when it has none)."""
    from ..vocab.tokenizer_json import TokenizerFiles

    return TokenizerFiles.load(folder).token_content("bos_token") or ""
