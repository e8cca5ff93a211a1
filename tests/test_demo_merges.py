"""End-to-end merges of the demo models with the shipped configs: flagship graft, Chimera, three sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tensors_of
from transformers import AutoModelForCausalLM, AutoTokenizer

from zenith_merge.cli import main
from zenith_merge.config import load_config, parse_config, with_absolute_paths
from zenith_merge.demo import ensure_demo, heldout_text
from zenith_merge.maths.graft import interpolate
from zenith_merge.maths.regmean import regmean_merge
from zenith_merge.pipeline import run_merge
from zenith_merge.stages.regmean import grams_file, read_gram

pytestmark = pytest.mark.demo
ROOT = Path(__file__).resolve().parents[1]


def _run(config: str, out: Path, *extra: str) -> None:
    assert main(["merge", str(ROOT / config), "--output", str(out), "--no-progress", *extra]) == 0


@pytest.fixture(scope="module")
def flagship(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flagship") / "out"
    _run("merge/config.yml", out)
    return out


def test_flagship_is_a_deepseek_checkpoint_with_both_sources_experts(flagship, capsys):
    config = json.loads((flagship / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (config["n_routed_experts"], config["n_group"], config["topk_group"]) == (12, 3, 1)
    plan = json.loads((flagship / ".zenith" / "plan.json").read_text())
    sources = [[s["source"] for s in layer["slots"]] for layer in plan["expert_table"]]
    assert all(row == ["base"] * 8 + ["donor1"] * 4 for row in sources)
    assert (flagship / ".zenith" / "align-donor1" / "align.safetensors").is_file()
    assert main(["smoke-test", str(flagship)]) == 0
    assert "result: ok" in capsys.readouterr().out


def test_flagship_keeps_the_base_when_the_donor_is_masked_and_slerp_t_is_0(tmp_path):
    """Base preservation on trained models, union vocabulary included: with slerp_t 0 the base's tokens keep
    their rows, and with the donor's slots never picked the logits over the base's vocabulary are the base's."""
    data = yaml.safe_load((ROOT / "merge" / "config.yml").read_text())
    data["tokenizer"]["slerp_t"] = 0.0
    out = run_merge(parse_config(data), config_dir=ROOT / "merge", output_dir=tmp_path / "out", progress=False)
    zen = ensure_demo("zen-tiny")
    tok = AutoTokenizer.from_pretrained(zen)
    text = heldout_text("code")[:600]
    ids = tok(text, return_tensors="pt").input_ids
    assert AutoTokenizer.from_pretrained(out.output_dir)(text, return_tensors="pt").input_ids.equal(ids)
    base = AutoModelForCausalLM.from_pretrained(zen, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(out.output_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in merged.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias[8:] = -1e4
        want = base(ids).logits
        torch.testing.assert_close(merged(ids).logits[..., :want.shape[-1]], want, rtol=1e-4, atol=1e-4)


def test_flagship_union_tokenizer_loads_and_renders_the_thinking_markers(flagship):
    tok = AutoTokenizer.from_pretrained(flagship)
    zen = AutoTokenizer.from_pretrained(ensure_demo("zen-tiny"))
    for text in (heldout_text("code"), heldout_text("maths"), heldout_text("maths", style="r1_chat")):
        assert tok(text).input_ids == zen(text).input_ids  # the union's encoder is the base's
    for special in ("<think>", "</think>", "<|im_start|>", "<|im_end|>"):
        ids = tok(special, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.decode(ids) == special
    for switch in ("/think", "/no_think"):  # text, as in Qwen3: split as the base splits it
        assert tok(switch, add_special_tokens=False).input_ids == zen(switch, add_special_tokens=False).input_ids
    ask = [{"role": "user", "content": "What is 12 + 7?"}]
    on = tok.apply_chat_template(ask, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    off = tok.apply_chat_template(ask, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on.endswith("<｜Assistant｜><think>\n") and off.endswith("<｜Assistant｜><think>\n\n</think>\n\n")
    soft = [{"role": "user", "content": "What is 12 + 7? /no_think"}]
    assert tok.apply_chat_template(soft, tokenize=False, add_generation_prompt=True) == off.replace("7?", "7? /no_think")
    eos = json.loads((flagship / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_tokens_to_ids("<｜end▁of▁sentence｜>") in eos and tok.convert_tokens_to_ids("<|im_end|>") in eos
    assert "token_map.json" in (flagship / "README.md").read_text()


def test_a_graft_fitted_one_layer_pair_at_a_time_writes_the_same_checkpoint(flagship, tmp_path):
    data = yaml.safe_load((ROOT / "merge" / "config.yml").read_text())
    data["align"]["max_memory"] = 1  # below one pair's statistics: one pair per pass
    out = run_merge(parse_config(data), config_dir=ROOT / "merge", output_dir=tmp_path / "out",
                    progress=False).output_dir
    names = sorted(p.name for p in (out / ".zenith" / "align-donor1").iterdir())
    assert names == ["align-0.safetensors", "align-1.safetensors", "align-2.safetensors", "align.json"]
    grouped, whole = tensors_of(out), tensors_of(flagship)
    assert grouped.keys() == whole.keys()
    assert all(torch.equal(grouped[n].view(torch.uint8), whole[n].view(torch.uint8)) for n in whole)


def test_resumed_graft_reuses_its_stages_and_shards(flagship, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in (flagship / ".zenith").rglob("*") if p.is_file()}
    cfg = load_config(ROOT / "merge" / "config.yml")
    result = run_merge(cfg, config_dir=ROOT / "merge", output_dir=flagship, resume=True, progress=False)
    assert result.write.written == [] and len(result.write.skipped) == len(result.plan.shards)
    after = {p.name: p.stat().st_mtime_ns for p in (flagship / ".zenith").rglob("*") if p.is_file()}
    assert after["usage.json"] == before["usage.json"] and after["align.safetensors"] == before["align.safetensors"]
    assert after["token_map.json"] == before["token_map.json"]


def test_r1t_recipe_is_r1_experts_in_the_v3_body(tmp_path):
    data = with_absolute_paths(yaml.safe_load((ROOT / "merge/examples/chimera.yml").read_text()),
                               ROOT / "merge" / "examples")
    data["assembly"]["weights"] = {"default": [1.0, 0.0], "routed_experts": [0.0, 1.0]}
    (tmp_path / "r1t.yml").write_text(yaml.safe_dump(data))
    out = tmp_path / "chimera"
    _run(str(tmp_path / "r1t.yml"), out)
    merged, v3, r1 = tensors_of(out), tensors_of(ensure_demo("zen-tiny")), tensors_of(ensure_demo("zen-r1-tiny"))
    assert merged.keys() == v3.keys()
    for name, t in merged.items():
        want = r1[name] if ".mlp.experts." in name else v3[name]
        assert torch.equal(t.view(torch.uint8), want.view(torch.uint8)), name


def test_chimera_merges_linear_weights_by_regmean_and_interpolates_the_rest(tmp_path):
    out = tmp_path / "chimera"
    _run("merge/examples/chimera.yml", out)
    cfg = load_config(ROOT / "merge/examples/chimera.yml")
    merged, v3, r1 = tensors_of(out), tensors_of(ensure_demo("zen-tiny")), tensors_of(ensure_demo("zen-r1-tiny"))
    weights = cfg.assembly.weights
    linear, norm = "model.layers.1.self_attn.o_proj.weight", "model.layers.1.input_layernorm.weight"
    grams = [read_gram(grams_file(out / ".zenith", key), linear) for key in ("base", "donor1")]
    want = regmean_merge([v3[linear], r1[linear]], grams, weights.get("attention", weights["default"]))
    assert torch.equal(merged[linear], want.to(merged[linear].dtype))
    # the same float32 arithmetic as the writer's (how add-with-alpha rounds differs between CPUs)
    want = interpolate([v3[norm], r1[norm]], weights.get("norms", weights["default"])).to(merged[norm].dtype)
    assert torch.equal(merged[norm], want)


def test_three_sources_give_twenty_experts(tmp_path):
    out = tmp_path / "three"
    _run("merge/examples/three_sources.yml", out)
    config = json.loads((out / "config.json").read_text())
    assert (config["n_routed_experts"], config["n_group"]) == (20, 5)
    plan = json.loads((out / ".zenith" / "plan.json").read_text())
    assert {k: v["align"] for k, v in plan["transforms"].items()} == {"base": "none", "donor1": "identity",
                                                                      "donor2": "fit"}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_chimera_from_fp8_parents_equals_the_chimera_of_their_bf16_casts(tmp_path):
    from zenith_merge.fp8_cast import fp8_cast

    fp8 = tmp_path / "fp8"
    _run("merge/examples/chimera_fp8.yml", fp8)
    data = with_absolute_paths(yaml.safe_load((ROOT / "merge/examples/chimera_fp8.yml").read_text()),
                               ROOT / "merge" / "examples")
    for name in ("zen-tiny-fp8", "zen-r1-tiny-fp8"):
        fp8_cast(ensure_demo(name), tmp_path / name.replace("fp8", "bf16"), progress=False)
    text = yaml.safe_dump(data).replace("demo://zen-tiny-fp8", str(tmp_path / "zen-tiny-bf16"))
    (tmp_path / "bf16.yml").write_text(text.replace("demo://zen-r1-tiny-fp8", str(tmp_path / "zen-r1-tiny-bf16")))
    _run(str(tmp_path / "bf16.yml"), tmp_path / "bf16")
    a, b = tensors_of(fp8), tensors_of(tmp_path / "bf16")
    assert a.keys() == b.keys() and all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)
    assert not any(n.endswith("_scale_inv") for n in a)
    assert "quantization_config" not in json.loads((fp8 / "config.json").read_text())


def test_smoke_report_renders_with_the_routing_heatmap(flagship, tmp_path):
    import shutil
    import struct

    out = tmp_path / "copy"
    shutil.copytree(flagship, out)
    assert main(["smoke-test", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "**ok**" in md and "| loading | pass |" in md and "![routing](.zenith/routing.png)" in md
    png = (out / ".zenith" / "routing.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000 and struct.unpack(">II", png[16:24])[0] > 300
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "## Smoke test" in card and "| generate | pass |" in card
    assert "base_model: demo://zen-tiny" in card and "library_name: transformers" in card and "## Plan" in card
    plan = json.loads((out / ".zenith" / "plan.json").read_text())
    assert all(f"`{s['fingerprint']}`" in card for s in plan["sources"].values())  # full sha256s
    assert "| merge |" in md and "maths (demo held-out)" in md  # quality of the merge and its sources


def test_interactive_chat_through_the_template_with_think(flagship):
    import io

    from zenith_merge.checks.chat import chat

    out = io.StringIO()
    n = chat(flagship, stdin=io.StringIO("/think What is 12 + 30?\n\n"), stdout=out, max_new_tokens=8,
             show_prompt=True)
    text = out.getvalue()
    assert n == 1 and "model> " in text
    assert "<think>\\n'" in text.splitlines()[0]  # /think: the template opens the thinking block


def test_thinking_check_fails_when_the_merge_no_longer_opens_think(flagship, tmp_path):
    import shutil

    from zenith_merge.checks.smoke import run_smoke_test
    from zenith_merge.io.manifest import changing

    out = tmp_path / "copy"
    shutil.copytree(flagship, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    with changing(out):  # an edit on purpose: the completion record takes the new sha256
        (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    report = run_smoke_test(out)
    assert report.failed == ["thinking"]
    assert "not in the merge" in {c.name: c.detail for c in report.checks}["thinking"]


def test_test_merged_model_sh_interactive_takes_one_exchange_on_stdin(flagship):
    import subprocess

    res = subprocess.run(["bash", str(ROOT / "merge" / "test_merged_model.sh"), str(flagship), "--interactive",
                          "--max-new-tokens", "6", "--show-prompt"], input="/think What is 2 + 3?\n",
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith(("prompt> ", "model> "))]
    assert len(lines) == 2 and "<think>" in lines[0] and lines[1].startswith("model> ")
