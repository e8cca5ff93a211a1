"""The MoE architectures mergekit-moe writes from dense models, as zenith-merge writes them: Mixtral (from Llama
or Mistral), Qwen2-MoE with its gated shared expert (from Qwen2, Llama or Mistral), and mergekit's DeepSeek-MoE
(written without remote code as DeepseekV3ForCausalLM, its MLA holding the donors' attention). Each is checked against transformers' own
modules: every tensor loads (nothing missing or unexpected), and a layer computes what the donors' MLPs do."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_dense, tensors_of, write_config
from transformers import AutoModelForCausalLM

from zenith_merge.architectures import ARCHITECTURES, classify, expected_shape, facts
from zenith_merge.config import load_config
from zenith_merge.errors import PlanError
from zenith_merge.pipeline import run_merge
from zenith_merge.plan.build import build_plan


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Three float32 models of each dense family mergekit-moe builds from (Llama, Mistral, Qwen2)."""
    root = tmp_path_factory.mktemp("dense")
    return {(cls, i): make_tiny_dense(root / f"{cls}{i}", seed=10 * i + n, cls=cls, dtype=torch.float32)
            for n, cls in enumerate(("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")) for i in range(3)}


def _merge(tmp_path, name: str, **data):
    folder = tmp_path / name
    folder.mkdir()
    cfg = write_config(folder, output_dir=str(folder / "out"), **{"gate_mode": "random", **data})
    return run_merge(load_config(cfg), config_dir=folder, progress=False).output_dir


def _loaded(out):
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _entries(*paths, **extra):
    return [{"source_model": str(p), **extra} for p in paths]


def test_every_mixtral_and_qwen2_moe_tensor_name_is_one_transformers_saves(tmp_path):
    """The tables name tensors as transformers' save_pretrained writes them (Mixtral's block_sparse_moe.w1/w3/w2)."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    for cls, cfg in ((MixtralForCausalLM, MixtralConfig(num_local_experts=3, **small)),
                     (Qwen2MoeForCausalLM, Qwen2MoeConfig(num_experts=3, moe_intermediate_size=24,
                                                          shared_expert_intermediate_size=40, **small))):
        cfg.architectures = [cls.__name__]
        cls(cfg).save_pretrained(tmp_path / cls.__name__, max_shard_size="100KB")
        config = json.loads((tmp_path / cls.__name__ / "config.json").read_text())
        arch = ARCHITECTURES[cls.__name__]
        assert facts(config).moe_layers == (0, 1) and facts(config).n_routed_experts == 3
        for name, t in tensors_of(tmp_path / cls.__name__).items():
            tid = classify(arch, name)
            assert tid is not None, name
            assert expected_shape(config, name) == tuple(t.shape), name


def test_llama_donors_make_a_mixtral_whose_one_expert_layer_is_the_donor_mlp(tmp_path, dense):
    llama = [dense["LlamaForCausalLM", i] for i in range(3)]
    out = _merge(tmp_path, "one", base_model=str(llama[0]), experts=_entries(llama[0]), architecture="mixtral",
                 experts_per_token=1)
    model = _loaded(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    donor = AutoModelForCausalLM.from_pretrained(llama[0]).eval()
    ids = torch.tensor([[0, 5, 9, 17, 3]])
    with torch.no_grad():  # one expert, top-1: softmax weight 1, so the whole model is the donor
        torch.testing.assert_close(model(ids).logits, donor(ids).logits, rtol=1e-5, atol=1e-5)
    three = _merge(tmp_path, "three", base_model=str(llama[0]), experts=_entries(*llama))
    config = json.loads((three / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 3
    assert config["num_experts_per_tok"] == 2 and config.get("sliding_window") is None
    got = tensors_of(three)
    for j, src in enumerate(llama):
        mlp = tensors_of(src)
        for proj, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            assert torch.equal(got[f"model.layers.1.block_sparse_moe.experts.{j}.{w}.weight"],
                               mlp[f"model.layers.1.mlp.{proj}.weight"])
    _loaded(three)


def test_qwen2_moe_shared_expert_is_gated_and_residual_scaled(tmp_path, dense):
    qwen2 = [dense["Qwen2ForCausalLM", i] for i in range(3)]
    out = _merge(tmp_path, "q", base_model=str(qwen2[0]), architecture="qwen", experts=_entries(*qwen2[:2]),
                 shared_experts=[{"source_model": str(qwen2[2]), "residual_scale": 0.5}])
    model = _loaded(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    block = model.model.layers[1].mlp
    a, b, s = (AutoModelForCausalLM.from_pretrained(p).eval().model.layers[1].mlp for p in qwen2)
    x = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = block(x)
        got = got[0] if isinstance(got, tuple) else got
        logits = x.view(-1, 32) @ block.gate.weight.T
        probs = torch.softmax(logits, -1)  # both experts picked (top-2 of 2), renormalised: the softmax itself
        routed = probs[:, :1] * a(x.view(-1, 32)) + probs[:, 1:] * b(x.view(-1, 32))
        shared = torch.sigmoid(block.shared_expert_gate(x.view(-1, 32))) * 0.5 * s(x.view(-1, 32))
        torch.testing.assert_close(got.view(-1, 32), routed + shared, rtol=1e-5, atol=1e-5)
    # Llama and Mistral sources: zero attention biases, as mergekit-moe writes them (its Mistral -> Qwen2-MoE
    # stops before writing; zenith-merge's is checked here alone: the one-expert layer is the donor's MLP)
    for family in ("LlamaForCausalLM", "MistralForCausalLM"):
        donors = [dense[family, i] for i in range(2)]
        out = _merge(tmp_path, f"q-{family}", base_model=str(donors[0]), architecture="qwen",
                     experts=_entries(donors[0]), shared_experts=[{"source_model": str(donors[1])}],
                     experts_per_token=1)
        biases = {n: t for n, t in tensors_of(out).items() if n.endswith("_proj.bias")}
        assert len(biases) == 3 * 2 and all(not t.any() for t in biases.values())
        block = _loaded(out).model.layers[1].mlp
        a, s = (AutoModelForCausalLM.from_pretrained(p).eval().model.layers[1].mlp for p in donors)
        with torch.no_grad():
            got = block(x)
            got = got[0] if isinstance(got, tuple) else got
            shared = torch.sigmoid(block.shared_expert_gate(x.view(-1, 32))) * s(x.view(-1, 32))
            torch.testing.assert_close(got.view(-1, 32), a(x.view(-1, 32)) + shared, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", ["LlamaForCausalLM", "MistralForCausalLM"])
def test_mergekit_deepseek_moe_upcycled_is_a_deepseek_v3_computing_the_dense_model(tmp_path, cls):
    """`architecture: deepseek` from dense models is DeepseekV3ForCausalLM, its attention MLA (maths/mla.py): one
    GQA model (2 KV heads, Llama 3.1's rope scaling) listed as every expert, top-2 renormalised, no shared expert
    (written as zeros), computes that model's logits in transformers, with no remote code and no key missing."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    dense = make_tiny_dense(tmp_path / "dense", seed=3, cls=cls, dtype=torch.float32, num_attention_heads=4,
                            num_key_value_heads=2, rope_parameters=rope)
    out = _merge(tmp_path, "up", base_model=str(dense), architecture="deepseek", experts_per_token=2,
                 experts=_entries(dense, dense, dense))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and "auto_map" not in config
    assert (config["qk_rope_head_dim"], config["qk_nope_head_dim"], config["n_shared_experts"]) == (16, 0, 1)
    model = _loaded(out)
    assert not model.model.layers[0].mlp.shared_experts.down_proj.weight.any()
    ids = torch.randint(3, 320, (2, 100), generator=torch.Generator().manual_seed(0))  # past the rope's 32
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(dense).eval()(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_mergekit_deepseek_moe_routes_sigmoid_top_k_beside_its_ungated_shared_expert(tmp_path, dense):
    """DeepSeek-MoE v1 keeps an ungated shared expert (residual_scale on its down) and renormalises the top-k
    weights only for k > 1; the DeepSeek-V3 output weighs with sigmoid scores (README says how that differs from
    v1's softmax): top-2 renormalised, a lone top-1 expert by its score."""
    llama = [dense["LlamaForCausalLM", i] for i in range(3)]
    mlps = [AutoModelForCausalLM.from_pretrained(p).eval().model.layers[0].mlp for p in llama]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    for k in (2, 1):
        out = _merge(tmp_path, f"k{k}", base_model=str(llama[0]), architecture="deepseek moe",
                     experts=_entries(*llama[:2]), shared_experts=[{"source_model": str(llama[2]),
                                                                    "residual_scale": 0.5}], experts_per_token=k)
        block = _loaded(out).model.layers[0].mlp
        with torch.no_grad():
            torch.testing.assert_close(block.shared_experts(x), 0.5 * mlps[2](x), rtol=1e-5, atol=1e-6)
            got = block(x[None])
            got = (got[0] if isinstance(got, tuple) else got).view(-1, 32)
            scores = torch.sigmoid(x @ block.gate.weight.T)
            expert_out = torch.stack([mlps[0](x), mlps[1](x)], dim=1)
            if k == 2:
                routed = (scores[..., None] * expert_out).sum(1) / scores.sum(1, keepdim=True)
            else:
                s, pick = scores.max(-1)
                routed = s[:, None] * expert_out[torch.arange(5), pick]
            torch.testing.assert_close(got, routed + 0.5 * mlps[2](x), rtol=1e-5, atol=1e-5)


def test_mergekit_names_mean_what_mergekit_means(tmp_path, dense):
    llama, mistral, qwen2 = ([dense[c, i] for i in range(2)] for c in
                             ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"))

    def plan_arch(**data):
        folder = tmp_path / f"p{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        cfg = write_config(folder, output_dir=str(folder / "out"), gate_mode="random", **data)
        return build_plan(load_config(cfg), config_dir=folder).target_config["architectures"][0]

    assert plan_arch(base_model=str(mistral[0]), experts=_entries(*mistral)) == "MixtralForCausalLM"  # no name
    assert plan_arch(base_model=str(llama[0]), experts=_entries(*llama), architecture="Mixtral") == "MixtralForCausalLM"
    shared = [{"source_model": str(llama[1])}]
    assert plan_arch(base_model=str(llama[0]), experts=_entries(*llama), architecture="qwen",
                     shared_experts=shared) == "Qwen2MoeForCausalLM"
    assert plan_arch(base_model=str(qwen2[0]), experts=_entries(*qwen2), architecture="qwen2_moe",
                     shared_experts=[{"source_model": str(qwen2[1])}]) == "Qwen2MoeForCausalLM"
    with pytest.raises(PlanError, match="Qwen MoE takes 1 shared_experts entries, not 0"):
        plan_arch(base_model=str(qwen2[0]), experts=_entries(*qwen2), architecture="qwen")
    with pytest.raises(PlanError, match="Mixtral builds from llama / mistral models, not qwen2"):
        plan_arch(base_model=str(qwen2[0]), experts=_entries(*qwen2), architecture="mixtral")
    with pytest.raises(PlanError, match="needs every model of one model_type"):
        plan_arch(base_model=str(llama[0]), experts=_entries(llama[0], mistral[1]))
    for name in ("deepseek", "DeepSeek MoE", "deepseek_v3", "DeepseekV3ForCausalLM"):
        assert plan_arch(base_model=str(llama[0]), experts=_entries(*llama), architecture=name) == \
            "DeepseekV3ForCausalLM"


def test_shared_experts_where_the_output_has_none_are_refused_by_name(tmp_path, dense, tiny_qwen_moe):
    llama = [dense["LlamaForCausalLM", i] for i in range(2)]
    with pytest.raises(PlanError, match="shared_experts"):
        _merge(tmp_path, "m", base_model=str(llama[0]), experts=_entries(*llama), architecture="mixtral",
               shared_experts=[{"source_model": str(llama[1])}])
    with pytest.raises(PlanError, match=r"shared_experts.0: Qwen3MoeForCausalLM has no shared expert"):
        _merge(tmp_path, "q3", base_model=str(tiny_qwen_moe), experts=_entries(tiny_qwen_moe),
               shared_experts=[{"source_model": str(tiny_qwen_moe)}])


def test_one_model_listed_several_times_upcycles_with_noise_seeded_per_slot(tmp_path, dense):
    llama = dense["LlamaForCausalLM", 0]
    out = _merge(tmp_path, "u", base_model=str(llama), experts=_entries(llama, llama, llama, noise_scale=0.01))
    got, src = tensors_of(out), tensors_of(llama)
    ws = [got[f"model.layers.0.block_sparse_moe.experts.{j}.w1.weight"] for j in range(3)]
    for w in ws:
        assert 0 < float((w - src["model.layers.0.mlp.gate_proj.weight"]).std()) < 0.02
    assert not torch.equal(ws[0], ws[1]) and not torch.equal(ws[1], ws[2])  # each slot its own noise
    again = _merge(tmp_path, "u2", base_model=str(llama), experts=_entries(llama, llama, llama, noise_scale=0.01))
    assert torch.equal(tensors_of(again)["model.layers.0.block_sparse_moe.experts.2.w1.weight"], ws[2])  # seeded
    _loaded(out)


def test_an_moe_source_listed_twice_with_keep_is_refused(tmp_path, tiny_qwen_moe):
    with pytest.raises(PlanError, match="experts.1.source_model: .* is already experts.0 and keep"):
        _merge(tmp_path, "k", base_model=str(tiny_qwen_moe),
               experts=[{"source_model": str(tiny_qwen_moe)},
                        {"source_model": str(tiny_qwen_moe), "keep": 2, "positive_prompts": ["x"]}])


def test_deepseek_from_dense_refuses_what_would_lose_its_latent_naming_why(tmp_path, dense):
    """The MLA latent sits near 1e-5 (maths/mla.py): float16 would hold it as subnormals, and a block-FP8 block
    sharing rows with the keys would round it to 0; both are refused by key. FP8 with whole blocks plans."""
    llama = [dense["LlamaForCausalLM", i] for i in range(2)]

    def plan(base, **data):
        folder = tmp_path / f"p{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        cfg = write_config(folder, output_dir=str(folder / "out"), gate_mode="random", architecture="deepseek",
                           base_model=str(base), experts=_entries(base, base), **data)
        return build_plan(load_config(cfg), config_dir=folder)

    with pytest.raises(PlanError, match="dtype: float16 .* set dtype: bfloat16 or float32"):
        plan(llama[0], dtype="float16")
    half = make_tiny_dense(tmp_path / "half", cls="LlamaForCausalLM", dtype=torch.float16)
    with pytest.raises(PlanError, match=r"float16 \(the dtype of .*half; no dtype: given\)"):
        plan(half)
    with pytest.raises(PlanError, match=r"fp8_output: .*kv_a_proj_with_mqa.* hidden size \(32\) a multiple of the FP8 "
                                        r"block \(128\)"):
        plan(llama[0], fp8_output=True)
    wide = make_tiny_dense(tmp_path / "wide", cls="LlamaForCausalLM", hidden=128, inter=64, dtype=torch.float32)
    kv_a = {t.name: t for t in plan(wide, fp8_output=True).tensors}["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert kv_a.dtype == "F8_E4M3"


def test_a_dropped_sliding_window_is_said(tmp_path, caplog):
    """mergekit-moe's outputs attend to the whole context; a Mistral's sliding window is dropped, and said."""
    mistral = make_tiny_dense(tmp_path / "m", cls="MistralForCausalLM", dtype=torch.float32, sliding_window=16)
    for arch in ("mixtral", "deepseek"):
        folder = tmp_path / arch
        folder.mkdir()
        cfg = write_config(folder, output_dir=str(folder / "out"), gate_mode="random", architecture=arch,
                           base_model=str(mistral), experts=_entries(mistral, mistral))
        caplog.clear()
        with caplog.at_level("WARNING"):
            target = build_plan(load_config(cfg), config_dir=folder).target_config
        assert target.get("sliding_window") is None
        assert "sliding_window 16 of" in caplog.text and "attends to the whole context" in caplog.text
