"""Router-only training: only router tensors change, deterministically; the bias rule balances load; resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tensors_of, write_config

from zenith_merge.cli import main
from zenith_merge.config import load_config
from zenith_merge.errors import ConfigError
from zenith_merge.maths.routing import RoutingSpec, route
from zenith_merge.pipeline import run_merge
from zenith_merge.stages.router_training import balance_bias

TEXT = ("def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n"
        "What is 3 + 4? It is 7. What is 12 * 7? It is 84.\n") * 6


def test_the_bias_rule_balances_a_skewed_router():
    spec = RoutingSpec("sigmoid", n_experts=8, top_k=2, norm_topk_prob=True, n_group=1, topk_group=1)
    g = torch.Generator().manual_seed(0)
    common = torch.full((16,), 0.5)
    h = torch.randn(512, 16, generator=g) + common
    w = torch.randn(8, 16, generator=g) * 0.3
    w[:2] += common  # experts 0 and 1 read the direction every token shares: they take most tokens
    bias = torch.zeros(8)
    everything = torch.ones(8, dtype=torch.bool)

    def cv(b):
        load = torch.bincount(route(h @ w.T, spec, b)[0].reshape(-1), minlength=8).float()
        return float(load.std() / load.mean()), load

    start, _ = cv(bias)
    for _ in range(300):
        bias = balance_bias(bias, cv(bias)[1], 1e-3, everything)
    end, _ = cv(bias)
    assert start > 0.5 and end < start / 3
    frozen = balance_bias(torch.zeros(8), cv(torch.zeros(8))[1], 1e-3, torch.arange(8) >= 4)
    assert torch.equal(frozen[:4], torch.zeros(4))  # untrained slots keep their bias


def _config(tmp_path, base, donor, name: str, steps: int):
    return write_config(tmp_path / name, base_model=str(base), gate_mode="random", output_dir=str(tmp_path / name / "out"),
                        experts=[{"source_model": str(base), "positive_prompts": [TEXT]},
                                 {"source_model": str(donor), "positive_prompts": [TEXT]}],
                        router={"train_steps": steps, "lr": 0.05, "seq_len": 16, "batch_size": 2})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_deepseek, tiny_qwen_moe):
    tmp = tmp_path_factory.mktemp("rt")
    for name in ("plain", "trained", "again"):
        (tmp / name).mkdir()
    runs = {}
    for name, steps in (("plain", 0), ("trained", 4), ("again", 4)):
        cfg = _config(tmp, tiny_deepseek, tiny_qwen_moe, name, steps)
        runs[name] = run_merge(load_config(cfg), config_dir=cfg.parent, progress=False)
    return runs


def test_router_training_changes_only_the_grafted_router_rows(trained):
    plain, out = tensors_of(trained["plain"].output_dir), tensors_of(trained["trained"].output_dir)
    assert plain.keys() == out.keys()
    changed = {n for n in out if not torch.equal(out[n].view(torch.uint8), plain[n].view(torch.uint8))}
    assert changed and all(".mlp.gate." in n for n in changed)
    for name in (n for n in out if n.endswith("mlp.gate.weight")):
        assert torch.equal(out[name][:4], plain[name][:4])  # the base's rows (router.train: grafted)
        assert not torch.equal(out[name][4:], plain[name][4:])
    log = json.loads((trained["trained"].output_dir / ".zenith" / "router_training.json").read_text())
    assert len(log["steps"]) == 4 and all(s["loss"] > 0 for s in log["steps"])


def test_router_training_is_deterministic_and_rewrites_only_the_router_shard(trained):
    a, b = trained["trained"], trained["again"]
    assert a.write.written == b.write.written == list(a.plan.retrained_shards)
    ta, tb = tensors_of(a.output_dir), tensors_of(b.output_dir)
    assert all(torch.equal(ta[n].view(torch.uint8), tb[n].view(torch.uint8)) for n in ta)


def test_a_trained_merge_resumes_without_training_again(trained, tmp_path):
    out = trained["again"].output_dir
    cfg = out.parent / "merge.yml"
    before = tensors_of(out)
    (out / trained["again"].plan.retrained_shards[0]).unlink()  # as if cut short while rewriting the routers
    log = (out / ".zenith" / "router_training.json").stat().st_mtime_ns
    result = run_merge(load_config(cfg), config_dir=cfg.parent, resume=True, progress=False)
    assert result.write.written == list(result.plan.retrained_shards)
    assert (out / ".zenith" / "router_training.json").stat().st_mtime_ns == log  # not trained again
    after = tensors_of(out)
    assert all(torch.equal(after[n].view(torch.uint8), before[n].view(torch.uint8)) for n in before)


def test_training_text_too_short_for_one_sequence_is_refused_before_anything_is_written(tmp_path, tiny_deepseek,
                                                                                        tiny_qwen_moe, capsys):
    cfg_path = write_config(tmp_path, base_model=str(tiny_deepseek), gate_mode="random",
                            output_dir=str(tmp_path / "out"),
                            experts=[{"source_model": str(tiny_deepseek), "positive_prompts": ["def f():"]},
                                     {"source_model": str(tiny_qwen_moe), "positive_prompts": ["What is 3?"]}],
                            align={"calibration": []}, router={"train_steps": 2, "seq_len": 64})
    with pytest.raises(ConfigError, match=r"router\.data \(empty: align\.calibration and the experts' "
                                          r"positive_prompts\): \d+ tokens in all, .* router\.seq_len = 64"):
        run_merge(load_config(cfg_path), config_dir=tmp_path, progress=False)
    assert not (tmp_path / "out").exists()
    assert main(["merge", str(cfg_path), "--dry-run"]) == 2  # the dry run says so too
    assert "router.seq_len = 64" in capsys.readouterr().err
    named = load_config(cfg_path).model_copy(update={"router": load_config(cfg_path).router.model_copy(
        update={"data": ["demo:code"], "seq_len": 100_000})})
    with pytest.raises(ConfigError, match=r"^router\.data: \d+ tokens in all"):
        run_merge(named, config_dir=tmp_path, progress=False)
    assert not (tmp_path / "out").exists()
