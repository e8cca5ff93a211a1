"""Merges on checkpoints laid out as the releases ship (zenith_merge.demo.release_layout, reduced widths): an FP8
Chimera of DeepSeek-V3-layout children (MTP layer, block scales some in another shard than their weight,
auto_map and custom-code files) is byte-identical to the parent each tensor comes from; to BF16 it equals
their dequantised tensors; and a Qwen3-MoE release layout passes through and loads in transformers with no
missing or unexpected keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import stored_bytes, write_config

from zenith_merge.architectures import ARCHITECTURES, classify
from zenith_merge.config import load_config
from zenith_merge.demo.release_layout import release_fixture
from zenith_merge.io.reader import Checkpoint
from zenith_merge.pipeline import run_merge

V3 = ARCHITECTURES["DeepseekV3ForCausalLM"]
CHIMERA = {"default": [1, 0], "routed_experts": [0, 1]}


@pytest.fixture(scope="module")
def children():
    return release_fixture("deepseek-v3-fp8-small"), release_fixture("deepseek-v3-r1-fp8-small")


def _merge(tmp_path: Path, **data) -> Path:
    cfg = write_config(tmp_path, output_dir=str(tmp_path / "out"), gate_mode="random", routing_report=False, **data)
    return run_merge(load_config(cfg), config_dir=cfg.parent, progress=False).output_dir


def _from_r1(name: str) -> bool:
    tid = classify(V3, name.removesuffix("_scale_inv"))
    return tid is not None and tid.tensor_class == "routed_experts"


def test_an_fp8_chimera_of_release_layout_children_is_byte_identical_to_its_parents(children, tmp_path):
    v3, r1 = children
    out = _merge(tmp_path, base_model=str(v3), merge_method="assembly", fp8_output=True,
                 experts=[{"source_model": str(v3)}, {"source_model": str(r1)}], assembly={"weights": CHIMERA})
    got, a, b = stored_bytes(out), stored_bytes(v3), stored_bytes(r1)
    assert got.keys() == a.keys() and any(n.startswith("model.layers.2.") for n in got)  # the MTP layer too
    for name, data in got.items():
        assert data == (b if _from_r1(name) else a)[name], name
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == json.loads((v3 / "config.json").read_text())["auto_map"]
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    for file in ("configuration_deepseek.py", "modeling_deepseek.py"):
        assert (out / file).read_bytes() == (v3 / file).read_bytes()


def test_a_bf16_chimera_of_release_layout_children_holds_their_dequantised_tensors(children, tmp_path):
    v3, r1 = children
    out = _merge(tmp_path, base_model=str(v3), merge_method="assembly", dtype="bfloat16",
                 experts=[{"source_model": str(v3)}, {"source_model": str(r1)}], assembly={"weights": CHIMERA})
    with Checkpoint.open(out) as merged, Checkpoint.open(v3) as a, Checkpoint.open(r1) as b:
        assert merged.fp8_block is None and set(merged.names()) == set(a.names())
        for name in merged.names():
            want = (b if _from_r1(name) else a).read(name)
            assert torch.equal(merged.read(name), want.to(merged.read(name).dtype)), name
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_a_qwen3_moe_release_layout_passes_through_and_loads_with_every_key(tmp_path):
    from transformers import AutoModelForCausalLM

    qwen = release_fixture("qwen3-moe-small")
    out = _merge(tmp_path, base_model=str(qwen), experts=[{"source_model": str(qwen)}])
    assert stored_bytes(out) == stored_bytes(qwen)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model(torch.tensor([[9707, 1879]])).logits.isfinite().all()
