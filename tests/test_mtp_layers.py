"""DeepSeek-V3's multi-token-prediction (MTP) layer, as the release lays it out (`model.layers.<depth>.*` with
its own embed_tokens, enorm, hnorm, eh_proj and shared head): described by the architecture table, copied,
assembled per class (or by `assembly.weights.mtp`), grafted with the expert table of the last MoE layer,
and kept in the FP8 classes; and FP8 copies that keep their weight and scale bytes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    add_mtp_layer,
    make_tiny_deepseek,
    make_tiny_qwen3_moe,
    stored_bytes,
    tensors_of,
    write_config,
)
from safetensors import safe_open

from zenith_merge.architectures import ARCHITECTURES, classify, extra_layer_indices
from zenith_merge.architectures.fp8 import quantizable
from zenith_merge.config import load_config
from zenith_merge.demo import ensure_demo
from zenith_merge.pipeline import run_merge
from zenith_merge.plan.build import build_plan
from zenith_merge.plan.summary import format_plan

V3 = ARCHITECTURES["DeepseekV3ForCausalLM"]
MTP = "model.layers.3."  # the tiny models have 3 decoder layers


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """Two children of one tiny DeepSeek-V3 (other seeds), each with an MTP layer; and a Qwen3-MoE donor."""
    root = tmp_path_factory.mktemp("mtp")
    a = add_mtp_layer(make_tiny_deepseek(root / "a", seed=0), seed=1)
    b = add_mtp_layer(make_tiny_deepseek(root / "b", seed=0), seed=2)
    donor = make_tiny_qwen3_moe(root / "donor", seed=3, hidden=32)
    return a, b, donor


def _merge(tmp_path: Path, **data) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = write_config(tmp_path, output_dir=str(tmp_path / "out"), **{"gate_mode": "random", **data})
    return run_merge(load_config(cfg), config_dir=cfg.parent, progress=False).output_dir


def test_the_table_describes_the_mtp_layer_and_finds_it_by_its_tensors(parents):
    a, _, _ = parents
    config = json.loads((a / "config.json").read_text())
    names = list(tensors_of(a))
    assert extra_layer_indices(V3, config, names) == (3,)
    assert extra_layer_indices(V3, config, [n for n in names if not n.startswith(MTP)]) == ()  # config alone: none
    roles = {n.removeprefix(MTP): classify(V3, n).role for n in names if n.startswith(MTP)}
    assert roles["eh_proj.weight"] == "mtp_eh_proj" and roles["shared_head.head.weight"] == "mtp_head"
    assert roles["enorm.weight"] == "mtp_enorm" and roles["mlp.experts.0.gate_proj.weight"] == "expert_gate"
    assert quantizable(V3, MTP + "self_attn.o_proj.weight", (32, 32))  # the MTP decoder layer: FP8 as elsewhere
    assert not quantizable(V3, MTP + "eh_proj.weight", (32, 64))  # BF16 in the release (a plain Linear in vLLM)
    assert not quantizable(V3, MTP + "shared_head.head.weight", (320, 32))


def test_a_chimera_takes_the_mtp_layer_per_class_or_whole_by_assembly_weights_mtp(parents, tmp_path):
    a, b, _ = parents
    experts = [{"source_model": str(a)}, {"source_model": str(b)}]
    out = _merge(tmp_path / "per-class", base_model=str(a), merge_method="assembly", experts=experts,
                 assembly={"weights": {"default": [1, 0], "routed_experts": [0, 1]}})
    got, ta, tb = tensors_of(out), tensors_of(a), tensors_of(b)
    assert got.keys() == ta.keys()
    for name, t in got.items():
        want = tb[name] if classify(V3, name).tensor_class == "routed_experts" else ta[name]
        assert torch.equal(t.view(torch.uint8), want.view(torch.uint8)), name  # MTP experts follow the class
    out = _merge(tmp_path / "whole", base_model=str(a), merge_method="assembly", experts=experts,
                 assembly={"weights": {"default": [1, 0], "mtp": [0, 1]}})
    got = tensors_of(out)
    for name, t in got.items():
        want = tb[name] if name.startswith(MTP) else ta[name]
        assert torch.equal(t.view(torch.uint8), want.view(torch.uint8)), name
    plan = json.loads((out / ".zenith" / "plan.json").read_text())
    mtp_recipes = [t["recipe"] for t in plan["tensors"] if t["name"].startswith(MTP)]
    assert mtp_recipes and all(r["kind"] == "copy" and r["source"] == "donor1" for r in mtp_recipes)


def test_a_graft_gives_the_mtp_layer_the_last_layers_expert_table(parents, tmp_path):
    a, _, donor = parents
    out = _merge(tmp_path, base_model=str(a), gate_mode="random", experts_per_token=2,
                 experts=[{"source_model": str(a)}, {"source_model": str(donor)}])
    config = json.loads((out / "config.json").read_text())
    n = config["n_routed_experts"]
    assert n == 8 and config["num_nextn_predict_layers"] == 1
    got, base = tensors_of(out), tensors_of(a)
    plan = build_plan(load_config(tmp_path / "merge.yml"))
    assert "MTP layer 3 (num_nextn_predict_layers): " in format_plan(plan)
    assert "its experts follow MoE layer 2's table" in format_plan(plan)
    mtp = plan.layer_experts(3)
    assert mtp.like == 2 and [s.source for s in mtp.slots] == [s.source for s in plan.layer_experts(2).slots]
    for j, slot in enumerate(mtp.slots):
        for proj in ("gate", "up", "down"):
            name = f"mlp.experts.{j}.{proj}_proj.weight"
            if slot.source == "base":  # the MTP layer's own experts, in place
                assert torch.equal(got[MTP + name], base[MTP + name])
            else:  # the donor's experts as grafted into the last layer
                assert torch.equal(got[MTP + name], got["model.layers.2." + name])
    rows = got[MTP + "mlp.gate.weight"]
    assert rows.shape == (n, 32) and torch.equal(rows[:4], base[MTP + "mlp.gate.weight"])
    for own in ("eh_proj.weight", "enorm.weight", "shared_head.head.weight", "self_attn.o_proj.weight"):
        assert torch.equal(got[MTP + own], base[MTP + own])
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and all(k.startswith(MTP) for k in info["unexpected_keys"])


def test_fp8_output_writes_the_mtp_layer_as_the_release_does(parents, tmp_path):
    """Its decoder layer's projections block FP8 with scales; eh_proj, embedding, head and norms BF16."""
    a, _, _ = parents
    out = _merge(tmp_path, base_model=str(a), experts=[{"source_model": str(a)}], fp8_output=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    dtypes = {}
    for file in set(index.values()):
        with safe_open(str(out / file), "pt") as f:
            dtypes.update({n: f.get_slice(n).get_dtype() for n in f.keys()})
    assert dtypes[MTP + "self_attn.o_proj.weight"] == "F8_E4M3" and MTP + "self_attn.o_proj.weight_scale_inv" in index
    assert dtypes[MTP + "mlp.experts.0.down_proj.weight"] == "F8_E4M3"
    for own in ("eh_proj.weight", "shared_head.head.weight", "embed_tokens.weight", "enorm.weight"):
        assert dtypes[MTP + own] == "BF16" and MTP + own + "_scale_inv" not in index


def test_an_eh_proj_the_base_stores_in_fp8_stays_fp8_with_its_bytes(parents, tmp_path):
    """The release keeps eh_proj BF16 (above); a base that quantised it as its other projections keeps it FP8,
    weight and scale bytes copied from the base, so the output's storage follows the base's."""
    from safetensors.torch import save_file

    from zenith_merge.fp8_cast import fp8_cast
    from zenith_merge.kernels.fp8 import quantize

    a, _, _ = parents
    base = tmp_path / "fp8"
    fp8_cast(a, base, to="fp8", progress=False)
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = base / index["weight_map"][MTP + "eh_proj.weight"]
    with safe_open(str(shard), "pt") as f:
        tensors, meta = {n: f.get_tensor(n) for n in f.keys()}, f.metadata()
    assert tensors[MTP + "eh_proj.weight"].dtype == torch.bfloat16  # fp8-cast keeps the release's form
    q, scale = quantize(tensors[MTP + "eh_proj.weight"])
    tensors[MTP + "eh_proj.weight"], tensors[MTP + "eh_proj.weight_scale_inv"] = q, scale * 1.25
    save_file(tensors, str(shard), metadata=meta)
    index["weight_map"][MTP + "eh_proj.weight_scale_inv"] = shard.name
    index_path.write_text(json.dumps(index))

    out = _merge(tmp_path, base_model=str(base), experts=[{"source_model": str(base)}], fp8_output=True)
    got, want = stored_bytes(out), stored_bytes(base)
    for name in (MTP + "eh_proj.weight", MTP + "eh_proj.weight_scale_inv"):
        assert got[name] == want[name], name
    with safe_open(str(out / json.loads((out / index_path.name).read_text())["weight_map"][MTP + "eh_proj.weight"]),
                   "pt") as f:
        assert f.get_slice(MTP + "eh_proj.weight").get_dtype() == "F8_E4M3"


def _with_release_like_scales(src: Path, dst: Path, seed: int) -> Path:
    """A copy of an FP8 folder whose block scales are not amax / 448 of their blocks (as the release's are
    not): each scale times a seeded factor in [1, 1.5). Quantising such a weight again changes its bytes."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    for file in dst.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            tensors, meta = {n: f.get_tensor(n) for n in f.keys()}, f.metadata()
        for n, t in tensors.items():
            if n.endswith("_scale_inv"):
                tensors[n] = t * (1 + 0.5 * torch.rand(t.shape, generator=gen))
        save_file(tensors, str(file), metadata=meta)
    return dst


def test_an_fp8_chimera_of_whole_classes_is_byte_identical_to_its_parents_tensor_by_tensor(tmp_path):
    v3 = _with_release_like_scales(ensure_demo("zen-tiny-fp8"), tmp_path / "v3", seed=1)
    r1 = _with_release_like_scales(ensure_demo("zen-r1-tiny-fp8"), tmp_path / "r1", seed=2)
    out = _merge(tmp_path, base_model=str(v3), merge_method="assembly", fp8_output=True,
                 experts=[{"source_model": str(v3)}, {"source_model": str(r1)}],
                 assembly={"weights": {"default": [1, 0], "routed_experts": [0, 1], "attention": [0, 1]}})
    got, a, b = stored_bytes(out), stored_bytes(v3), stored_bytes(r1)
    assert got.keys() == a.keys()
    scales = [n for n in got if n.endswith("_scale_inv")]
    assert scales
    for name, data in got.items():
        weight = classify(ARCHITECTURES["DeepseekV3ForCausalLM"], name.removesuffix("_scale_inv"))
        from_r1 = weight is not None and weight.tensor_class in ("routed_experts", "attention")
        assert data == (b if from_r1 else a)[name], name  # weight bytes and scale bytes alike


def test_a_copied_fp8_tensor_whose_source_is_bf16_is_quantised(tmp_path):
    bf16 = make_tiny_deepseek(tmp_path / "bf16")
    out = _merge(tmp_path, base_model=str(bf16), experts=[{"source_model": str(bf16)}], fp8_output=True)
    got = stored_bytes(out)
    assert any(n.endswith("_scale_inv") for n in got)
    shutil.rmtree(out)


def test_eh_proj_takes_the_attention_weights_and_the_plan_names_the_mtp_layer(parents, tmp_path):
    """In an assembly, the MTP layer's own projection (eh_proj, class mtp) is weighted as attention (not as
    `default`), and `zenith-merge plan` names the layer."""
    a, b, _ = parents
    out = _merge(tmp_path, base_model=str(a), merge_method="assembly",
                 experts=[{"source_model": str(a)}, {"source_model": str(b)}],
                 assembly={"weights": {"default": [1, 0], "attention": [0, 1]}})
    got, ta, tb = tensors_of(out), tensors_of(a), tensors_of(b)
    assert torch.equal(got[MTP + "eh_proj.weight"], tb[MTP + "eh_proj.weight"])
    assert torch.equal(got[MTP + "self_attn.o_proj.weight"], tb[MTP + "self_attn.o_proj.weight"])
    assert torch.equal(got[MTP + "enorm.weight"], ta[MTP + "enorm.weight"])  # norms: default
    assert "MTP layer 3 (num_nextn_predict_layers): " in format_plan(build_plan(load_config(tmp_path / "merge.yml")))


def test_keep_on_a_base_with_an_mtp_layer_is_refused_naming_it(parents, tmp_path):
    from zenith_merge.errors import PlanError

    a, _, donor = parents
    cfg = write_config(tmp_path, base_model=str(a), gate_mode="random", output_dir=str(tmp_path / "out"),
                       experts=[{"source_model": str(a), "keep": 2, "positive_prompts": ["def f(): pass"]},
                                {"source_model": str(donor), "positive_prompts": ["2 + 2 = 4"]}])
    with pytest.raises(PlanError, match=r"experts\.0\.keep: the base's MTP layer\(s\) \[3\] would need their own"):
        build_plan(load_config(cfg))


def test_a_union_vocabulary_rebuilds_the_mtp_layers_embedding_and_head(parents, tmp_path):
    """With a donor of another tokenizer, the MTP layer's own embedding and head get the union's rows: its own
    rows for the base's tokens (exact at slerp_t 0), the donor's tokens as in the model's embedding and head."""
    from conftest import save_tokenizer

    a, _, _ = parents
    donor = make_tiny_qwen3_moe(tmp_path / "donor", seed=4, hidden=32)
    save_tokenizer(donor, vocab_size=290, specials=("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
                   text=["Solve 12 * 7 step by step: 10 * 7 = 70, 2 * 7 = 14, total 84.\n"] * 20)
    out = _merge(tmp_path / "m", base_model=str(a), experts=[{"source_model": str(a)}, {"source_model": str(donor)}],
                 tokenizer={"source": "union", "slerp_t": 0.0})
    got, base = tensors_of(out), tensors_of(a)
    plan = json.loads((out / ".zenith" / "plan.json").read_text())
    recipes = {t["name"]: t["recipe"] for t in plan["tensors"]}
    assert recipes[MTP + "embed_tokens.weight"] == {"kind": "vocab", "part": "embed", "tensor": MTP + "embed_tokens.weight"}
    assert recipes[MTP + "shared_head.head.weight"]["tensor"] == MTP + "shared_head.head.weight"
    tmap = json.loads((out / ".zenith" / "token_map.json").read_text())
    n = tmap["base_size"]
    for own, main in (("embed_tokens.weight", "model.embed_tokens.weight"), ("shared_head.head.weight",
                                                                             "lm_head.weight")):
        rows = got[MTP + own]
        assert rows.shape == got[main].shape and rows.shape[0] == tmap["padded_size"] > n
        assert torch.equal(rows[:n], base[MTP + own][:n])  # the MTP layer's own rows
        added = slice(n, tmap["size"])
        torch.testing.assert_close(rows[added].float(), got[main][added].float(), rtol=0.02, atol=0.02)


def _untrained_and_trained(parents, tmp_path, training) -> tuple[dict, dict]:
    """The tensors of the MTP parent grafted with the Qwen3-MoE donor, without training and after 3 steps of
    the training `training(steps)` configures."""
    a, _, donor = parents
    text = "def add(a, b):\n    return a + b\n" * 8
    return tuple(tensors_of(_merge(tmp_path / str(steps), base_model=str(a), experts_per_token=2,
                                   experts=[{"source_model": str(a), "positive_prompts": [text]},
                                            {"source_model": str(donor), "positive_prompts": [text]}],
                                   **training(steps))) for steps in (0, 3))


def test_router_training_leaves_the_mtp_layers_router_as_planned(parents, tmp_path):
    """transformers' forward pass never runs the MTP layer, so router training cannot train its router: the
    layer's router rows are the ones the plan gave it (as without training), while the model's grafted rows
    move."""
    plain, trained = _untrained_and_trained(parents, tmp_path, lambda steps: {
        "router": {"train_steps": steps, "lr": 0.05, "seq_len": 16, "batch_size": 2}})
    assert torch.equal(trained[MTP + "mlp.gate.weight"], plain[MTP + "mlp.gate.weight"])
    assert not torch.equal(trained["model.layers.2.mlp.gate.weight"], plain["model.layers.2.mlp.gate.weight"])


def test_alignment_training_gives_the_mtp_layer_the_last_layers_trained_maps(parents, tmp_path):
    """Alignment training runs no MTP layer: the MTP layer's grafted slots take the last MoE layer's maps, so
    after training they are the last layer's grafted experts as trained (the same donor layer, the same maps),
    and they moved with them."""
    plain, trained = _untrained_and_trained(parents, tmp_path, lambda steps: {
        "align": {"mode": "fit", "train_steps": steps, "lr": 0.05}, "router": {"seq_len": 16, "batch_size": 2}})
    n_base = sum(1 for k in plain if k.startswith("model.layers.2.mlp.experts.") and k.endswith("gate_proj.weight")
                 and torch.equal(plain[k], trained[k]))
    grafted = [k for k in trained if k.startswith(MTP + "mlp.experts.") and not torch.equal(plain[k], trained[k])]
    assert grafted and n_base  # the donor's slots moved with training, the base's stayed
    for k in grafted:
        last = k.replace(MTP, "model.layers.2.")
        assert torch.equal(trained[k], trained[last]), k
