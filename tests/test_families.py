"""The MoE families users merge today, each checked against transformers' own modules: DeepSeek-V2 / V2.5, GLM-4.5 /
4.6 (with the release's MTP layer), Kimi-K2 (a DeepSeek-V3 with its tiktoken tokenizer and no tokenizer.json),
GPT-OSS (fused experts; MXFP4 releases dequantised on read), and Mixtral and Qwen2-MoE (their dense -> MoE forms:
test_mergekit_moe_outputs.py).

For each, a tiny model built by transformers' class (seeded random weights, saved sharded): every tensor it saves
is described with its shape, the facts are right, the base alone is rewritten bit for bit, and an assembly of two
children is the weighted average, loads in transformers with no key missing or unexpected, and runs."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import add_mtp_layer, read_index, save_tokenizer, tensors_of, write_config
from safetensors.torch import load_file, save_file

from zenith_merge.architectures import (
    ARCHITECTURES,
    architecture_of,
    classify,
    expected_shape,
    extra_layer_indices,
    facts,
    tensor_name,
)
from zenith_merge.config import load_config
from zenith_merge.errors import PlanError
from zenith_merge.io.reader import Checkpoint
from zenith_merge.pipeline import run_merge
from zenith_merge.plan.build import build_plan

_SMALL = dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=3, bos_token_id=0,
              eos_token_id=1, pad_token_id=2, max_position_embeddings=128)
_MLA = dict(num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
            v_head_dim=8)

# family -> (transformers class, its config's values). Widths scaled down; routing and layout as the releases.
FAMILIES = {
    # DeepSeek-V2 / V2.5: q LoRA, 2 shared experts, group-limited greedy softmax routing scaled by 16
    "deepseek-v2": ("DeepseekV2ForCausalLM", dict(
        _SMALL, **_MLA, q_lora_rank=16, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=2,
        num_experts_per_tok=2, first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=2, topk_group=1,
        routed_scaling_factor=16.0)),
    # GLM-4.5: q/k/v biases, q/k norms, half rotary, sigmoid group routing with a correction bias, 1 shared expert
    "glm-4.5": ("Glm4MoeForCausalLM", dict(
        _SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_intermediate_size=16,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2,
        topk_group=1, attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5, routed_scaling_factor=2.5,
        norm_topk_prob=True)),
    # Kimi-K2: DeepSeek-V3 with 384 routed experts (kept), 8 per token, 1 shared, 1 dense layer, one group
    "kimi-k2": ("DeepseekV3ForCausalLM", dict(
        _SMALL, **_MLA, num_hidden_layers=2, q_lora_rank=16, moe_intermediate_size=8, n_routed_experts=384,
        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=1, n_group=1, topk_group=1,
        routed_scaling_factor=2.827, norm_topk_prob=True, num_nextn_predict_layers=0)),
    # Mixtral and Qwen2-MoE (also mergekit-moe's outputs): softmax top-k; Qwen2-MoE's gated shared expert
    "mixtral": ("MixtralForCausalLM", dict(_SMALL, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2)),
    "qwen2-moe": ("Qwen2MoeForCausalLM", dict(_SMALL, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=24, decoder_sparse_step=1)),
    # GPT-OSS: fused experts with biases, a router with a bias, sinks, sliding and full layers alternating
    "gpt-oss": ("GptOssForCausalLM", dict(
        _SMALL, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
}

# The releases' config.json values (public): what the tables must read from them.
RELEASES = {
    "DeepSeek-V2.5": dict(architectures=["DeepseekV2ForCausalLM"], vocab_size=102400, hidden_size=5120,
                          intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60,
                          num_attention_heads=128, n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
                          first_k_dense_replace=1, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                          qk_rope_head_dim=64, v_head_dim=128, topk_method="group_limited_greedy", n_group=8,
                          topk_group=3, routed_scaling_factor=16.0),
    "GLM-4.5": dict(architectures=["Glm4MoeForCausalLM"], vocab_size=151552, hidden_size=5120,
                    intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=92, num_attention_heads=96,
                    num_key_value_heads=8, head_dim=128, n_routed_experts=160, n_shared_experts=1,
                    num_experts_per_tok=8, first_k_dense_replace=3, attention_bias=True, use_qk_norm=True,
                    partial_rotary_factor=0.5, routed_scaling_factor=2.5, num_nextn_predict_layers=1),
    "Kimi-K2": dict(architectures=["DeepseekV3ForCausalLM"], model_type="kimi_k2", vocab_size=163840,
                    hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
                    num_attention_heads=64, n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8,
                    first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=1536, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_nextn_predict_layers=0),
    "gpt-oss-120b": dict(architectures=["GptOssForCausalLM"], vocab_size=201088, hidden_size=2880,
                         intermediate_size=2880, num_hidden_layers=36, num_attention_heads=64, num_key_value_heads=8,
                         head_dim=64, num_local_experts=128, num_experts_per_tok=4, sliding_window=128),
}


def _build(name: str, path: Path, seed: int = 0) -> Path:
    """A tiny model of family `name`, BF16, sharded, with a tokenizer (Kimi's: tiktoken.model, no tokenizer.json)."""
    cls, values = FAMILIES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, cls.replace("ForCausalLM", "Config"))(**values)
    config.architectures = [cls]
    model = getattr(transformers, cls)(config)
    with torch.no_grad():  # routers that route somewhere (transformers may initialise them to zeros)
        for module_name, module in model.named_modules():
            if module_name.endswith(("mlp.gate", "mlp.router")):
                module.weight.normal_(0, 0.5)
                for bias in ("e_score_correction_bias", "bias"):
                    if isinstance(getattr(module, bias, None), torch.Tensor):
                        getattr(module, bias).uniform_(-0.1, 0.1)
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="40KB")
    if name == "kimi-k2":
        save_kimi_layout(path)
    else:
        save_tokenizer(path)
    return path


KIMI_TOKENIZER_CODE = '''"""Stand-in for Kimi-K2's tokenization_kimi.py (a tiktoken tokenizer): named by tokenizer_config.json."""


class TikTokenTokenizer:
    vocab_files_names = {"vocab_file": "tiktoken.model"}
'''


def save_kimi_layout(path: Path) -> None:
    """Kimi-K2's files beside the weights: config.json of model_type kimi_k2 with its auto_map (stand-in code),
    tiktoken.model (base64 token and rank per line), tokenizer_config.json naming tokenization_kimi.py, and no
    tokenizer.json."""
    from zenith_merge.demo.release_layout import _CONFIGURATION_STUB, _MODELING_STUB

    config = json.loads((path / "config.json").read_text())
    config.update(model_type="kimi_k2", auto_map={
        "AutoConfig": "configuration_deepseek.DeepseekV3Config", "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "configuration_deepseek.py").write_text(_CONFIGURATION_STUB)
    (path / "modeling_deepseek.py").write_text(_MODELING_STUB)
    (path / "tokenization_kimi.py").write_text(KIMI_TOKENIZER_CODE)
    (path / "tiktoken.model").write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    specials = {str(256 + i): {"content": f"<|reserved_{i}|>", "special": True} for i in range(64)}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TikTokenTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer",
                                                                               None]},
        "bos_token": "<|reserved_0|>", "eos_token": "<|reserved_1|>", "added_tokens_decoder": specials}, indent=2))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, a tiny model of the family, a second child: the same model with every tensor moved, seeded). GLM's
    carries the release's MTP layer."""
    root = tmp_path_factory.mktemp(request.param)
    base = _build(request.param, root / "a")
    if request.param == "glm-4.5":
        add_mtp_layer(base)
    return request.param, base, perturbed(base, root / "b")


def perturbed(src: Path, dst: Path, seed: int = 1) -> Path:
    """A sibling of `src` (same config and tokenizer files): every floating tensor plus 5% of its norm as noise."""
    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    by_file: dict[str, dict] = {}
    for name, t in sorted(tensors_of(src).items()):
        noise = torch.randn(t.shape, generator=gen)
        t = (t.float() + 0.05 * t.float().norm() / max(float(noise.norm()), 1e-12) * noise).to(t.dtype)
        by_file.setdefault(read_index(src)["weight_map"][name], {})[name] = t
    for file, tensors in by_file.items():
        save_file(tensors, str(dst / file), metadata={"format": "pt"})
    return dst


def _merge(folder: Path, **data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = write_config(folder, output_dir=str(folder / "out"), **data)
    return run_merge(load_config(cfg), config_dir=folder, progress=False).output_dir


def _load(folder: Path, name: str):
    """The folder in transformers, by the family's class, with what it reported missing or unexpected. Kimi-K2's
    model_type (kimi_k2) is its remote code's: transformers 5 converts per-expert tensors on load by model_type,
    so its DeepseekV3ForCausalLM reads the folder as deepseek_v3 (vLLM and SGLang read these names directly)."""
    cls = getattr(transformers, FAMILIES[name][0])
    config = cls.config_class.from_pretrained(folder)
    config.model_type = cls.config_class.model_type
    model, info = cls.from_pretrained(folder, config=config, output_loading_info=True, dtype=torch.float32)
    return model.eval(), info


def test_every_saved_tensor_is_described_and_the_facts_are_right(family):
    name, base, _ = family
    config = json.loads((base / "config.json").read_text())
    arch = architecture_of(config)
    tensors = tensors_of(base)
    layers, experts = set(), set()
    for tensor, t in tensors.items():
        tid = classify(arch, tensor)
        assert tid is not None and tid.tensor_class != "other", f"{arch.name}: {tensor} not in the table"
        assert expected_shape(config, tensor) == tuple(t.shape), tensor
        assert tensor_name(arch, tid.role, tid.layer, tid.expert) == tensor
        if tid.tensor_class == "routed_experts" and tid.layer < config["num_hidden_layers"]:
            layers.add(tid.layer)
            axis = arch.roles[tid.role].expert_axis
            experts |= {tid.expert} if axis is None else set(range(t.shape[axis]))
    f = facts(config)
    assert list(f.moe_layers) == sorted(layers) and len(experts) == f.n_routed_experts
    assert f.experts_per_token == FAMILIES[name][1]["num_experts_per_tok"]
    assert f.n_shared_experts == FAMILIES[name][1].get("n_shared_experts", 0)
    assert extra_layer_indices(arch, config, list(tensors)) == ((3,) if name == "glm-4.5" else ())


def test_the_base_alone_is_rewritten_bit_for_bit_with_its_side_files(family, tmp_path):
    _, base, _ = family
    out = _merge(tmp_path, base_model=str(base), max_shard_size="30KB")
    src, got = tensors_of(base), tensors_of(out)
    assert src.keys() == got.keys()
    for tensor in src:
        assert src[tensor].dtype == got[tensor].dtype, tensor
        assert torch.equal(src[tensor].view(torch.uint8), got[tensor].view(torch.uint8)), tensor
    sides = [p.name for p in base.iterdir() if p.suffix in (".py", ".model") or p.name.startswith("tokenizer")]
    assert sides and all((out / s).read_bytes() == (base / s).read_bytes() for s in sides)


def _weighted(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() * 0.25 + b.float() * 0.75).to(a.dtype)


def test_an_assembly_of_two_children_is_their_weighted_average_and_runs(family, tmp_path):
    name, base, other = family
    out = _merge(tmp_path, base_model=str(base), merge_method="assembly", gate_mode="random",
                 experts=[{"source_model": str(base)}, {"source_model": str(other)}],
                 assembly={"weights": {"default": [1.0, 3.0]}}, max_shard_size="30KB")
    a, b, got = tensors_of(base), tensors_of(other), tensors_of(out)
    assert got.keys() == a.keys()
    for tensor in a:  # products by 1/4 and 3/4 of BF16 values are exact in float32: one rounding, as here
        torch.testing.assert_close(got[tensor], _weighted(a[tensor], b[tensor]), rtol=0, atol=0, msg=tensor)
    model, info = _load(out, name)
    mtp = "model.layers.3." if name == "glm-4.5" else None  # transformers drops the MTP layer, as vLLM runs it
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert all(mtp and k.startswith(mtp) for k in info["unexpected_keys"]), info["unexpected_keys"]
    assert bool(info["unexpected_keys"]) == bool(mtp)
    with torch.no_grad():
        logits = model(torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))).logits
    assert logits.shape == (2, 12, 320) and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["deepseek-v2", "glm-4.5", "gpt-oss", "mixtral", "qwen2-moe"], indirect=True)
def test_a_regmean_assembly_solves_the_linear_weights_and_runs(family, tmp_path, caplog):
    """RegMean assembly (each child on its own text) on each family transformers runs: attention weights are
    solved (not the weighted average), the output loads and runs. GPT-OSS's experts are stored fused (3-D, with
    biases), which RegMean does not solve: they are the weighted average, and the plan says so by name."""
    name, base, other = family
    out = _merge(tmp_path, base_model=str(base), merge_method="assembly", gate_mode="random",
                 experts=[{"source_model": str(base)}, {"source_model": str(other)}],
                 assembly={"weights": {"default": [1.0, 3.0]},
                           "regmean": {"data": [["demo:code"], ["demo:maths"]], "max_tokens": 256}})
    a, b, got = tensors_of(base), tensors_of(other), tensors_of(out)
    solved = [n for n in a if ("self_attn" in n and n.endswith("proj.weight") and ".layers.3." not in n)]
    assert solved and all(not torch.equal(got[n], _weighted(a[n], b[n])) for n in solved)
    fused = [n for n in a if ".mlp.experts." in n and a[n].dim() == 3]
    assert bool(fused) == (name == "gpt-oss")
    assert all(torch.equal(got[n], _weighted(a[n], b[n])) for n in fused)
    warned = "assembly.regmean.classes routed_experts: GptOssForCausalLM stores 4 of its tensors fused"
    assert (warned in caplog.text) == (name == "gpt-oss")
    model, info = _load(out, name)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()


@pytest.mark.parametrize("family", ["deepseek-v2", "glm-4.5", "kimi-k2"], indirect=True)
def test_a_concat_of_two_children_puts_their_experts_side_by_side(family, tmp_path):
    """Per-expert families concatenate (GPT-OSS's fused experts do not: below). DeepSeek-V2's routing weights are
    not renormalised, so the merge measures them on the sources' prompts; GLM's MTP layer gets the same slots."""
    name, base, other = family
    prompts = [["def add(a, b):"], ["What is 3 + 4?"]] if name == "deepseek-v2" else [[], []]
    out = _merge(tmp_path, base_model=str(base), gate_mode="random", max_shard_size="200KB",
                 experts=[{"source_model": str(p), "positive_prompts": t} for p, t in zip((base, other), prompts)])
    n = FAMILIES[name][1]["n_routed_experts"]
    config = json.loads((out / "config.json").read_text())
    assert facts(config).n_routed_experts == 2 * n
    arch, got, theirs = architecture_of(config), tensors_of(out), tensors_of(other)
    layers = {layer: layer for layer in facts(config).moe_layers}
    if name == "glm-4.5":  # the MTP layer's donor slots repeat the last MoE layer's
        layers[3] = max(facts(config).moe_layers)
    for layer, source_layer in layers.items():
        donor_expert = theirs[tensor_name(arch, "expert_gate", source_layer, 0)]
        assert torch.equal(got[tensor_name(arch, "expert_gate", layer, n)], donor_expert), layer
    model, info = _load(out, name)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert all(k.startswith("model.layers.3.") for k in info["unexpected_keys"]) and name == "glm-4.5" or \
        not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_the_release_configs_resolve(release):
    config = RELEASES[release]
    f = facts(config)
    depth, first = config["num_hidden_layers"], config.get("first_k_dense_replace", 0)
    assert f.moe_layers == tuple(range(first, depth))
    assert f.n_routed_experts == config.get("n_routed_experts", config.get("num_local_experts"))
    arch = architecture_of(config)
    gate = "experts_gate_up" if "experts_gate_up" in arch.roles else "expert_gate"
    assert expected_shape(config, tensor_name(arch, gate, depth - 1, 0)) == {
        "DeepSeek-V2.5": (1536, 5120), "GLM-4.5": (1536, 5120), "Kimi-K2": (2048, 7168),
        "gpt-oss-120b": (128, 2880, 5760)}[release]
    if release == "GLM-4.5":  # its MTP layer: model.layers.92, as DeepSeek-V3's
        assert expected_shape(config, "model.layers.92.eh_proj.weight") == (5120, 10240)
        assert expected_shape(config, "model.layers.92.self_attn.q_proj.weight") == (12288, 5120)


def test_deepseek_v2_lite_layout_with_biases_is_described(tmp_path):
    """V2-Lite has no q LoRA (one q_proj); attention_bias and mlp_bias add biases transformers saves."""
    values = dict(FAMILIES["deepseek-v2"][1], q_lora_rank=None, topk_method="greedy", n_group=None, topk_group=None,
                  attention_bias=True, mlp_bias=True)
    config = transformers.DeepseekV2Config(**values)
    config.architectures = ["DeepseekV2ForCausalLM"]
    transformers.DeepseekV2ForCausalLM(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    arch = architecture_of(saved)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.bias"} <= set(tensors)
    for tensor, t in tensors.items():
        assert classify(arch, tensor) is not None, tensor
        assert expected_shape(saved, tensor) == tuple(t.shape), tensor


@pytest.mark.parametrize("family", ["kimi-k2"], indirect=True)
def test_kimi_children_with_other_tokenizers_are_refused(family, tmp_path):
    """With no tokenizer.json, assembly compares the vocabulary file there is (Kimi's tiktoken.model)."""
    _, base, other = family
    retok = tmp_path / "retok"
    shutil.copytree(other, retok)
    (retok / "tiktoken.model").write_text((retok / "tiktoken.model").read_text().replace(" 255\n", " 256\n"))
    cfg = load_config(write_config(tmp_path, base_model=str(base), merge_method="assembly", gate_mode="random",
                                   experts=[{"source_model": str(base)}, {"source_model": str(retok)}],
                                   assembly={"weights": {"default": [0.5, 0.5]}}))
    with pytest.raises(PlanError, match="tiktoken.model differs from the base's"):
        build_plan(cfg, config_dir=tmp_path)


def test_gate_source_residual_on_a_base_transformers_cannot_load_names_it(tmp_path):
    """gate_source: residual loads the base through transformers, as mergekit-moe does; Kimi-K2's model type and
    tiktoken tokenizer are remote code, so it cannot, and the error says so, naming the base and the way out."""
    from zenith_merge.errors import CalibrationError

    base = _build("kimi-k2", tmp_path / "kimi")
    cfg = load_config(write_config(tmp_path, base_model=str(base), gate_mode="hidden", gate_source="residual",
                                   routing_report=False, output_dir=str(tmp_path / "out"),
                                   experts=[{"source_model": str(base), "positive_prompts": ["def add(a, b):"]},
                                            {"source_model": str(base), "positive_prompts": ["What is 3 + 4?"]}]))
    with pytest.raises(CalibrationError, match=rf"gate_source: residual loads the base .*{base}.*"
                                               r"use gate_source: moe_input"):
        run_merge(cfg, config_dir=tmp_path, progress=False)
    assert not (tmp_path / "out" / "config.json").exists()


# -- GPT-OSS: fused experts, MXFP4 releases -------------------------------------------------------------------------


def _mxfp4_copy(src: Path, dst: Path, seed: int = 2) -> Path:
    """`src` as the GPT-OSS releases store it: each expert weight W (experts, rows, cols) as uint8 `W_blocks`
    (experts, cols, rows / 32, 16) and `W_scales` (experts, cols, rows / 32), seeded random codes (scales around
    2^-6), and `quantization_config: {quant_method: mxfp4}`."""
    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    index = read_index(src)
    by_file: dict[str, dict] = {}
    for name, t in sorted(tensors_of(src).items()):
        file = index["weight_map"].pop(name)
        if name.endswith(("gate_up_proj", "down_proj")):
            experts, rows, cols = t.shape
            blocks = torch.randint(0, 256, (experts, cols, rows // 32, 16), generator=gen, dtype=torch.uint8)
            scales = torch.randint(118, 124, (experts, cols, rows // 32), generator=gen, dtype=torch.uint8)
            by_file.setdefault(file, {}).update({name + "_blocks": blocks, name + "_scales": scales})
        else:
            by_file.setdefault(file, {})[name] = t
    for file, tensors in by_file.items():
        save_file(tensors, str(dst / file), metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(tensors, file))
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt-oss")
    base = _build("gpt-oss", root / "bf16")
    return base, _mxfp4_copy(base, root / "mxfp4")


def test_mxfp4_experts_are_read_as_transformers_dequantises_them(gpt_oss, tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    _, mx = gpt_oss
    stored = tensors_of(mx)
    with Checkpoint.open(mx) as ckpt:
        weights = [n for n in ckpt.names() if n.endswith(("gate_up_proj", "down_proj"))]
        assert len(weights) == 4 and not [n for n in ckpt.names() if n.endswith(("_blocks", "_scales"))]
        for name in weights:
            want = convert_moe_packed_tensors(stored[name + "_blocks"], stored[name + "_scales"], dtype=torch.bfloat16)
            got = ckpt.read(name)
            assert ckpt.info(name).dtype == "BF16" and tuple(ckpt.info(name).shape) == tuple(want.shape)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), name
    out = _merge(tmp_path, base_model=str(mx))  # passthrough: BF16 out, quantization_config dropped
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = tensors_of(out)
    for name in weights:
        want = convert_moe_packed_tensors(stored[name + "_blocks"], stored[name + "_scales"], dtype=torch.bfloat16)
        assert torch.equal(merged[name].view(torch.int16), want.view(torch.int16)), name
    model, info = _load(out, "gpt-oss")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_a_concat_or_graft_of_fused_experts_is_refused_by_name(gpt_oss, tmp_path, tiny_qwen_moe):
    base, _ = gpt_oss
    cfg = load_config(write_config(tmp_path, base_model=str(base), gate_mode="random",
                                   experts=[{"source_model": str(base)}, {"source_model": str(base)}]))
    with pytest.raises(PlanError, match=r"GptOssForCausalLM stores each layer's experts fused.*"
                                        r"mlp\.experts\.gate_up_proj.*use merge_method: assembly"):
        build_plan(cfg, config_dir=tmp_path)
    cfg = load_config(write_config(tmp_path, base_model=str(tiny_qwen_moe), gate_mode="random",
                                   experts=[{"source_model": str(tiny_qwen_moe)}, {"source_model": str(base)}]))
    with pytest.raises(PlanError, match="GptOssForCausalLM stores each layer's experts fused"):
        build_plan(cfg, config_dir=tmp_path)


def test_the_routing_report_adds_gpt_oss_router_bias_to_the_logits(gpt_oss, tmp_path):
    """GPT-OSS's router adds its bias to the logits before the top-k (transformers' GptOssTopKRouter): with a
    bias of +30 on one expert per layer, that expert is in every token's picks, and the report says so."""
    base, _ = gpt_oss
    biased = tmp_path / "biased"
    shutil.copytree(base, biased)
    for f in biased.glob("*.safetensors"):
        tensors = load_file(f)
        for name in [n for n in tensors if n.endswith("mlp.router.bias")]:
            layer = int(name.split(".")[2])
            tensors[name] = torch.zeros_like(tensors[name])
            tensors[name][(layer + 1) % tensors[name].numel()] = 30.0
        save_file(tensors, str(f), metadata={"format": "pt"})
    out = _merge(tmp_path / "m", base_model=str(biased))
    from zenith_merge.checks.routing_report import routing_usage

    report = routing_usage(out, {"text": ["def add(a, b):\n    return a + b\n\nprint(add(2, 3))"]}, progress=False)
    tokens = report["domains"]["text"]
    assert tokens > 5 and report["top_k"] == 2
    for layer, per_domain in report["layers"].items():
        counts = per_domain["text"]["experts"]
        assert sum(counts) == 2 * tokens and counts[(int(layer) + 1) % len(counts)] == tokens, (layer, counts)


def test_every_family_table_is_registered():
    for cls, _ in FAMILIES.values():
        assert cls in ARCHITECTURES
    assert {"MixtralForCausalLM", "Qwen2MoeForCausalLM"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("name", ["glm-4.5", "deepseek-v2", "kimi-k2"])
def test_a_family_donor_grafts_into_a_deepseek_v3_base(name, tmp_path):
    """Concat across families (issue 3's graft): the donor's experts mapped into a tiny DeepSeek-V3 base's hidden
    space by the ridge fit on calibration text; the output loads with nothing missing and runs. DeepSeek-V2's
    weights are not renormalised, so its usage is measured on its prompts."""
    from conftest import make_tiny_deepseek

    base = make_tiny_deepseek(tmp_path / "base", seed=1)
    donor = _build(name, tmp_path / "donor")
    prompts = {"positive_prompts": ["def add(a, b):", "What is 3 + 4?"]} if name == "deepseek-v2" else {}
    out = _merge(tmp_path / "merge", base_model=str(base), gate_mode="random", routing_report=False,
                 experts=[{"source_model": str(base)}, {"source_model": str(donor), **prompts}],
                 align={"calibration": ["demo:code"], "max_tokens": 500})
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.n_routed_experts > json.loads((base / "config.json").read_text())["n_routed_experts"]
    assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def test_fp8_cast_round_trips_each_family(family, tmp_path):
    """`zenith-merge fp8-cast` on each family: its projections become block FP8 with their scales (fused 3-D
    experts stay BF16), and the cast back to BF16 is within FP8's rounding of the original."""
    from zenith_merge.fp8_cast import fp8_cast
    from zenith_merge.io.reader import Checkpoint

    name, base, _ = family
    fp8_cast(base, tmp_path / "fp8", to="fp8", progress=False)
    fp8_cast(tmp_path / "fp8", tmp_path / "bf16", to="bf16", progress=False)
    stored = tensors_of(tmp_path / "fp8")
    quantised = [n for n, t in stored.items() if t.dtype == torch.float8_e4m3fn]
    assert quantised and all(n + "_scale_inv" in stored for n in quantised), name
    original, back = tensors_of(base), tensors_of(tmp_path / "bf16")
    assert set(back) == set(original)
    for n in quantised:
        err = (back[n].float() - original[n].float()).norm() / original[n].float().norm()
        assert err < 0.08, (name, n, float(err))
    with Checkpoint.open(tmp_path / "fp8") as c:
        assert all(c.is_fp8(n) for n in quantised)
