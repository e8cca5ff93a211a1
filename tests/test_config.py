"""The merge config: mergekit-moe's keys accepted unchanged, our keys validated, errors naming the key path."""

from pathlib import Path

import pytest
import yaml
from mergekit.moe.config import MoEMergeConfig

from zenith_merge.config import load_config, parse_byte_size, parse_config
from zenith_merge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "merge" / "config.yml", *sorted((ROOT / "merge" / "examples").glob("*.yml"))]
ZENITH_KEYS = {"output_dir", "max_shard_size", "load_in_8bit", "workers", "backend", "allow_pickle", "seed", "tokenizer",
               "merge_method", "align", "assembly"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.base_model.startswith("demo://")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_mergekit_moe_syntax(path):
    """Less our own keys, every shipped config is a valid mergekit-moe (or mergekit-yaml) config as mergekit
    itself parses it."""
    from mergekit.config import MergeConfiguration

    from zenith_merge.config.mergekit_yaml import ZENITH_KEYS as YAML_ZENITH_KEYS
    from zenith_merge.config.mergekit_yaml import is_mergekit_yaml

    data = yaml.safe_load(path.read_text())
    if is_mergekit_yaml(data):
        parsed = MergeConfiguration.model_validate({k: v for k, v in data.items() if k not in YAML_ZENITH_KEYS})
        assert parsed.merge_method == data["merge_method"] and len(parsed.models) == len(data["models"])
        return
    mk = {k: v for k, v in data.items() if k not in ZENITH_KEYS}
    for e in mk.get("experts", []):
        e.pop("keep", None)
        e.pop("shared_expert", None)
    parsed = MoEMergeConfig.model_validate(mk)
    assert parsed.base_model is not None and len(parsed.experts) == len(data.get("experts", []))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_start_with_their_command(path):
    head = path.read_text().splitlines()[:8]
    assert any("bash merge/run_merge.sh" in line for line in head)


def test_flagship_has_base_and_donor_with_thinking_prompts():
    cfg = load_config(ROOT / "merge" / "config.yml")
    sources = [e.source_model for e in cfg.experts]
    assert sources == ["demo://zen-tiny", "demo://qwen3-moe-tiny"]
    assert any(p.startswith("/think") for p in cfg.experts[1].positive_prompts)
    assert cfg.tokenizer.source == "union" and not cfg.tokenizer.donor_merges and not cfg.tokenizer.protect


def test_protect_without_donor_merges_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("base_model: demo://zen-tiny\ngate_mode: random\nexperts: [{source_model: demo://qwen3-moe-tiny}]\n"
                    "tokenizer: {source: union, protect: [demo:code]}\n")
    with pytest.raises(ConfigError, match=r"(?s)tokenizer: protect: .*donor_merges: true"):
        load_config(path)
    path.write_text(path.read_text().replace("protect:", "donor_merges: true, protect:"))
    assert load_config(path).tokenizer.protect == ["demo:code"]


def test_assembly_needs_one_weight_per_expert_and_a_default():
    base = {"base_model": "/m", "gate_mode": "random", "merge_method": "assembly",
            "experts": [{"source_model": "/m"}, {"source_model": "/n"}]}
    assert "assembly: merge_method assembly needs assembly.weights" in _error(base)
    assert "assembly.weights.default: required" in _error({**base, "assembly": {"weights": {"router": [1, 0]}}})
    msg = _error({**base, "assembly": {"weights": {"default": [1, 0], "routed_experts": [1]}}})
    assert "assembly.weights.routed_experts: 1 weights for 2 experts[] entries" in msg
    msg = _error({**base, "assembly": {"weights": {"default": [1, 0], "experts": [0, 1]}}})
    assert "assembly.weights: unknown tensor class 'experts'" in msg
    assert "assembly: only used with merge_method: assembly" in _error(
        {**base, "merge_method": "concat", "assembly": {"weights": {"default": [1, 0]}}})


def _error(data) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(data, where="cfg.yml")
    return str(err.value)


def test_unknown_key_is_named_with_its_path():
    msg = _error({"base_model": "/m", "experts": [{"source_model": "/m", "positve_prompts": ["x"]}]})
    assert "experts.0.positve_prompts: unknown key" in msg


def test_bad_value_names_path_and_value():
    msg = _error({"base_model": "/m", "gate_mode": "random", "experts": [{"source_model": "/a"}, {"source_model": "/b", "keep": 0}]})
    assert "experts.1.keep" in msg and "0" in msg


def test_missing_required_key():
    assert "base_model: Field required" in _error({"experts": []})


def test_bad_gate_mode_lists_choices():
    msg = _error({"base_model": "/m", "gate_mode": "magic"})
    assert "gate_mode" in msg and "'magic'" in msg and "hidden" in msg


def test_unknown_demo_model_lists_demo_models():
    msg = _error({"base_model": "demo://gpt5-tiny"})
    assert "base_model" in msg and "zen-tiny" in msg


def test_remote_references_are_refused():
    assert "nothing is downloaded" in _error({"base_model": "hf://deepseek-ai/DeepSeek-V3"})


def test_unknown_architecture_lists_supported():
    msg = _error({"base_model": "/m", "architecture": "falcon"})
    assert "architecture" in msg and "DeepseekV3ForCausalLM" in msg and "Qwen3MoeForCausalLM" in msg


def test_hidden_gate_needs_prompts():
    msg = _error({"base_model": "/m", "experts": [{"source_model": "/a"}]})
    assert "experts.0.positive_prompts" in msg


def test_slerp_factor_range():
    assert "tokenizer.slerp_t" in _error({"base_model": "/m", "tokenizer": {"slerp_t": 1.5}})


def test_top_level_must_be_a_mapping():
    assert "mapping" in _error(["base_model"])


def test_yaml_syntax_error_names_file(tmp_path):
    p = tmp_path / "broken.yml"
    p.write_text("base_model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yml: not valid YAML"):
        load_config(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yml")


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("4GiB", 4 * 2**30),
                                           ("2.5gb", 2_500_000_000), (1234, 1234), ("100", 100)])
def test_byte_sizes(text, expected):
    assert parse_byte_size(text) == expected


@pytest.mark.parametrize("bad", ["-1GB", "5 parameters", 0, True, "GB"])
def test_bad_byte_sizes(bad):
    with pytest.raises(ValueError):
        parse_byte_size(bad)


def test_a_config_with_thousands_of_bad_values_gives_one_readable_message(tmp_path):
    """From fuzzing: a list of 60,000 bad values gave a 4.6 MB message; it is the first 20 problems and a count."""
    path = tmp_path / "c.yml"
    path.write_text("base_model: demo://zen-tiny\nexperts:\n" + "  - source_model: 7\n" * 60_000)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert len(text) < 3000 and "... and 59980 more problems" in text and "experts.0.source_model" in text
