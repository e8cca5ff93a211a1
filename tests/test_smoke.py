"""The smoke test passes on a good merge and names the failed check on a broken one."""

import json
import shutil

import pytest
import torch
from conftest import read_index, write_config
from safetensors import safe_open

from zenith_merge.cli import main
from zenith_merge.config import load_config
from zenith_merge.pipeline import run_merge
from zenith_merge.smoke import run_smoke_test


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_deepseek):
    tmp = tmp_path_factory.mktemp("smoke")
    cfg = load_config(write_config(tmp, base_model=str(tiny_deepseek), output_dir=str(tmp / "out"), max_shard_size="30KB"))
    return run_merge(cfg, config_dir=tmp, progress=False).output_dir


@pytest.fixture
def broken(tmp_path, good):
    out = tmp_path / "copy"
    shutil.copytree(good, out)
    return out


def test_good_merge_passes_and_generates(good):
    report = run_smoke_test(good)
    assert report.ok, report.checks
    assert [c.name for c in report.checks] == ["index", "manifest", "planned-tensors", "finite", "config-tokenizer",
                                               "special-tokens", "loading", "generate", "thinking", "quality"]
    assert report.samples


def test_deleted_shard_fails_index(broken):
    file = sorted(broken.glob("model-*.safetensors"))[1]
    file.unlink()
    report = run_smoke_test(broken, generate=False)
    assert report.failed == ["index"] and file.name in report.checks[0].detail


def test_corrupted_byte_fails_manifest(broken):
    file = sorted(broken.glob("model-*.safetensors"))[0]
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))
    report = run_smoke_test(broken, generate=False)
    assert "manifest" in report.failed and file.name in {c.name: c.detail for c in report.checks}["manifest"]


def test_nan_fails_finite(broken):
    from safetensors.torch import save_file

    weight_map = read_index(broken)["weight_map"]
    file = broken / weight_map["model.norm.weight"]
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    report = run_smoke_test(broken, generate=False)
    assert "finite" in report.failed
    assert "model.norm.weight" in {c.name: c.detail for c in report.checks}["finite"]


def test_vocab_disagreement_fails_config_tokenizer(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["vocab_size"] = 50
    (broken / "config.json").write_text(json.dumps(cfg))
    report = run_smoke_test(broken, generate=False)
    assert "config-tokenizer" in report.failed


def test_cli_exit_code_names_failure(broken, capsys):
    (broken / ".zenith" / "manifest.json").unlink()
    assert main(["smoke-test", str(broken), "--no-generate"]) == 1
    assert "FAILED: manifest" in capsys.readouterr().out


def test_wrong_dtype_fails_planned_tensors(broken):
    from safetensors.torch import save_file

    weight_map = read_index(broken)["weight_map"]
    file = broken / weight_map["model.norm.weight"]
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float16)
    save_file(tensors, file, metadata={"format": "pt"})
    assert "planned-tensors" in run_smoke_test(broken, generate=False).failed


def _rewrite(folder, name, edit):
    from safetensors.torch import save_file

    file = folder / read_index(folder)["weight_map"][name]
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = edit(tensors[name])
    save_file(tensors, file, metadata={"format": "pt"})


def test_wrong_shape_fails_planned_tensors(broken):
    _rewrite(broken, "model.norm.weight", lambda t: t[:-1].clone())
    report = run_smoke_test(broken, generate=False)
    assert "planned-tensors" in report.failed
    assert "model.norm.weight" in {c.name: c.detail for c in report.checks}["planned-tensors"]


def test_missing_special_token_fails_special_tokens(broken):
    data = json.loads((broken / "tokenizer.json").read_text())
    data["added_tokens"] = [a for a in data["added_tokens"] if a["content"] != "</s>"]
    data["model"]["vocab"].pop("</s>", None)
    (broken / "tokenizer.json").write_text(json.dumps(data))
    report = run_smoke_test(broken, generate=False)
    assert "special-tokens" in report.failed
    assert "'</s>'" in {c.name: c.detail for c in report.checks}["special-tokens"]


def test_an_extra_weight_fails_loading(broken):
    """A tensor the model does not use: transformers' loading report names it."""
    from safetensors.torch import save_file

    extra = broken / "extra.safetensors"
    save_file({"model.layers.0.mlp.surplus.weight": torch.ones(2)}, str(extra), metadata={"format": "pt"})
    index = read_index(broken)
    index["weight_map"]["model.layers.0.mlp.surplus.weight"] = "extra.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    report = run_smoke_test(broken)
    assert "loading" in report.failed
    assert "surplus" in {c.name: c.detail for c in report.checks}["loading"]


def test_cli_writes_report_json_and_md(good, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(good, out)
    assert main(["smoke-test", str(out), "--no-generate"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["ok"] and [c["name"] for c in data["checks"]][:2] == ["index", "manifest"]
    md = (out / "report.md").read_text()
    assert "| special-tokens | pass |" in md
    assert "## Smoke test" in (out / "README.md").read_text()


def test_quality_is_measured_on_given_text_for_the_merge_and_its_sources(good, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 10)
    report = run_smoke_test(good, texts={"code": text.read_text()})
    assert set(report.quality) == {"merge", "base"} and report.quality["merge"]["code"] > 0
    assert report.quality["merge"]["code"] == report.quality["base"]["code"]  # a passthrough: the base itself


def test_a_model_larger_than_memory_loads_offloaded_and_generates(good):
    from zenith_merge.smoke import greedy, load_model

    model, tok, info = load_model(good, max_memory=20_000)  # far less than the weights: accelerate offloads
    assert "disk" in set(getattr(model, "hf_device_map", {}).values())
    assert not info["missing_keys"] and greedy(model, tok, "def add(a, b):", 4, special=True)
