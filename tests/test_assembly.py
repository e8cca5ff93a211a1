"""Same-family assembly: W = sum_i w_i W_i / sum_i w_i per tensor class, with a difference threshold."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_deepseek, read_index, tensors_of, write_config
from safetensors.torch import save_file

from zenith_merge.config import load_config
from zenith_merge.errors import PlanError
from zenith_merge.maths.graft import relative_difference
from zenith_merge.pipeline import run_merge
from zenith_merge.plan.build import build_plan


def perturbed_copy(src, dst, seed=0):
    """A sibling of `src`: same config and tokenizer; tensor i moved by a relative amount 10^-(i % 4)."""
    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    by_file: dict[str, dict] = {}
    for i, (name, t) in enumerate(sorted(tensors_of(src).items())):
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=gen)
            size = 10.0 ** -(i % 4) * t.float().norm() / max(noise.norm(), 1e-12)
            t = (t.float() + size * noise).to(t.dtype)
        by_file.setdefault(read_index(src)["weight_map"][name], {})[name] = t
    for file, tensors in by_file.items():
        save_file(tensors, str(dst / file), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def sibling(tmp_path_factory, tiny_deepseek):
    return perturbed_copy(tiny_deepseek, tmp_path_factory.mktemp("sib") / "sibling")


def _assemble(tmp_path, base, other, weights, threshold=0.0, **extra):
    cfg = load_config(write_config(
        tmp_path, base_model=str(base), gate_mode="random", merge_method="assembly", output_dir=str(tmp_path / "out"),
        max_shard_size="40KB", experts=[{"source_model": str(base)}, {"source_model": str(other)}],
        assembly={"weights": weights, "threshold": threshold}, **extra))
    return run_merge(cfg, config_dir=tmp_path, progress=False)


def test_all_weight_on_the_base_reproduces_it_bit_for_bit(tmp_path, tiny_deepseek, sibling):
    result = _assemble(tmp_path, tiny_deepseek, sibling, {"default": [1.0, 0.0]})
    out, base = tensors_of(result.output_dir), tensors_of(tiny_deepseek)
    assert out.keys() == base.keys()
    for name in base:
        assert torch.equal(out[name].view(torch.uint8), base[name].view(torch.uint8)), name


def test_chimera_recipe_takes_the_second_parents_routed_experts_bit_for_bit(tmp_path, tiny_deepseek, sibling):
    result = _assemble(tmp_path, tiny_deepseek, sibling, {"default": [1.0, 0.0], "routed_experts": [0.0, 1.0]})
    out, base, other = tensors_of(result.output_dir), tensors_of(tiny_deepseek), tensors_of(sibling)
    experts = [n for n in base if ".mlp.experts." in n]
    assert len(experts) == 2 * 4 * 3
    for name in base:
        want = other[name] if name in experts else base[name]
        assert torch.equal(out[name].view(torch.uint8), want.view(torch.uint8)), name


def test_threshold_keeps_the_base_where_parents_barely_differ(tmp_path, tiny_deepseek, sibling):
    threshold = 0.05  # the sibling's tensors moved by 1, 0.1, 0.01 or 0.001 of their norm
    result = _assemble(tmp_path, tiny_deepseek, sibling, {"default": [0.5, 0.5]}, threshold=threshold)
    out, base, other = tensors_of(result.output_dir), tensors_of(tiny_deepseek), tensors_of(sibling)
    kept = mixed = 0
    for name in base:
        d = relative_difference(other[name], base[name])
        if d <= threshold:
            assert torch.equal(out[name], base[name]), name
            kept += 1
        else:
            want = ((base[name].float() + other[name].float()) / 2).to(base[name].dtype)
            assert torch.equal(out[name], want), name
            mixed += 1
    assert kept > 10 and mixed > 10


def test_assembly_refuses_other_attention_layouts_and_tokenizers(tmp_path, tiny_deepseek, sibling):
    heads = make_tiny_deepseek(tmp_path / "heads", num_attention_heads=4)
    cfg = load_config(write_config(
        tmp_path, base_model=str(tiny_deepseek), gate_mode="random", merge_method="assembly",
        experts=[{"source_model": str(tiny_deepseek)}, {"source_model": str(heads)}],
        assembly={"weights": {"default": [0.5, 0.5]}}))
    with pytest.raises(PlanError, match="experts.1.source_model .*incompatible attention layout: num_attention_heads "
                                        "is 4, the base's 2"):
        build_plan(cfg, config_dir=tmp_path)
    retok = tmp_path / "retok"
    shutil.copytree(sibling, retok)
    tok = json.loads((retok / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<start>"
    (retok / "tokenizer.json").write_text(json.dumps(tok))
    cfg = cfg.model_copy(update={"experts": [cfg.experts[0], cfg.experts[1].model_copy(
        update={"source_model": str(retok)})]})
    with pytest.raises(PlanError, match="tokenizer.json differs"):
        build_plan(cfg, config_dir=tmp_path)
