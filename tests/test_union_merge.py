"""Merges with a union vocabulary on tiny models: rows as the token map says, tied and untied embeddings,
the `tokenizer` command, resume, and the errors that name the token or file at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_deepseek, make_tiny_qwen3_moe, save_tokenizer, tensors_of, write_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from zenith_merge.cli import main
from zenith_merge.config import load_config
from zenith_merge.errors import ConfigError, PlanError
from zenith_merge.pipeline import run_merge
from zenith_merge.plan.build import build_plan
from zenith_merge.vocab.rows import NormStats, match_norms, slerp
from zenith_merge.vocab.token_map import TokenMap

DONOR_TEXT = ["Solve 12 * 7 step by step: 10 * 7 = 70, 2 * 7 = 14, total 84.\n", "fire and brimstone\n"] * 20
SPECIALS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")


def _donor_tokenizer(folder: Path) -> Path:
    save_tokenizer(folder, vocab_size=290, specials=SPECIALS, text=DONOR_TEXT)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("union")
    base = make_tiny_deepseek(root / "base")
    donor = _donor_tokenizer(make_tiny_qwen3_moe(root / "donor", seed=1, tie_word_embeddings=True))
    tied_base = make_tiny_qwen3_moe(root / "tied-base", seed=2, tie_word_embeddings=True)
    untied_donor = _donor_tokenizer(make_tiny_deepseek(root / "untied-donor", seed=3))
    return {"base": base, "donor": donor, "tied_base": tied_base, "untied_donor": untied_donor}


def _config(tmp_path: Path, base: Path, donor: Path, **tokenizer) -> Path:
    return write_config(tmp_path, base_model=str(base), gate_mode="random", output_dir=str(tmp_path / "out"),
                        experts=[{"source_model": str(base), "positive_prompts": ["def add(a, b):\n    return a + b"]},
                                 {"source_model": str(donor), "positive_prompts": DONOR_TEXT[:2]}],
                        tokenizer={"source": "union", **tokenizer})


def _merge(path: Path):
    return run_merge(load_config(path), config_dir=path.parent, progress=False)


def _expected_rows(out: Path, part: str, base: torch.Tensor, donor: torch.Tensor) -> torch.Tensor:
    """The union's rows recomputed from the token map and the saved maps, independently of the writer."""
    header = json.loads((out / ".zenith" / "token_map.json").read_text())
    arrays = load_file(str(out / ".zenith" / "token_map.safetensors"))
    maps = load_file(str(out / ".zenith" / "vocab_maps.safetensors"))
    M = maps.get(f"{part}.donor1")
    src, dst = NormStats(**header["norms"][part]["donor1"]), NormStats(**header["norms"][part]["base"])
    want = torch.zeros(header["padded_size"], base.shape[1], dtype=torch.float64)
    want[:base.shape[0]] = base.double()
    for uid in range(header["size"]):
        rule = header["row_rules"][int(arrays["row"][uid])]
        if rule == "base":
            continue
        d = donor[int(arrays["ids.donor1"][uid])].double()
        mapped = match_norms(((M.double() @ d) if M is not None else d)[None], src, dst)
        b = int(arrays["ids.base"][uid])
        want[uid] = mapped[0] if rule == "donor1" else slerp(base[b][None], mapped, header["slerp_t"])[0]
    return want


@pytest.mark.parametrize("t", [0.0, 0.5])
def test_untied_base_rows_follow_the_token_map_and_base_rows_stay_exact_at_t_0(models, tmp_path, t):
    out = _merge(_config(tmp_path, models["base"], models["donor"], slerp_t=t)).output_dir
    merged, base, donor = tensors_of(out), tensors_of(models["base"]), tensors_of(models["donor"])
    tmap = json.loads((out / ".zenith" / "token_map.json").read_text())
    assert merged["model.embed_tokens.weight"].shape[0] == tmap["padded_size"] and tmap["padded_size"] % 64 == 0
    for part, name in (("embed", "model.embed_tokens.weight"), ("head", "lm_head.weight")):
        donor_rows = donor["model.embed_tokens.weight"]  # the donor is tied: its head rows are its embedding
        want = _expected_rows(out, part, base[name], donor_rows)
        torch.testing.assert_close(merged[name].double(), want.to(merged[name].dtype).double(), rtol=0, atol=0)
        if t == 0.0:
            n = tmap["base_size"]
            assert torch.equal(merged[name][:n].view(torch.int16), base[name][:n].view(torch.int16))
    tok = AutoTokenizer.from_pretrained(out)
    assert all(len(tok(s, add_special_tokens=False).input_ids) == 1 for s in SPECIALS)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == tmap["padded_size"]
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("def add(a, b): <|im_start|>", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_a_tied_base_keeps_one_embedding_and_an_untied_donor_gives_its_embedding_rows(models, tmp_path):
    out = _merge(_config(tmp_path, models["tied_base"], models["untied_donor"], slerp_t=0.0)).output_dir
    merged, base = tensors_of(out), tensors_of(models["tied_base"])
    assert "lm_head.weight" not in merged and json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    want = _expected_rows(out, "embed", base["model.embed_tokens.weight"],
                          tensors_of(models["untied_donor"])["model.embed_tokens.weight"])
    got = merged["model.embed_tokens.weight"]
    torch.testing.assert_close(got.double(), want.to(got.dtype).double(), rtol=0, atol=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_command_builds_the_union_and_merge_resume_reuses_it(models, tmp_path, capsys):
    cfg = _config(tmp_path, models["base"], models["donor"],
                  tokens={"<think>": {"source": str(models["donor"]), "force": False}})
    assert main(["tokenizer", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "union tokenizer:" in printed and "special tokens added: <|im_start|>, <|im_end|>" in printed
    tmap = tmp_path / "out" / ".zenith" / "token_map.json"
    before = tmap.stat().st_mtime_ns
    assert main(["merge", str(cfg), "--resume", "--no-progress"]) == 0
    assert tmap.stat().st_mtime_ns == before
    assert "## Vocabulary" in (tmp_path / "out" / "README.md").read_text()
    token_map = TokenMap.load(tmap.parent)
    think = AutoTokenizer.from_pretrained(tmp_path / "out").convert_tokens_to_ids("<think>")
    assert token_map.header["row_rules"][int(token_map.row[think])] == "donor1"  # donor-only, from the donor as asked
    assert token_map.ids["base"][think] == -1 and token_map.ids["donor1"][think] >= 0


def test_token_settings_name_the_token_at_fault(models, tmp_path):
    base, donor = models["base"], models["donor"]
    with pytest.raises(PlanError, match=r"tokenizer.tokens.'<nope>': '<nope>' is no token of the base's"):
        build_plan(load_config(_config(tmp_path, base, donor, tokens={"<nope>": {"source": "base", "force": True}})))
    # the flagship's old entries: in real Qwen3 the soft switches are text, not tokens
    with pytest.raises(PlanError, match=r"tokenizer.tokens.'/think': .* /think and /no_think are plain text"):
        build_plan(load_config(_config(tmp_path, base, donor, tokens={"/think": {"source": str(donor),
                                                                                "force": True}})))
    with pytest.raises(PlanError, match=r"tokenizer.tokens.'<\|im_end\|>'.source: .* has no token '<\|im_end\|>'"):
        build_plan(load_config(_config(tmp_path, base, donor, tokens={"<|im_end|>": {"source": "base",
                                                                                    "force": True}})))
    with pytest.raises(ConfigError, match=r"tokenizer.tokens: '<think>': force: true needs a source"):
        load_config(_config(tmp_path, base, donor, tokens={"<think>": {"force": True}}))
    conflicting = tmp_path / "conflict.yml"
    conflicting.write_text(f"base_model: {base}\ngate_mode: random\nexperts:\n  - source_model: {base}\n"
                           f"  - source_model: {donor}\ntokenizer:\n  source: union\n  tokens:\n"
                           f"    '<think>': {{source: base, force: true}}\n"
                           f"    '<think>': {{source: {donor}, force: true}}\n")
    with pytest.raises(ConfigError, match=r"line 10: key '<think>' is given twice in one mapping \(first on line 9\)"):
        load_config(conflicting)


def test_an_unsupported_donor_tokenizer_is_refused_naming_its_file(models, tmp_path):
    donor = tmp_path / "wordpiece-donor"
    shutil.copytree(models["donor"], donor)
    data = json.loads((donor / "tokenizer.json").read_text())
    data["model"] = {"type": "WordPiece", "unk_token": "<s>", "vocab": data["model"]["vocab"]}
    (donor / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"wordpiece-donor/tokenizer.json: tokenizer model type 'WordPiece'"):
        build_plan(load_config(_config(tmp_path, models["base"], donor)))
