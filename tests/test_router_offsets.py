"""Calibrated router offsets: the selection bias that sends each source's prompts to its own experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_qwen3_moe, tensors_of, write_config

from zenith_merge.config import load_config, parse_config
from zenith_merge.demo import ensure_demo
from zenith_merge.errors import PlanError
from zenith_merge.maths.routing import RoutingSpec
from zenith_merge.pipeline import run_merge
from zenith_merge.plan.build import build_plan
from zenith_merge.stages.router_offsets import GRID, _hit_leak, calibrate_layer

ROOT = Path(__file__).resolve().parents[1]
SPEC = RoutingSpec("sigmoid", n_experts=8, top_k=2, norm_topk_prob=True, n_group=2, topk_group=1)
SLOTS = ["base"] * 4 + ["donor1"] * 4


def _synthetic(seed: int = 0):
    """Two domains along two directions; the donor's rows read its domain, but too weakly to be picked."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    code_dir, maths_dir = torch.zeros(d), torch.zeros(d)
    code_dir[0], maths_dir[1] = 1.0, 1.0
    states = {"base": torch.randn(60, d, generator=g) * 0.3 + 2 * code_dir,
              "donor1": torch.randn(60, d, generator=g) * 0.3 + 2 * maths_dir}
    rows = torch.randn(8, d, generator=g) * 0.1
    rows[:4] += 1.5 * code_dir + 0.5
    rows[4:] += 0.4 * maths_dir - 1.0  # domain-selective, but scaled below every base row
    return states, rows, torch.zeros(8)


def test_offset_maximises_hit_minus_leak_and_moves_only_the_sources_slots():
    states, rows, bias = _synthetic()
    mask = torch.tensor([s == "donor1" for s in SLOTS])
    hit0, leak0 = _hit_leak(0.0, bias.double(), mask, states["donor1"], states["base"], rows, SPEC)
    assert hit0 < 0.1  # before: the donor's domain does not reach its experts
    out = calibrate_layer(states, rows, bias, SLOTS, SPEC, ["donor1"])["donor1"]
    best = max(h - k for h, k in (_hit_leak(float(b), bias.double(), mask, states["donor1"], states["base"], rows,
                                            SPEC) for b in GRID))
    assert out["hit"] - out["leak"] == pytest.approx(best)
    assert out["hit"] - out["leak"] > 0.6 and out["hit_before"] == pytest.approx(hit0)  # was below 0.1


def test_without_other_prompts_the_smallest_offset_reaching_the_target_share_is_taken():
    states, rows, bias = _synthetic()
    out = calibrate_layer({"donor1": states["donor1"]}, rows, bias, SLOTS, SPEC, ["donor1"], target_share=0.5)
    mask = torch.tensor([s == "donor1" for s in SLOTS])
    assert out["donor1"]["hit"] >= 0.5
    step = float(GRID[1] - GRID[0])
    below = _hit_leak(out["donor1"]["offset"] - step, bias.double(), mask, states["donor1"], None, rows, SPEC)
    assert below[0] < 0.5


@pytest.mark.demo
def test_flagship_with_calibration_writes_offsets_into_the_donor_slots_bias(tmp_path):
    data = yaml.safe_load((ROOT / "merge" / "config.yml").read_text())
    data["router"] = {"calibrate": True}
    out = run_merge(parse_config(data), config_dir=ROOT / "merge", output_dir=tmp_path / "out",
                    progress=False).output_dir
    offsets = json.loads((out / ".zenith" / "router_offsets.json").read_text())["layers"]
    merged, base = tensors_of(out), tensors_of(ensure_demo("zen-tiny"))
    for layer, per in offsets.items():
        v = per["donor1"]
        assert v["hit"] - v["leak"] >= v["hit_before"] - v["leak_before"] - 1e-9
        name = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
        assert torch.equal(merged[name][:8], base[name])  # the base's slots keep their corrections
        want = (base[name].float().mean() + v["offset"]).to(merged[name].dtype)
        assert torch.allclose(merged[name][8:], want.expand(4))
    plan = json.loads((out / ".zenith" / "plan.json").read_text())
    assert plan["stages"]["router_offsets"] == ["donor1"] and "router_offsets.json" in plan["artefacts"]


def test_calibration_asked_of_an_output_without_a_selection_bias_is_refused(tmp_path):
    base = make_tiny_qwen3_moe(tmp_path / "q")
    donor = make_tiny_qwen3_moe(tmp_path / "d", seed=1)
    cfg = write_config(tmp_path, base_model=str(base), gate_mode="random", router={"calibrate": True},
                       experts=[{"source_model": str(base), "positive_prompts": ["a"]},
                                {"source_model": str(donor), "positive_prompts": ["b"]}])
    with pytest.raises(PlanError, match="router.calibrate: the output .*Qwen3MoeForCausalLM.* has no selection bias"):
        build_plan(load_config(cfg))
