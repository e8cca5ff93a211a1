"""A merge with only a base rewrites it through reader -> plan -> writer: bit-identical, same logits."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from conftest import read_index, write_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from zenith_merge.cli import main
from zenith_merge.config import load_config
from zenith_merge.errors import CheckpointError, OutputError, PlanError
from zenith_merge.pipeline import run_merge
from zenith_merge.plan.build import build_plan


def _tensors(folder):
    index = read_index(folder)
    out = {}
    for name, file in index["weight_map"].items():
        with safe_open(folder / file, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def _merge(tmp_path, base, **extra):
    cfg_path = write_config(tmp_path, base_model=str(base), output_dir=str(tmp_path / "out"),
                            max_shard_size="30KB", **extra)
    return run_merge(load_config(cfg_path), config_dir=tmp_path, progress=False)


def test_every_tensor_bit_identical(tmp_path, tiny_deepseek):
    result = _merge(tmp_path, tiny_deepseek)
    src, out = _tensors(tiny_deepseek), _tensors(result.output_dir)
    assert src.keys() == out.keys()
    for name in src:
        assert src[name].dtype == out[name].dtype and src[name].shape == out[name].shape, name
        assert torch.equal(src[name].view(torch.uint8), out[name].view(torch.uint8)), name


def test_output_loads_and_gives_the_base_logits(tmp_path, tiny_deepseek):
    result = _merge(tmp_path, tiny_deepseek)
    base = AutoModelForCausalLM.from_pretrained(tiny_deepseek, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(result.output_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(base(ids).logits, merged(ids).logits)


def test_the_completion_record_is_the_last_write_and_lists_every_file(tmp_path, tiny_deepseek):
    result = _merge(tmp_path, tiny_deepseek)
    out = result.output_dir
    manifest = json.loads((out / ".zenith" / "manifest.json").read_text())
    assert manifest["state"] == "complete"
    files = [p for p in out.iterdir() if p.is_file()] + [out / ".zenith" / "plan.json"]
    assert {p.relative_to(out).as_posix() for p in files} <= set(manifest["files"])
    newest = max(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file())
    assert (out / ".zenith" / "manifest.json").stat().st_mtime_ns == newest


def test_resume_removes_the_temporary_files_a_kill_left(tmp_path, tiny_deepseek):
    out = _merge(tmp_path, tiny_deepseek).output_dir
    left = [out / ".zenith" / ".plan.json.tmp", out / ".zenith" / ".routing.json.tmp", out / ".config.json.tmp",
            out / ".zenith" / ".usage.json.tmp-123"]
    for p in left:
        p.write_text("partial")
    run_merge(load_config(tmp_path / "merge.yml"), config_dir=tmp_path, progress=False, resume=True)
    assert not [p for p in left if p.exists()]


def test_nonfinite_weights_are_refused_naming_the_tensor_unless_allowed(tmp_path, tiny_deepseek):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_deepseek, src)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    tensors = load_file(str(shard))
    name = next(n for n, t in tensors.items() if t.is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[:2] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(name)}': 2 NaN/Inf values \(copied from "
                                              rf".*{shard.name}\).*allow_nonfinite: true"):
        _merge(tmp_path, src)
    (tmp_path / "out").rename(tmp_path / "failed")
    result = _merge(tmp_path, src, allow_nonfinite=True)
    assert torch.isnan(_tensors(result.output_dir)[name]).sum() == 2


def test_output_has_several_shards_with_index_written_last(tmp_path, tiny_deepseek):
    result = _merge(tmp_path, tiny_deepseek)
    out = result.output_dir
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    for shard in result.plan.shards:  # the limit bounds tensor bytes; one oversized tensor gets a shard of its own
        assert shard.nbytes <= 30_000 or len(shard.tensors) == 1, shard.filename
    assert (out / "model.safetensors.index.json").stat().st_mtime_ns >= max(s.stat().st_mtime_ns for s in shards)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json", ".zenith/plan.json"):
        assert (out / name).is_file(), name


def test_dtype_conversion_keeps_router_bias_float32(tmp_path, tiny_deepseek):
    result = _merge(tmp_path, tiny_deepseek, dtype="float32")
    out = _tensors(result.output_dir)
    assert out["model.embed_tokens.weight"].dtype == torch.float32
    assert json.loads((result.output_dir / "config.json").read_text())["dtype"] == "float32"
    src = _tensors(tiny_deepseek)
    assert torch.equal(out["model.embed_tokens.weight"], src["model.embed_tokens.weight"].float())


def test_plan_reads_no_weights_and_estimates(tmp_path, tiny_deepseek):
    cfg = load_config(write_config(tmp_path, base_model=str(tiny_deepseek), max_shard_size="30KB"))
    plan = build_plan(cfg, config_dir=tmp_path)
    sizes = sum(f.stat().st_size for f in tiny_deepseek.glob("*.safetensors"))
    assert plan.estimates.tensor_count == len(read_index(tiny_deepseek)["weight_map"])
    assert 0 < plan.estimates.total_bytes < sizes
    assert plan.estimates.peak_memory_bytes > 2 * plan.estimates.largest_tensor_bytes
    assert plan.output_dir == str((tmp_path / "merged_model").resolve())
    assert not (tmp_path / "merged_model").exists()


def test_plan_id_is_stable_and_tracks_content(tmp_path, tiny_deepseek):
    cfg = load_config(write_config(tmp_path, base_model=str(tiny_deepseek), max_shard_size="30KB"))
    a = build_plan(cfg, config_dir=tmp_path)
    b = build_plan(cfg, config_dir=tmp_path, output_dir=tmp_path / "elsewhere")
    c = build_plan(cfg.model_copy(update={"dtype": "float32"}), config_dir=tmp_path)
    assert a.plan_id == b.plan_id != c.plan_id


def test_experts_per_token_larger_than_expert_count(tmp_path, tiny_deepseek):
    cfg = load_config(write_config(tmp_path, base_model=str(tiny_deepseek), experts_per_token=9))
    with pytest.raises(PlanError, match="experts_per_token: 9 is more than the 4 routed experts"):
        build_plan(cfg, config_dir=tmp_path)


def test_refuses_non_empty_output_and_source_folder(tmp_path, tiny_deepseek):
    _merge(tmp_path, tiny_deepseek)
    with pytest.raises(OutputError):
        _merge(tmp_path, tiny_deepseek)
    cfg = load_config(write_config(tmp_path, base_model=str(tiny_deepseek), output_dir=str(tiny_deepseek)))
    with pytest.raises(OutputError):
        run_merge(cfg, config_dir=tmp_path, progress=False, overwrite=True)


def test_source_model_never_modified(tmp_path, tiny_deepseek):
    def digest():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tiny_deepseek.iterdir()) if p.is_file()}

    before = digest()
    _merge(tmp_path, tiny_deepseek)
    assert digest() == before


def test_cli_plan_merge_and_output_override(tmp_path, tiny_deepseek, capsys):
    cfg = write_config(tmp_path, base_model=str(tiny_deepseek), max_shard_size="30KB")
    assert main(["plan", str(cfg), "--output", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "estimated peak memory" in text and "shards" in text and str(tmp_path / "o") in text
    assert main(["merge", str(cfg), "--output", str(tmp_path / "o"), "--dry-run"]) == 0
    assert not (tmp_path / "o").exists()
    assert main(["merge", str(cfg), "--output", str(tmp_path / "o"), "--no-progress"]) == 0
    assert (tmp_path / "o" / "model.safetensors.index.json").is_file()
    assert main(["merge", str(cfg), "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["merge", str(cfg), "--output", str(tmp_path / "o"), "--resume", "--no-progress"]) == 0


def test_cli_user_error_is_one_line_not_a_traceback(tmp_path, capsys):
    cfg = write_config(tmp_path, base_model=str(tmp_path / "missing"))
    assert main(["plan", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "missing" in err


@pytest.mark.parametrize("command", ["plan", "merge", "demo", "update-config", "smoke-test"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: zenith-merge " + command in capsys.readouterr().out


def test_base_listed_among_experts_means_its_own_experts(tmp_path):
    """The flagship lists the base among `experts` by its demo:// reference; that is not a donor."""
    from zenith_merge.plan.sources import resolve_model

    assert resolve_model("demo://zen-tiny", build_demo=False).path.name == "zen-tiny"
    from zenith_merge.demo import demo_dir

    assert resolve_model("demo://zen-tiny", build_demo=False).path == demo_dir() / "zen-tiny"
