"""UMoE: exact conversion of Qwen3 attention to pre-mixing form, causal masking, one shared pool, router gradients."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

from zenith_merge.umoe import UMoEBlock, UMoEConfig, from_attention, rope_tables


def _qwen3(hidden: int, heads: int, kv_heads: int, head_dim: int, seed: int):
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      head_dim=head_dim, num_hidden_layers=1, intermediate_size=2 * hidden,
                                      vocab_size=64, max_position_embeddings=64)
    config._attn_implementation = "eager"
    attn = Qwen3Attention(config, layer_idx=0).eval()
    with torch.no_grad():  # transformers initialises the norms to ones: make them matter
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    return config, attn


@pytest.mark.parametrize("hidden,heads,kv_heads,head_dim,seq", [(32, 4, 4, 8, 7), (48, 6, 2, 8, 11), (24, 2, 1, 16, 5)])
def test_converted_attention_reproduces_qwen3_attention_with_padding(hidden, heads, kv_heads, head_dim, seq):
    config, attn = _qwen3(hidden, heads, kv_heads, head_dim, seed=hidden + seq)
    x = torch.randn(2, seq, hidden)
    pos = torch.arange(seq)[None].expand(2, seq)
    cos, sin = Qwen3RotaryEmbedding(config)(x, pos)
    padding = torch.ones(2, seq, dtype=torch.long)
    padding[1, :2] = 0  # left padding in the second sequence
    mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=padding,
                              past_key_values=None, position_ids=pos)
    with torch.no_grad():
        want = attn(x, position_embeddings=(cos, sin), attention_mask=mask)[0]
        got = from_attention(attn)(x, position_embeddings=(cos, sin), attention_mask=mask)[0]
    real = padding.bool()  # rows of pad positions attend to nothing real: both are arbitrary there
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def _block(seed=0) -> UMoEBlock:
    torch.manual_seed(seed)
    return UMoEBlock(UMoEConfig(hidden=16, n_experts=6, expert_inter=12, q_rank=8, head_dim=8, attn_top_k=2,
                                ffn_top_k=3))


def test_future_tokens_do_not_change_earlier_outputs():
    block = _block()
    x = torch.randn(1, 9, 16)
    rope = rope_tables(torch.arange(9)[None], 8, 10_000.0)
    y = block(x, rope)
    changed = x.clone()
    changed[:, 6:] = torch.randn(1, 3, 16)
    y2 = block(changed, rope)
    torch.testing.assert_close(y2[:, :6], y[:, :6])
    assert not torch.allclose(y2[:, 6:], y[:, 6:])


def test_padding_mask_hides_padded_tokens():
    block = _block(1)
    x = torch.randn(1, 6, 16)
    rope = rope_tables(torch.arange(6)[None], 8, 10_000.0)
    keep = torch.tensor([[0, 0, 1, 1, 1, 1]])
    y = block(x, rope, keep)
    other = x.clone()
    other[:, :2] = torch.randn(1, 2, 16)  # what the padded positions hold does not matter to the attention
    y2 = block.attention(other, rope, keep)
    torch.testing.assert_close(y2[:, 2:], block.attention(x, rope, keep)[:, 2:])
    assert y.shape == x.shape


def test_attention_and_ffn_share_one_pool():
    block = _block()
    assert block.attention.pool is block.ffn.pool is block.pool
    names = {n for n, _ in block.named_parameters()}
    assert {"pool.w1", "pool.w2"} <= names and not any(n.startswith(("attention.pool", "ffn.pool")) for n in names)
    cfg = block.cfg
    pool = cfg.n_experts * 2 * cfg.hidden * cfg.expert_inter
    assert sum(p.numel() for n, p in block.named_parameters() if n.startswith("pool.")) == pool


def test_gradients_reach_both_routers_and_the_pool():
    block = _block()
    x = torch.randn(2, 5, 16)
    block(x, rope_tables(torch.arange(5)[None].expand(2, 5), 8, 10_000.0)).pow(2).mean().backward()
    for p in (block.attention.router.weight, block.ffn.router.weight, block.pool.w1, block.attention.q_a,
              block.attention.k_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_the_papers_1b_configuration_is_expressible():
    cfg = UMoEConfig.paper_1b()
    assert (cfg.n_experts, cfg.expert_inter, cfg.attn_top_k, cfg.ffn_top_k) == (64, 512, 3, 10)


@pytest.mark.demo
def test_umoe_demo_trains_both_models_with_matched_parameters(capsys):
    from zenith_merge.cli import main

    assert main(["umoe-demo", "--steps", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| umoe", "| standard_moe"))]
    assert len(rows) == 2
    params = [int(r.split("|")[2].replace(",", "")) for r in rows]
    per_expert_pair = 2 * (2 * 96 * 192 + 96)  # one expert per layer, both layers
    assert abs(params[0] - params[1]) < per_expert_pair  # matched to within one expert per layer
    assert all(0 < float(r.split("|")[5]) < 20 for r in rows)  # finite held-out bits per byte
