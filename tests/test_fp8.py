"""Block FP8: the Triton kernel and the CPU path agree bit for bit; the reader dequantises; fp8-cast both ways."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_deepseek, read_index, tensors_of, write_config
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from zenith_merge.config import load_config
from zenith_merge.errors import CheckpointError
from zenith_merge.fp8_cast import fp8_cast
from zenith_merge.io.reader import Checkpoint
from zenith_merge.kernels.fp8 import E4M3_MAX, dequantize, dequantize_torch, quantize, scale_shape
from zenith_merge.pipeline import run_merge

BLOCK = (16, 16)  # small blocks, so the tiny models' weights span several, with ragged edges


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory) -> Path:
    return make_tiny_deepseek(tmp_path_factory.mktemp("bf16") / "m", seed=3)


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory, bf16_model) -> Path:
    out = tmp_path_factory.mktemp("fp8") / "m"
    fp8_cast(bf16_model, out, to="fp8", block=BLOCK, progress=False)
    return out


def _interpreted_kernel(monkeypatch):
    """fp8_triton imported afresh with TRITON_INTERPRET=1: the kernel runs on CPU tensors, interpreted."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sys.modules.pop("zenith_merge.kernels.fp8_triton", None)
    module = importlib.import_module("zenith_merge.kernels.fp8_triton")
    monkeypatch.delitem(sys.modules, "zenith_merge.kernels.fp8_triton")
    return module.dequantize_triton


@pytest.mark.parametrize("shape,block", [((130, 257), (128, 128)), ((128, 128), (128, 128)), ((5, 3), (128, 128)),
                                         ((300, 129), (128, 128)), ((70, 45), (16, 32))])
def test_triton_kernel_under_the_interpreter_equals_the_cpu_path_bit_for_bit(monkeypatch, shape, block):
    kernel = _interpreted_kernel(monkeypatch)
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    q, s = quantize(torch.randn(shape, generator=g) * 5, block)
    s = s * torch.rand(s.shape, generator=g)  # arbitrary scales, not only amax ones
    assert torch.equal(kernel(q, s, block), dequantize_torch(q, s, block))


def test_triton_kernel_decodes_every_e4m3_byte_as_torch_does(monkeypatch):
    kernel = _interpreted_kernel(monkeypatch)
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    a, b = kernel(every, torch.ones(1, 1), (128, 128)), dequantize_torch(every, torch.ones(1, 1), (128, 128))
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 300), b0=st.sampled_from([16, 64, 128]),
       b1=st.sampled_from([16, 128]), magnitude=st.floats(1e-4, 1e4), seed=st.integers(0, 2**31))
def test_dequantised_weights_are_within_e4m3_rounding_of_the_originals(rows, cols, b0, b1, magnitude, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * magnitude
    q, s = quantize(w, (b0, b1))
    assert q.dtype == torch.float8_e4m3fn and tuple(s.shape) == scale_shape((rows, cols), (b0, b1))
    back = dequantize_torch(q, s, (b0, b1))
    per = s.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
    # e4m3 keeps 3 mantissa bits: half a unit is 2^-4 of the value; below 2^-6 (subnormals) 2^-10 of the scale
    assert bool(((back - w).abs() <= w.abs() * 2**-4 + per * 2**-10 + 1e-30).all())
    assert float((w.abs() / per).max()) <= E4M3_MAX * (1 + 1e-6)


@pytest.mark.parametrize("shape", [(2500, 40), (2304, 256), (2304, 200), (100, 384)])
def test_slab_by_slab_cpu_dequantisation_equals_one_pass(shape):
    """Whole blocks (scales broadcast) and ragged ones (scales expanded), over several slabs of rows."""
    g = torch.Generator().manual_seed(0)
    q, s = quantize(torch.randn(shape, generator=g), (128, 128))
    want = dequantize_torch(q, s, (128, 128))
    assert torch.equal(dequantize(q, s, (128, 128), torch.float32), want)
    assert torch.equal(dequantize(q, s, (128, 128)), want.to(torch.bfloat16))


def test_reader_dequantises_block_fp8_and_hides_the_scales(fp8_model, bf16_model):
    with Checkpoint.open(fp8_model) as ckpt, Checkpoint.open(bf16_model) as plain:
        assert ckpt.fp8_block == BLOCK
        assert not any(n.endswith("_scale_inv") for n in ckpt.names())
        assert sorted(ckpt.names()) == sorted(plain.names())
        name = "model.layers.1.self_attn.o_proj.weight"
        assert ckpt.is_fp8(name) and ckpt.info(name).dtype == "BF16" and ckpt.byte_range(name) is None
        want = dequantize_torch(ckpt.read_stored(name), ckpt.read_scale(name), BLOCK).to(torch.bfloat16)
        assert torch.equal(ckpt.read(name), want)
        assert bytes(ckpt.read_bytes(name)) == want.reshape(-1).view(torch.uint8).numpy().tobytes()
        router = "model.layers.1.mlp.gate.weight"
        assert not ckpt.is_fp8(router) and torch.equal(ckpt.read(router), plain.read(router))


def test_fp8_cast_round_trip_keeps_what_it_does_not_quantise(fp8_model, bf16_model, tmp_path):
    back = tmp_path / "back"
    fp8_cast(fp8_model, back, to="bf16", progress=False)
    fp8_config = json.loads((fp8_model / "config.json").read_text())
    assert fp8_config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                                 "weight_block_size": list(BLOCK)}
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    assert (back / "tokenizer.json").read_bytes() == (bf16_model / "tokenizer.json").read_bytes()
    assert sorted(read_index(back)["weight_map"]) == sorted(read_index(bf16_model)["weight_map"])
    src, out, stored = tensors_of(bf16_model), tensors_of(back), tensors_of(fp8_model)
    quantized = {n for n in stored if n.endswith("_scale_inv")}
    assert "model.layers.1.mlp.gate.weight_scale_inv" not in quantized  # routers stay as they are
    assert "model.embed_tokens.weight_scale_inv" not in quantized and "lm_head.weight_scale_inv" not in quantized
    for name, t in src.items():
        if name + "_scale_inv" in quantized:
            want = dequantize_torch(stored[name], stored[name + "_scale_inv"], BLOCK).to(torch.bfloat16)
            assert torch.equal(out[name], want), name
        else:
            assert torch.equal(out[name].view(torch.uint8), t.view(torch.uint8)), name


def test_fp8_cast_resumes_with_the_missing_shard_only(fp8_model, tmp_path):
    out = tmp_path / "out"
    first = fp8_cast(fp8_model, out, to="bf16", progress=False)
    before = tensors_of(out)
    lost = first.written[-1]
    (out / lost).unlink()
    again = fp8_cast(fp8_model, out, to="bf16", resume=True, progress=False)
    assert again.written == [lost] and len(again.skipped) == len(first.written) - 1
    after = tensors_of(out)
    assert all(torch.equal(after[n].view(torch.uint8), before[n].view(torch.uint8)) for n in before)


def test_fp8_output_loads_in_transformers_dequantised_on_cpu(fp8_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp8_model)  # no GPU: transformers dequantises to bf16
    with Checkpoint.open(fp8_model) as ckpt:
        w = ckpt.read("model.layers.1.self_attn.o_proj.weight")
    assert torch.equal(model.model.layers[1].self_attn.o_proj.weight.detach().to(torch.bfloat16), w)


def test_a_merge_from_fp8_sources_equals_the_merge_from_their_bf16_form(fp8_model, tmp_path):
    """Assembly of an FP8 base and an FP8 sibling gives the bytes of the same assembly of their BF16 casts."""
    sibling = tmp_path / "sib"
    fp8_cast(make_tiny_deepseek(tmp_path / "sib-bf16", seed=4), sibling, to="fp8", block=BLOCK, progress=False)
    outs = {}
    for form in ("fp8", "bf16"):
        base, other = (fp8_model, sibling) if form == "fp8" else (tmp_path / "b16", tmp_path / "s16")
        if form == "bf16":
            fp8_cast(fp8_model, base, progress=False)
            fp8_cast(sibling, other, progress=False)
        (tmp_path / form).mkdir()
        cfg = write_config(tmp_path / form, base_model=str(base), gate_mode="random", merge_method="assembly",
                           output_dir=str(tmp_path / form / "out"), routing_report=False,
                           experts=[{"source_model": str(base)}, {"source_model": str(other)}],
                           assembly={"weights": {"default": [1.0, 0.0], "routed_experts": [0.3, 0.7]}})
        outs[form] = run_merge(load_config(cfg), config_dir=cfg.parent, progress=False).output_dir
    a, b = tensors_of(outs["fp8"]), tensors_of(outs["bf16"])
    assert a.keys() == b.keys() and all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)
    assert "quantization_config" not in json.loads((outs["fp8"] / "config.json").read_text())


def _broken(tmp_path, fp8_model, edit) -> Path:
    """A copy of the FP8 model with `edit(tensors, config)` applied to its first shard holding FP8, and config."""
    out = tmp_path / "broken"
    shutil.copytree(fp8_model, out)
    config = json.loads((out / "config.json").read_text())
    shard = next(f for f in sorted(out.glob("*.safetensors"))
                 if any(t.dtype == torch.float8_e4m3fn for t in load_file(str(f)).values()))
    tensors = load_file(str(shard))
    edit(tensors, config)
    index = read_index(out)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


def _fp8_name(tensors) -> str:
    return next(n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn)


def test_bad_fp8_inputs_are_refused_naming_the_tensor(tmp_path, fp8_model):
    def drop_scale(t, c):
        del t[_fp8_name(t) + "_scale_inv"]

    def misshape_scale(t, c):
        n = _fp8_name(t) + "_scale_inv"
        t[n] = torch.ones(t[n].shape[0] + 1, t[n].shape[1])

    def no_config(t, c):
        del c["quantization_config"]

    def unknown_fmt(t, c):
        c["quantization_config"]["fmt"] = "e5m2"

    def e5m2_tensor(t, c):
        n = _fp8_name(t)
        t[n] = t[n].float().to(torch.float8_e5m2)

    cases = [(drop_scale, r"is FP8 but its scale tensor '.*_scale_inv' is missing"),
             (misshape_scale, r"tensor '.*_scale_inv' is F32\[\d+, \d+\]; the scales of '.*' .* must be F32"),
             (no_config, r"tensor '.*' is F8_E4M3 but config.json has no quantization_config"),
             (unknown_fmt, r"quantization_config.fmt is 'e5m2'; only e4m3 block FP8"),
             (e5m2_tensor, r"tensor '.*' is F8_E5M2, but quantization_config says e4m3")]
    for i, (edit, message) in enumerate(cases):
        folder = _broken(tmp_path / str(i), fp8_model, edit)
        with pytest.raises(CheckpointError, match=message):
            Checkpoint.open(folder)


def test_fp8_output_equals_fp8_cast_of_the_bf16_merge_and_passes_the_smoke_test(tmp_path, bf16_model):
    from zenith_merge.smoke import run_smoke_test

    sibling = make_tiny_deepseek(tmp_path / "sib", seed=5)
    outs = {}
    for fp8 in (False, True):
        folder = tmp_path / ("fp8" if fp8 else "bf16")
        folder.mkdir()
        cfg = write_config(folder, base_model=str(bf16_model), gate_mode="random", merge_method="assembly",
                           output_dir=str(folder / "out"), routing_report=False, fp8_output=fp8,
                           experts=[{"source_model": str(bf16_model)}, {"source_model": str(sibling)}],
                           assembly={"weights": {"default": [0.6, 0.4]}})
        outs[fp8] = run_merge(load_config(cfg), config_dir=folder, progress=False).output_dir
    fp8_cast(outs[False], tmp_path / "cast", to="fp8", progress=False)
    a, b = tensors_of(outs[True]), tensors_of(tmp_path / "cast")
    assert a.keys() == b.keys() and any(n.endswith("_scale_inv") for n in a)
    assert all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)
    config = json.loads((outs[True] / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    report = run_smoke_test(outs[True])
    assert report.ok, report.failed


def test_fp8_output_refuses_training_it_cannot_follow(tmp_path, bf16_model, tiny_qwen_moe):
    from zenith_merge.errors import PlanError
    from zenith_merge.plan import build_plan

    cfg = write_config(tmp_path, base_model=str(bf16_model), gate_mode="random", fp8_output=True,
                       experts=[{"source_model": str(bf16_model)}, {"source_model": str(tiny_qwen_moe)}],
                       router={"train_steps": 2})
    with pytest.raises(PlanError, match="fp8_output: not with router.train_steps"):
        build_plan(load_config(cfg), config_dir=tmp_path)
