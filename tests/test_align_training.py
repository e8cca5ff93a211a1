"""Alignment training (align.train_steps): the maps A and B train with the router rows, then are folded in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_deepseek, tensors_of, write_config
from safetensors import safe_open

from zenith_merge.config import load_config, parse_config
from zenith_merge.errors import PlanError
from zenith_merge.maths.graft import fold_projection, pad_to
from zenith_merge.pipeline import run_merge
from zenith_merge.plan.build import build_plan
from zenith_merge.plan.models import Plan
from zenith_merge.stages.router_training import soft_cross_entropy

TEXT = ("def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n"
        "What is 3 + 4? It is 7. What is 12 * 7? It is 84.\n") * 6
ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, base, donor, name: str, steps: int, **donor_extra):
    (tmp_path / name).mkdir(exist_ok=True)
    return write_config(tmp_path / name, base_model=str(base), gate_mode="random",
                        output_dir=str(tmp_path / name / "out"),
                        experts=[{"source_model": str(base), "positive_prompts": [TEXT]},
                                 {"source_model": str(donor), "positive_prompts": [TEXT], **donor_extra}],
                        align={"calibration": [], "train_steps": steps, "lr": 1e-2},
                        router={"lr": 0.05, "seq_len": 16, "batch_size": 2})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_deepseek, tiny_qwen_moe):
    tmp = tmp_path_factory.mktemp("at")
    out = {}
    for name, steps in (("plain", 0), ("trained", 3), ("again", 3)):
        cfg = _config(tmp, tiny_deepseek, tiny_qwen_moe, name, steps)
        out[name] = run_merge(load_config(cfg), config_dir=cfg.parent, progress=False)
    return out


def _donor_expert(name: str, plan: Plan) -> bool:
    if ".mlp.experts." not in name:
        return False
    layer, slot = int(name.split(".")[2]), int(name.split(".")[5])
    return plan.slot(layer, slot).source == "donor1"


def test_alignment_training_changes_only_routers_and_the_donors_experts(runs):
    plan = runs["trained"].plan
    plain, out = tensors_of(runs["plain"].output_dir), tensors_of(runs["trained"].output_dir)
    assert plain.keys() == out.keys()
    changed = {n for n in out if not torch.equal(out[n].view(torch.uint8), plain[n].view(torch.uint8))}
    donor_experts = {n for n in out if _donor_expert(n, plan)}
    assert donor_experts and donor_experts <= changed
    assert all(".mlp.gate." in n for n in changed - donor_experts)
    log = json.loads((runs["trained"].output_dir / ".zenith" / "router_training.json").read_text())
    assert len(log["steps"]) == 3


def test_written_donor_experts_are_the_fold_of_the_trained_maps(runs, tiny_qwen_moe):
    result = runs["trained"]
    plan, out = result.plan, tensors_of(result.output_dir)
    donor = tensors_of(tiny_qwen_moe)
    name = next(n for n in sorted(out) if _donor_expert(n, plan) and n.endswith("down_proj.weight"))
    layer, slot_index = int(name.split(".")[2]), int(name.split(".")[5])
    slot = plan.slot(layer, slot_index)
    with safe_open(str(result.output_dir / ".zenith" / "align_trained.safetensors"), "pt") as f:
        A = f.get_tensor(f"donor1.A.{layer}.{slot.source_layer}")
        B = f.get_tensor(f"donor1.B.{layer}.{slot.source_layer}")
    for proj in ("gate", "up", "down"):
        src = donor[f"model.layers.{slot.source_layer}.mlp.experts.{slot.expert}.{proj}_proj.weight"]
        mine = out[name.replace("down_proj", f"{proj}_proj")]
        want = pad_to(fold_projection(src, proj, A=A, B=B, scale=slot.scale), tuple(mine.shape)).to(mine.dtype)
        assert torch.equal(mine, want), proj


def test_alignment_training_is_deterministic_and_rewrites_only_its_shards(runs):
    a, b = runs["trained"], runs["again"]
    assert a.write.written == b.write.written == list(a.plan.retrained_shards)
    assert len(a.plan.retrained_shards) < len(a.plan.shards)
    ta, tb = tensors_of(a.output_dir), tensors_of(b.output_dir)
    assert all(torch.equal(ta[n].view(torch.uint8), tb[n].view(torch.uint8)) for n in ta)


def test_random_experts_keep_each_tensors_norm_and_nothing_else(tmp_path, tiny_deepseek, tiny_qwen_moe):
    cfg = _config(tmp_path, tiny_deepseek, tiny_qwen_moe, "random", 0, random_experts=True)
    plain = _config(tmp_path, tiny_deepseek, tiny_qwen_moe, "plain", 0)
    a = run_merge(load_config(cfg), config_dir=cfg.parent, progress=False)
    b = run_merge(load_config(plain), config_dir=plain.parent, progress=False)
    ta, tb = tensors_of(a.output_dir), tensors_of(b.output_dir)
    base_like = [n for n in ta if not _donor_expert(n, a.plan)]
    assert all(torch.equal(ta[n].view(torch.uint8), tb[n].view(torch.uint8)) for n in base_like)
    checked = 0
    for n in (n for n in ta if _donor_expert(n, a.plan)):
        if n.endswith("down_proj.weight"):
            continue  # folded through B: its norm is B's business; gate/up below see A the same way in both
        x, y = ta[n].float().flatten(), tb[n].float().flatten()
        assert abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1])) < 0.5
        checked += 1
    assert checked


def test_alignment_training_needs_a_fit_and_the_teacher_needs_training(tmp_path, tiny_deepseek):
    sibling = make_tiny_deepseek(tmp_path / "sibling", seed=1)  # same width: identity, nothing to fit
    same = write_config(tmp_path, base_model=str(tiny_deepseek), gate_mode="random",
                        experts=[{"source_model": str(tiny_deepseek)}, {"source_model": str(sibling)}],
                        align={"train_steps": 2})
    with pytest.raises(PlanError, match="align.train_steps: no fitted maps to train"):
        build_plan(load_config(same), config_dir=tmp_path)
    data = yaml.safe_load(same.read_text())
    data["align"] = {"teacher_data": ["demo:maths"]}
    with pytest.raises(PlanError, match="align.teacher_data: the teacher loss is part of alignment training"):
        build_plan(parse_config(data), config_dir=tmp_path)


def test_soft_cross_entropy_is_the_entropy_when_student_equals_teacher():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.arange(7)
    p = torch.softmax(logits, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert soft_cross_entropy(logits, logits, ids, ids) == pytest.approx(float(entropy), rel=1e-6)
    # tokens only the student knows do not change the loss: both sides are renormalised over shared ones
    wide = torch.cat([logits, torch.randn(2, 5, 3, generator=g)], dim=-1)
    assert soft_cross_entropy(wide, logits, ids, ids) == pytest.approx(float(entropy), rel=1e-6)
    shifted = soft_cross_entropy(torch.randn(2, 5, 7, generator=g), logits, ids, ids)
    assert shifted > entropy  # Gibbs: cross-entropy >= entropy


@pytest.mark.demo
def test_the_donor_teaches_through_the_union_vocabulary(tmp_path):
    data = yaml.safe_load((ROOT / "merge" / "config.yml").read_text())
    data["align"].update(train_steps=20, teacher_data=["demo:maths"])
    data["router"] = {"calibrate": False, "lr": 1e-2}
    data["routing_report"] = False
    result = run_merge(parse_config(data), config_dir=ROOT / "merge", output_dir=tmp_path / "out", progress=False)
    steps = json.loads((result.output_dir / ".zenith" / "router_training.json").read_text())["steps"]
    teacher = [s["teacher"] for s in steps]
    assert len(teacher) == 20 and all(t > 0 for t in teacher)
    assert sum(teacher[-4:]) < sum(teacher[:4])  # the merge moves toward the donor's predictions


def test_random_experts_on_the_base_alone_are_not_a_bit_identical_copy(tmp_path, tiny_deepseek):
    cfg = write_config(tmp_path, base_model=str(tiny_deepseek), gate_mode="random", output_dir=str(tmp_path / "out"),
                       experts=[{"source_model": str(tiny_deepseek), "random_experts": True}])
    result = run_merge(load_config(cfg), config_dir=tmp_path, progress=False)
    assert result.plan.method == "concat"  # not the passthrough, which would ignore the control
    out, base = tensors_of(result.output_dir), tensors_of(tiny_deepseek)
    experts = [n for n in base if ".mlp.experts." in n]
    assert experts and all(not torch.equal(out[n], base[n]) for n in experts)
    assert all(torch.equal(out[n].view(torch.uint8), base[n].view(torch.uint8)) for n in base if n not in experts)
