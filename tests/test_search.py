"""`zenith-merge search`: per-class assembly weights for two same-family parents, chosen on calibration text."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from zenith_merge.cli import main
from zenith_merge.config import load_config, parse_config, with_absolute_paths
from zenith_merge.demo import bits_per_byte, calibration_text
from zenith_merge.errors import ConfigError
from zenith_merge.pipeline import run_merge
from zenith_merge.search import Candidate, Score, breed, check_searchable, run_search, uniform, write_search

ROOT = Path(__file__).resolve().parents[1]
CHIMERA = ROOT / "merge" / "examples" / "chimera.yml"
CLASSES = ("embeddings", "lm_head", "attention", "routed_experts")


def _small_search(**search) -> dict:
    data = yaml.safe_load(CHIMERA.read_text())
    data["search"] = {"keep": ["demo:code"], "gain": ["demo:maths"], "grid": [0.0, 0.4, 1.0], "generations": 1,
                      "population": 2, "max_chars": 6000, **search}
    data["assembly"]["regmean"]["max_tokens"] = 2048
    return data


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    data = _small_search()
    out = tmp_path_factory.mktemp("search")
    result = run_search(parse_config(data), config_dir=CHIMERA.parent, progress=False, work_dir=out)
    return result, write_search(result, data, CHIMERA, out)


@pytest.mark.demo
def test_search_sweeps_then_refines_and_ranks_parents_at_the_ends(searched):
    result, _ = searched
    sweep = result.sweep()
    assert [s.candidate.lambdas[0][1] for s in sweep] == [0.0, 0.4, 1.0]
    assert sweep[0].loss == pytest.approx(0.0, abs=1e-9) and sweep[0].gap == pytest.approx(0.0, abs=1e-9)
    assert sweep[-1].gap == pytest.approx(1.0)  # all of experts[1] closes all of its own gap
    assert sum(s.candidate.origin == "generation 1" for s in result.scores) == 2
    assert result.best.feasible and result.best.loss <= 0.03
    assert result.best == min(result.scores, key=Score.rank)


@pytest.mark.demo
def test_search_scores_exactly_what_the_merge_of_its_best_config_writes(searched, tmp_path):
    """best.yml merged to disk and scored from the folder gives the search's own numbers."""
    result, paths = searched
    cfg = load_config(paths["config"])
    assert {c: w for c, w in cfg.assembly.weights.items() if c != "default"} == {
        c: [pytest.approx(1 - lam), lam] for c, lam in result.best.candidate.lambdas}
    out = run_merge(cfg, config_dir=paths["config"].parent, output_dir=tmp_path / "best", progress=False).output_dir
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    keep = bits_per_byte(model, tok, calibration_text("code")[:6000])
    gain = bits_per_byte(model, tok, calibration_text("maths")[:6000])
    assert keep == pytest.approx(result.best.keep_bpb, rel=1e-6)
    assert gain == pytest.approx(result.best.gain_bpb, rel=1e-6)


@pytest.mark.demo
def test_search_report_has_tables_a_valid_png_and_every_candidate(searched):
    result, paths = searched
    md = paths["md"].read_text()
    assert "| lambda | keep bpb |" in md and "![lambda sweep](search.png)" in md
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    width, height = struct.unpack(">II", png[16:24])
    assert width > 300 and height > 200
    data = yaml.safe_load(paths["json"].read_text())
    assert len(data["candidates"]) == len(result.scores) and data["best"]["gap"] == pytest.approx(result.best.gap)


@pytest.mark.demo
def test_search_refuses_text_where_the_second_parent_is_no_better(tmp_path):
    data = _small_search(gain=["demo:code"], keep=["demo:maths"], max_chars=2000)
    with pytest.raises(ConfigError, match="search.gain: experts.1. is not better"):
        run_search(parse_config(data), config_dir=CHIMERA.parent, progress=False, work_dir=tmp_path)


def test_search_needs_assembly_two_parents_and_text():
    data = _small_search()
    with pytest.raises(ConfigError, match="merge_method: search looks for assembly weights"):
        check_searchable(parse_config({**{k: v for k, v in data.items() if k != "assembly"},
                                       "merge_method": "concat"}))
    three = {**data, "experts": data["experts"] * 2 + data["experts"][:1]}
    three["assembly"] = {"weights": {"default": [1, 0, 0, 0, 0]}}
    with pytest.raises(ConfigError, match="experts: search interpolates two parents"):
        check_searchable(parse_config(three))
    with pytest.raises(ConfigError, match="search.keep: give text"):
        check_searchable(parse_config({**data, "search": {"gain": ["demo:maths"]}}))
    with pytest.raises(ConfigError, match="search.classes: unknown tensor class 'mlp'"):
        parse_config({**data, "search": {**data["search"], "classes": ["mlp"]}})


def test_search_dry_run_says_what_it_would_score_and_writes_nothing(tmp_path, capsys):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(with_absolute_paths(_small_search(), CHIMERA.parent)))
    assert main(["search", str(cfg), "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 candidates at most" in out and "dry run: nothing scored" in out
    assert not (tmp_path / "s").exists()


@given(st.lists(st.lists(st.floats(0, 1), min_size=len(CLASSES), max_size=len(CLASSES)), min_size=1, max_size=4),
       st.integers(0, 2**31), st.floats(0.01, 0.5))
def test_children_stay_in_the_unit_interval_rounded_and_in_class_order(parents, seed, sigma):
    cands = [Candidate(tuple(zip(CLASSES, lams)), "p") for lams in parents]
    child = breed(cands, random.Random(seed), sigma, "generation 1")
    assert [c for c, _ in child.lambdas] == list(CLASSES)
    assert all(0.0 <= lam <= 1.0 and round(lam, 2) == lam for _, lam in child.lambdas)
    again = breed(cands, random.Random(seed), sigma, "generation 1")
    assert again == child  # seeded: the same child


@given(st.lists(st.tuples(st.floats(-0.1, 0.3), st.floats(-0.5, 1.5)), min_size=1, max_size=12))
def test_rank_prefers_any_candidate_within_the_loss_to_every_one_outside(points):
    scores = [Score(uniform(CLASSES, 0.0, "sweep"), 0.0, 0.0, loss, gap, loss <= 0.03) for loss, gap in points]
    best = min(scores, key=Score.rank)
    inside = [s for s in scores if s.feasible]
    if inside:
        assert best.feasible and best.gap == max(s.gap for s in inside)
    else:
        assert best.loss == min(s.loss for s in scores)


def test_candidate_weights_override_only_searched_classes():
    cand = Candidate((("attention", 0.25), ("routed_experts", 1.0)), "sweep")
    weights = cand.weights({"default": [1.0, 0.0], "norms": [0.5, 0.5], "attention": [1.0, 0.0]})
    assert weights == {"default": [1.0, 0.0], "norms": [0.5, 0.5], "attention": [0.75, 0.25],
                       "routed_experts": [0.0, 1.0]}


def test_absolute_paths_keep_demo_references_and_resolve_the_rest(tmp_path):
    data = {"base_model": "demo://zen-tiny", "output_dir": "../out", "experts": [{"source_model": "models/a"}],
            "align": {"calibration": ["demo:code", "text/c.txt", "/abs/d.txt"], "teacher_data": ["text/t.txt"]},
            "tokenizer": {"source": "union", "tokens": {"<think>": {"source": "models/a"}}}}
    out = with_absolute_paths(data, tmp_path)
    assert out["base_model"] == "demo://zen-tiny" and out["output_dir"] == str((tmp_path / "../out").resolve())
    assert out["experts"][0]["source_model"] == str(tmp_path / "models" / "a")
    assert out["align"]["calibration"] == ["demo:code", str(tmp_path / "text" / "c.txt"), "/abs/d.txt"]
    assert out["tokenizer"]["tokens"]["<think>"]["source"] == str(tmp_path / "models" / "a")
    assert out["align"]["teacher_data"] == [str(tmp_path / "text" / "t.txt")] and out["tokenizer"]["source"] == "union"
    other = with_absolute_paths({"tokenizer": {"source": "models/b"}}, tmp_path)
    assert other["tokenizer"]["source"] == str(tmp_path / "models" / "b")
    assert data["output_dir"] == "../out"  # the input is not modified


TIES = ROOT / "merge" / "examples" / "ties.yml"


@pytest.mark.demo
def test_a_method_search_scores_every_combination_and_its_best_config_merges_to_its_score(tmp_path):
    """search.parameters of a mergekit-yaml config: every combination scored, the parents scored as themselves
    (gap 0 and 1 by definition), best.yml carries the chosen parameters, and its merge scores as searched."""
    data = yaml.safe_load(TIES.read_text())
    data["search"] = {"keep": ["demo:code"], "gain": ["demo:maths"], "max_chars": 4000,
                      "parameters": {"density": [0.5, 0.9], "models.1.weight": [0.5, 1.0]}}
    result = run_search(parse_config(data), config_dir=TIES.parent, progress=False, work_dir=tmp_path / "work")
    assert result.kind == "method" and result.classes == ("density", "models.1.weight")
    assert sorted(s.candidate.lambdas for s in result.scores) == [
        (("density", d), ("models.1.weight", w)) for d in (0.5, 0.9) for w in (0.5, 1.0)]
    assert len({(s.keep_bpb, s.gain_bpb) for s in result.scores}) == 4  # each candidate is another merge
    paths = write_search(result, data, TIES, tmp_path / "out")
    assert "| parameter | value |" in paths["md"].read_text()
    best = yaml.safe_load(paths["config"].read_text())
    chosen = dict(result.best.candidate.lambdas)
    assert best["parameters"] == {**data["parameters"], "density": chosen["density"]}
    assert best["models"][1]["parameters"]["weight"] == chosen["models.1.weight"]
    assert best["models"][0]["model"] == "demo://zen-tiny"  # still a mergekit-yaml config
    out = run_merge(load_config(paths["config"]), config_dir=tmp_path, output_dir=tmp_path / "best",
                    progress=False).output_dir
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    assert bits_per_byte(model, tok, calibration_text("maths")[:4000]) == pytest.approx(result.best.gain_bpb, rel=1e-6)


def test_a_method_search_needs_its_parameters():
    data = yaml.safe_load(TIES.read_text())
    data["search"] = {"keep": ["demo:code"], "gain": ["demo:maths"]}
    with pytest.raises(ConfigError, match="search.parameters: give the ties parameters to search"):
        check_searchable(parse_config(data))
