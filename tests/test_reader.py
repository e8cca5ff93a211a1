"""The lazy reader: bit-exact reads, and each refusal naming the file and tensor at fault."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from zenith_merge.errors import CheckpointError
from zenith_merge.io.reader import Checkpoint
from zenith_merge.io.safetensors_format import build_header, read_header

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool, torch.float8_e4m3fn,
          torch.float8_e5m2]
FP8_CONFIG = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4, "num_hidden_layers": 1, "vocab_size": 3,
         "num_attention_heads": 1, "intermediate_size": 8}


def _folder(path: Path, tensors, config=None, name="model.safetensors") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / name, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or {}))
    return path


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_reads_like_safetensors(folder: Path, ckpt: Checkpoint, weight_map: dict[str, str]) -> None:
    for name, file in weight_map.items():
        with safe_open(folder / file, "pt") as ref:
            want = ref.get_tensor(name)
        got = ckpt.read(name)
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert _bits(got) == _bits(want), name
        assert bytes(ckpt.read_bytes(name)) == _bits(want), name


def test_every_dtype_round_trips_bit_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    fp8 = {d for d in DTYPES if "float8" in str(d)}  # read only as DeepSeek-style block FP8 (tests/test_fp8.py)
    tensors = {f"t.{d}".replace("torch.", ""): (torch.randn(3, 5, generator=g) * 40).to(d) for d in DTYPES
               if d not in fp8}
    tensors |= {"empty": torch.zeros(0, 4), "scalar": torch.tensor(3.5, dtype=torch.bfloat16),
                "nan": torch.tensor([float("nan"), float("inf"), -0.0], dtype=torch.bfloat16)}
    block = {"w": (torch.randn(3, 5, generator=g) * 40).to(torch.float8_e4m3fn), "w_scale_inv": torch.ones(1, 1)}
    folder = _folder(tmp_path, tensors | block, FP8_CONFIG)
    with Checkpoint.open(folder) as ckpt:
        assert sorted(ckpt.names()) == sorted([*tensors, "w"]) and len(ckpt) == len(tensors) + 1 and "scalar" in ckpt
        _assert_reads_like_safetensors(folder, ckpt, dict.fromkeys(tensors, "model.safetensors"))
        assert ckpt.info("t.bfloat16").dtype == "BF16" and ckpt.info("t.bool").dtype == "BOOL"
        assert _bits(ckpt.read_stored("w")) == _bits(block["w"])  # the FP8 bytes as stored
        assert torch.equal(ckpt.read("w"), block["w"].float().to(torch.bfloat16))  # scale 1: the values themselves


def test_info_points_at_the_bytes(tmp_path):
    folder = _folder(tmp_path, {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(5, dtype=torch.int16)})
    with Checkpoint.open(folder) as ckpt:
        raw = (folder / "model.safetensors").read_bytes()
        for name in ckpt.names():
            info = ckpt.info(name)
            assert raw[info.offset:info.offset + info.nbytes] == bytes(ckpt.read_bytes(name))
            rng = ckpt.byte_range(name)
            assert (rng.file, rng.offset, rng.nbytes) == (info.file, info.offset, info.nbytes)
        assert ckpt.info("b").shape == (5,) and ckpt.files() == [info.file]
        with pytest.raises(CheckpointError, match="no tensor 'c'"):
            ckpt.info("c")


def test_sharded_deepseek(tiny_deepseek):
    weight_map = json.loads((tiny_deepseek / "model.safetensors.index.json").read_text())["weight_map"]
    with Checkpoint.open(tiny_deepseek) as ckpt:
        assert len(ckpt.files()) >= 3 and sorted(ckpt.names()) == sorted(weight_map)
        assert [f.name for f in ckpt.files()] == sorted(set(weight_map.values()))
        _assert_reads_like_safetensors(tiny_deepseek, ckpt, weight_map)


@pytest.fixture(scope="module")
def tiny_qwen3_moe(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    config = transformers.Qwen3MoeConfig(
        vocab_size=512, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2)
    path = tmp_path_factory.mktemp("qwen3-moe")
    transformers.Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    return path


def test_sharded_qwen3_moe_with_shapes_checked(tiny_qwen3_moe):
    weight_map = json.loads((tiny_qwen3_moe / "model.safetensors.index.json").read_text())["weight_map"]
    with Checkpoint.open(tiny_qwen3_moe) as ckpt:
        assert len(ckpt.files()) >= 2 and sorted(ckpt.names()) == sorted(weight_map)
        assert ckpt.config["architectures"] == ["Qwen3MoeForCausalLM"]
        _assert_reads_like_safetensors(tiny_qwen3_moe, ckpt, weight_map)


def test_reads_are_owned_copies(tmp_path):
    folder = _folder(tmp_path, {"w": torch.ones(4)})
    with Checkpoint.open(folder) as ckpt:
        t = ckpt.read("w")
        t += 1
        assert torch.equal(ckpt.read("w"), torch.ones(4))
        assert isinstance(ckpt.read_bytes("w"), bytearray)


def test_close_reopens_and_pickles(tmp_path):
    folder = _folder(tmp_path, {"w": torch.arange(4.0)})
    ckpt = Checkpoint.open(folder)
    ckpt.read("w")
    ckpt.close()
    assert torch.equal(ckpt.read("w"), torch.arange(4.0))  # handles reopen on demand
    clone = pickle.loads(pickle.dumps(ckpt))  # what a worker process receives
    assert torch.equal(clone.read("w"), torch.arange(4.0))
    ckpt.close()
    clone.close()


def test_hugging_face_cache_links_are_followed(tmp_path, tiny_deepseek):
    """A hub snapshot's files are links into the cache's blobs/; that is not "outside the folder"."""
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in tiny_deepseek.iterdir():
        shutil.copy(f, blobs / f.name)
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    with Checkpoint.open(snapshot) as ckpt:
        assert len(ckpt) == len(json.loads((tiny_deepseek / "model.safetensors.index.json").read_text())["weight_map"])


# -- refusals -------------------------------------------------------------------------------------

@pytest.fixture
def sharded(tmp_path, tiny_deepseek):
    dst = tmp_path / "m"
    shutil.copytree(tiny_deepseek, dst)
    return dst


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _set_index(folder, index):
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("entry", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors"])
def test_index_entry_outside_folder(sharded, entry):
    index = _index(sharded)
    index["weight_map"]["model.norm.weight"] = entry
    _set_index(sharded, index)
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json: entry '{entry}' points outside the "
                                              f"model folder"):
        Checkpoint.open(sharded)


def test_index_entry_symlink_outside_folder(sharded, tmp_path):
    index = _index(sharded)
    victim = index["weight_map"]["model.norm.weight"]
    target = tmp_path / "elsewhere.safetensors"
    shutil.move(sharded / victim, target)
    (sharded / victim).symlink_to(target)
    with pytest.raises(CheckpointError, match=f"entry '{victim}' is a link to {target}, outside the model folder"):
        Checkpoint.open(sharded)


def test_single_file_symlink_outside_folder(tmp_path):
    real = _folder(tmp_path / "real", {"w": torch.ones(2)})
    link = tmp_path / "link"
    link.mkdir()
    (link / "model.safetensors").symlink_to(real / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"link/model.safetensors is a link to .*, outside the model folder"):
        Checkpoint.open(link)


def test_missing_shard(sharded):
    file = _index(sharded)["weight_map"]["model.norm.weight"]
    (sharded / file).unlink()
    with pytest.raises(CheckpointError, match=f"{sharded}: shard '{file}' named in model.safetensors.index.json "
                                              f"is missing"):
        Checkpoint.open(sharded)


def test_shard_tensor_not_in_index(sharded):
    index = _index(sharded)
    file = index["weight_map"].pop("model.norm.weight")
    _set_index(sharded, index)
    with pytest.raises(CheckpointError, match=f"{file}: tensor 'model.norm.weight' is in this shard but not listed "
                                              f"in model.safetensors.index.json"):
        Checkpoint.open(sharded)


def test_index_tensor_absent_from_shard(sharded):
    index = _index(sharded)
    file = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.ghost.weight"] = file
    _set_index(sharded, index)
    with pytest.raises(CheckpointError, match=f"{file}: tensor 'model.ghost.weight' is listed in "
                                              f"model.safetensors.index.json but absent from this shard"):
        Checkpoint.open(sharded)


def test_index_places_tensor_in_another_shard(sharded):
    index = _index(sharded)
    files = sorted(set(index["weight_map"].values()))
    here = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.norm.weight"] = next(f for f in files if f != here)
    _set_index(sharded, index)
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' is (in this shard but model.safetensors"
                                              ".index.json places it in|listed in .* but absent)"):
        Checkpoint.open(sharded)


def test_truncated_file(sharded):
    file = sharded / _index(sharded)["weight_map"]["lm_head.weight"]
    last = max(read_header(file).tensors.items(), key=lambda kv: kv[1].end)[0]
    data = file.read_bytes()
    file.write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match=f"{file}: tensor '{last}': truncated file \\(the tensor ends at byte "
                                              f"{len(data)}, the file has {len(data) - 5} bytes\\)"):
        Checkpoint.open(sharded)
    file.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=f"{file}: truncated safetensors file \\(header of \\d+ bytes, "
                                              f"file of 100\\)"):
        Checkpoint.open(sharded)
    file.write_bytes(data[:6])
    with pytest.raises(CheckpointError, match=f"{file}: truncated safetensors file \\(6 bytes, no header\\)"):
        Checkpoint.open(sharded)


def _raw_file(folder: Path, header: bytes, data_len: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(data_len))
    return folder


@pytest.mark.parametrize("garbage,why", [
    (b"{not json", r"corrupt safetensors header: not valid JSON"),
    (b"[1, 2]", r"corrupt safetensors header \(not a JSON object\)"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 7]}}',
     r"tensor 'w': corrupt safetensors header \(F32\[2\] needs 8 bytes, its offsets span 7\)"),
    (b'{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', r"tensor 'w': corrupt .*shape \[-2\]"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]}}', r"tensor 'w': corrupt .*data_offsets"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}', r"tensor 'w': corrupt .*data_offsets"),
    (b'{"w": "nope"}', r"tensor 'w': corrupt safetensors header \(entry is not an object\)"),
    (b'{"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}', r"tensor 'w' has unknown dtype 'Q4'"),
    (b'{"__metadata__": 3}', r"corrupt safetensors header \(__metadata__ is not an object\)"),
])
def test_corrupt_header(tmp_path, garbage, why):
    folder = _raw_file(tmp_path, garbage)
    with pytest.raises(CheckpointError, match=f"{folder / 'model.safetensors'}: {why}"):
        Checkpoint.open(folder)


def test_header_length_field_wrong(tmp_path):
    header = build_header([("w", "F32", (4,))])
    good = header + bytes(16)
    n = int.from_bytes(header[:8], "little")
    (tmp_path / "model.safetensors").write_bytes((n - 3).to_bytes(8, "little") + good[8:])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header"):
        Checkpoint.open(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((10**6).to_bytes(8, "little") + good[8:])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated safetensors file"):
        Checkpoint.open(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((2**60).to_bytes(8, "little") + good[8:])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors file"):
        Checkpoint.open(tmp_path)


def test_overlapping_tensors(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    folder = _raw_file(tmp_path, header, 12)
    with pytest.raises(CheckpointError, match=r"corrupt safetensors header \(tensors 'a' and 'b' overlap\)"):
        Checkpoint.open(folder)


def test_shape_contradicting_config(tmp_path):
    config = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_hidden_layers": 4, "vocab_size": 10,
              "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 16, "moe_intermediate_size": 8,
              "num_experts_per_tok": 2}
    name = "model-00002-of-00004.safetensors"
    folder = _folder(tmp_path, {"model.layers.3.mlp.gate.weight": torch.zeros(8, 64)}, config, name=name)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.layers.3.mlp.gate.weight": name}}))
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(folder)
    assert str(err.value) == (f"{folder / name}: tensor 'model.layers.3.mlp.gate.weight' has shape (8, 64) but "
                              f"config.json implies (16, 64)")
    assert len(Checkpoint.open(folder, check_shapes=False)) == 1


def test_shape_contradicting_config_in_a_real_model(sharded):
    cfg = json.loads((sharded / "config.json").read_text())
    cfg["n_routed_experts"] = 8
    (sharded / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.\d.mlp.gate.(weight|e_score_correction_bias)' "
                                              r"has shape \(4,( 32)?\) but config.json implies \(8,( 32)?\)"):
        Checkpoint.open(sharded)


def test_integer_weight_refused(tmp_path):
    _folder(tmp_path, {"model.norm.weight": torch.ones(4, dtype=torch.int32)}, LLAMA)
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' has dtype I32; a floating-point weight "
                                              "was expected"):
        Checkpoint.open(tmp_path)


def test_integer_tensor_the_tables_do_not_know_is_fine(tmp_path):
    _folder(tmp_path, {"model.layers.0.self_attn.rotary.inv_freq_steps": torch.ones(4, dtype=torch.int64)}, LLAMA)
    assert len(Checkpoint.open(tmp_path)) == 1


@pytest.mark.parametrize("dtype,code", [(torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2")])
def test_fp8_without_quantization_config(tmp_path, dtype, code):
    folder = _folder(tmp_path, {"w": torch.ones(4).to(dtype)})
    with pytest.raises(CheckpointError, match=f"{folder / 'model.safetensors'}: tensor 'w' is {code} but config.json "
                                              f"has no quantization_config"):
        Checkpoint.open(folder)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no weights found \\(looked for model.safetensors.index"
                                              f".json, model.safetensors, pytorch_model.bin.index.json, "
                                              f"pytorch_model.bin\\)$"):
        Checkpoint.open(tmp_path)
    save_file({"w": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="found model-00001-of-00002.safetensors but no index"):
        Checkpoint.open(tmp_path)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        Checkpoint.open(tmp_path / "nope")


def test_bad_config_json(tmp_path):
    _folder(tmp_path, {"w": torch.ones(2)})
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        Checkpoint.open(tmp_path)


# -- pickles --------------------------------------------------------------------------------------

def test_pickle_needs_opt_in(tmp_path):
    tensors = {"a": torch.randn(3, 3), "b": torch.arange(4), "s": torch.tensor(2.0, dtype=torch.bfloat16)}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'pytorch_model.bin'}: pickled .bin checkpoint.*convert "
                                              f"the model to safetensors, or opt in with `allow_pickle: true`"):
        Checkpoint.open(tmp_path)
    with Checkpoint.open(tmp_path, allow_pickle=True) as ckpt:
        assert ckpt.info("b").dtype == "I64" and ckpt.info("a").offset == -1 and ckpt.byte_range("a") is None
        for name, t in tensors.items():
            assert _bits(ckpt.read(name)) == _bits(t) and bytes(ckpt.read_bytes(name)) == _bits(t)


def test_sharded_and_legacy_pickles(tmp_path):
    a, b = {"a": torch.randn(2, 3)}, {"b": torch.randn(4).to(torch.bfloat16)}
    torch.save(a, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(b, tmp_path / "pytorch_model-00002-of-00002.bin", _use_new_zipfile_serialization=False)  # no mmap
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    with pytest.raises(CheckpointError, match="pytorch_model-00001-of-00002.bin: pickled .bin checkpoint"):
        Checkpoint.open(tmp_path)
    with Checkpoint.open(tmp_path, allow_pickle=True) as ckpt:
        assert ckpt.names() == ["a", "b"]
        assert torch.equal(ckpt.read("a"), a["a"]) and torch.equal(ckpt.read("b"), b["b"])


def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"a": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot load with weights_only=True"):
        Checkpoint.open(tmp_path, allow_pickle=True)


def test_pickle_that_is_not_a_state_dict(tmp_path):
    torch.save({"a": torch.ones(2), "step": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="entry 'step' is a int, not a tensor"):
        Checkpoint.open(tmp_path, allow_pickle=True)
