"""The lazy reader: bit-exact reads, and each refusal naming the file and tensor at fault."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zenith_merge.errors import CheckpointError
from zenith_merge.io.reader import Checkpoint

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8, torch.bool,
          torch.float8_e4m3fn]


def _folder(tmp_path, tensors, config=None, name="model.safetensors"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, tmp_path / name, metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config or {}))
    return tmp_path


def test_every_dtype_round_trips_bit_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": (torch.randn(3, 5, generator=g) * 4).to(d) for i, d in enumerate(DTYPES)}
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(3.5)
    folder = _folder(tmp_path, tensors, {"quantization_config": {"quant_method": "fp8"}})
    with Checkpoint.open(folder) as ckpt, safe_open(folder / "model.safetensors", "pt") as ref:
        assert set(ckpt.names()) == set(tensors)
        for name in tensors:
            got, want = ckpt.read(name), ref.get_tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape
            raw = want.reshape(-1).view(torch.uint8)
            assert torch.equal(got.reshape(-1).view(torch.uint8), raw)
            assert bytes(ckpt.read_bytes(name)) == raw.numpy().tobytes()


def test_sharded_real_model(tiny_deepseek):
    index = json.loads((tiny_deepseek / "model.safetensors.index.json").read_text())
    with Checkpoint.open(tiny_deepseek) as ckpt:
        assert len(ckpt.files()) >= 3 and set(ckpt.names()) == set(index["weight_map"])
        for name, file in index["weight_map"].items():
            with safe_open(tiny_deepseek / file, "pt") as f:
                assert torch.equal(ckpt.read(name), f.get_tensor(name))


def test_reads_do_not_alias_the_file(tmp_path):
    folder = _folder(tmp_path, {"w": torch.ones(4)})
    with Checkpoint.open(folder) as ckpt:
        t = ckpt.read("w")
        t += 1
        assert torch.equal(ckpt.read("w"), torch.ones(4))


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
    with pytest.raises(CheckpointError, match="points outside the model folder"):
        Checkpoint.open(sharded)


def test_index_entry_symlink_outside_folder(sharded, tmp_path):
    index = _index(sharded)
    target = tmp_path / "elsewhere.safetensors"
    shutil.copy(sharded / index["weight_map"]["model.norm.weight"], target)
    (sharded / "link.safetensors").symlink_to(target)
    index["weight_map"] = {k: ("link.safetensors" if v == index["weight_map"]["model.norm.weight"] else v)
                           for k, v in index["weight_map"].items()}
    _set_index(sharded, index)
    with pytest.raises(CheckpointError, match="is a link to .* outside the model folder"):
        Checkpoint.open(sharded)


def test_missing_shard(sharded):
    file = _index(sharded)["weight_map"]["model.norm.weight"]
    (sharded / file).unlink()
    with pytest.raises(CheckpointError, match=f"shard '{file}' named in model.safetensors.index.json is missing"):
        Checkpoint.open(sharded)


def test_index_and_shard_disagree(sharded):
    index = _index(sharded)
    del index["weight_map"]["model.norm.weight"]
    _set_index(sharded, index)
    with pytest.raises(CheckpointError, match="'model.norm.weight' is not listed in model.safetensors.index.json"):
        Checkpoint.open(sharded)
    index["weight_map"]["model.ghost.weight"] = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.norm.weight"] = index["weight_map"]["model.ghost.weight"]
    _set_index(sharded, index)
    with pytest.raises(CheckpointError, match="model.norm.weight|model.ghost.weight"):
        Checkpoint.open(sharded)


def test_truncated_file(sharded):
    file = sharded / _index(sharded)["weight_map"]["lm_head.weight"]
    data = file.read_bytes()
    file.write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match=f"{file.name}: truncated file: tensor '.*' ends at byte"):
        Checkpoint.open(sharded)
    file.write_bytes(data[:6])
    with pytest.raises(CheckpointError, match=f"{file.name}: truncated safetensors file"):
        Checkpoint.open(sharded)


@pytest.mark.parametrize("garbage", [b"{not json", b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 7]}}',
                                     b'{"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}'])
def test_corrupt_header(tmp_path, garbage):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(len(garbage).to_bytes(8, "little") + garbage + bytes(64))
    with pytest.raises(CheckpointError, match="model.safetensors: (corrupt|tensor 'w' has unknown dtype)"):
        Checkpoint.open(tmp_path)


def test_header_length_beyond_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        Checkpoint.open(tmp_path)


def test_overlapping_tensors(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    with pytest.raises(CheckpointError, match="overlap"):
        Checkpoint.open(tmp_path)


def test_shape_contradicting_config(sharded):
    cfg = json.loads((sharded / "config.json").read_text())
    cfg["n_routed_experts"] = 8
    (sharded / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.mlp.gate.(weight|e_score_correction_bias)' has shape \(4,( 32)?\) but config.json implies \(8,( 32)?\)"):
        Checkpoint.open(sharded)
    assert len(Checkpoint.open(sharded, check_shapes=False)) > 0


def test_integer_weight_refused(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4, "num_hidden_layers": 1, "vocab_size": 3,
              "num_attention_heads": 1}
    _folder(tmp_path, {"model.norm.weight": torch.ones(4, dtype=torch.int32)}, config)
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype I32; a floating-point weight was expected"):
        Checkpoint.open(tmp_path)


def test_fp8_without_quantization_config(tmp_path):
    _folder(tmp_path, {"w": torch.ones(4).to(torch.float8_e4m3fn)})
    with pytest.raises(CheckpointError, match="'w' is F8_E4M3 but config.json has no quantization_config"):
        Checkpoint.open(tmp_path)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        Checkpoint.open(tmp_path)


def test_pickle_needs_opt_in(tmp_path):
    tensors = {"a": torch.randn(3, 3), "b": torch.arange(4)}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickled .bin checkpoint.*allow_pickle"):
        Checkpoint.open(tmp_path)
    with Checkpoint.open(tmp_path, allow_pickle=True) as ckpt:
        assert torch.equal(ckpt.read("a"), tensors["a"]) and ckpt.info("b").dtype == "I64"
        assert bytes(ckpt.read_bytes("a")) == tensors["a"].numpy().tobytes()


def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"a": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot load with weights_only"):
        Checkpoint.open(tmp_path, allow_pickle=True)
