"""Block FP8: the Triton kernel and the CPU path agree bit for bit; the reader dequantises; fp8-cast both ways."""

from __future__ import annotations

import importlib
import json
import math
import pickle
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import make_tiny_deepseek, read_index, tensors_of, write_config
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import zenith_merge.io.dequantize as dequantize_module
import zenith_merge.kernels.fp8 as fp8_kernels
from zenith_merge.config import load_config
from zenith_merge.errors import CheckpointError
from zenith_merge.fp8_cast import CastSource, fp8_cast
from zenith_merge.io.layout import TensorSpec
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


EVERY_BYTE = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
FINITE_BYTES = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaNs by position only (their sign and payload are not specified)."""
    nan = a.isnan()
    return (a.dtype == b.dtype and a.shape == b.shape and torch.equal(nan, b.isnan())
            and torch.equal(a[~nan].view(torch.uint8), b[~nan].view(torch.uint8)))


def _definition(q, s, block, dtype):
    return dequantize_torch(q, s, block).to(dtype)


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("scale", [1.0, 1e-30, 2.0**-140, 3e-3, 100.0, 255.9, -7.5])
def test_fast_cpu_path_decodes_every_e4m3_byte_as_the_definition(dtype, scale):
    """All 256 bytes (subnormals, both zeros, the largest, the NaN codes) at scales of many magnitudes,
    subnormal included; the finite bytes alone too, so that the bit trick, not its fallback, runs."""
    for q in (EVERY_BYTE, FINITE_BYTES.view(torch.float8_e4m3fn).reshape(2, 127)):
        s = torch.full(scale_shape(tuple(q.shape), (128, 128)), scale)
        assert _same(dequantize(q, s, (128, 128), dtype), _definition(q, s, (128, 128), dtype))


def test_fast_cpu_path_is_the_one_taken_for_finite_bytes_and_scales():
    q, s = quantize(torch.randn(300, 260) * 3, (128, 128))
    with mock.patch.object(fp8_kernels, "_decode_plain", side_effect=AssertionError("fallback taken")):
        assert _same(dequantize(q, s, (128, 128)), _definition(q, s, (128, 128), torch.bfloat16))


@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_scales_the_trick_cannot_take_fall_back_to_the_same_result(dtype):
    """A finite scale >= 2^8 (s * 2^120 overflows float32) takes the plain path for its block row;
    inf and NaN scales and the NaN bytes give what the definition gives."""
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (300, 300), dtype=torch.uint8, generator=g)
    q = raw.view(torch.float8_e4m3fn)
    finite = torch.where((raw & 0x7F) == 0x7F, 0x3C, raw).view(torch.float8_e4m3fn)
    s = torch.rand(3, 3, generator=g) * 1e-3
    s[0, 1], s[1, 2], s[2, 0], s[2, 2] = 256.0, float("inf"), float("nan"), 3e38
    s[1, 0] = -float("inf")
    for weight in (q, finite):
        assert _same(dequantize(weight, s, (128, 128), dtype), _definition(weight, s, (128, 128), dtype))


_special_scales = st.sampled_from([0.0, -0.0, 2.0**-149, 1e-40, 255.99998, 256.0, 1e5, 3.4e38, math.inf, -math.inf,
                                   math.nan])


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 300), b0=st.sampled_from([1, 3, 16, 64, 128]),
       b1=st.sampled_from([1, 7, 16, 128]), dtype=st.sampled_from(OUT_DTYPES),
       slab=st.sampled_from([1, 100, 4096, 2**19]), log10=st.floats(-30, 2), negative=st.booleans(),
       specials=st.lists(st.tuples(st.integers(0, 2**31), _special_scales), max_size=3),
       nan_bytes=st.booleans(), seed=st.integers(0, 2**31))
def test_fast_cpu_path_equals_the_definition_bit_for_bit(rows, cols, b0, b1, dtype, slab, log10, negative, specials,
                                                          nan_bytes, seed):
    """Random shapes with ragged edges, block sizes, slab sizes (whole block rows or parts of one), scales
    from 1e-30 to 100 spread over two decades around 10^log10, some special ones, NaN bytes or none."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=g)
    if not nan_bytes:
        raw[(raw & 0x7F) == 0x7F] = 0x3C
    q = raw.view(torch.float8_e4m3fn)
    s = 10.0 ** (log10 + torch.rand(scale_shape((rows, cols), (b0, b1)), generator=g, dtype=torch.float64) * 2 - 1)
    s = (-s if negative else s).to(torch.float32)
    for at, value in specials:
        s.view(-1)[at % s.numel()] = value
    with mock.patch.object(fp8_kernels, "SLAB_ELEMENTS", slab):
        assert _same(dequantize(q, s, (b0, b1), dtype), _definition(q, s, (b0, b1), dtype))


@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_under_flushed_denormals_dequantisation_equals_the_definition_under_the_same_mode(dtype):
    """torch.set_flush_denormal(True) zeroes the bit trick's subnormal intermediates (q * 2^-120 for
    every e4m3 subnormal byte): `dequantize` sees the mode and computes the definition instead, at a
    scale where flushing leaves the definition alone (1) and at one where it changes it (1e-36)."""
    q = FINITE_BYTES.view(torch.float8_e4m3fn).reshape(2, 127)
    unit = torch.ones(1, 1)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        for scale in (1.0, 1e-36):
            assert _same(dequantize(q, unit * scale, (128, 128), dtype), _definition(q, unit * scale, (128, 128), dtype))
        bare = torch.empty(q.shape, dtype=torch.int32)
        fp8_kernels._decode_scaled(q, torch.full((1, q.shape[1]), 2.0**120), bare)
    finally:
        torch.set_flush_denormal(False)
    assert not _same(bare.view(torch.float32), _definition(q, unit, (128, 128), torch.float32))  # the trick alone fails


def test_dequantize_writes_into_out_and_returns_it():
    q, s = quantize(torch.randn(130, 257), (128, 128))
    for dtype in OUT_DTYPES:
        out = torch.full((130, 257), 7.0, dtype=dtype)
        got = dequantize(q, s, (128, 128), dtype, out=out)
        assert got is out and _same(out, _definition(q, s, (128, 128), dtype))
    with pytest.raises(ValueError, match="out must be a contiguous torch.bfloat16 tensor of shape \\(130, 257\\)"):
        dequantize(q, s, (128, 128), out=torch.empty(130, 256, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        dequantize(q, s, (128, 128), out=torch.empty(130, 257, dtype=torch.float32))
    with pytest.raises(ValueError, match="expected \\(2, 3\\)"):
        dequantize(q, s[:, :2], (128, 128))


def test_reader_reads_stored_tensors_and_their_rows_into_a_given_buffer(fp8_model):
    with Checkpoint.open(fp8_model) as ckpt:
        name = "model.layers.1.self_attn.o_proj.weight"
        whole = ckpt.read_stored(name)
        buffer = bytearray(whole.numel() + 5)
        got = ckpt.read_stored_into(name, buffer)
        assert got.dtype == torch.float8_e4m3fn and torch.equal(got.view(torch.uint8), whole.view(torch.uint8))
        assert got.data_ptr() == torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()  # in the buffer, no copy
        rows = ckpt.read_stored_into(name, buffer, rows=(3, 20))
        assert torch.equal(rows.view(torch.uint8), whole[3:20].view(torch.uint8))
        norm = "model.layers.1.input_layernorm.weight"
        assert torch.equal(ckpt.read_stored_into(norm, bytearray(4096)), ckpt.read(norm))
        with pytest.raises(ValueError, match="a writable buffer of .* bytes is needed"):
            ckpt.read_stored_into(name, bytearray(10))
        with pytest.raises(ValueError, match="no rows"):
            ckpt.read_stored_into(name, buffer, rows=(5, whole.shape[0] + 1))


def test_fp8_cast_source_reuses_its_buffers_and_pickles_without_them(fp8_model, monkeypatch):
    """Weights come back as views of one BF16 buffer, read a block row at a time (the smallest chunk),
    with the values of a whole-tensor dequantisation; a pickled source carries no buffer."""
    monkeypatch.setattr(dequantize_module, "READ_CHUNK_BYTES", 1)
    source = CastSource(str(fp8_model), "bf16", BLOCK)
    with Checkpoint.open(fp8_model) as ckpt:
        names = sorted((n for n in ckpt.names() if ckpt.is_fp8(n)), key=lambda n: -ckpt.info(n).nbytes)
        pointers = set()
        for name in names:
            got = source.produce(TensorSpec(name, "BF16", ckpt.info(name).shape))
            assert got.dtype == torch.bfloat16 and tuple(got.shape) == tuple(ckpt.info(name).shape)
            assert torch.equal(got, dequantize_torch(ckpt.read_stored(name), ckpt.read_scale(name), BLOCK)
                               .to(torch.bfloat16)), name
            pointers.add(got.data_ptr())
    assert len(names) > 2 and len(pointers) == 1
    copy = pickle.loads(pickle.dumps(source))
    assert copy._dequantizer is None and copy._ckpt is None
    source.close()


def test_fp8_cast_with_worker_processes_writes_the_same_bytes(fp8_model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    fp8_cast(fp8_model, one, progress=False)
    result = fp8_cast(fp8_model, two, workers=2, progress=False)
    assert len(result.written) > 1
    a, b = tensors_of(one), tensors_of(two)
    assert a.keys() == b.keys() and all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)


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
    threads = torch.get_num_threads()
    fp8_cast(fp8_model, back, to="bf16", progress=False)
    assert torch.get_num_threads() == threads  # the single-threaded cast gives them back
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
    from zenith_merge.checks.smoke import run_smoke_test

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
    from zenith_merge.plan.build import build_plan

    cfg = write_config(tmp_path, base_model=str(bf16_model), gate_mode="random", fp8_output=True,
                       experts=[{"source_model": str(bf16_model)}, {"source_model": str(tiny_qwen_moe)}],
                       router={"train_steps": 2})
    with pytest.raises(PlanError, match="fp8_output: not with router.train_steps"):
        build_plan(load_config(cfg), config_dir=tmp_path)
