"""Calibration forward passes: hooks capture what the modules see and return, offsets survive chunking,
disk offload and 8-bit give the states a plain load gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zenith_merge.demo import calibration_text, ensure_demo
from zenith_merge.errors import CalibrationError
from zenith_merge.forward.calibration import CapturedChunk, CapturePoint, capture_hidden
from zenith_merge.forward.loading import bnb_8bit_unavailable, load_for_calibration

pytestmark = pytest.mark.demo

TEXT = calibration_text("code")[:2500]


@pytest.fixture(scope="module")
def zen() -> Path:
    return ensure_demo("zen-tiny")


@pytest.fixture(scope="module")
def qwen() -> Path:
    return ensure_demo("qwen3-moe-tiny")


@pytest.fixture(scope="module")
def zen_loaded(zen):
    return load_for_calibration(zen)


def _points(layer: int) -> list[CapturePoint]:
    return [CapturePoint.input_of(f"model.layers.{layer}.mlp"), CapturePoint.output_of(f"model.layers.{layer}")]


def _hook_counts(model) -> int:
    # (`_forward_pre_hooks_with_kwargs` only flags entries of `_forward_pre_hooks`)
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _cat(chunks: list[CapturedChunk], point: CapturePoint) -> torch.Tensor:
    return torch.cat([c.states[point] for c in chunks])


def test_layer_outputs_match_output_hidden_states(zen_loaded):
    model, tok = zen_loaded
    points = [CapturePoint.output_of(f"model.layers.{layer}") for layer in range(3)]
    [chunk] = capture_hidden(model, tok, [TEXT[:600]], points, progress=False)
    ids = tok(TEXT[:600], add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for layer, point in enumerate(points):
        got = chunk.states[point]
        assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (ids.shape[1], 128)
        torch.testing.assert_close(got, hidden[layer + 1][0], rtol=0, atol=0)


def test_the_head_runs_on_the_last_position_only_unless_a_point_reads_it(zen_loaded):
    """Capture passes never read logits: the (vocab x hidden) head sees one position, and every captured state is
    what the whole forward gives. A point on the head itself (RegMean solving lm_head) gets every position."""
    model, tok = zen_loaded
    seen: list[int] = []
    handle = model.lm_head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    try:
        layer = CapturePoint.output_of("model.layers.2")
        [chunk] = capture_hidden(model, tok, [TEXT[:600]], [layer], progress=False)
        n = len(chunk.ends)
        assert n > 1 and seen == [1]
        head = CapturePoint.input_of("lm_head")
        [chunk] = capture_hidden(model, tok, [TEXT[:600]], [layer, head], progress=False)
        assert seen == [1, n] and chunk.states[head].shape == (n, 128)
        ids = tok(TEXT[:600], add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        torch.testing.assert_close(chunk.states[layer], hidden[3][0], rtol=0, atol=0)
    finally:
        handle.remove()


def test_moe_input_is_the_normalised_residual_after_attention(zen_loaded):
    """Recompute layer 2 by hand from its input: attention, post_attention_layernorm, MoE, residual."""
    model, tok = zen_loaded
    layer = model.model.layers[2]
    mlp_in, layer_in = CapturePoint.input_of("model.layers.2.mlp"), CapturePoint.output_of("model.layers.1")
    [chunk] = capture_hidden(model, tok, [TEXT[:600]], [mlp_in, layer_in, *_points(2)], progress=False)
    x = chunk.states[layer_in][None]
    with torch.no_grad():
        positions = torch.arange(x.shape[1])[None]
        attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=None, position_ids=positions,
                                  position_embeddings=model.model.rotary_emb(x, positions))
        residual = x + attn
        normed = layer.post_attention_layernorm(residual)
        out = residual + layer.mlp(normed)
    torch.testing.assert_close(chunk.states[mlp_in], normed[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunk.states[CapturePoint.output_of("model.layers.2")], out[0], rtol=1e-5, atol=1e-5)


def test_hooks_are_removed_after_the_pass_and_on_early_close(zen_loaded):
    model, tok = zen_loaded
    before = _hook_counts(model)
    gen = capture_hidden(model, tok, [TEXT], _points(1), max_tokens_per_text=64, progress=False)
    next(gen)
    assert _hook_counts(model) == before + 2
    gen.close()
    assert _hook_counts(model) == before
    list(capture_hidden(model, tok, [TEXT], _points(1), max_tokens_per_text=64, progress=False))
    assert _hook_counts(model) == before
    with pytest.raises(CalibrationError, match="model.layers.9.mlp"):
        list(capture_hidden(model, tok, [TEXT], _points(9), progress=False))
    assert _hook_counts(model) == before


def test_chunk_offsets_are_relative_to_the_original_text(zen_loaded):
    model, tok = zen_loaded
    texts = ["a short one\n", TEXT]
    chunks = list(capture_hidden(model, tok, texts, _points(1), max_tokens_per_text=50, progress=False))
    full = tok(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    long = [c for c in chunks if c.text_index == 1]
    assert [c.text_index for c in chunks] == [0] + [1] * len(long)
    assert len(long) == -(-len(full.input_ids) // 50) and all(len(c) == 50 for c in long[:-1])
    assert torch.equal(torch.cat([c.ends for c in long]), torch.tensor([e for _, e in full.offset_mapping]))
    assert long[0].start == 0 and "".join(c.text for c in long) == TEXT[: int(long[-1].ends[-1])]
    for prev, c in zip(long, long[1:]):
        assert c.start == int(prev.ends[-1]) and c.text == TEXT[c.start:int(c.ends[-1])]
        # the chunk's own tokens, re-encoded from the same ids, spell its text
        assert tok.decode(full.input_ids[sum(map(len, long[:long.index(c)])):][:len(c)]) == c.text
    # the first chunk ran with exactly the context of the first 50 tokens of the whole text
    [head] = capture_hidden(model, tok, [TEXT], _points(1), max_total_tokens=50, progress=False)
    torch.testing.assert_close(head.states[_points(1)[1]], long[0].states[_points(1)[1]], rtol=0, atol=0)


def test_max_total_tokens_cuts_the_stream(zen_loaded):
    model, tok = zen_loaded
    chunks = list(capture_hidden(model, tok, [TEXT, TEXT], _points(1), max_tokens_per_text=64,
                                 max_total_tokens=150, progress=False))
    assert [len(c) for c in chunks] == [64, 64, 22]
    assert all(c.states[p].shape[0] == len(c) for c in chunks for p in _points(1))


def test_a_pass_stopped_after_a_layer_never_runs_the_later_ones_and_captures_the_same(zen_loaded):
    model, tok = zen_loaded
    ran = []
    later = [model.model.layers[i].register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i in (2, 3)]
    try:
        full = list(capture_hidden(model, tok, [TEXT], _points(1), max_total_tokens=200, progress=False))
        assert ran
        ran.clear()
        cut = list(capture_hidden(model, tok, [TEXT], _points(1), max_total_tokens=200, stop_after="model.layers.1",
                                  progress=False))
        assert ran == []
    finally:
        for h in later:
            h.remove()
    assert [len(c) for c in cut] == [len(c) for c in full]
    assert all(torch.equal(a.states[p], b.states[p]) for a, b in zip(full, cut) for p in _points(1))
    with pytest.raises(CalibrationError, match="no module 'model.layers.9'"):
        list(capture_hidden(model, tok, [TEXT], _points(1), stop_after="model.layers.9", progress=False))


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_disk_offload_on_cpu_gives_the_plain_states(zen, zen_loaded, tmp_path):
    """max_memory below the float32 model size: accelerate keeps the first layers on CPU, the rest on disk."""
    model, tok = zen_loaded
    budget = _weights_bytes(zen)  # the checkpoint is bfloat16: half of what float32 needs
    offload_dir = tmp_path / "offload"
    offloaded, _ = load_for_calibration(zen, max_memory={"cpu": budget}, offload_dir=offload_dir)
    placement = set(offloaded.hf_device_map.values())
    print("device map:", offloaded.hf_device_map)
    assert placement == {"cpu", "disk"}, offloaded.hf_device_map
    on_disk = [n for n, p in offloaded.named_parameters() if p.device.type == "meta"]
    assert on_disk, "offloaded weights must not be materialised"
    points = [*_points(1), *_points(3)]
    plain = list(capture_hidden(model, tok, [TEXT], points, max_tokens_per_text=128, progress=False))
    streamed = list(capture_hidden(offloaded, tok, [TEXT], points, max_tokens_per_text=128, progress=False))
    for point in points:
        torch.testing.assert_close(_cat(streamed, point), _cat(plain, point), rtol=1e-5, atol=1e-5)
    # a pass stopped after layer 1 leaves the offloaded model as it was: whole passes still match
    cut = list(capture_hidden(offloaded, tok, [TEXT], _points(1), max_tokens_per_text=128,
                              stop_after="model.layers.1", progress=False))
    again = list(capture_hidden(offloaded, tok, [TEXT], points, max_tokens_per_text=128, progress=False))
    for point in _points(1):
        torch.testing.assert_close(_cat(cut, point), _cat(plain, point), rtol=1e-5, atol=1e-5)
    for point in points:
        torch.testing.assert_close(_cat(again, point), _cat(plain, point), rtol=1e-5, atol=1e-5)
    assert all(p.device.type == "meta" for n, p in offloaded.named_parameters() if n in on_disk)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc/self/maps")
def test_loading_reads_the_shards_without_mapping_them(zen, monkeypatch):
    """A mapped shard's pages count in RSS while transformers converts and offloads the weights, so an
    offloaded load's peak would grow with the model; read with pread, only tensors in flight count."""
    import safetensors
    import transformers.modeling_utils as modeling_utils

    shards = sorted(str(p.resolve()) for p in zen.glob("*.safetensors"))
    mapped_during_load: list[list[str]] = []
    convert = modeling_utils.convert_and_load_state_dict_in_model

    def watched(*args, **kwargs):
        maps = Path("/proc/self/maps").read_text().splitlines()
        mapped_during_load.append(sorted({s for s in shards for line in maps if line.endswith(s)}))
        return convert(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "convert_and_load_state_dict_in_model", watched)
    model, _ = load_for_calibration(zen, max_memory={"cpu": _weights_bytes(zen)})
    assert mapped_during_load == [[]]
    assert modeling_utils.safe_open is safetensors.safe_open  # transformers' loader is left as it was
    assert any(p.device.type == "meta" for p in model.parameters())  # the offloaded load this is about


_HEAP_PROBE = """
import ctypes, sys
import torch
from zenith_merge.forward.loading import load_for_calibration

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info

def mapped_when_allocated() -> bool:
    # freeing a mapped 16 MiB block raises glibc's dynamic threshold past 8 MiB, unless it is fixed
    del_me = torch.empty(16 << 20, dtype=torch.uint8)
    del del_me
    before = libc.mallinfo2().hblkhd
    block = torch.empty(8 << 20, dtype=torch.uint8)
    return libc.mallinfo2().hblkhd - before >= 8 << 20

print(mapped_when_allocated())
load_for_calibration(sys.argv[1], max_memory={"cpu": int(sys.argv[2])})
print(mapped_when_allocated())
"""


def test_bounded_loading_returns_large_freed_blocks_to_the_system(zen):
    """glibc's dynamic mmap threshold let the forward passes' activations fragment the heap, so the peak
    grew with each pass over the text; once a model is loaded within max_memory, large blocks are mapped."""
    import ctypes
    import subprocess
    import sys

    try:
        has_mallinfo2 = hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        has_mallinfo2 = False
    if not has_mallinfo2:
        pytest.skip("needs glibc 2.33 or later (mallinfo2)")
    run = subprocess.run([sys.executable, "-c", _HEAP_PROBE, str(zen), str(_weights_bytes(zen))],
                         capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False", "True"]  # the heap's own rule first, then the fixed threshold


def test_load_errors_name_the_folder(tmp_path):
    with pytest.raises(CalibrationError, match=str(tmp_path / "nowhere")):
        load_for_calibration(tmp_path / "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(CalibrationError, match=str(tmp_path / "broken")):
        load_for_calibration(tmp_path / "broken")


_NO_8BIT = bnb_8bit_unavailable()


@pytest.mark.skipif(_NO_8BIT is not None, reason=f"no bitsandbytes int8 here: {_NO_8BIT}")
@pytest.mark.parametrize("name, layer", [("qwen3-moe-tiny", 1), ("zen-tiny", 2)])
def test_8bit_load_runs_and_stays_close(name, layer):
    """int8 linear layers (bitsandbytes runs on CPU too): states within a few percent of float32."""
    import bitsandbytes as bnb

    folder = ensure_demo(name)
    model, tok = load_for_calibration(folder)
    quant, _ = load_for_calibration(folder, load_in_8bit=True)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in quant.modules())
    points = _points(layer)
    ref = list(capture_hidden(model, tok, [TEXT], points, max_tokens_per_text=128, progress=False))
    got = list(capture_hidden(quant, tok, [TEXT], points, max_tokens_per_text=128, progress=False))
    for point in points:
        a, b = _cat(ref, point), _cat(got, point)
        rel = float((a - b).norm() / a.norm())
        print(f"{name} {point}: relative error of 8-bit {rel:.4f}")
        assert torch.isfinite(b).all() and rel < 0.1


def test_8bit_unavailable_raises_calibration_error(zen, monkeypatch):
    import zenith_merge.forward.loading as loading

    monkeypatch.setattr(loading, "bnb_8bit_unavailable", lambda: "bitsandbytes has no working 8-bit matmul on cpu")
    with pytest.raises(CalibrationError, match=r"zen-tiny: load_in_8bit=True but bitsandbytes has no working"):
        load_for_calibration(zen, load_in_8bit=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA, int8 with offload is accelerate's documented path")
def test_8bit_with_offload_on_cpu_is_refused_clearly(zen):
    # accelerate's dispatch of a partly offloaded int8 model asks for an accelerator device; say so up front
    with pytest.raises(CalibrationError, match="needs CUDA"):
        load_for_calibration(zen, load_in_8bit=True, max_memory={"cpu": 10**6})


def test_batched_capture_equals_one_text_at_a_time():
    """Right padding with a mask: in a causal model no real token sees a pad, so batching changes nothing."""
    from zenith_merge.demo import ensure_demo
    from zenith_merge.forward.calibration import CapturePoint, capture_batch, capture_hidden
    from zenith_merge.forward.loading import load_for_calibration

    model, tok = load_for_calibration(ensure_demo("qwen3-moe-tiny"), dtype=torch.float32)
    texts = ["What is 3 + 4?", "Solve for x: 2x - 5 = 11. First add 5.", "ok"]
    points = [CapturePoint.input_of("model.layers.1.mlp"), CapturePoint.output_of("model.layers.2")]
    batched = capture_batch(model, tok, texts, points)
    one_by_one = list(capture_hidden(model, tok, texts, points, progress=False))
    for got, want in zip(batched, one_by_one):
        for p in points:
            torch.testing.assert_close(got[p], want.states[p], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("ragged", "shape"), [
    ("kv_b_proj", {"qk_nope_head_dim": 40, "v_head_dim": 56}),  # 192 rows: transformers scales 96-row blocks
    ("kv_a_proj_with_mqa", {"kv_lora_rank": 544, "qk_rope_head_dim": 32}),  # DeepSeek-V3's 576 rows: refused
])
def test_a_block_fp8_checkpoint_loads_as_its_bf16_cast_even_in_ragged_blocks(tmp_path, ragged, shape):
    """transformers' own CPU dequantisation derives the block from the scale grid, wrong for a weight whose rows
    are not a multiple of 128; loaded for calibration, every weight is the reader's: the model equals its BF16
    cast."""
    from conftest import make_tiny_deepseek

    from zenith_merge.fp8_cast import fp8_cast

    bf16 = make_tiny_deepseek(tmp_path / "bf16", seed=3, **shape)
    fp8_cast(bf16, tmp_path / "fp8", to="fp8", block=(128, 128), progress=False)
    fp8_cast(tmp_path / "fp8", tmp_path / "cast", progress=False)
    (model, _), (cast, _) = load_for_calibration(tmp_path / "fp8"), load_for_calibration(tmp_path / "cast")
    ours, want = model.state_dict(), cast.state_dict()
    name = f"model.layers.1.self_attn.{ragged}.weight"
    assert ours[name].shape[0] % 128 and ours[name].shape[0] > 128  # a ragged block row
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, cast(input_ids=ids).logits)
