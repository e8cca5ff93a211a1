"""Release-layout checkpoints (zenith_merge.demo.release_layout): names, shapes, dtypes, shards and values
as DeepSeek-V3 and Qwen3-MoE ship them, checked against transformers' own classes."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from zenith_merge.demo.release_configs import (
    DEEPSEEK_V3_CONFIG,
    FP8_QUANTIZATION_CONFIG,
    QWEN3_30B_A3B_CONFIG,
    SMALL_DEEPSEEK_V3,
)
from zenith_merge.demo.release_layout import (
    DELETE,
    release_config,
    release_fixture,
    release_tensors,
    write_release_checkpoint,
)

# The weights the DeepSeek-V3 release stores as float8_e4m3fn: the 2-D projections of MLA attention, the
# dense MLPs, the routed and the shared experts (the MTP layer's decoder layer included; not eh_proj)
DEEPSEEK_FP8 = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj"
                          r"|o_proj)|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight")
MTP_EXTRA = ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
             "shared_head.head.weight")


def headers(folder: Path) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """shard file -> {tensor: (safetensors dtype, shape)}, read from each shard's header."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        n = int.from_bytes(path.open("rb").read(8), "little")
        head = json.loads(path.open("rb").read(8 + n)[8:])
        head.pop("__metadata__", None)
        out[path.name] = {k: (v["dtype"], tuple(v["shape"])) for k, v in head.items()}
    return out


def tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor: (dtype, shape)} over every shard."""
    return {k: v for shard in headers(folder).values() for k, v in shard.items()}


def load(folder: Path, name: str) -> torch.Tensor:
    """One tensor, from the shard the index names."""
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(folder / shard), "pt") as f:
        return f.get_tensor(name)


def transformers_names(folder: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes transformers writes to disk for the folder's config (built on the meta
    device; transformers 5 fuses experts in memory and splits them again when it saves)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in revert_weight_conversion(model, model.state_dict()).items()}


def dequantise(weight: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Block-FP8 -> BF16 as DeepSeek's fp8_cast_bf16.py does it: float32 product, then BF16."""
    rows, cols = weight.shape
    full = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (weight.float() * full).to(torch.bfloat16)


@pytest.fixture(scope="module")
def v3_bf16() -> Path:
    return release_fixture("deepseek-v3-bf16-small")


@pytest.fixture(scope="module")
def v3_fp8() -> Path:
    return release_fixture("deepseek-v3-fp8-small")


@pytest.fixture(scope="module")
def qwen3() -> Path:
    return release_fixture("qwen3-moe-small")


def test_config_is_the_release_config_with_the_overrides(v3_fp8, v3_bf16, qwen3):
    fp8 = json.loads((v3_fp8 / "config.json").read_text())
    assert fp8 == {**DEEPSEEK_V3_CONFIG, **SMALL_DEEPSEEK_V3}
    assert fp8["quantization_config"] == FP8_QUANTIZATION_CONFIG == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    assert fp8["num_nextn_predict_layers"] == 1 and fp8["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_deepseek.DeepseekV3ForCausalLM"
    bf16 = json.loads((v3_bf16 / "config.json").read_text())
    assert "quantization_config" not in bf16 and bf16 == {k: v for k, v in fp8.items() if k != "quantization_config"}
    q = json.loads((qwen3 / "config.json").read_text())
    assert set(q) == set(QWEN3_30B_A3B_CONFIG) and q["architectures"] == ["Qwen3MoeForCausalLM"]
    edited = release_config("deepseek-v3", {"seq_aux": DELETE, "q_lora_rank": None})
    assert "seq_aux" not in edited and edited["q_lora_rank"] is None and edited["num_hidden_layers"] == 61
    names = [t.name for t in release_tensors("deepseek-v3", {**edited, **SMALL_DEEPSEEK_V3, "q_lora_rank": None})]
    assert "model.layers.0.self_attn.q_proj.weight" in names and not any("q_a_proj" in n for n in names)
    # the custom-code files auto_map names define the classes it names
    for file, names in (("configuration_deepseek.py", {"DeepseekV3Config"}),
                        ("modeling_deepseek.py", {"DeepseekV3Model", "DeepseekV3ForCausalLM"})):
        tree = ast.parse((v3_fp8 / file).read_text())
        assert names <= {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
        assert "stand" in ast.get_docstring(tree).lower()
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (v3_fp8 / file).is_file() and (qwen3 / file).is_file()
    assert json.loads((v3_fp8 / "generation_config.json").read_text())["eos_token_id"] == 1


def test_deepseek_names_and_shapes_are_transformers_plus_the_mtp_layer(v3_bf16):
    config = json.loads((v3_bf16 / "config.json").read_text())
    ours, theirs = tensors(v3_bf16), transformers_names(v3_bf16)
    mtp = f"model.layers.{config['num_hidden_layers']}."
    main = {k: v for k, v in ours.items() if not k.startswith(mtp)}
    assert {k: shape for k, (_, shape) in main.items()} == theirs
    assert {k: dtype for k, (dtype, _) in ours.items() if dtype != "BF16"} == {
        f"model.layers.{i}.mlp.gate.e_score_correction_bias": "F32" for i in (1, 2)}
    # the MTP layer: a full MoE decoder layer (layer 1's tensors) plus exactly the listed extra tensors
    layer = {k.removeprefix("model.layers.1."): v for k, v in ours.items() if k.startswith("model.layers.1.")}
    extra = {k.removeprefix(mtp): v for k, v in ours.items() if k.startswith(mtp)}
    assert set(extra) == set(layer) | set(MTP_EXTRA) and all(extra[k] == layer[k] for k in layer)
    h, vocab = config["hidden_size"], config["vocab_size"]
    assert extra["eh_proj.weight"] == ("BF16", (h, 2 * h))
    assert extra["shared_head.head.weight"] == extra["embed_tokens.weight"] == ("BF16", (vocab, h))
    assert extra["enorm.weight"] == extra["hnorm.weight"] == extra["shared_head.norm.weight"] == ("BF16", (h,))
    # the MTP layer's embedding and head are the main model's (shared in training)
    assert torch.equal(load(v3_bf16, mtp + "embed_tokens.weight"), load(v3_bf16, "model.embed_tokens.weight"))
    assert torch.equal(load(v3_bf16, mtp + "shared_head.head.weight"), load(v3_bf16, "lm_head.weight"))


def test_fp8_weights_are_the_releases_with_block_scales(v3_fp8, v3_bf16):
    ours = tensors(v3_fp8)
    scales = {k for k in ours if k.endswith("_scale_inv")}
    quantised = {k for k in ours if DEEPSEEK_FP8.fullmatch(k)}
    assert {k.removesuffix("_scale_inv") for k in scales} == quantised
    assert {k for k, (dtype, _) in ours.items() if dtype == "F8_E4M3"} == quantised
    assert {k for k in ours if k not in scales} == set(tensors(v3_bf16))  # the BF16 form: same names
    assert "model.layers.2.eh_proj.weight" not in quantised and "lm_head.weight" not in quantised
    for name in quantised:
        rows, cols = ours[name][1]
        assert ours[name + "_scale_inv"] == ("F32", (-(-rows // 128), -(-cols // 128))), name
    where = {k: shard for shard, names in headers(v3_fp8).items() for k in names}
    assert any(where[s] != where[s.removesuffix("_scale_inv")] for s in scales)
    for name in quantised:  # finite codes only (0x7F / 0xFF are NaN), amax 448, scales ~1e-4
        codes = load(v3_fp8, name).view(torch.uint8)
        assert not ((codes & 0x7F) == 0x7F).any(), name
        scale = load(v3_fp8, name + "_scale_inv")
        assert 2e-5 < scale.min() and scale.max() < 2e-3, name
    w = load(v3_fp8, "model.layers.1.mlp.experts.3.down_proj.weight").float()
    assert w.abs().max() == 448 and 100 < w.std() < 200


def test_bf16_form_is_the_dequantised_fp8_form(v3_fp8, v3_bf16):
    fp8 = tensors(v3_fp8)
    for name in tensors(v3_bf16):
        got = load(v3_bf16, name)
        if fp8[name][0] == "F8_E4M3":
            want = dequantise(load(v3_fp8, name), load(v3_fp8, name + "_scale_inv"))
        else:
            want = load(v3_fp8, name)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
    w = load(v3_bf16, "model.layers.0.self_attn.q_b_proj.weight").float()  # 96 columns: a partial block
    assert 0.01 < w.std() < 0.04


@pytest.mark.parametrize("name", ["deepseek-v3-fp8-small", "qwen3-moe-small"])
def test_shards_and_index_agree(name):
    folder = release_fixture(name)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = headers(folder)
    count = len(shards)
    width = 6 if name.startswith("deepseek") else 5  # DeepSeek: model-00001-of-000163.safetensors
    assert sorted(shards) == [f"model-{i:05d}-of-{count:0{width}d}.safetensors" for i in range(1, count + 1)]
    assert count > 1
    seen = [k for names in shards.values() for k in names]
    assert len(seen) == len(set(seen)) == len(index["weight_map"])
    assert index["weight_map"] == {k: shard for shard, names in shards.items() for k in names}
    size = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    total = sum(size[d] * torch.Size(s).numel() for names in shards.values() for d, s in names.values())
    assert index["metadata"]["total_size"] == total


def test_transformers_loads_deepseek_with_only_the_mtp_layer_unexpected(v3_bf16):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(v3_bf16, output_loading_info=True)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    assert info["unexpected_keys"] and all(k.startswith("model.layers.2.") for k in info["unexpected_keys"])
    ids = AutoTokenizer.from_pretrained(v3_bf16)("def add(a, b):\n    return a + b", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 129280) and torch.isfinite(logits).all() and logits.std() > 0.05


def test_qwen3_is_transformers_layout_and_loads_with_no_missing_or_unexpected_keys(qwen3):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = tensors(qwen3)
    assert {k: shape for k, (_, shape) in ours.items()} == transformers_names(qwen3)
    assert {dtype for dtype, _ in ours.values()} == {"BF16"}
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in ours and "model.layers.0.self_attn.q_norm.weight" in ours
    model, info = AutoModelForCausalLM.from_pretrained(qwen3, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    ids = AutoTokenizer.from_pretrained(qwen3)("Solve for x: 2x - 5 = 11.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.std() > 0.05


def test_qwen3_fp8_uses_block_scales_on_the_projections(tmp_path):
    folder = write_release_checkpoint(tmp_path / "q", "qwen3-moe", fp8=True, tokenizer=False,
                                      overrides={"num_hidden_layers": 1, "num_experts": 4, "num_experts_per_tok": 2,
                                                 "hidden_size": 128, "vocab_size": 512, "head_dim": 32,
                                                 "num_attention_heads": 4, "num_key_value_heads": 2,
                                                 "moe_intermediate_size": 64})
    ours = tensors(folder)
    assert json.loads((folder / "config.json").read_text())["quantization_config"] == FP8_QUANTIZATION_CONFIG
    fp8 = {k for k, (d, _) in ours.items() if d == "F8_E4M3"}
    assert {k.split(".", 3)[3] for k in fp8} == {
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        *(f"mlp.experts.{e}.{p}.weight" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj"))}
    assert {k + "_scale_inv" for k in fp8} == {k for k in ours if k.endswith("_scale_inv")}
    assert ours["model.layers.0.mlp.gate.weight"][0] == "BF16"


def test_building_twice_gives_the_same_bytes_and_seeds_change_them(tmp_path):
    small = {**SMALL_DEEPSEEK_V3, "vocab_size": 2048}
    args = dict(overrides=small, tokenizer=False, shard_bytes=2 * 2**20, parent_seed=3, child_seed=4)
    a = write_release_checkpoint(tmp_path / "a", "deepseek-v3", **args)
    b = write_release_checkpoint(tmp_path / "b", "deepseek-v3", **args)
    c = write_release_checkpoint(tmp_path / "c", "deepseek-v3", **{**args, "child_seed": 5})
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and len([f for f in files if f.endswith("safetensors")]) > 2
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "model.safetensors.index.json").read_bytes() == (c / "model.safetensors.index.json").read_bytes()
    assert all((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.endswith(".safetensors"))
    with pytest.raises(Exception, match="not empty"):
        write_release_checkpoint(a, "deepseek-v3", **args)


def test_two_children_of_one_parent_differ_slightly(v3_fp8):
    r1 = release_fixture("deepseek-v3-r1-fp8-small")
    config = release_config("deepseek-v3", SMALL_DEEPSEEK_V3)
    for t in release_tensors("deepseek-v3", config):
        if t.kind == "scale" or not re.search(r"layers\.1\.mlp\.experts\.0\.|embed_tokens|layers\.0\.input", t.name):
            continue
        a, b = load(v3_fp8, t.name), load(r1, t.name)
        if t.kind == "weight":
            a = dequantise(a, load(v3_fp8, t.name + "_scale_inv"))
            b = dequantise(b, load(r1, t.name + "_scale_inv"))
        a, b = a.float(), b.float()
        rel = ((a - b).norm() / a.norm()).item()
        assert 0.003 < rel < 0.08, (t.name, rel)
