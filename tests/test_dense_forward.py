"""The plain forward pass (no transformers) equals transformers' on Llama, Mistral, Qwen3 and the MoE forms
Mixtral, Qwen2-MoE (shared expert) and Qwen3-MoE, and says when it does not apply."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_dense

from zenith_merge.forward import dense as dense_forward
from zenith_merge.forward.calibration import CapturePoint, capture_batch
from zenith_merge.forward.loading import load_for_calibration
from zenith_merge.stages import prompt_vectors

TEXTS = ["def add(a, b):\n    return a + b", "What is 3 + 4? It is 7.", "class Stack:"]


def _assert_equal_to_transformers(folder, layers=(0, 2)) -> None:
    """The plain pass's MLP (or MoE block) inputs equal those transformers' forward feeds the modules."""
    mine = dense_forward.mlp_inputs(folder, TEXTS, list(layers))
    model, tok = load_for_calibration(folder)
    points = {layer: CapturePoint.input_of(f"model.layers.{layer}.mlp") for layer in layers}
    ref = capture_batch(model, tok, TEXTS, list(points.values()))
    for i in range(len(TEXTS)):
        assert set(mine[i]) == set(layers)
        for layer, point in points.items():
            torch.testing.assert_close(mine[i][layer], ref[i][point], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", ["Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM"])
def test_mlp_inputs_equal_transformers_forward(cls, tmp_path):
    _assert_equal_to_transformers(make_tiny_dense(tmp_path / cls, cls=cls, layers=3, dtype=torch.float32))


def _tiny_moe(folder, cls: str):
    import transformers
    from conftest import save_tokenizer

    small = dict(vocab_size=320, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)
    config = {"MixtralForCausalLM": lambda: transformers.MixtralConfig(num_local_experts=4, **small),
              "Qwen2MoeForCausalLM": lambda: transformers.Qwen2MoeConfig(
                  num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=36, norm_topk_prob=True,
                  **small),
              "Qwen3MoeForCausalLM": lambda: transformers.Qwen3MoeConfig(
                  num_experts=4, moe_intermediate_size=24, head_dim=8, mlp_only_layers=[1], **small)}[cls]()
    config.architectures = [cls]
    torch.manual_seed(0)
    getattr(transformers, cls)(config).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


@pytest.mark.parametrize("cls", ["MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"])
def test_moe_block_inputs_equal_transformers_forward(cls, tmp_path):
    """Layer 2's MoE block input depends on layers 0 and 1: their attention, routing, experts (and shared expert)."""
    folder = _tiny_moe(tmp_path / cls, cls)
    import json

    assert dense_forward.supported(json.loads((folder / "config.json").read_text()), 512)
    _assert_equal_to_transformers(folder)


def test_biased_llama_attention_and_mlp_are_included(tmp_path):
    import transformers
    from conftest import save_tokenizer

    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                      mlp_bias=True, rope_theta=500.0, max_position_embeddings=64)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "m")
    save_tokenizer(tmp_path / "m")
    mine = dense_forward.mlp_inputs(tmp_path / "m", TEXTS[:2], [1])
    model, tok = load_for_calibration(tmp_path / "m")
    point = CapturePoint.input_of("model.layers.1.mlp")
    ref = capture_batch(model, tok, TEXTS[:2], [point])
    for i in range(2):
        torch.testing.assert_close(mine[i][1], ref[i][point], rtol=1e-5, atol=1e-5)


def test_configs_the_plain_pass_does_not_cover_go_to_transformers():
    base = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rope_theta": 1e4}
    assert dense_forward.supported(base, 512)
    assert not dense_forward.supported({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, 512)
    assert not dense_forward.supported({**base, "hidden_act": "gelu"}, 512)
    assert not dense_forward.supported({**base, "architectures": ["DeepseekV3ForCausalLM"]}, 512)
    mistral = {**base, "architectures": ["MistralForCausalLM"], "sliding_window": 256}
    assert not dense_forward.supported(mistral, 512) and dense_forward.supported(mistral, 128)


def test_hidden_vectors_by_the_plain_pass_equal_the_transformers_ones(tmp_path):
    folder = make_tiny_dense(tmp_path / "q", cls="Qwen3ForCausalLM", layers=3, dtype=torch.float32)
    prompts = {"a": (TEXTS[:2], TEXTS[2:]), "b": (TEXTS[1:], ())}
    fast = prompt_vectors.hidden_vectors(folder, [1, 2], prompts, mode="hidden", progress=False)
    model, tok = load_for_calibration(folder)
    points = {layer: CapturePoint.input_of(f"model.layers.{layer}.mlp") for layer in (1, 2)}
    for source, (pos, neg) in prompts.items():
        p = prompt_vectors._prompt_states(model, tok, pos, points, "hidden")
        n = prompt_vectors._prompt_states(model, tok, neg, points, "hidden") if neg else None
        want = torch.stack([p[layer] - (n[layer] if n is not None else 0) for layer in (1, 2)])
        want = want / want.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(fast[source], want, rtol=1e-5, atol=1e-5)
