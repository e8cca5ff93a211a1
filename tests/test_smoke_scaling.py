"""The smoke test in bounded memory: on a checkpoint of ~650 MB whose largest tensors are its 100 MB
vocabulary matrices (an fp8-cast output, and a merge's block-FP8 output), `smoke-test --max-memory 200MB`
(generation on, the model streamed from disk) peaks at the interpreter's baseline plus less than twice the
largest tensor, not at the model's size; its MTP layer
passes as an extra layer, a missing weight still fails loading and a NaN is named by the streamed finite
check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_deepseek, save_tokenizer, write_config
from safetensors import safe_open
from safetensors.torch import save_file

from zenith_merge.checks.smoke import check_loading, run_smoke_test
from zenith_merge.config import load_config
from zenith_merge.errors import ZenithError
from zenith_merge.pipeline import run_merge

MB = 10**6
VOCAB, HIDDEN = 49152, 1024  # each vocabulary matrix: 49152 x 1024 bf16 = 100.7 MB, the largest tensors
DIMS = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=8192, moe_intermediate_size=1024,
            num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=2, topk_group=1, num_attention_heads=8, num_key_value_heads=8,
            q_lora_rank=384, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
            num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1, pad_token_id=2,
            max_position_embeddings=512, tie_word_embeddings=False)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_wide(folder: Path, *, seed: int = 0, shard_bytes: int = 120 * MB) -> Path:
    """The test checkpoint: the DeepSeek-V3 release layout (zenith_merge.demo.release_layout) at the widths of
    DIMS, in BF16, with a small trained tokenizer."""
    from zenith_merge.demo.release_layout import write_release_checkpoint

    write_release_checkpoint(folder, "deepseek-v3", overrides=DIMS, fp8=False, seed=seed, shard_bytes=shard_bytes,
                             tokenizer=False)
    save_tokenizer(folder)
    return folder


def _edited(src: Path, dst: Path, name: str, edit) -> Path:
    """A copy of `src` (files hard-linked) whose shard holding `name` is rewritten with `edit(tensor)` (None:
    the tensor removed, from the index too)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            os.link(f, dst / f.name)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    file = index["weight_map"][name]
    with safe_open(src / file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    new = edit(tensors.pop(name))
    if new is None:
        del index["weight_map"][name]
        (dst / "model.safetensors.index.json").unlink()
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tensors[name] = new
    (dst / file).unlink()
    save_file(tensors, str(dst / file), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def wide_fp8(tmp_path_factory) -> Path:
    """The test checkpoint in block FP8, as the DeepSeek-V3 release ships."""
    from zenith_merge.demo.release_layout import write_release_checkpoint

    folder = write_release_checkpoint(tmp_path_factory.mktemp("wide-fp8") / "model", "deepseek-v3", overrides=DIMS,
                                      fp8=True, seed=0, shard_bytes=120 * MB, tokenizer=False)
    save_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def wide(wide_fp8, tmp_path_factory) -> Path:
    """The test checkpoint in BF16: `zenith-merge fp8-cast` of wide_fp8 (so the smoke test runs on its output)."""
    from zenith_merge.fp8_cast import fp8_cast

    out = tmp_path_factory.mktemp("wide") / "model"
    fp8_cast(wide_fp8, out, progress=False)
    return out


# the child reports its own peak (VmHWM): its ru_maxrss would include the RSS of the parent it was forked from
_CHILD = ("import atexit, re, runpy, sys\n"
          "atexit.register(lambda: print('peak-rss-kb', re.search(r'VmHWM:\\s+(\\d+)', "
          "open('/proc/self/status').read()).group(1)))\n"
          "sys.argv = ['zenith_merge.checks.smoke', *sys.argv[1:]]\n"
          "runpy.run_module('zenith_merge.checks.smoke', run_name='__main__')\n")


def _smoke_in_child(folder: Path, report: Path, *extra: str) -> tuple[int, int, str]:
    """(exit status, peak RSS in bytes, output) of `python -m zenith_merge.checks.smoke` in a child process."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(folder), "--report", str(report), *extra],
                          capture_output=True, env=ENV, text=True)
    out = proc.stdout + proc.stderr
    peak = int(proc.stdout.rsplit("peak-rss-kb ", 1)[1].split()[0]) * 1024
    return proc.returncode, peak, out


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> int:
    """The smoke test's peak RSS on the same code paths with negligible weights (a tiny DeepSeek-V3)."""
    root = tmp_path_factory.mktemp("baseline")
    status, peak, out = _smoke_in_child(make_tiny_deepseek(root / "tiny"), root / "tiny-report")
    assert status == 0, out
    return peak


@pytest.mark.parametrize("subject", ["fp8-cast output", "fp8 merge output"])
def test_smoke_test_peak_rss_is_the_baseline_plus_less_than_twice_the_largest_tensor(wide, wide_fp8, baseline,
                                                                                      tmp_path, subject):
    """On an fp8-cast output (BF16) and on a merge's block-FP8 output (the FP8 checkpoint with its MTP layer,
    written by `zenith-merge merge` with fp8_output), under a 200 MB cap."""
    from zenith_merge.checks.smoke_model import plan_load

    if subject == "fp8 merge output":
        cfg = write_config(tmp_path, base_model=str(wide_fp8), experts=[{"source_model": str(wide_fp8)}],
                           fp8_output=True, gate_mode="random", routing_report=False,
                           output_dir=str(tmp_path / "merged"))
        wide = run_merge(load_config(cfg), config_dir=tmp_path, progress=False).output_dir
        assert json.loads((wide / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    plan = plan_load(wide, 200 * MB)
    largest = VOCAB * HIDDEN * 2  # the vocabulary matrices: read by rows (embedding) and slabs (head)
    assert plan.mode == "stream" and plan.float32_bytes > 3 * largest and plan.stream_bytes < largest
    status, peak, out = _smoke_in_child(wide, tmp_path / "report", "--max-memory", "200MB")
    assert status == 0, out
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    checks = {c["name"]: c for c in data["checks"]}
    ran = ("finite", "loading", "generate", "thinking")
    assert all(checks[n]["ok"] and not checks[n]["skipped"] for n in ran)
    assert "streamed from disk" in checks["loading"]["detail"] and data["samples"]
    assert "of extra layer 3 (not run by transformers)" in checks["loading"]["detail"]  # the MTP layer
    # the weights loaded whole would add about plan.float32_bytes (BF16 one: ~750 MB; measured +1.0 GB)
    assert peak - baseline < 2 * largest, (peak / MB, baseline / MB)
    assert not any(p.name.startswith("report") for p in wide.iterdir())  # the report goes where it is told


def test_a_missing_weight_still_fails_loading(wide, tmp_path):
    name = "model.layers.1.mlp.shared_experts.down_proj.weight"
    folder = _edited(wide, tmp_path / "missing", name, lambda t: None)
    with pytest.raises(ZenithError, match=r"1 weights missing: model\.layers\.1\.mlp\.shared_experts\.down"):
        check_loading(folder, {}, 200 * MB)


def test_nan_in_one_tensor_is_named(wide, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    folder = _edited(wide, tmp_path / "nan", name,
                     lambda t: t.index_fill(0, torch.tensor([HIDDEN - 1]), float("nan")))
    report = run_smoke_test(folder, generate=False)
    assert report.failed == ["finite"]
    detail = {c.name: c.detail for c in report.checks}["finite"]
    assert detail == f"1 tensor with NaN or Inf values: {name} (8192 NaN)"


def test_release_layout_fp8_checkpoint_runs_streamed_exactly_as_transformers_loads_it():
    """DeepSeek-V3 as released (block FP8 with scales in other shards, the MTP layer, YaRN RoPE, the release
    vocabulary and tokenizer, custom-code files): the smoke test passes streamed, and the streamed model's
    logits are the ones transformers computes from the model loaded whole."""
    release_layout = pytest.importorskip("zenith_merge.demo.release_layout")
    from transformers import AutoModelForCausalLM

    from zenith_merge.checks.smoke import load_model
    from zenith_merge.forward.loading import block_fp8_loaded_as_read

    folder = release_layout.release_fixture("deepseek-v3-fp8-small")
    report = run_smoke_test(folder, max_memory=100 * MB)
    details = {c.name: c.detail for c in report.checks}
    assert report.ok and report.skipped == ["manifest", "planned-tensors", "quality"], report.checks
    assert "streamed from disk" in details["loading"]
    assert "of extra layer 2 (not run by transformers)" in details["loading"]
    model, tok, info = load_model(folder, max_memory=100 * MB)
    with block_fp8_loaded_as_read(folder):
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                   experts_implementation="eager")
    ids = tok("def fibonacci(n):\n    return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref.eval()(ids).logits)
