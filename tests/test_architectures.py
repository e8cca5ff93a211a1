"""Architecture tables: every tensor of real transformers models is described, with the shape its config implies."""

import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

from zenith_merge.architectures import (
    ARCHITECTURES,
    architecture_of,
    classify,
    dim,
    expected_shape,
    facts,
    tensor_name,
    vocab_part,
)
from zenith_merge.errors import PlanError

TINY = {
    "DeepseekV3ForCausalLM": lambda: transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8),
    "Qwen3MoeForCausalLM": lambda: transformers.Qwen3MoeConfig(
        vocab_size=96, hidden_size=24, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=6, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[1]),
    "Qwen3ForCausalLM": lambda: transformers.Qwen3Config(
        vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=6),
    "LlamaForCausalLM": lambda: transformers.LlamaConfig(
        vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2),
    "MistralForCausalLM": lambda: transformers.MistralConfig(
        vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=6),
    "Qwen2ForCausalLM": lambda: transformers.Qwen2Config(
        vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2),
    "MixtralForCausalLM": lambda: transformers.MixtralConfig(
        vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "DeepseekV2ForCausalLM": lambda: transformers.DeepseekV2Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
        q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8),
    "Glm4MoeForCausalLM": lambda: transformers.Glm4MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, attention_bias=True, use_qk_norm=True),
    "Qwen2MoeForCausalLM": lambda: transformers.Qwen2MoeConfig(
        vocab_size=96, hidden_size=24, intermediate_size=40, moe_intermediate_size=12,
        shared_expert_intermediate_size=20, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2),
}


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    """A tiny real model of each architecture, saved and reloaded the way users' checkpoints are."""
    torch.manual_seed(0)
    config = TINY[request.param]()
    config.architectures = [request.param]
    model = getattr(transformers, request.param)(config)
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    import json

    return json.loads((out / "config.json").read_text()), shapes


def test_every_saved_tensor_is_described_with_the_right_shape(tiny):
    config, shapes = tiny
    arch = architecture_of(config)
    for name, shape in shapes.items():
        assert classify(arch, name) is not None, f"{arch.name}: {name} not in the table"
        assert expected_shape(config, name) == shape, name


def test_tensor_name_inverts_classify(tiny):
    config, shapes = tiny
    arch = architecture_of(config)
    for name in shapes:
        tid = classify(arch, name)
        assert tensor_name(arch, tid.role, tid.layer, tid.expert) == name


def test_facts_match_the_model(tiny):
    config, shapes = tiny
    f = facts(config)
    assert f.num_layers == config["num_hidden_layers"] and f.hidden_size == config["hidden_size"]
    expert_layers = sorted({classify(architecture_of(config), n).layer for n in shapes if ".experts." in n})
    assert list(f.moe_layers) == expert_layers
    if f.is_moe:
        experts = {classify(architecture_of(config), n).expert for n in shapes if ".experts." in n}
        assert len(experts) == f.n_routed_experts


def test_the_vocabulary_matrices_are_the_roles_with_a_row_per_token():
    """A union vocabulary (concat) and a method's padding both rebuild exactly these rows: the embedding and head,
    and an MTP layer's own pair where the family has one."""
    found = {name: {r: vocab_part(arch, r) for r in arch.roles if vocab_part(arch, r)}
             for name, arch in ARCHITECTURES.items()}
    pair = {"embed": "embed", "lm_head": "head"}
    mtp = {**pair, "mtp_embed": "embed", "mtp_head": "head"}
    assert found == {name: mtp if name in ("DeepseekV3ForCausalLM", "Glm4MoeForCausalLM") else pair
                     for name in ARCHITECTURES}


def test_qwen3_moe_mlp_only_layers_are_dense():
    config = TINY["Qwen3MoeForCausalLM"]().to_dict()
    config["architectures"] = ["Qwen3MoeForCausalLM"]
    assert facts(config).moe_layers == (0, 2)


def test_num_experts_alias():
    """transformers 5 writes Qwen3-MoE's expert count as num_local_experts; older configs say num_experts."""
    base = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 8,
            "moe_intermediate_size": 4, "num_experts_per_tok": 1}
    assert facts({**base, "num_experts": 6}).n_routed_experts == 6
    assert facts({**base, "num_local_experts": 5}).n_routed_experts == 5


def test_unknown_architecture_lists_supported():
    with pytest.raises(PlanError, match="supported: DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, Glm4MoeForCausalLM, GptOss"):
        architecture_of({"architectures": ["FalconForCausalLM"]})


@given(heads=st.integers(1, 64), nope=st.integers(1, 256), rope=st.integers(1, 128))
def test_formula_dimensions(heads, nope, rope):
    arch = ARCHITECTURES["DeepseekV3ForCausalLM"]
    cfg = {"num_attention_heads": heads, "qk_nope_head_dim": nope, "qk_rope_head_dim": rope}
    assert dim(cfg, arch, "q_b_out") == heads * (nope + rope)
    assert dim({}, arch, "q_b_out") is None


@pytest.mark.parametrize("name", sorted(TINY))
def test_roles_said_to_share_an_input_read_one_tensor_in_transformers_forward(name):
    """`shared_inputs` is what RegMean relies on to keep one statistic per group: check it on the modelling code."""
    arch = ARCHITECTURES[name]
    assert all(role in arch.roles for group in arch.shared_inputs for role in group)
    torch.manual_seed(0)
    config = TINY[name]()
    model = getattr(transformers, name)(config).eval()
    modules = dict(model.named_modules())
    seen, hooks = {}, []
    for group in arch.shared_inputs:
        for role in group:
            for layer in range(config.num_hidden_layers):
                module = modules.get(tensor_name(arch, role, layer, 0).removesuffix(".weight"))
                if isinstance(module, torch.nn.Linear):  # fused expert tensors are no modules of their own
                    hooks.append(module.register_forward_pre_hook(
                        lambda m, args, key=(group, layer, role): seen.setdefault(key, args[0])))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1)))
    for h in hooks:
        h.remove()
    inputs: dict[tuple, list[torch.Tensor]] = {}
    for (group, layer, _role), x in seen.items():
        inputs.setdefault((group, layer), []).append(x)
    for (group, layer), xs in inputs.items():
        assert all(torch.equal(x, xs[0]) for x in xs), (group, layer)
    assert max(len(xs) for xs in inputs.values()) >= 2  # every architecture has a group of two hooked modules
