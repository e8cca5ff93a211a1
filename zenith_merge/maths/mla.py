"""A Llama/Mistral attention layer (GQA with RoPE) written as DeepSeek-V3's multi-head latent attention (MLA),
computing the same function in transformers.

MLA's per-head key is [k_nope_h ; k_pe], k_pe one rotary key shared by every head, and its keys and values come
from a compressed latent that an RMSNorm (kv_a_layernorm, eps' = 1e-6 in transformers) scales per token. With H
hidden, n heads, n_kv KV heads of head_dim d, x_n the layer's normalised input (input_layernorm kept as it is),
g(h) head h's KV group, and every donor weight copied unscaled (only rearranged):

    qk_nope_head_dim = 0, qk_rope_head_dim = n_kv * d, v_head_dim = d, kv_lora_rank = H, q_lora_rank = none
    k_pe   = [W_k,0 x_n ; ... ; W_k,n_kv-1 x_n]            every KV head's key side by side in the shared key
    q_pe,h = W_q,h x_n in group g(h)'s slots, zeros elsewhere; cos and sin carry n_kv^(1/4) (longrope's
             attention_factor), so q_pe,h . k_pe gains sqrt(n_kv) and
             sqrt(n_kv) q_pe,h . k_pe / sqrt(n_kv d) = q_h . k_g(h) / sqrt(d)          (Llama's score)
    latent = c x_n, c a power of two with c^2 max(x_n^2) <= delta * eps' (delta = 1e-4), where
             RMSNorm(c x_n) * w = c x_n w / sqrt(c^2 ms(x_n) + eps') = x_n (1 + O(delta))  for w = sqrt(eps') / c
    v_h    = W_v,g(h) . RMSNorm(latent) * w = W_v,g(h) x_n (1 + O(delta))
    o_proj unchanged.

Since ms(x_n) <= max(weight)^2 (x_n = weight * x / rms(x)), RMSNorm works in its linear range for every token:
the value path is the donor's up to a relative 5e-5, and only the constant w is rounded to the written dtype
(bfloat16: 5e-4). The rotary key carries n_kv heads, each needing the donor's frequencies: MLA's rope over
qk_rope_head_dim dimensions has geometric frequencies base^(-2i / (n_kv d)), so the output config states the
donor's own per pair through `longrope`'s per-dimension factors (f_i = 1 / (inv_freq_i * base^(2i / (n_kv d))),
short and long as the donor's (the same list unless the donor is longrope), factor 1). transformers reads them;
vLLM, SGLang and llama.cpp read a DeepSeek `rope_scaling` as YaRN or not at all (and vLLM's kv_a_layernorm
takes rms_norm_eps), so this form computes the donor's attention in transformers only. Dynamic NTK scaling,
whose frequencies follow the sequence length, is refused.

Weights are stored as DeepSeek stores them (`rope_interleave`: each rotary pair as adjacent rows), so a Llama
head's pair (j, j + d/2) becomes rows (2j, 2j + 1) of its slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# transformers' DeepseekV3Attention builds kv_a_layernorm with RMSNorm's default eps (not rms_norm_eps).
KV_NORM_EPS = 1e-6
# How far inside RMSNorm's linear range the latent stays: relative error on the values at most DELTA / 2.
DELTA = 1e-4


@dataclass(frozen=True)
class GqaLayout:
    """The attention shape of a dense GQA config."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> GqaLayout:
        """Read from a Llama/Mistral config.json."""
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        return cls(hidden, heads, kv_heads, head_dim)

    @property
    def rope_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class DonorRope:
    """The donor's rope as transformers computes it: its base, inverse frequencies per rotary pair below and
    above `original` positions (different only for longrope), the factor on cos and sin, its context."""

    theta: float
    short: torch.Tensor
    long: torch.Tensor
    original: int
    attention_factor: float
    max_positions: int


def donor_rope(config: dict[str, Any]) -> DonorRope:
    """The donor's rope from its `rope_parameters` (default, linear, llama3, yarn, longrope), computed by
    transformers itself. Dynamic NTK scaling changes the frequencies with every sequence length, which no static
    list holds: refused (ValueError)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    known = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type", "auto_map")})
    params = known.rope_parameters or {}
    kind = params.get("rope_type", "default")
    if "dynamic" in kind:
        raise ValueError(f"rope_type {kind}: its frequencies change with the sequence length, which DeepSeek's "
                         f"rope cannot hold; convert with architecture: mixtral or qwen")
    rope = LlamaRotaryEmbedding(known)
    short, max_pos = rope.inv_freq.double(), int(known.max_position_embeddings)
    original, long = max_pos, short
    if kind == "longrope":
        original = int(params.get("original_max_position_embeddings") or max_pos)
        long = ROPE_INIT_FUNCTIONS[kind](known, None, seq_len=original + 1)[0].double()
    return DonorRope(float(params["rope_theta"]), short, long, original, float(rope.attention_scaling), max_pos)


def mla_config(config: dict[str, Any]) -> dict[str, Any]:
    """The DeepseekV3 attention keys of a dense GQA config: the MLA shape above and the donor's rope as longrope
    factors (see the module docstring)."""
    lay = GqaLayout.of(config)
    rope = donor_rope(config)
    theta = rope.theta
    d = lay.rope_dim
    exponent = torch.arange(0, d, 2, dtype=torch.int64).float() / d  # as transformers computes it
    mla_freq = (theta ** exponent).double()

    def factors(inv_freq: torch.Tensor) -> list[float]:
        # pair i of the shared key is pair i mod d/2 of KV head i // (d/2)
        return (1.0 / (inv_freq.repeat(lay.kv_heads) * mla_freq)).tolist()

    return {
        "num_attention_heads": lay.heads, "num_key_value_heads": lay.heads, "q_lora_rank": None,
        "kv_lora_rank": lay.hidden, "qk_rope_head_dim": d, "qk_nope_head_dim": 0, "v_head_dim": lay.head_dim,
        "rope_interleave": True, "rope_theta": theta, "max_position_embeddings": rope.max_positions,
        "rope_scaling": {"rope_type": "longrope", "rope_theta": theta, "short_factor": factors(rope.short),
                         "long_factor": factors(rope.long), "factor": 1.0,
                         "original_max_position_embeddings": rope.original,
                         # cos and sin times n_kv^(1/4): q_pe . k_pe gains sqrt(n_kv), so the score's
                         # 1 / sqrt(n_kv d) is the donor's 1 / sqrt(d), with q and k copied unscaled
                         "attention_factor": rope.attention_factor * lay.kv_heads ** 0.25},
    }


# Keys of a dense Llama/Mistral config with no meaning (or another) in the DeepseekV3 output.
GQA_ONLY_KEYS = ("head_dim", "rope_parameters", "sliding_window", "use_sliding_window", "max_window_layers",
                 "pretraining_tp", "mlp_bias", "attention_bias")


def latent_scale(input_norm: torch.Tensor) -> float:
    """c: the largest power of two with c^2 max(weight^2) <= DELTA * KV_NORM_EPS (exact in every float dtype)."""
    peak = float(input_norm.abs().max()) or 1.0
    return 2.0 ** math.floor(math.log2(math.sqrt(DELTA * KV_NORM_EPS) / peak))


def _pair_rows(head_dim: int) -> torch.Tensor:
    """Row order of one head in DeepSeek's interleaved rope layout: rows (2j, 2j+1) <- Llama's (j, j + d/2)."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


# The dense layer's weights (by architecture role) each MLA weight is made from.
MLA_INPUTS = {"q_proj": ("q_proj",), "kv_a_proj": ("k_proj", "input_norm"), "kv_a_norm": ("input_norm",),
              "kv_b_proj": ("v_proj",)}


def gqa_as_mla(part: str, weights: dict[str, torch.Tensor], lay: GqaLayout,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One MLA weight (`part`: q_proj, kv_a_proj, kv_a_norm or kv_b_proj) of a layer in `dtype`, from the dense
    layer's weights MLA_INPUTS[part] names (q, k, v projections, input_layernorm weight; see the module
    docstring). The donor's weights are copied unscaled (only rearranged), so they are rounded to `dtype` once,
    as in any conversion; q_proj, n_kv times the donor's q and mostly zeros, is filled in `dtype` directly."""
    d, group = lay.head_dim, lay.heads // lay.kv_heads
    rows = _pair_rows(d)
    if part == "q_proj":
        heads = weights["q_proj"].reshape(lay.heads, d, lay.hidden)[:, rows]
        out = torch.zeros(lay.heads, lay.kv_heads, d, lay.hidden, dtype=dtype)
        out[torch.arange(lay.heads), torch.arange(lay.heads) // group] = heads.to(dtype)
        return out.reshape(lay.heads * lay.rope_dim, lay.hidden)
    if part == "kv_b_proj":
        values = weights["v_proj"].reshape(lay.kv_heads, d, lay.hidden).to(dtype)
        return values.repeat_interleave(group, dim=0).reshape(lay.heads * d, lay.hidden)
    c = latent_scale(weights["input_norm"])
    if part == "kv_a_proj":
        keys = weights["k_proj"].reshape(lay.kv_heads, d, lay.hidden)[:, rows].reshape(lay.rope_dim, lay.hidden).to(dtype)
        return torch.cat([torch.eye(lay.hidden, dtype=dtype) * c, keys])
    if part == "kv_a_norm":
        return torch.full((lay.hidden,), math.sqrt(KV_NORM_EPS) / c, dtype=dtype)
    raise ValueError(f"unknown MLA part {part!r}")
