"""`routing.route` picks and weighs experts exactly as transformers' own routers do."""

from __future__ import annotations

import pytest
import torch
import transformers

from zenith_merge.errors import PlanError
from zenith_merge.maths.routing import RoutingSpec, route, routed_total, routing_spec
from zenith_merge.plan.experts import SourceSlots, compensation, map_layers, routing_groups


@pytest.mark.parametrize("n_group,topk_group,norm", [(1, 1, True), (2, 1, True), (4, 2, False)])
def test_sigmoid_group_routing_matches_deepseek_v3(n_group, topk_group, norm):
    config = transformers.DeepseekV3Config(hidden_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=n_group,
                                           topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=2.5)
    router = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 16, generator=gen))
        router.e_score_correction_bias.copy_(torch.randn(8, generator=gen) * 0.1)
    h = torch.randn(50, 16, generator=gen)
    logits, want_w, want_idx = router(h)
    config.architectures = ["DeepseekV3ForCausalLM"]
    spec = routing_spec(config.to_dict())
    idx, w = route(logits, spec, router.e_score_correction_bias)
    order, want_order = idx.sort(-1), want_idx.sort(-1)
    assert torch.equal(order.values, want_order.values)
    torch.testing.assert_close(w.gather(1, order.indices), want_w.gather(1, want_order.indices))


def test_softmax_routing_matches_qwen3_moe():
    config = transformers.Qwen3MoeConfig(hidden_size=16, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)
    router = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter(config)
    with torch.no_grad():
        router.weight.normal_()
    logits, want_w, want_idx = router(torch.randn(40, 16))
    config.architectures = ["Qwen3MoeForCausalLM"]
    idx, w = route(logits, routing_spec(config.to_dict()))
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(w, want_w)


def test_routed_totals_and_compensation():
    ds = RoutingSpec("sigmoid", n_experts=8, top_k=2, norm_topk_prob=True, scaling=2.5)
    qwen = RoutingSpec("softmax", n_experts=6, top_k=8, norm_topk_prob=True)
    assert routed_total(ds) == 2.5 and routed_total(qwen) == 1.0
    assert compensation(qwen, ds) == pytest.approx(0.4)  # Qwen's picks sum to 1, DeepSeek's to 2.5; top-k aside
    assert compensation(ds, ds) == 1.0
    assert compensation(None, ds) == pytest.approx(0.4)  # an always-on MLP (weight 1)
    assert compensation(None, qwen) == 1.0  # a dense MLP in a normalised MoE keeps its scale (mergekit-moe)
    raw = RoutingSpec("softmax", n_experts=6, top_k=2, norm_topk_prob=False)
    assert compensation(raw, ds) is None and compensation(raw, ds, source_measured=0.6) == pytest.approx(0.24)


def test_measured_total_matches_route():
    raw = RoutingSpec("softmax", n_experts=6, top_k=2, norm_topk_prob=False)
    logits = torch.randn(30, 6, generator=torch.Generator().manual_seed(2))
    _, w = route(logits, raw)
    top2 = logits.softmax(-1).topk(2, dim=-1).values.sum(-1)
    torch.testing.assert_close(w.sum(-1), top2)


def test_layer_map_by_relative_depth():
    assert map_layers([1, 2, 3], 4, [0, 1, 2], 3) == {1: 1, 2: 1, 3: 2}
    assert map_layers([0, 1], 2, [0, 1, 2, 3, 4], 5) == {0: 0, 1: 4}
    assert map_layers([3], 4, [5], 10) == {3: 5}


def test_groups_keep_the_base_group_size():
    base = RoutingSpec("sigmoid", n_experts=8, top_k=2, norm_topk_prob=True, n_group=2, topk_group=1)
    slots = [SourceSlots("base", 8, False, False), SourceSlots("donor1", 4, False, False)]
    assert routing_groups(base, slots, 2, base_included=True) == (3, 1)
    with pytest.raises(PlanError, match=r"experts.1: 6 experts per layer, .* groups of 4 .* keep a multiple of 4"):
        routing_groups(base, [slots[0], SourceSlots("donor1", 6, False, False)], 2, base_included=True)
    dense = [SourceSlots(f"donor{i}", 0, True, False) for i in (1, 2, 3, 4)]  # one MLP each: they share a group
    assert routing_groups(base, [slots[0], *dense], 2, base_included=True) == (3, 1)
    flat = RoutingSpec("sigmoid", n_experts=8, top_k=2, norm_topk_prob=True)
    assert routing_groups(flat, [slots[0], SourceSlots("d", 6, False, False)], 2, base_included=True) == (1, 1)


def _router(family: str, **values):
    """(transformers' own router module of `family` with seeded random weights, the config as a dict)."""
    modules = {"DeepseekV2ForCausalLM": ("deepseek_v2", "DeepseekV2TopkRouter"),
               "Glm4MoeForCausalLM": ("glm4_moe", "Glm4MoeTopkRouter"),
               "GptOssForCausalLM": ("gpt_oss", "GptOssTopKRouter"),
               "MixtralForCausalLM": ("mixtral", "MixtralTopKRouter"),
               "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeTopKRouter")}
    package, cls = modules[family]
    config = getattr(transformers, family.replace("ForCausalLM", "Config"))(hidden_size=16, num_attention_heads=4,
                                                                           num_key_value_heads=4, **values)
    router = getattr(getattr(transformers.models, package), f"modeling_{package}").__dict__[cls](config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for buffer in ("weight", "bias", "e_score_correction_bias"):
            if isinstance(getattr(router, buffer, None), torch.Tensor):
                getattr(router, buffer).copy_(torch.randn(getattr(router, buffer).shape, generator=gen))
    config.architectures = [family]
    return router, config.to_dict()


# Each family's router at its release's routing settings (widths scaled down), and the variants its configs take.
ROUTERS = {
    "deepseek-v2 group_limited_greedy": ("DeepseekV2ForCausalLM", dict(
        n_routed_experts=16, num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=16.0)),
    "deepseek-v2-lite greedy": ("DeepseekV2ForCausalLM", dict(
        n_routed_experts=8, num_experts_per_tok=3, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0)),
    "glm-4.5": ("Glm4MoeForCausalLM", dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                           routed_scaling_factor=2.5, norm_topk_prob=True)),
    "gpt-oss": ("GptOssForCausalLM", dict(num_local_experts=8, num_experts_per_tok=4)),
    "mixtral": ("MixtralForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2-moe": ("Qwen2MoeForCausalLM", dict(num_experts=8, num_experts_per_tok=4, norm_topk_prob=False)),
}


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_familys_routing_matches_its_transformers_router(name):
    """The experts `route` picks and their weights, from the router's logits (GPT-OSS's router bias added to them,
    DeepSeek's and GLM's selection bias passed), equal what the family's own transformers module gives."""
    router, config = _router(*ROUTERS[name][:1], **ROUTERS[name][1])
    h = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, want_w, want_idx = router(h)
    bias = getattr(router, "e_score_correction_bias", None)
    idx, w = route(logits, routing_spec(config), bias)
    order, want_order = idx.sort(-1), want_idx.sort(-1)
    assert torch.equal(order.values, want_order.values)
    torch.testing.assert_close(w.gather(1, order.indices), want_w.float().gather(1, want_order.indices))
