"""The smoke test passes on a good merge and names the failed check on a broken one."""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import add_mtp_layer, make_tiny_deepseek, read_index, write_config
from safetensors import safe_open

from zenith_merge.checks.smoke import add_arguments, run_smoke_test
from zenith_merge.cli import main
from zenith_merge.config import load_config
from zenith_merge.errors import ZenithError
from zenith_merge.pipeline import run_merge


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_deepseek):
    tmp = tmp_path_factory.mktemp("smoke")
    cfg = load_config(write_config(tmp, base_model=str(tiny_deepseek), output_dir=str(tmp / "out"),
                                   max_shard_size="30KB"))
    return run_merge(cfg, config_dir=tmp, progress=False).output_dir


@pytest.fixture
def broken(tmp_path, good):
    out = tmp_path / "copy"
    shutil.copytree(good, out)
    return out


def test_good_merge_passes_and_generates(good):
    report = run_smoke_test(good)
    assert report.ok, report.checks
    assert [c.name for c in report.checks] == ["index", "manifest", "planned-tensors", "tensor-names",
                                               "finite", "config-tokenizer", "special-tokens", "loading",
                                               "generate", "thinking", "quality"]
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


def test_an_interrupted_merge_fails_even_with_every_file_there(broken):
    """Killed after the index (or anywhere before the completion record): the manifest says "writing"."""
    from zenith_merge.io.manifest import mark_writing

    mark_writing(broken)
    report = run_smoke_test(broken, generate=False)
    assert "manifest" in report.failed
    assert "not complete: the merge was interrupted" in {c.name: c.detail for c in report.checks}["manifest"]


def test_a_side_file_changed_after_the_merge_fails_manifest(broken):
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))
    report = run_smoke_test(broken, generate=False)
    assert "config.json: sha256 differs" in {c.name: c.detail for c in report.checks}["manifest"]


def test_the_smoke_reports_keep_a_merge_complete(broken):
    from zenith_merge.io.manifest import is_complete

    assert main(["smoke-test", str(broken), "--no-generate"]) == 0
    assert is_complete(broken) and (broken / "report.json").is_file()
    assert run_smoke_test(broken, generate=False).ok  # the reports' new sha256s are recorded


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


def test_quality_streamed_matches_the_model_in_memory(good):
    """Bits per byte of a streamed model (bfloat16, weights read as its modules run) and its sources, beside
    the float32 model loaded whole: the same to within bfloat16's rounding."""
    text = {"code": "def add(a, b):\n    return a + b\n" * 10}
    whole = run_smoke_test(good, texts=text).quality
    streamed = run_smoke_test(good, texts=text, max_memory=60_000).quality
    assert set(streamed) == {"merge", "base"} and streamed["merge"] == streamed["base"]
    assert abs(streamed["merge"]["code"] - whole["merge"]["code"]) < 0.01 * whole["merge"]["code"]


def test_a_model_larger_than_memory_runs_streamed_and_generates_as_loaded(good):
    """Over the cap, transformers' model runs with every weight read from disk as its module runs: the same
    logits as the model loaded whole in bfloat16."""
    from transformers import AutoModelForCausalLM

    from zenith_merge.checks.smoke import greedy, load_model

    model, tok, info = load_model(good, max_memory=60_000)  # less than the 186 kB of float32 weights
    assert model._zenith_load.mode == "stream" and not any(info.values())
    assert all(p.is_meta for n, p in model.named_parameters() if "anchor" not in n)  # nothing resident
    ref = AutoModelForCausalLM.from_pretrained(good, dtype=torch.bfloat16, experts_implementation="eager")
    ref.eval()
    ids = tok("def add(a, b):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    prompt = "def add(a, b):"
    assert greedy(model, tok, prompt, 4, special=True) == greedy(ref, tok, prompt, 4, special=True)


def test_an_architecture_not_streamed_loads_offloaded_by_accelerate(good):
    from zenith_merge.checks.smoke import greedy, load_model, plan_load

    # 80 kB: less than the 186 kB of float32 weights, more than 3 x the largest module (lm_head, 20 kB)
    plan = plan_load(good, 80_000, stream=False)
    model, tok, info = load_model(good, max_memory=80_000, plan=plan)
    assert plan.mode == "offload" and "disk" in set(getattr(model, "hf_device_map", {}).values())
    assert model.dtype == torch.bfloat16
    assert not info["missing_keys"] and greedy(model, tok, "def add(a, b):", 4, special=True)


def test_streamed_smoke_test_generates_in_one_batch(good):
    report = run_smoke_test(good, max_memory=60_000)
    details = {c.name: c.detail for c in report.checks}
    assert report.ok and report.skipped == ["quality"], report.checks  # no text to measure on: nothing else
    assert "streamed from disk" in details["loading"]
    assert "in one batch, 8 new tokens each" in details["generate"]
    assert report.samples


def test_a_cap_below_the_largest_tensor_skips_the_model_checks_with_a_note(good):
    report = run_smoke_test(good, max_memory=5_000)  # the largest tensor but the vocabulary's, 3 kB, twice
    assert report.ok and report.skipped == ["loading", "generate", "thinking", "quality"]
    note = {c.name: c.detail for c in report.checks}["loading"]
    assert note.startswith("skipped: cannot run within max_memory 5 kB: its largest tensor (model.layers.")


def test_a_folder_without_plan_skips_the_plan_checks_and_is_never_written(tmp_path, tiny_deepseek, capsys,
                                                                          monkeypatch):
    """A plain Hugging Face folder (a source model): no manifest, no plan; the reports go elsewhere."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the reports of a folder not a merge go
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tiny_deepseek.iterdir())
    assert main(["smoke-test", str(tiny_deepseek)]) == 0
    out = capsys.readouterr().out
    assert "SKIP  manifest" in out and "SKIP  planned-tensors" in out and "PASS  loading" in out
    report_md = Path(out.split("report: ")[1].split(" (")[0])
    assert report_md.is_file() and report_md.parent.parent == tmp_path
    assert "| manifest | skip |" in report_md.read_text()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tiny_deepseek.iterdir()) == before
    from zenith_merge.checks.smoke import command

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(tiny_deepseek), "--no-generate", "--report", str(tmp_path / "r")])
    assert command(args) == 0
    assert (tmp_path / "r" / "report.json").is_file()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tiny_deepseek.iterdir()) == before


def test_mtp_layer_is_accepted_as_an_extra_layer(tmp_path):
    """A release-style MTP layer (layer num_hidden_layers, not run by transformers) passes loading and names.
    """
    src = add_mtp_layer(make_tiny_deepseek(tmp_path / "src"))
    cfg = load_config(write_config(tmp_path, base_model=str(src), gate_mode="random",
                                   output_dir=str(tmp_path / "out"), experts=[{"source_model": str(src)}]))
    out = run_merge(cfg, config_dir=tmp_path, progress=False).output_dir
    assert main(["smoke-test", str(out), "--no-report"]) == 0
    report = run_smoke_test(out)
    details = {c.name: c.detail for c in report.checks}
    assert report.ok and "of extra layer 3 (not run by transformers)" in details["loading"]
    assert "of extra layer 3" in details["tensor-names"]


def test_an_mtp_tensor_missing_or_misplaced_fails_tensor_names(tmp_path):
    src = add_mtp_layer(make_tiny_deepseek(tmp_path / "src"))
    _drop(src, "model.layers.3.eh_proj.weight")
    report = run_smoke_test(src, generate=False)
    assert report.failed == ["tensor-names"]
    assert "extra layer 3 lacks mtp_eh_proj" in {c.name: c.detail for c in report.checks}["tensor-names"]


def _drop(folder, name):
    """Remove tensor `name` from its shard and from the index."""
    from safetensors.torch import save_file

    index = read_index(folder)
    file = folder / index["weight_map"].pop(name)
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != name}
    save_file(tensors, file, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_a_missing_weight_fails_loading(broken):
    _drop(broken, "model.layers.1.self_attn.o_proj.weight")
    report = run_smoke_test(broken)
    assert "loading" in report.failed and "planned-tensors" in report.failed
    assert "o_proj" in {c.name: c.detail for c in report.checks}["loading"]


def test_fp8_cast_output_passes_without_a_plan_and_is_not_written(tmp_path, capsys, monkeypatch):
    from zenith_merge.demo import ensure_demo

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "reports"))
    (tmp_path / "reports").mkdir()

    out = tmp_path / "bf16"
    assert main(["fp8-cast", str(ensure_demo("zen-tiny-fp8", progress=False)), str(out)]) == 0
    before = sorted(p.name for p in out.rglob("*"))
    capsys.readouterr()
    assert main(["smoke-test", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PASS  manifest" in text and "SKIP  planned-tensors" in text and "PASS  generate" in text
    assert sorted(p.name for p in out.rglob("*")) == before
    assert main(["smoke-test", str(ensure_demo("zen-tiny-fp8", progress=False)), "--no-report"]) == 0  # FP8


def test_finite_streams_in_slabs_and_names_every_offender(broken):
    from zenith_merge.checks.smoke import check_finite

    _rewrite(broken, "model.layers.1.mlp.experts.0.up_proj.weight",
             lambda t: t.index_fill(0, torch.tensor([0, 5]), float("nan")))
    _rewrite(broken, "model.norm.weight", lambda t: t.index_fill(0, torch.tensor([3]), float("inf")))
    with pytest.raises(ZenithError) as err:
        check_finite(broken, slab_bytes=64)  # a few rows per slab: the offending rows are in different slabs
    assert "2 tensors with NaN or Inf values" in str(err.value)
    assert "model.layers.1.mlp.experts.0.up_proj.weight (64 NaN)" in str(err.value)
    assert "model.norm.weight (1 Inf)" in str(err.value)


def test_finite_dequantises_block_fp8_and_names_the_weight_of_a_nan_scale(tmp_path):
    from zenith_merge.demo import ensure_demo

    folder = tmp_path / "fp8"
    shutil.copytree(ensure_demo("zen-tiny-fp8", progress=False), folder)
    scale = sorted(n for n in read_index(folder)["weight_map"] if n.endswith("_scale_inv"))[0]
    _rewrite(folder, scale, lambda s: s.index_fill(1, torch.tensor([0]), float("nan")))  # a column of blocks
    report = run_smoke_test(folder, generate=False)
    assert report.failed == ["manifest", "finite"]  # the shard rewritten: its sha256 changed too
    weight = scale.removesuffix("_scale_inv")
    detail = {c.name: c.detail for c in report.checks}["finite"]
    assert f"1 tensor with NaN or Inf values: {weight} (" in detail
