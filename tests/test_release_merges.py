"""Merges on checkpoints laid out as the releases ship (zenith_merge.demo.release_layout, reduced widths): an FP8
Chimera of DeepSeek-V3-layout children (MTP layer, block scales some in another shard than their weight,
auto_map and custom-code files) or of Qwen3-MoE FP8 children (Qwen3-30B-A3B-*-2507-FP8's layout) is
byte-identical to the parent each tensor comes from; to BF16 it equals their dequantised tensors, and the
Qwen3-MoE one loads in transformers with every key and passes the smoke test streamed; and a Qwen3-MoE release
layout passes through and loads in transformers with no missing or unexpected keys."""

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

CHIMERA = {"default": [1, 0], "routed_experts": [0, 1]}
# family -> (its architecture, the two FP8 children of one parent: V3 and R1; Qwen3-30B-A3B Instruct and Thinking)
PAIRS = {"deepseek-v3": ("DeepseekV3ForCausalLM", "deepseek-v3-fp8-small", "deepseek-v3-r1-fp8-small"),
         "qwen3-moe": ("Qwen3MoeForCausalLM", "qwen3-moe-instruct-fp8-small", "qwen3-moe-thinking-fp8-small")}


@pytest.fixture(scope="module", params=sorted(PAIRS))
def children(request):
    """(family, the base child, the child whose routed experts a Chimera takes), laid out as the releases ship."""
    _, a, b = PAIRS[request.param]
    return request.param, release_fixture(a), release_fixture(b)


def _merge(tmp_path: Path, **data) -> Path:
    cfg = write_config(tmp_path, output_dir=str(tmp_path / "out"), gate_mode="random", routing_report=False, **data)
    return run_merge(load_config(cfg), config_dir=cfg.parent, progress=False).output_dir


def _from_second(family: str, name: str) -> bool:
    tid = classify(ARCHITECTURES[PAIRS[family][0]], name.removesuffix("_scale_inv"))
    return tid is not None and tid.tensor_class == "routed_experts"


def test_an_fp8_chimera_of_release_layout_children_is_byte_identical_to_its_parents(children, tmp_path):
    family, a_dir, b_dir = children
    out = _merge(tmp_path, base_model=str(a_dir), merge_method="assembly", fp8_output=True,
                 experts=[{"source_model": str(a_dir)}, {"source_model": str(b_dir)}], assembly={"weights": CHIMERA})
    got, a, b = stored_bytes(out), stored_bytes(a_dir), stored_bytes(b_dir)
    assert got.keys() == a.keys() and any(n.endswith("_scale_inv") for n in got)
    assert any(n.startswith("model.layers.2.") for n in got) == (family == "deepseek-v3")  # the MTP layer too
    for name, data in got.items():
        assert data == (b if _from_second(family, name) else a)[name], name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert config.get("auto_map") == json.loads((a_dir / "config.json").read_text()).get("auto_map")
    for file in ("configuration_deepseek.py", "modeling_deepseek.py"):
        assert (out / file).exists() == (family == "deepseek-v3")
        assert not (out / file).exists() or (out / file).read_bytes() == (a_dir / file).read_bytes()


def test_a_bf16_chimera_of_release_layout_children_holds_their_dequantised_tensors(children, tmp_path):
    family, a_dir, b_dir = children
    out = _merge(tmp_path, base_model=str(a_dir), merge_method="assembly", dtype="bfloat16",
                 experts=[{"source_model": str(a_dir)}, {"source_model": str(b_dir)}], assembly={"weights": CHIMERA})
    with Checkpoint.open(out) as merged, Checkpoint.open(a_dir) as a, Checkpoint.open(b_dir) as b:
        assert merged.fp8_block is None and set(merged.names()) == set(a.names())
        for name in merged.names():
            want = (b if _from_second(family, name) else a).read(name)
            assert torch.equal(merged.read(name), want.to(merged.read(name).dtype)), name
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_a_bf16_qwen3_moe_chimera_loads_with_every_key_and_passes_the_smoke_test_streamed(tmp_path):
    """The Qwen3-MoE Chimera (Thinking's experts in Instruct) written BF16: transformers loads it with no key
    missing or unexpected, and the smoke test passes it streamed from disk under a 40 MB cap, its largest
    tensors being the 78 MB vocabulary matrices."""
    from transformers import AutoModelForCausalLM

    from zenith_merge.checks.smoke import run_smoke_test

    _, a_dir, b_dir = PAIRS["qwen3-moe"]
    a_dir, b_dir = release_fixture(a_dir), release_fixture(b_dir)
    out = _merge(tmp_path, base_model=str(a_dir), merge_method="assembly", dtype="bfloat16",
                 experts=[{"source_model": str(a_dir)}, {"source_model": str(b_dir)}], assembly={"weights": CHIMERA})
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    report = run_smoke_test(out, max_memory=40 * 10**6)
    details = {c.name: c.detail for c in report.checks}
    assert report.ok and "streamed from disk" in details["loading"], report.checks
    assert {"manifest", "planned-tensors", "finite", "loading", "generate"} <= {c.name for c in report.checks
                                                                                if not c.skipped}


def test_a_qwen3_moe_release_layout_passes_through_and_loads_with_every_key(tmp_path):
    from transformers import AutoModelForCausalLM

    qwen = release_fixture("qwen3-moe-small")
    out = _merge(tmp_path, base_model=str(qwen), experts=[{"source_model": str(qwen)}])
    assert stored_bytes(out) == stored_bytes(qwen)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model(torch.tensor([[9707, 1879]])).logits.isfinite().all()


def test_tokenizer_source_base_on_the_qwen3_release_layout_drops_the_padding_rows(tmp_path):
    """A mergekit-yaml linear merge of the Qwen3-MoE FP8 children with `tokenizer_source: base`: as in mergekit,
    the embedding and head become the real Qwen3 tokenizer's 151,669 tokens (the release pads to 151,936),
    each the average of the children's rows; the output loads in transformers with every key."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a_dir, b_dir = (release_fixture(n) for n in PAIRS["qwen3-moe"][1:])
    cfg = tmp_path / "linear.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "tokenizer_source": "base", "dtype": "float32",
                                   "out_dtype": "bfloat16", "output_dir": str(tmp_path / "out"),
                                   "models": [{"model": str(a_dir), "parameters": {"weight": 1.0}},
                                              {"model": str(b_dir), "parameters": {"weight": 1.0}}]}))
    out = run_merge(load_config(cfg), config_dir=tmp_path, progress=False).output_dir
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 151669 == len(AutoTokenizer.from_pretrained(out))
    with Checkpoint.open(out) as merged, Checkpoint.open(a_dir) as a, Checkpoint.open(b_dir) as b:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            want = ((a.read(name)[:151669].float() + b.read(name)[:151669].float()) / 2).to(torch.bfloat16)
            assert torch.equal(merged.read(name), want), name
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
