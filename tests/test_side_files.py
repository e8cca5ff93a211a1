"""Release side files: the custom code `auto_map` names, generation config, tokenizer and chat template are
carried from the base (the union's tokenizer where it applies), byte for byte, and the model card lists them;
a custom-code file the config names but the base lacks is refused at plan time, naming the file and key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_tiny_deepseek, make_tiny_qwen3_moe, save_tokenizer, write_config

from zenith_merge.cli import main
from zenith_merge.config import load_config
from zenith_merge.errors import PlanError
from zenith_merge.plan.build import build_plan
from zenith_merge.plan.models import UNION_SIDE_FILES
from zenith_merge.plan.sources import custom_code_files

# As DeepSeek-V3's release config.json has it.
AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
CONFIGURATION = '''"""A stand-in for the release's configuration_deepseek.py."""
from transformers import PretrainedConfig


class DeepseekV3Config(PretrainedConfig):
    model_type = "deepseek_v3"
'''
MODELING = '''"""A stand-in for the release's modeling_deepseek.py."""
from torch import nn

from .configuration_deepseek import DeepseekV3Config
from .rope_utils import rotate_half  # a module of the folder no auto_map entry names


class DeepseekV3Model(nn.Module):
    config_class = DeepseekV3Config


class DeepseekV3ForCausalLM(DeepseekV3Model):
    pass
'''
ROPE = "def rotate_half(x):\n    return x\n"
CUSTOM_CODE = ("configuration_deepseek.py", "modeling_deepseek.py", "rope_utils.py")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
DONOR_TEXT = ["Solve 12 * 7 step by step: 10 * 7 = 70, 2 * 7 = 14, total 84.\n", "fire and brimstone\n"] * 20


def _release(folder: Path, auto_map: dict = AUTO_MAP) -> Path:
    """A tiny DeepseekV3 folder laid out like the DeepSeek-V3 release: auto_map in config.json, the custom
    code beside it, and a script of the release that nothing names."""
    make_tiny_deepseek(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}, indent=2))
    for name, text in zip(CUSTOM_CODE, (CONFIGURATION, MODELING, ROPE)):
        (folder / name).write_text(text)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "fp8_cast_bf16.py").write_text("# a release script, not named by auto_map\n")
    return folder


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """Read-only: tests that change it copy it first."""
    return _release(tmp_path_factory.mktemp("side-files") / "DeepSeek-V3")


def _card_rows(out: Path) -> dict[str, str]:
    card = (out / "README.md").read_text()
    section = card.split("## Files", 1)[1].split("\n## ", 1)[0]
    return {line.split("`")[1]: line for line in section.splitlines() if line.startswith("| `")}


def test_a_passthrough_merge_carries_the_custom_code_byte_for_byte_and_lists_it(release, tmp_path):
    cfg = write_config(tmp_path, base_model=str(release),
                       experts=[{"source_model": str(release), "positive_prompts": ["def main():"]}])
    out = tmp_path / "out"
    assert main(["merge", str(cfg), "--output", str(out), "--no-progress"]) == 0
    plan = json.loads((out / ".zenith" / "plan.json").read_text())
    assert plan["side_files"] == {name: "base" for name in (*CUSTOM_CODE, *TOKENIZER, "generation_config.json")}
    for name in plan["side_files"]:
        assert (out / name).read_bytes() == (release / name).read_bytes(), name
    assert not (out / "fp8_cast_bf16.py").exists()  # only what auto_map (and its imports) name
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP
    rows = _card_rows(out)
    assert rows.keys() == plan["side_files"].keys()
    for name in CUSTOM_CODE:
        assert "custom code" in rows[name] and f"base (`{release}`)" in rows[name]
    assert "generation defaults" in rows["generation_config.json"] and "tokenizer" in rows["tokenizer.json"]
    assert "chat template" in rows["chat_template.jinja"]
    assert not list(out.glob(".*.tmp"))


def test_with_the_union_tokenizer_the_tokenizer_is_the_unions_and_the_custom_code_the_bases(release, tmp_path):
    donor = make_tiny_qwen3_moe(tmp_path / "donor", seed=1, tie_word_embeddings=True)
    save_tokenizer(donor, vocab_size=290, specials=("<|im_start|>", "<|im_end|>"), text=DONOR_TEXT)
    cfg = write_config(tmp_path, base_model=str(release), gate_mode="random", tokenizer={"source": "union"},
                       experts=[{"source_model": str(release), "positive_prompts": ["def add(a, b):"]},
                                {"source_model": str(donor), "positive_prompts": DONOR_TEXT[:2]}])
    out = tmp_path / "out"
    assert main(["merge", str(cfg), "--output", str(out), "--no-progress"]) == 0
    sides = json.loads((out / ".zenith" / "plan.json").read_text())["side_files"]
    assert {n: k for n, k in sides.items() if k == "base"} == dict.fromkeys(CUSTOM_CODE, "base")
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        n for n, k in sides.items() if k == UNION_SIDE_FILES}
    for name in CUSTOM_CODE:
        assert (out / name).read_bytes() == (release / name).read_bytes(), name
    union = out / ".zenith" / "tokenizer"
    assert (out / "tokenizer.json").read_bytes() == (union / "tokenizer.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() != (release / "tokenizer.json").read_bytes()
    rows = _card_rows(out)
    assert "union tokenizer" in rows["tokenizer.json"] and f"base (`{release}`)" in rows["modeling_deepseek.py"]


def test_a_custom_code_file_named_but_absent_is_refused_at_plan_time(release, tmp_path, capsys):
    base = tmp_path / "release"
    shutil.copytree(release, base)
    (base / "modeling_deepseek.py").unlink()
    cfg = write_config(tmp_path, base_model=str(base))
    with pytest.raises(PlanError, match=r"modeling_deepseek\.py.*auto_map\.AutoModel\b.*config\.json"):
        build_plan(load_config(cfg), config_dir=tmp_path)
    out = tmp_path / "out"
    assert main(["merge", str(cfg), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "modeling_deepseek.py" in err and "auto_map.AutoModel" in err and "remove that entry" in err
    assert not (out / "model.safetensors.index.json").exists()


def test_a_module_imported_by_the_custom_code_but_absent_is_refused_naming_the_importer(release, tmp_path):
    base = tmp_path / "release"
    shutil.copytree(release, base)
    (base / "rope_utils.py").unlink()
    with pytest.raises(PlanError, match=r"rope_utils\.py.*relative import in modeling_deepseek\.py"):
        build_plan(load_config(write_config(tmp_path, base_model=str(base))), config_dir=tmp_path)


def test_auto_map_forms_lists_remote_references_and_the_tokenizer_config(tmp_path, caplog):
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("configuration_x.py", "tokenization_x.py", "tokenization_x_fast.py", "helpers.py"):
        (folder / name).write_text("import os\nfrom . import nothing\n")
    (folder / "tokenization_x.py").write_text("from .helpers import f\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}}))
    config = {"auto_map": {"AutoConfig": "configuration_x.XConfig",
                           "AutoTokenizer": [None, "tokenization_x_fast.XTokenizerFast"],
                           "AutoModel": "someone/other-repo--modeling_y.YModel"}}
    with caplog.at_level("INFO", logger="zenith_merge.plan.sources"):
        files = custom_code_files(folder, config)
    assert files == ["configuration_x.py", "helpers.py", "tokenization_x.py", "tokenization_x_fast.py"]
    assert "someone/other-repo--modeling_y.YModel" in caplog.text and "not carried" in caplog.text
    assert custom_code_files(folder, {}) == ["helpers.py", "tokenization_x.py"]  # the tokenizer's own
    for bad in ("../secrets.X", "noclass"):
        with pytest.raises(PlanError, match=r"auto_map\.AutoConfig .*not a module\.Class reference"):
            custom_code_files(folder, {"auto_map": {"AutoConfig": bad}})
