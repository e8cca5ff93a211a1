"""The routing report: each source's share of the merged routers' top-k picks and weight, per layer and text."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import tensors_of
from transformers import AutoModelForCausalLM, AutoTokenizer

from zenith_merge.checks.routing_report import load_routing, slot_owners
from zenith_merge.cli import main
from zenith_merge.config import load_config
from zenith_merge.pipeline import run_merge

pytestmark = pytest.mark.demo
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flagship(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("routing") / "out"
    run_merge(load_config(ROOT / "merge" / "config.yml"), config_dir=ROOT / "merge", output_dir=out, progress=False)
    return out


def test_merge_writes_a_report_whose_shares_add_up_per_layer_and_text(flagship):
    report = load_routing(flagship)
    assert report is not None and report["sources"] == ["base", "donor1"] and report["top_k"] == 2
    assert set(report["domains"]) == {"base prompts", "donor1 prompts", "demo:code", "demo:maths"}
    assert report["domains"]["demo:code"] == 2048  # capped at max_tokens
    assert list(report["layers"]) == ["1", "2", "3"]  # the MoE layers (layer 0 is dense)
    for layer, per in report["layers"].items():
        assert report["slots"][layer] == {"base": 8, "donor1": 4}
        for domain, shares in per.items():
            assert sum(shares[s]["picks"] for s in report["sources"]) == pytest.approx(1.0)
            assert sum(shares[s]["weight"] for s in report["sources"]) == pytest.approx(1.0)
            assert sum(shares["experts"]) == 2 * report["domains"][domain]
            assert shares["donor1"]["picks"] == pytest.approx(sum(shares["experts"][8:]) / sum(shares["experts"]))


def test_report_counts_match_the_models_own_router_picks(flagship):
    """Hooks on transformers' own DeepseekV3 gates, run on the same prompts, count the same picks."""
    report = load_routing(flagship)
    cfg = load_config(ROOT / "merge" / "config.yml")
    model = AutoModelForCausalLM.from_pretrained(flagship, dtype=torch.bfloat16).eval()  # as stored, as the report runs
    stored = tensors_of(flagship)
    for layer in (1, 2, 3):  # transformers casts the float32 selection bias to bfloat16; the checkpoint's is float32
        gate = model.model.layers[layer].mlp.gate
        gate.e_score_correction_bias = stored[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"].float()
    tok = AutoTokenizer.from_pretrained(flagship)
    counts = {layer: torch.zeros(12, dtype=torch.long) for layer in (1, 2, 3)}

    def hook(layer):
        def record(module, args, output):
            counts[layer] += torch.bincount(output[2].reshape(-1), minlength=12)
        return record

    handles = [model.model.layers[layer].mlp.gate.register_forward_hook(hook(layer)) for layer in counts]
    with torch.no_grad():
        for prompt in cfg.experts[1].positive_prompts:
            model(input_ids=torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]]), use_cache=False)
    for h in handles:
        h.remove()
    # the first MoE layer sees identical inputs: identical picks. Deeper layers' inputs pass through
    # bf16 expert kernels, which the two loaders (and CPUs) may run differently, so a near-tie can flip
    # a pick; a flipped pick moves one count from one expert to another.
    assert report["layers"]["1"]["donor1 prompts"]["experts"] == counts[1].tolist()
    for layer, c in counts.items():
        mine = torch.tensor(report["layers"][str(layer)]["donor1 prompts"]["experts"])
        assert int(mine.sum()) == int(c.sum()), layer
        flipped = int((mine - c).abs().sum()) // 2
        # measured: 0, 0 and 3 of 140 picks flipped in layers 1-3 with the demo models this machine (AVX-512
        # EPYC, 2026-12-06) built; flips grow with depth
        assert flipped <= max(2, 0.03 * int(c.sum())), layer


def test_heatmap_is_a_png_and_the_model_card_links_it(flagship):
    png = (flagship / ".zenith" / "routing.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    width, height = struct.unpack(">II", png[16:24])
    assert width > 300 and height > 300
    card = (flagship / "README.md").read_text()
    assert "## Routing" in card and "![routing](.zenith/routing.png)" in card and "| 1 | demo:maths |" in card


def test_a_report_is_kept_only_for_the_bytes_it_describes(flagship, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(flagship, copy)
    assert load_routing(copy) is not None
    manifest = json.loads((copy / ".zenith" / "manifest.json").read_text())
    first = next(iter(manifest["shards"]))
    manifest["shards"][first]["sha256"] = "0" * 64
    (copy / ".zenith" / "manifest.json").write_text(json.dumps(manifest))
    assert load_routing(copy) is None


def test_a_report_without_its_heatmap_is_made_again(flagship, tmp_path):
    """A kill between the heatmap and the JSON can no longer leave a JSON without a PNG (the PNG comes first);
    a folder that has one anyway (an older version's, or a deleted PNG) gets both made again on resume."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(flagship, copy)
    (copy / ".zenith" / "routing.png").unlink()
    assert load_routing(copy) is None


def test_routing_command_routes_named_texts(flagship, tmp_path, capsys):
    text = tmp_path / "sums.txt"
    text.write_text("What is 12 + 30? 12 + 30 = 42.\n" * 20)
    assert main(["routing", str(flagship), "--text", f"sums={text}", "--max-tokens", "64", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| 1 | sums |" in out and "routing.png" in out
    assert load_routing(flagship)["domains"]["sums"] == 64
    assert main(["routing", str(flagship), "--text", "no-equals-sign"]) == 2


def test_an_assembly_has_one_source_so_every_pick_is_the_bases(tmp_path):
    out = tmp_path / "chimera"
    assert main(["merge", str(ROOT / "merge" / "examples" / "chimera.yml"), "--output", str(out), "--no-progress"]) == 0
    report = load_routing(out)
    assert report["sources"] == ["base"] and set(report["domains"]) == {"experts.0 prompts", "experts.1 prompts"}
    assert all(per[d]["base"]["picks"] == 1.0 for per in report["layers"].values() for d in report["domains"])
    from zenith_merge.plan.models import Plan

    assert slot_owners(Plan.load(out), 1, 8) == ["base"] * 8


def test_routing_report_false_writes_none(tmp_path):
    import yaml

    data = yaml.safe_load((ROOT / "merge" / "examples" / "chimera.yml").read_text())
    data.update(routing_report=False, output_dir=str(tmp_path / "out"))
    data.pop("search")
    (tmp_path / "c.yml").write_text(yaml.safe_dump(data))
    result = run_merge(load_config(tmp_path / "c.yml"), config_dir=tmp_path, progress=False)
    assert not (result.output_dir / ".zenith" / "routing.json").exists()


def test_the_plain_pass_and_transformers_give_the_same_report(tmp_path, monkeypatch):
    """Mixtral / Qwen2-MoE / Qwen3-MoE outputs are routed by the plain layer-by-layer pass (no transformers model
    in memory); it counts the same picks as the transformers forward (float32 tiny models: no rounding apart)."""
    from conftest import make_tiny_dense, write_config

    from zenith_merge.checks import routing_report
    from zenith_merge.forward import dense as dense_forward

    llama = [make_tiny_dense(tmp_path / f"l{i}", seed=i, cls="LlamaForCausalLM", dtype=torch.float32)
             for i in range(3)]
    long_text = "def add(a, b):\n    return a + b\n" * 120  # several 512-token chunks, past the cap
    experts = [{"source_model": str(p), "positive_prompts": [f"prompt {i} " * 3]} for i, p in enumerate(llama)]
    cfg = write_config(tmp_path, base_model=str(llama[0]), gate_mode="hidden", experts=experts,
                       output_dir=str(tmp_path / "out"), routing_report=False)
    out = run_merge(load_config(cfg), config_dir=tmp_path, progress=False).output_dir
    domains = {"prompts": [e["positive_prompts"][0] for e in experts], "long": [long_text]}
    plain = routing_report.routing_usage(out, domains, max_tokens=1100, progress=False)
    monkeypatch.setattr(dense_forward, "supported", lambda config, max_tokens: False)
    full = routing_report.routing_usage(out, domains, max_tokens=1100, progress=False)
    assert plain["domains"] == full["domains"] and plain["domains"]["long"] == 1100
    for layer, per in full["layers"].items():
        for domain, shares in per.items():
            assert plain["layers"][layer][domain]["experts"] == shares["experts"], (layer, domain)
            for source in plain["sources"]:
                assert plain["layers"][layer][domain][source]["weight"] == pytest.approx(shares[source]["weight"],
                                                                                         abs=1e-5)
