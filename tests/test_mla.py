"""A Llama/Mistral attention layer written as DeepSeek-V3's MLA (maths/mla.py) computes what the donor's does, in
transformers' own modules: LlamaAttention against DeepseekV3Attention with the converted weights and config, over
random layouts (heads, KV heads, head_dim), norm weights, residual magnitudes (down to below RMSNorm's eps), the
rope types a Llama loads, and positions past the rope's original context."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DeepseekV3Config, LlamaConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from zenith_merge.maths.mla import DELTA, GQA_ONLY_KEYS, GqaLayout, gqa_as_mla, latent_scale, mla_config

ROPES = {
    "default": None,
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 32},
    # Phi-3's kind: other frequencies past original_max_position_embeddings (the steps below go past it)
    "longrope": {"rope_type": "longrope", "factor": 3.0, "original_max_position_embeddings": 32},
}


def _pair(kv_heads: int, group: int, head_dim: int, hidden: int, rope: str, eps: float, seed: int):
    """(LlamaAttention, its rope, DeepseekV3Attention converted from it, its rope), random weights, float32."""
    torch.manual_seed(seed)
    values = dict(hidden_size=hidden, num_attention_heads=kv_heads * group, num_key_value_heads=kv_heads,
                  head_dim=head_dim, intermediate_size=8, num_hidden_layers=1, vocab_size=16, rms_norm_eps=eps,
                  max_position_embeddings=96, rope_theta=500.0)
    if ROPES[rope]:
        values["rope_scaling"] = dict(ROPES[rope])
    if rope == "longrope":
        values["rope_scaling"].update(short_factor=[1.0 + i / 4 for i in range(head_dim // 2)],
                                      long_factor=[2.0 + i for i in range(head_dim // 2)])
    llama_config = LlamaConfig(**values)
    llama_config._attn_implementation = "eager"
    llama = LlamaAttention(llama_config, 0).float()
    for p in llama.parameters():
        torch.nn.init.normal_(p, std=0.3)
    dense = llama_config.to_dict()
    mla = {k: v for k, v in dense.items() if k not in (*GQA_ONLY_KEYS, "architectures", "model_type")}
    mla.update(mla_config(dense))
    ds_config = DeepseekV3Config(**mla)
    ds_config._attn_implementation = "eager"
    ds = DeepseekV3Attention(ds_config, 0).float()
    norm = torch.rand(hidden) * 3 + 0.05
    lay = GqaLayout.of(dense)
    w = {"q_proj": llama.q_proj.weight, "k_proj": llama.k_proj.weight, "v_proj": llama.v_proj.weight,
         "input_norm": norm}
    parts = {"q_proj": "q_proj", "kv_a_proj_with_mqa": "kv_a_proj", "kv_b_proj": "kv_b_proj",
             "kv_a_layernorm": "kv_a_norm"}
    ds.load_state_dict({**{f"{name}.weight": gqa_as_mla(part, w, lay) for name, part in parts.items()},
                        "o_proj.weight": llama.o_proj.weight}, strict=True)
    return llama, LlamaRotaryEmbedding(llama_config), ds, DeepseekV3RotaryEmbedding(ds_config), norm


@settings(max_examples=25, deadline=None, database=None)
@given(kv_heads=st.integers(1, 3), group=st.integers(1, 3), half=st.integers(1, 4), width=st.integers(1, 6),
       rope=st.sampled_from(sorted(ROPES)), eps=st.sampled_from([1e-6, 1e-5]),
       magnitude=st.sampled_from([1e-4, 1e-2, 1.0, 30.0]), seed=st.integers(0, 2**16))
def test_mla_from_gqa_computes_the_llama_attention_in_transformers(kv_heads, group, half, width, rope, eps,
                                                                    magnitude, seed):
    hidden = kv_heads * group * width  # transformers wants hidden a multiple of the heads (head_dim is its own)
    llama, llama_rope, ds, ds_rope, norm = _pair(kv_heads, group, 2 * half, hidden, rope, eps, seed)
    steps = 80  # past the rope's original context (32) for llama3 / yarn: longrope's long factors serve there
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, steps, hidden, generator=gen) * magnitude
    x_n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm  # input_layernorm, as both models apply it
    pos = torch.arange(steps)[None].expand(2, -1)
    mask = torch.full((steps, steps), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want = llama(x_n, llama_rope(x_n, pos), mask)[0]
        got = ds(x_n, ds_rope(x_n, pos), mask)[0]
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4 * float(want.abs().max()))


def test_the_latent_stays_in_rmsnorms_linear_range_for_any_token():
    """c^2 max(weight^2) <= DELTA * eps: RMSNorm(c x_n) = c x_n / sqrt(eps) within DELTA / 2, whatever x is, since
    ms(x_n) <= max(weight^2); c is a power of two, exact in every float dtype."""
    norm = torch.tensor([0.5, 3.0, -7.0, 1.0])
    c = latent_scale(norm)
    assert math.log2(c) == int(math.log2(c))
    assert c * c * 49.0 <= DELTA * 1e-6 < 4 * c * c * 49.0


def test_bfloat16_weights_are_the_donors_rounded_once():
    """The donor's q, k and v are copied unscaled (rearranged, zeros around them): a bfloat16 donor's values
    reappear bit for bit, so the bfloat16 output is as close to the donor as any bfloat16 copy."""
    torch.manual_seed(0)
    lay = GqaLayout(hidden=16, heads=4, kv_heads=2, head_dim=4)
    q, k, v = (torch.randn(n * 4, 16).to(torch.bfloat16) for n in (4, 2, 2))
    norm = torch.rand(16).to(torch.bfloat16)
    weights = {"q_proj": q, "k_proj": k, "v_proj": v, "input_norm": norm}
    for part, src in (("q_proj", q), ("kv_a_proj", k), ("kv_b_proj", v)):
        got = gqa_as_mla(part, weights, lay, torch.bfloat16)
        values = set(got.flatten().tolist()) - {0.0, latent_scale(norm)}
        assert values <= set(src.flatten().tolist()), part


def test_dynamic_ntk_rope_is_refused_naming_it():
    """Dynamic NTK scaling recomputes the frequencies at every sequence length: no static list holds it."""
    config = LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         rope_scaling={"rope_type": "dynamic", "factor": 2.0}).to_dict()
    with pytest.raises(ValueError, match="rope_type dynamic: .* architecture: mixtral or qwen"):
        mla_config(config)
