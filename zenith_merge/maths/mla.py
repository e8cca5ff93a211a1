"""A Llama/Mistral attention layer (GQA with RoPE) written as DeepSeek-V3's multi-head latent attention (MLA),
computing the same function in transformers.

MLA's per-head key is [k_nope_h ; k_pe], k_pe one rotary key shared by every head, and its keys and values come
from a compressed latent that an RMSNorm (kv_a_layernorm) scales per token. With H hidden, n heads, n_kv KV
heads of head_dim d, x_n the layer's normalised input (input_layernorm kept as it is), g(h) head h's KV group:

    qk_nope_head_dim = 0, qk_rope_head_dim = n_kv * d, v_head_dim = d, kv_lora_rank = H, q_lora_rank = none
    k_pe   = [W_k,0 x_n ; ... ; W_k,n_kv-1 x_n]            every KV head's key side by side in the shared key
    q_pe,h = sqrt(n_kv) * W_q,h x_n in group g(h)'s slots, zeros elsewhere, so that
             q_pe,h . k_pe / sqrt(n_kv d) = q_h . k_g(h) / sqrt(d)                     (Llama's score)
    latent = c x_n, c a power of two with c^2 max(x_n^2) <= delta * eps (delta = 1e-4), where
             RMSNorm(c x_n) = c x_n / sqrt(c^2 ms(x_n) + eps) = c x_n / sqrt(eps) * (1 + O(delta))
    v_h    = W_v,g(h) * sqrt(eps) / c . RMSNorm(latent) = W_v,g(h) x_n * (1 + O(delta))
    o_proj unchanged.

Since ms(x_n) <= max(weight)^2 (x_n = weight * x / rms(x)), RMSNorm works in its linear range for every token:
the value path is the donor's up to a relative 5e-5, below bfloat16's rounding. The rotary key carries n_kv
heads, each needing the donor's frequencies: MLA's rope over qk_rope_head_dim dimensions has geometric
frequencies base^(-2i / (n_kv d)), so the output config states the donor's own per pair through `longrope`'s
per-dimension factors (f_i = 1 / (inv_freq_i * base^(2i / (n_kv d))), the same list short and long, factor 1,
the donor's attention factor). transformers reads them; vLLM and SGLang replace a DeepSeek `rope_scaling` by
their DeepSeek YaRN, so this form computes the donor's attention in transformers only.

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


def donor_rope(config: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """(inv_freq per rotary pair, attention factor) the donor's transformers rope computes: its `rope_parameters`
    (default, llama3, yarn, ...) applied by transformers itself, so every rope type a Llama loads is carried."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    known = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "auto_map")}
    rope = LlamaRotaryEmbedding(LlamaConfig(**known))
    return rope.inv_freq.double(), float(rope.attention_scaling)


def mla_config(config: dict[str, Any]) -> dict[str, Any]:
    """The DeepseekV3 attention keys of a dense GQA config: the MLA shape above and the donor's rope as longrope
    factors (see the module docstring)."""
    lay = GqaLayout.of(config)
    inv_freq, attention_factor = donor_rope(config)
    theta = float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0)
    d = lay.rope_dim
    exponent = torch.arange(0, d, 2, dtype=torch.int64).float() / d  # as transformers computes it
    mla_freq = (theta ** exponent).double()
    want = inv_freq.repeat(lay.kv_heads)  # pair i of the shared key is pair i mod d/2 of KV head i // (d/2)
    factors = (1.0 / (want * mla_freq)).tolist()
    max_pos = int(config.get("max_position_embeddings") or 4096)
    return {
        "num_attention_heads": lay.heads, "num_key_value_heads": lay.heads, "q_lora_rank": None,
        "kv_lora_rank": lay.hidden, "qk_rope_head_dim": d, "qk_nope_head_dim": 0, "v_head_dim": lay.head_dim,
        "rope_interleave": True, "rope_theta": theta, "max_position_embeddings": max_pos,
        "rope_scaling": {"rope_type": "longrope", "rope_theta": theta, "short_factor": factors, "long_factor": factors,
                         "factor": 1.0, "original_max_position_embeddings": max_pos,
                         "attention_factor": attention_factor},
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


def gqa_as_mla(part: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_norm: torch.Tensor,
               lay: GqaLayout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One MLA weight (`part`: q_proj, kv_a_proj or kv_b_proj) of a layer, computed in float32 and returned in
    `dtype`, from the layer's q, k and v projections and its input_layernorm weight (see the module docstring).
    q_proj, n_kv times the donor's q and mostly zeros, is filled in `dtype` directly."""
    d, group = lay.head_dim, lay.heads // lay.kv_heads
    rows = _pair_rows(d)
    if part == "q_proj":
        heads = q.float().reshape(lay.heads, d, lay.hidden)[:, rows] * math.sqrt(lay.kv_heads)
        out = torch.zeros(lay.heads, lay.kv_heads, d, lay.hidden, dtype=dtype)
        out[torch.arange(lay.heads), torch.arange(lay.heads) // group] = heads.to(dtype)
        return out.reshape(lay.heads * lay.rope_dim, lay.hidden)
    c = latent_scale(input_norm)
    if part == "kv_a_proj":
        keys = k.float().reshape(lay.kv_heads, d, lay.hidden)[:, rows].reshape(lay.rope_dim, lay.hidden)
        return torch.cat([torch.eye(lay.hidden) * c, keys]).to(dtype)
    if part == "kv_b_proj":
        values = v.float().reshape(lay.kv_heads, d, lay.hidden) * (math.sqrt(KV_NORM_EPS) / c)
        return values.repeat_interleave(group, dim=0).reshape(lay.heads * d, lay.hidden).to(dtype)
    raise ValueError(f"unknown MLA part {part!r}")
