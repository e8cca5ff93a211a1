"""update-config: the output's config.json follows its plan and tokenizer, idempotently; --check reports drift."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config

from zenith_merge.config import load_config
from zenith_merge.pipeline import run_merge
from zenith_merge.pipeline.output_config import patch_output

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def merged(tmp_path, tiny_deepseek):
    cfg = load_config(write_config(tmp_path, base_model=str(tiny_deepseek), output_dir=str(tmp_path / "out"),
                                   experts_per_token=3))
    return run_merge(cfg, config_dir=tmp_path, progress=False).output_dir


def _config(out):
    return json.loads((out / "config.json").read_text())


def test_fresh_merge_has_no_drift(merged):
    assert _config(merged)["num_experts_per_tok"] == 3
    assert patch_output(merged, check=True) == []


def test_drift_is_reported_then_repaired_idempotently(merged):
    cfg = _config(merged)
    cfg.update(num_experts_per_tok=1, n_routed_experts=99, eos_token_id=5, architectures=["LlamaForCausalLM"])
    (merged / "config.json").write_text(json.dumps(cfg))
    drift = patch_output(merged, check=True)
    assert {d.key for d in drift} >= {"num_experts_per_tok", "n_routed_experts", "eos_token_id", "architectures"}
    assert _config(merged)["n_routed_experts"] == 99  # --check writes nothing
    assert patch_output(merged)
    fixed = _config(merged)
    assert (fixed["num_experts_per_tok"], fixed["n_routed_experts"], fixed["eos_token_id"]) == (3, 4, 1)
    assert patch_output(merged) == [] and patch_output(merged, check=True) == []


def test_special_token_ids_come_from_the_tokenizer(merged):
    tok_cfg = json.loads((merged / "tokenizer_config.json").read_text())
    tok_cfg["eos_token"] = "<pad>"  # the tokenizer now says eos is id 2
    (merged / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    patch_output(merged)
    assert _config(merged)["eos_token_id"] == 2
    gen = json.loads((merged / "generation_config.json").read_text())
    assert 2 in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])


def test_script_check_exit_codes(merged):
    script = [sys.executable, str(ROOT / "merge" / "update_config.py"), str(merged)]
    assert subprocess.run([*script, "--check"], capture_output=True).returncode == 0
    cfg = _config(merged)
    cfg["vocab_size"] = 7
    (merged / "config.json").write_text(json.dumps(cfg))
    res = subprocess.run([*script, "--check"], capture_output=True, text=True)
    assert res.returncode == 1 and "vocab_size is 7" in res.stdout
    assert subprocess.run(script, capture_output=True).returncode == 0
    assert _config(merged)["vocab_size"] == 320
