"""Grafting experts from other models: across architectures and widths, same family, dense donors.

Tiny random models (conftest) keep these fast; the demo-model runs are in test_demo_merges.py.
"""

from __future__ import annotations

import json
from typing import get_args

import pytest
import torch
from conftest import make_tiny_deepseek, make_tiny_dense, make_tiny_qwen3_moe, tensors_of, write_config
from transformers import AutoModelForCausalLM

from zenith_merge.config import GateMode, load_config
from zenith_merge.errors import PlanError
from zenith_merge.maths.graft import expert_forward, fold_projection, pad_to
from zenith_merge.pipeline import run_merge
from zenith_merge.plan.build import build_plan
from zenith_merge.stages.align import load_alignment

PROMPTS = ["def add(a, b):\n    return a + b\n", "What is 3 + 4? It is 7.", "class Stack:\n    pass\n"]
E = "model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"


def _merge(tmp_path, base, experts, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    extra.setdefault("gate_mode", "random")
    cfg = load_config(write_config(tmp_path, base_model=str(base), output_dir=str(tmp_path / "out"),
                                   max_shard_size="40KB", experts=experts, **extra))
    return run_merge(cfg, config_dir=tmp_path, progress=False)


def _entry(path, **kw):
    return {"source_model": str(path), "positive_prompts": PROMPTS, **kw}


def _mask_slots(model, slots):
    """Make the given expert slots unpickable: their score-correction bias to -1e4 (sigmoid scores are in [0, 1])."""
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias[list(slots)] = -1e4


def _logits(folder, ids, mask=()):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    _mask_slots(model, mask)
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def cross_arch(tmp_path_factory, tiny_deepseek, tiny_qwen_moe):
    """tiny_deepseek (hidden 32) + tiny_qwen_moe (hidden 24): fitted maps, all 4 donor experts, transferred rows."""
    tmp = tmp_path_factory.mktemp("cross")
    return _merge(tmp, tiny_deepseek, [_entry(tiny_deepseek), _entry(tiny_qwen_moe)], gate_mode="transfer",
                  align={"calibration": [], "max_tokens": 400})


def test_cross_architecture_output_is_a_standard_deepseek_checkpoint(cross_arch):
    out = cross_arch.output_dir
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (config["n_routed_experts"], config["n_group"], config["topk_group"]) == (8, 4, 1)
    model = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code: transformers' own class
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    generated = model.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


def test_base_preservation_with_donor_rows_masked(cross_arch, tiny_deepseek):
    """With the donor's slots never picked, the merged model is the base: logits equal to float tolerance."""
    base = _logits(tiny_deepseek, IDS)
    merged = _logits(cross_arch.output_dir, IDS, mask=range(4, 8))
    torch.testing.assert_close(merged, base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(cross_arch.output_dir, IDS), base, atol=1e-3)  # unmasked, the donor acts


def test_grafted_expert_is_the_folded_donor_expert(cross_arch, tiny_qwen_moe):
    out = tensors_of(cross_arch.output_dir)
    src = tensors_of(tiny_qwen_moe)
    plan = cross_arch.plan
    al = load_alignment(cross_arch.output_dir / ".zenith" / "align-donor1")
    assert set(al.pairs) == {(1, 0), (2, 1)} and al.n_tokens > 0
    assert all(-1.0 <= r <= 1.0 for r in (*al.r2_A.values(), *al.r2_B.values()))
    for layer in (1, 2):
        slot = plan.slot(layer, 5)
        A, B = al.A[layer, slot.source_layer], al.B[layer, slot.source_layer]
        for proj in ("gate", "up", "down"):
            want = fold_projection(src[E.format(layer=slot.source_layer, expert=slot.expert, proj=proj)], proj,
                                   A=A, B=B, scale=slot.scale)
            got = out[E.format(layer=layer, expert=5, proj=proj)]
            shape = (16, 32) if proj != "down" else (32, 16)  # donor's 12 padded to the base's 16
            torch.testing.assert_close(got.float(), pad_to(want, shape).to(torch.bfloat16).float())
        # transfer: the donor's router row, mapped through A
        donor_row = src[f"model.layers.{slot.source_layer}.mlp.gate.weight"][slot.expert].float()
        got_row = out[f"model.layers.{layer}.mlp.gate.weight"][5].float()
        torch.testing.assert_close(got_row, (donor_row @ A).to(torch.bfloat16).float())


def test_a_sources_layers_can_be_chosen(tmp_path, tiny_deepseek, tiny_qwen_moe):
    """`experts[].layers` overrides the relative-depth map: output layer 2 takes donor layer 0's experts,
    its maps are fitted for that pair, and the layer not listed keeps its depth-matched source layer."""
    result = _merge(tmp_path, tiny_deepseek, [_entry(tiny_deepseek), _entry(tiny_qwen_moe, layers={2: 0})],
                    align={"calibration": [], "max_tokens": 400})
    plan = result.plan
    assert {int(k): v for k, v in plan.layer_map["donor1"].items()} == {1: 0, 2: 0}
    al = load_alignment(result.output_dir / ".zenith" / "align-donor1")
    assert set(al.pairs) == {(1, 0), (2, 0)}
    out, src = tensors_of(result.output_dir), tensors_of(tiny_qwen_moe)
    slot = plan.slot(2, 5)
    assert slot.source_layer == 0
    want = fold_projection(src[E.format(layer=0, expert=slot.expert, proj="gate")], "gate", A=al.A[2, 0], B=al.B[2, 0],
                           scale=slot.scale)
    torch.testing.assert_close(out[E.format(layer=2, expert=5, proj="gate")].float(),
                               pad_to(want, (16, 32)).to(torch.bfloat16).float())


def test_same_width_graft_computes_the_source_expert_scaled(tmp_path, tiny_deepseek):
    """Identity alignment: the grafted expert is the source expert, padded, times the scale compensation."""
    donor = make_tiny_qwen3_moe(tmp_path / "qwen32", hidden=32, moe_inter=12, dtype=torch.float32)
    result = _merge(tmp_path, tiny_deepseek, [_entry(tiny_deepseek), _entry(donor)], dtype="float32")
    assert result.plan.transforms["donor1"].align == "identity"
    out, src = tensors_of(result.output_dir), tensors_of(donor)
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(3))
    for slot_index in range(4, 8):
        slot = result.plan.slot(2, slot_index)
        assert slot.scale == pytest.approx(1 / 2.5)  # Qwen's picks sum to 1, DeepSeek's to 2.5
        got = expert_forward(x, *(out[E.format(layer=2, expert=slot_index, proj=p)] for p in ("gate", "up", "down")))
        want = expert_forward(x, *(src[E.format(layer=slot.source_layer, expert=slot.expert, proj=p)]
                                   for p in ("gate", "up", "down")))
        torch.testing.assert_close(got, slot.scale * want, rtol=1e-5, atol=1e-6)


def test_same_family_concat_copies_experts_and_routers_byte_for_byte(tmp_path, tiny_deepseek):
    sibling = make_tiny_deepseek(tmp_path / "sibling", seed=7)
    result = _merge(tmp_path, tiny_deepseek, [_entry(tiny_deepseek), _entry(sibling)], gate_mode="transfer")
    out, a, b = tensors_of(result.output_dir), tensors_of(tiny_deepseek), tensors_of(sibling)
    for layer in (1, 2):
        for e in range(4):
            for proj in ("gate", "up", "down"):
                assert torch.equal(out[E.format(layer=layer, expert=e, proj=proj)],
                                   a[E.format(layer=layer, expert=e, proj=proj)])
                assert torch.equal(out[E.format(layer=layer, expert=4 + e, proj=proj)],
                                   b[E.format(layer=layer, expert=e, proj=proj)])
        for part in ("weight", "e_score_correction_bias"):
            name = f"model.layers.{layer}.mlp.gate.{part}"
            assert torch.equal(out[name], torch.cat([a[name], b[name]]))
    for name in a:  # the body is the base's, bit for bit
        if ".mlp.experts." not in name and ".mlp.gate." not in name:
            assert torch.equal(out[name], a[name]), name


def test_dense_donors_each_give_one_padded_expert(tmp_path, tiny_deepseek):
    """Two dense donors (Qwen3 and Llama): their MLPs (intermediate 40) become experts; everything pads to 40."""
    qwen = make_tiny_dense(tmp_path / "qwen3", inter=40, layers=3)
    llama = make_tiny_dense(tmp_path / "llama", inter=40, layers=2, cls="LlamaForCausalLM", seed=1)
    result = _merge(tmp_path, tiny_deepseek, [_entry(tiny_deepseek), _entry(qwen), _entry(llama)])
    config = json.loads((result.output_dir / "config.json").read_text())
    assert (config["n_routed_experts"], config["moe_intermediate_size"], config["n_group"]) == (6, 40, 3)  # 2 shared
    slot = result.plan.slot(2, 4)
    assert (slot.kind, slot.source, slot.source_layer) == ("dense_mlp", "donor1", 2)
    out, src = tensors_of(result.output_dir), tensors_of(qwen)
    assert torch.equal(out[E.format(layer=2, expert=4, proj="gate")], src["model.layers.2.mlp.gate_proj.weight"])
    # the base's own experts and shared expert were padded from 16 to 40: still the base's function
    torch.testing.assert_close(_logits(result.output_dir, IDS, mask=range(4, 6)), _logits(tiny_deepseek, IDS),
                               rtol=1e-5, atol=1e-5)


def test_two_qwen3_moe_models_merge_into_a_qwen3_moe(tmp_path, tiny_qwen_moe):
    other = make_tiny_qwen3_moe(tmp_path / "other", seed=5)
    result = _merge(tmp_path, tiny_qwen_moe, [_entry(tiny_qwen_moe), _entry(other)], gate_mode="transfer")
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["num_experts"] == 8
    out, b = tensors_of(result.output_dir), tensors_of(other)
    assert torch.equal(out[E.format(layer=1, expert=6, proj="down")], b[E.format(layer=1, expert=2, proj="down")])
    # float32: transformers' grouped expert matmul wants 16-byte strides, which 12 bf16 values are not
    model = AutoModelForCausalLM.from_pretrained(result.output_dir, dtype=torch.float32)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_keep_picks_the_most_used_experts(tmp_path, tiny_deepseek, tiny_qwen_moe):
    result = _merge(tmp_path, tiny_deepseek, [_entry(tiny_deepseek), _entry(tiny_qwen_moe, keep=2)],
                    align={"max_tokens": 200})
    usage = json.loads((result.output_dir / ".zenith" / "usage.json").read_text())["sources"]["donor1"]
    for layer in (1, 2):
        slots = result.plan.expert_table[layer - 1].slots[4:]
        stats = usage[str(slots[0].source_layer)]
        assert [s.expert for s in slots] == stats["order"][:2]
        assert sorted(stats["counts"], reverse=True)[:2] == [stats["counts"][s.expert] for s in slots]
        assert sum(stats["counts"]) == 2 * stats["tokens"]


def make_dense_entry(tmp_path):
    return _entry(make_tiny_dense(tmp_path / "dense-entry", inter=40))


def _plan_error(tmp_path, base, experts, **extra):
    extra.setdefault("gate_mode", "random")
    cfg = load_config(write_config(tmp_path, base_model=str(base), experts=experts, **extra))
    with pytest.raises(PlanError) as err:
        build_plan(cfg, config_dir=tmp_path)
    return str(err.value)


def test_clear_errors_for_bad_inputs(tmp_path, tiny_deepseek, tiny_qwen_moe):
    msg = _plan_error(tmp_path, tiny_deepseek, [_entry(tiny_deepseek), _entry(tiny_qwen_moe, keep=9)])
    assert "experts.1.keep: 9 is more than the 4 routed experts" in msg
    msg = _plan_error(tmp_path, tiny_deepseek, [_entry(tiny_deepseek), _entry(tiny_qwen_moe, keep=3)])
    assert "experts.1: 3 experts per layer" in msg and "multiple of 2" in msg
    msg = _plan_error(tmp_path, tiny_deepseek, [_entry(tiny_deepseek), make_dense_entry(tmp_path)],
                      gate_mode="transfer")
    assert "gate_mode: transfer needs the source's router rows, but experts.1.source_model" in msg
    msg = _plan_error(tmp_path, tiny_deepseek, [_entry(tiny_qwen_moe)], align={"mode": "identity"})
    assert "align.mode: identity, but experts.0.source_model" in msg and "hidden size 24" in msg
    msg = _plan_error(tmp_path, tiny_deepseek, [_entry(tiny_deepseek), _entry(tiny_deepseek, keep=2)])
    assert "experts.1.source_model" in msg and "already experts.0 and keep" in msg
    msg = _plan_error(tmp_path, tiny_deepseek, [_entry(tiny_deepseek), _entry(tiny_qwen_moe, layers={5: 0})])
    assert "experts.1.layers.5: the output's MoE layers are [1, 2]" in msg
    msg = _plan_error(tmp_path, tiny_deepseek, [_entry(tiny_deepseek), _entry(tiny_qwen_moe, layers={2: 7})])
    assert "experts.1.layers.2:" in msg and "has no layer 7 to take experts from" in msg


def test_donor_without_moe_or_mlp_is_refused(tmp_path, tiny_deepseek):
    dense = make_tiny_dense(tmp_path / "dense", inter=40)
    config = json.loads((dense / "config.json").read_text())
    del config["intermediate_size"]
    (dense / "config.json").write_text(json.dumps(config))
    msg = _plan_error(tmp_path, tiny_deepseek, [_entry(tiny_deepseek), _entry(dense)])
    assert "experts.1.source_model" in msg and "no MoE layers and no MLP" in msg


def test_unknown_donor_architecture_lists_the_supported_ones(tmp_path, tiny_deepseek):
    dense = make_tiny_dense(tmp_path / "dense", inter=40)
    config = json.loads((dense / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (dense / "config.json").write_text(json.dumps(config))
    msg = _plan_error(tmp_path, tiny_deepseek, [_entry(tiny_deepseek), _entry(dense)])
    assert "unsupported architecture 'MambaForCausalLM'" in msg and "Qwen3MoeForCausalLM" in msg


def test_plan_and_align_commands_show_the_expert_table_and_fits(tmp_path, tiny_deepseek, tiny_qwen_moe, capsys):
    from zenith_merge.cli import main

    path = write_config(tmp_path, base_model=str(tiny_deepseek), gate_mode="random", output_dir=str(tmp_path / "out"),
                        experts=[_entry(tiny_deepseek), _entry(tiny_qwen_moe, keep=2)])
    assert main(["plan", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "layer   1: [0-3] base L1 e0-e3  [4-5] donor1 L0 top 2 by usage x0.4" in shown
    assert "stage align: donor1 pairs [(1, 0), (2, 1)]" in shown
    assert "stages (forward passes) hold about" in shown
    assert not (tmp_path / "out").exists()
    assert main(["align", str(path), "--no-progress"]) == 0
    shown = capsys.readouterr().out
    assert "R^2 A: 1.0:" in shown and "paired tokens" in shown and "top 2 by usage" not in shown
    assert "expert usage of donor1 on its prompts" in shown and \
        sum(line.count("*") for line in shown.splitlines() if line.startswith("  L")) == 4  # 2 kept in 2 layers
    assert main(["merge", str(path), "--resume", "--no-progress"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


def test_a_donors_shared_expert_can_join_as_a_routed_expert(tmp_path, tiny_deepseek):
    """A DeepSeek donor: its 3 most used experts plus its shared expert fill two groups of 2."""
    donor = make_tiny_deepseek(tmp_path / "donor", seed=3)
    result = _merge(tmp_path, tiny_deepseek,
                    [_entry(tiny_deepseek), _entry(donor, keep=3, shared_expert="routed")])
    slot = result.plan.slot(1, 7)
    assert (slot.kind, slot.source, slot.scale) == ("shared", "donor1", pytest.approx(1 / 2.5))
    out, src = tensors_of(result.output_dir), tensors_of(donor)
    torch.testing.assert_close(out[E.format(layer=1, expert=7, proj="down")].float(),
                               (src["model.layers.1.mlp.shared_experts.down_proj.weight"].float() / 2.5)
                               .to(torch.bfloat16).float())
    assert torch.equal(out[E.format(layer=1, expert=7, proj="gate")],
                       src["model.layers.1.mlp.shared_experts.gate_proj.weight"])
    msg = _plan_error(tmp_path, tiny_deepseek, [_entry(tiny_deepseek), _entry(donor, shared_expert="routed")])
    assert "experts.1: 5 experts per layer" in msg
    msg = _plan_error(tmp_path, tiny_deepseek, [_entry(tiny_deepseek, shared_expert="routed"), _entry(donor)])
    assert "experts.0.shared_expert" in msg


def test_dense_models_become_the_experts_of_the_bases_moe_twin(tmp_path):
    """mergekit-moe's case: a dense Qwen3 base and two dense Qwen3 donors -> Qwen3MoeForCausalLM, MLPs as experts."""
    base = make_tiny_dense(tmp_path / "base", inter=40, layers=2)
    donors = [make_tiny_dense(tmp_path / f"d{i}", inter=40, layers=2, seed=i + 1) for i in range(2)]
    result = _merge(tmp_path, base, [_entry(base), *(_entry(d) for d in donors)], architecture="qwen3_moe",
                    experts_per_token=2)
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["model_type"] == "qwen3_moe"
    assert (config["num_experts"], config["moe_intermediate_size"], config["decoder_sparse_step"]) == (3, 40, 1)
    out = tensors_of(result.output_dir)
    for layer in (0, 1):
        for j, src in enumerate([base, *donors]):
            mlp = tensors_of(src)
            for proj in ("gate", "up", "down"):  # c = 1: a dense MLP keeps its scale in a normalised MoE
                assert torch.equal(out[E.format(layer=layer, expert=j, proj=proj)],
                                   mlp[f"model.layers.{layer}.mlp.{proj}_proj.weight"])
    assert not any(".mlp.gate_proj." in n or ".mlp.up_proj." in n for n in out)
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], tensors_of(base)["model.layers.1.self_attn.q_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(result.output_dir, dtype=torch.float32)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    # as in mergekit-moe, the architecture key may be left out (or given as mergekit names it)
    for arch in (None, "Qwen3 MoE"):
        extra = {"architecture": arch} if arch else {}
        cfg = load_config(write_config(tmp_path, base_model=str(base), gate_mode="random",
                                       experts=[_entry(base), _entry(donors[0])], **extra))
        assert build_plan(cfg, config_dir=tmp_path).target_config["architectures"] == ["Qwen3MoeForCausalLM"]
    llama = make_tiny_dense(tmp_path / "llama", inter=40, layers=2, cls="LlamaForCausalLM")
    msg = _plan_error(tmp_path, llama, [_entry(llama), _entry(donors[0])])
    assert "architecture (not given): no MoE output fits" in msg and "one model_type (got llama, qwen3)" in msg


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg", "cheap_embed"])
def test_prompt_based_router_rows(tmp_path, tiny_deepseek, tiny_qwen_moe, mode):
    """mergekit's modes: a donor's rows are its unit prompt vector (at the base rows' norm) plus its own mapped rows."""
    from zenith_merge.stages.prompt_vectors import load_vector

    entries = [_entry(tiny_deepseek), _entry(tiny_qwen_moe, negative_prompts=["class Stack:\n    pass\n"])]
    result = _merge(tmp_path, tiny_deepseek, entries, gate_mode=mode, align={"max_tokens": 200})
    zdir = result.output_dir / ".zenith"
    out, base, donor = tensors_of(result.output_dir), tensors_of(tiny_deepseek), tensors_of(tiny_qwen_moe)
    al = load_alignment(zdir / "align-donor1")
    for layer in (1, 2):
        v = load_vector(zdir, "donor1", layer)
        assert v.shape == (32,) and v.norm().item() == pytest.approx(1.0, abs=1e-5)
        rows = out[f"model.layers.{layer}.mlp.gate.weight"].float()
        base_rows = base[f"model.layers.{layer}.mlp.gate.weight"].float()
        assert torch.equal(rows[:4], base_rows)
        slot = result.plan.slot(layer, 4)
        mapped = donor[f"model.layers.{slot.source_layer}.mlp.gate.weight"][slot.expert].float() @ \
            al.A[layer, slot.source_layer]
        want = v * base_rows.norm(dim=-1).mean() + mapped
        torch.testing.assert_close(rows[4], want.to(torch.bfloat16).float())
    if mode == "cheap_embed":  # the same vector for every layer
        assert torch.equal(load_vector(zdir, "donor1", 1), load_vector(zdir, "donor1", 2))


@pytest.mark.parametrize("mode", get_args(GateMode))
def test_every_gate_mode_gives_finite_router_rows_of_the_outputs_shape(tmp_path, tiny_deepseek, tiny_qwen_moe, mode):
    """Each gate mode: one router row and one score correction per output expert, all finite; the base's own rows
    kept; each grafted row distinct and non-zero."""
    entries = [_entry(tiny_deepseek), _entry(tiny_qwen_moe, negative_prompts=["class Stack:\n    pass\n"])]
    result = _merge(tmp_path, tiny_deepseek, entries, gate_mode=mode, align={"calibration": [], "max_tokens": 200})
    config = json.loads((result.output_dir / "config.json").read_text())
    out, base = tensors_of(result.output_dir), tensors_of(tiny_deepseek)
    n, width = config["n_routed_experts"], config["hidden_size"]
    assert (n, width) == (8, 32)
    for layer in (1, 2):
        rows = out[f"model.layers.{layer}.mlp.gate.weight"]
        bias = out[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
        assert rows.shape == (n, width) and bias.shape == (n,)
        assert torch.isfinite(rows.float()).all() and torch.isfinite(bias.float()).all()
        assert torch.equal(rows[:4], base[f"model.layers.{layer}.mlp.gate.weight"])
        grafted = rows[4:].float()
        assert grafted.norm(dim=-1).min() > 0
        assert torch.pdist(grafted).min() > 0  # no two grafted experts share a row


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_vectors_equal_mergekits_formula_recomputed_from_the_base_model(tmp_path, tiny_deepseek, tiny_qwen_moe,
                                                                                mode):
    """v(l) = normalise(mean over positive prompts of h_l - mean over negative prompts of h_l), h_l the input of
    layer l's MoE block (last token for `hidden`, mean over tokens for `hidden_avg`), recomputed here one prompt
    at a time with a plain hook on the base model, independently of the calibration code."""
    from transformers import AutoTokenizer

    from zenith_merge.stages.prompt_vectors import load_vector

    negative = ["class Stack:\n    pass\n", "import os\n"]
    entries = [_entry(tiny_deepseek), _entry(tiny_qwen_moe, negative_prompts=negative)]
    result = _merge(tmp_path, tiny_deepseek, entries, gate_mode=mode, calibration_dtype="float32",
                    align={"calibration": [], "max_tokens": 200})
    model = AutoModelForCausalLM.from_pretrained(tiny_deepseek, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_deepseek)

    def state(prompt: str, layer: int) -> torch.Tensor:
        seen = []
        hook = model.model.layers[layer].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0]))
        ids = tokenizer(tokenizer.bos_token + prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        hook.remove()
        return seen[0].mean(0) if mode == "hidden_avg" else seen[0][-1]

    for layer in (1, 2):
        diff = torch.stack([state(p, layer) for p in PROMPTS]).mean(0) - \
            torch.stack([state(p, layer) for p in negative]).mean(0)
        torch.testing.assert_close(load_vector(result.output_dir / ".zenith", "donor1", layer), diff / diff.norm(),
                                   rtol=1e-4, atol=1e-5)


def test_hidden_rows_for_dense_models_are_mergekits_unit_vectors(tmp_path):
    base = make_tiny_dense(tmp_path / "base", inter=40, layers=2)
    donor = make_tiny_dense(tmp_path / "donor", inter=40, layers=2, seed=4)
    result = _merge(tmp_path, base, [_entry(base), {"source_model": str(donor), "positive_prompts": ["What is 3?"]}],
                    architecture="qwen3_moe", gate_mode="hidden")
    out = tensors_of(result.output_dir)
    for layer in (0, 1):
        rows = out[f"model.layers.{layer}.mlp.gate.weight"].float()
        torch.testing.assert_close(rows.norm(dim=-1), torch.ones(2), atol=1e-2, rtol=0)
        assert not torch.allclose(rows[0], rows[1], atol=1e-2)


def test_mergekits_noise_and_residual_scale_apply_to_a_sources_experts(tmp_path, tiny_deepseek):
    sibling = make_tiny_deepseek(tmp_path / "sibling", seed=7, dtype=torch.float32)
    result = _merge(tmp_path, tiny_deepseek, [_entry(tiny_deepseek), _entry(sibling, residual_scale=0.5)],
                    dtype="float32")
    out, src = tensors_of(result.output_dir), tensors_of(sibling)
    name = E.format(layer=1, expert=2, proj="{}")
    assert torch.equal(out[E.format(layer=1, expert=6, proj="down")], src[name.format("down")] * 0.5)
    assert torch.equal(out[E.format(layer=1, expert=6, proj="gate")], src[name.format("gate")])
    noisy = _merge(tmp_path / "noisy", tiny_deepseek, [_entry(tiny_deepseek), _entry(sibling, noise_scale=0.01)],
                   dtype="float32")
    delta = tensors_of(noisy.output_dir)[E.format(layer=1, expert=6, proj="gate")] - src[name.format("gate")]
    assert 0.005 < delta.std().item() < 0.02
    again = _merge(tmp_path / "again", tiny_deepseek, [_entry(tiny_deepseek), _entry(sibling, noise_scale=0.01)],
                   dtype="float32")
    assert torch.equal(tensors_of(again.output_dir)[E.format(layer=1, expert=6, proj="gate")],
                       src[name.format("gate")] + delta)  # seeded: the same noise every run


def test_memory_capped_stages_give_the_same_router_rows(tmp_path):
    """calibration_max_memory streams the base's layers from disk (accelerate offload): same rows as in memory."""
    base = make_tiny_dense(tmp_path / "base", inter=40, layers=2)
    donor = make_tiny_dense(tmp_path / "donor", inter=40, layers=2, seed=4)
    entries = [_entry(base), {"source_model": str(donor), "positive_prompts": ["What is 3?", "Solve 2x = 4."]}]
    free = _merge(tmp_path / "free", base, entries, gate_mode="hidden", calibration_dtype="float32")
    capped = _merge(tmp_path / "capped", base, entries, gate_mode="hidden", calibration_dtype="float32",
                    calibration_max_memory="1KB")
    a, b = tensors_of(free.output_dir), tensors_of(capped.output_dir)
    for layer in (0, 1):
        name = f"model.layers.{layer}.mlp.gate.weight"
        torch.testing.assert_close(a[name].float(), b[name].float(), rtol=0, atol=1e-2)  # bf16 rows
