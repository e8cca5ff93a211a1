"""RegMean: the exact maths of the merge, the statistics the stage collects, and the assembly that uses them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_deepseek, tensors_of, write_config
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from zenith_merge.config import load_config, parse_config
from zenith_merge.errors import ConfigError
from zenith_merge.forward.loading import load_for_calibration
from zenith_merge.maths.graft import interpolate
from zenith_merge.maths.regmean import regmean_merge
from zenith_merge.pipeline import run_merge
from zenith_merge.plan.build import build_plan
from zenith_merge.plan.summary import format_plan
from zenith_merge.stages.regmean import grams_file, input_grams, read_gram

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["def add(a, b):\n    return a + b\n" * 6, "What is 3 + 4? It is 7. " * 8]


def _spd(g: torch.Generator, width: int, rank: int) -> torch.Tensor:
    x = torch.randn(4 * width, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, width, generator=g,
                                                                                      dtype=torch.float64)
    return x.T @ x / x.shape[0]


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 12), width=st.integers(1, 12), n=st.integers(2, 3), seed=st.integers(0, 2**31),
       ws=st.lists(st.floats(0.05, 5.0), min_size=3, max_size=3))
def test_equal_gram_matrices_give_the_weighted_average(out, width, n, seed, ws):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(out, width, generator=g) for _ in range(n)]
    gram = _spd(g, width, width)
    merged = regmean_merge(tensors, [gram] * n, ws[:n], ridge=0.0)
    assert torch.allclose(merged, interpolate(tensors, ws[:n]), atol=1e-4, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 10), width=st.integers(2, 10), seed=st.integers(0, 2**31), wa=st.floats(0.1, 3.0),
       wb=st.floats(0.1, 3.0), off=st.floats(0.0, 1.0))
def test_the_merge_solves_regmeans_normal_equations(out, width, seed, wa, wb, off):
    """sum_i w_i G~_i (W^T - W_i^T) = 0 with G~ the off-diagonal-scaled Gram matrices (ridge off)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(out, width, generator=g), torch.randn(out, width, generator=g)
    ga, gb = _spd(g, width, width), _spd(g, width, width)
    merged = regmean_merge([a, b], [ga, gb], [wa, wb], off_diagonal=off, ridge=0.0).double()

    def shrunk(m):
        return off * m + (1 - off) * torch.diag(torch.diagonal(m))

    residual = wa * shrunk(ga) @ (merged - a.double()).T + wb * shrunk(gb) @ (merged - b.double()).T
    scale = float((wa * shrunk(ga) @ a.double().T).abs().max() + (wb * shrunk(gb) @ b.double().T).abs().max())
    assert float(residual.abs().max()) <= 1e-4 * max(scale, 1.0)


def test_parents_reading_disjoint_inputs_each_keep_their_own_outputs():
    """Parent a only ever sees the first k input features, parent b the rest: the merge is exact on both."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    xa = torch.cat([torch.randn(64, 2, generator=g), torch.zeros(64, 4)], 1)
    xb = torch.cat([torch.zeros(64, 2), torch.randn(64, 4, generator=g)], 1)
    merged = regmean_merge([a, b], [xa.T @ xa / 64, xb.T @ xb / 64], [0.5, 0.5], ridge=0.0)
    assert torch.allclose(xa @ merged.T, xa @ a.T, atol=1e-4) and torch.allclose(xb @ merged.T, xb @ b.T, atol=1e-4)
    assert not torch.allclose(xa @ interpolate([a, b], [0.5, 0.5]).T, xa @ a.T, atol=1e-2)


def test_inputs_no_parent_saw_take_the_weighted_average():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    zero = torch.zeros(4, 4)
    assert torch.allclose(regmean_merge([a, b], [zero, zero], [3.0, 1.0]), interpolate([a, b], [3.0, 1.0]), atol=1e-6)
    x = torch.cat([torch.randn(32, 2, generator=g), torch.zeros(32, 2)], 1)  # features 2 and 3 never seen
    merged = regmean_merge([a, b], [x.T @ x / 32, x.T @ x / 32], [3.0, 1.0])
    assert torch.allclose(merged[:, 2:], interpolate([a, b], [3.0, 1.0])[:, 2:], atol=1e-5)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="Gram"):
        regmean_merge([torch.zeros(2, 3), torch.zeros(2, 3)], [torch.eye(3), torch.eye(2)], [1.0, 1.0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_deepseek(tmp_path_factory.mktemp("rm") / "m", seed=5, dtype=torch.float32)


def test_statistics_equal_a_direct_recomputation_from_transformers_own_modules(tiny):
    """Linear inputs from forward hooks; each expert's inputs from transformers' own routing (top_k_index)."""
    names = ["model.layers.1.self_attn.o_proj.weight", "lm_head.weight", "model.layers.1.mlp.experts.2.gate_proj.weight",
             "model.layers.1.mlp.experts.2.down_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight"]
    grams, tokens = input_grams(tiny, names, TEXTS, max_tokens=10_000, progress=False)
    model, tok = load_for_calibration(tiny)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = dict(model.named_modules())
    hooks = [mods[n.removesuffix(".weight")].register_forward_pre_hook(
        lambda m, args, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for n in names if ".experts." not in n]
    experts = mods["model.layers.1.mlp.experts"]

    def on_experts(m, args):
        x, idx = args[0], args[1]
        xe = x[(idx == 2).any(-1)]
        seen[names[2]].append(xe.double())
        gate, up = torch.nn.functional.linear(xe, m.gate_up_proj[2]).chunk(2, dim=-1)
        seen[names[3]].append((m.act_fn(gate) * up).double())
    hooks.append(experts.register_forward_pre_hook(on_experts))
    total = 0
    with torch.no_grad():
        for text in TEXTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            total += len(ids)
            model(input_ids=torch.tensor([ids]), use_cache=False)
    for h in hooks:
        h.remove()
    assert tokens == total
    for n in names:
        x = torch.cat(seen[n])
        assert x.shape[0] > 0, n
        assert torch.allclose(grams[n].double(), x.T @ x / x.shape[0], atol=1e-5, rtol=1e-4), n


def test_weights_reading_one_input_share_one_stored_gram_matrix(tiny, tmp_path):
    """q_a/kv_a, an expert's gate/up and the shared expert's gate/up each keep one matrix, stored once; every
    weight reads it back, and it equals the statistic of that weight's own module input."""
    from safetensors import safe_open

    from zenith_merge.stages.regmean import saved_covers, write_input_grams

    pairs = [("model.layers.1.self_attn.q_a_proj.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"),
             ("model.layers.2.mlp.experts.1.gate_proj.weight", "model.layers.2.mlp.experts.1.up_proj.weight"),
             ("model.layers.1.mlp.shared_experts.gate_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight")]
    alone = ["model.layers.1.self_attn.o_proj.weight", "model.layers.2.mlp.experts.1.down_proj.weight"]
    names = [n for pair in pairs for n in pair] + alone
    grams, _ = input_grams(tiny, names, TEXTS, max_tokens=10_000, progress=False)
    for a, b in pairs:
        assert grams[a] is grams[b]
    for one in (names[1], names[4]):  # computed on their own, each weight gets the same statistic
        own, _ = input_grams(tiny, [one], TEXTS, max_tokens=10_000, progress=False)
        assert torch.equal(own[one], grams[one])
    path = tmp_path / "regmean-x.safetensors"
    write_input_grams(tiny, names, TEXTS, path, key="k", max_tokens=10_000, progress=False)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted([a for a, _ in pairs] + alone)
    assert all(torch.equal(read_gram(path, n), grams[n]) for n in names)
    assert saved_covers(path, "k", names) and not saved_covers(path, "k", [*names, "lm_head.weight"])


LINEAR = ["model.layers.1.self_attn.q_a_proj.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
          "model.layers.1.self_attn.q_b_proj.weight", "model.layers.1.self_attn.o_proj.weight",
          *(f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight" for layer in (1, 2) for e in range(4)
            for p in ("gate", "up", "down")),
          "model.layers.2.mlp.shared_experts.down_proj.weight", "lm_head.weight"]


def test_statistics_in_bounded_passes_write_the_same_file_holding_less_at_once(tiny, tmp_path):
    """max_memory: one pass per group of statistics, each group within the budget (a larger matrix alone), and
    the file byte for byte the one a single pass writes."""
    from zenith_merge.stages.regmean import write_input_grams

    one = write_input_grams(tiny, LINEAR, TEXTS, tmp_path / "regmean-one.safetensors", key="k", max_tokens=10_000,
                            progress=False)
    budget = 8 * 32 * 32 * 2  # two of the 32-wide matrices
    bounded = write_input_grams(tiny, LINEAR, TEXTS, tmp_path / "regmean-bounded.safetensors", key="k", max_tokens=10_000,
                                max_memory=budget, progress=False)
    assert one.passes == 1 and bounded.passes > 5 and bounded.tokens == one.tokens
    assert bounded.peak_sum_bytes <= budget < one.peak_sum_bytes
    assert (tmp_path / "regmean-one.safetensors").read_bytes() == (tmp_path / "regmean-bounded.safetensors").read_bytes()
    grams, _ = input_grams(tiny, LINEAR, TEXTS, max_tokens=10_000, progress=False)
    assert all(torch.equal(read_gram(tmp_path / "regmean-one.safetensors", n), grams[n]) for n in LINEAR)


def test_statistics_cut_short_resume_at_the_first_unfinished_group(tiny, tmp_path, monkeypatch):
    """Killed in its third pass, the stage leaves the two finished groups' parts and no statistics file; run
    again, it makes only the remaining passes and writes the file an uninterrupted run writes."""
    from zenith_merge.stages import regmean

    budget = 8 * 32 * 32
    whole = regmean.write_input_grams(tiny, LINEAR, TEXTS, tmp_path / "whole" / "regmean-x.safetensors", key="k",
                                      max_tokens=10_000, max_memory=budget, progress=False)
    real, calls = regmean._pass, []

    def counted(*args, **kwargs):
        calls.append(1)
        if fail and len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(regmean, "_pass", counted)
    path = tmp_path / "cut" / "regmean-x.safetensors"
    fail = True
    with pytest.raises(RuntimeError, match="killed"):
        regmean.write_input_grams(tiny, LINEAR, TEXTS, path, key="k", max_tokens=10_000, max_memory=budget,
                                  progress=False)
    assert sorted(p.name for p in path.parent.iterdir()) == [
        regmean.part_file(path, i, whole.groups).name for i in (0, 1)]
    fail, calls[:] = False, []
    again = regmean.write_input_grams(tiny, LINEAR, TEXTS, path, key="k", max_tokens=10_000, max_memory=budget,
                                      progress=False)
    assert again.passes == len(calls) == whole.groups - 2
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert path.read_bytes() == (tmp_path / "whole" / "regmean-x.safetensors").read_bytes()


def test_the_plan_counts_one_group_of_statistics_when_memory_is_bounded(tmp_path, tiny):
    config, _ = _two_parents(tmp_path, tiny, classes=["attention", "routed_experts", "lm_head"])
    free = build_plan(load_config(config), config_dir=tmp_path)
    data = yaml.safe_load(config.read_text())
    data["assembly"]["regmean"]["max_memory"] = "20KB"
    config.write_text(yaml.safe_dump(data))
    capped = build_plan(load_config(config), config_dir=tmp_path)
    stage, whole = capped.stages.regmean["donor1"], free.stages.regmean["donor1"]
    assert stage.max_memory == 20_000 and stage.passes > whole.passes == 1 and stage.matrices == whole.matrices
    assert stage.sum_bytes <= 20_000 < whole.sum_bytes
    assert capped.estimates.stage_memory_bytes < free.estimates.stage_memory_bytes
    assert f"{stage.passes} passes within max_memory" in format_plan(capped)


def _two_parents(tmp_path, tiny, **regmean):
    """A config assembling `tiny` with a noisy copy of it (a stand-in fine-tune), RegMean on two texts."""
    from safetensors.torch import load_file, save_file

    other = make_tiny_deepseek(tmp_path / "other", seed=5, dtype=torch.float32)
    g = torch.Generator().manual_seed(9)
    for f in other.glob("*.safetensors"):
        part = load_file(f)
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) * v.abs().mean() for k, v in part.items()},
                  str(f), metadata={"format": "pt"})
    texts = []
    for name, text in zip(("code.txt", "maths.txt"), TEXTS):
        (tmp_path / name).write_text(text)
        texts.append([str(tmp_path / name)])
    return write_config(tmp_path, base_model=str(tiny), merge_method="assembly", gate_mode="random",
                        experts=[{"source_model": str(tiny)}, {"source_model": str(other)}],
                        assembly={"weights": {"default": [0.7, 0.3], "norms": [0.5, 0.5]},
                                  "regmean": {"data": texts, **regmean}},
                        output_dir=str(tmp_path / "out"), routing_report=False), other


def test_assembly_merges_linear_weights_by_regmean_and_interpolates_the_rest(tmp_path, tiny):
    config, other = _two_parents(tmp_path, tiny, classes=["attention", "routed_experts", "lm_head"])
    summary = format_plan(build_plan(load_config(config), config_dir=tmp_path))
    assert "attention (RegMean): 0.7 base + 0.3 donor1" in summary and "stage RegMean statistics: donor1" in summary
    result = run_merge(load_config(config), config_dir=tmp_path, progress=False)
    out = result.output_dir
    merged, a, b = tensors_of(out), tensors_of(tiny), tensors_of(other)
    zdir = out / ".zenith"
    assert set(result.plan.stages.regmean) == {"base", "donor1"}
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.experts.0.down_proj.weight",
                 "lm_head.weight"):
        want = regmean_merge([a[name], b[name]], [read_gram(grams_file(zdir, k), name) for k in ("base", "donor1")],
                             [0.7, 0.3])
        assert torch.equal(merged[name], want.to(merged[name].dtype)), name
        assert not torch.allclose(merged[name], interpolate([a[name], b[name]], [0.7, 0.3]), atol=1e-6), name
    for name, weights in (("model.layers.1.mlp.shared_experts.up_proj.weight", [0.7, 0.3]),  # class not listed
                          ("model.layers.1.input_layernorm.weight", [0.5, 0.5])):
        assert torch.equal(merged[name], interpolate([a[name], b[name]], weights).to(merged[name].dtype)), name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    # resumed: the statistics are reused, not recomputed
    before = grams_file(zdir, "donor1").stat().st_mtime_ns
    run_merge(load_config(config), config_dir=tmp_path, resume=True, progress=False)
    assert grams_file(zdir, "donor1").stat().st_mtime_ns == before


def test_regmean_data_needs_one_text_list_per_parent(tmp_path, tiny):
    data = {"base_model": str(tiny), "merge_method": "assembly",
            "experts": [{"source_model": str(tiny)}, {"source_model": str(tmp_path)}],
            "assembly": {"weights": {"default": [0.5, 0.5]}, "regmean": {"data": [["a.txt"]]}}}
    with pytest.raises(ConfigError, match=r"assembly.regmean.data: 1 text lists for 2 experts"):
        parse_config(data)
    data["assembly"]["regmean"] = {"data": [["a"], ["b"]], "classes": ["norms"]}
    with pytest.raises(ConfigError, match="norms"):
        parse_config(data)


@pytest.mark.demo
def test_search_keeps_regmean_and_computes_its_statistics_once(tmp_path):
    """The demo Chimera's search: every candidate a RegMean assembly, the statistics computed for the first only."""
    from zenith_merge.search import run_search

    chimera = ROOT / "merge" / "examples" / "chimera.yml"
    data = yaml.safe_load(chimera.read_text())
    data["assembly"]["regmean"]["max_tokens"] = 1024
    data["search"].update(grid=[0.0, 0.3, 1.0], generations=0, max_chars=3000)
    work = tmp_path / "search"
    result = run_search(parse_config(data), config_dir=chimera.parent, progress=False, work_dir=work)
    stats = grams_file(work / ".zenith", "donor1")
    assert [s.candidate.lambdas[0][1] for s in result.sweep()] == [0.0, 0.3, 1.0]
    assert result.sweep()[-1].gap == pytest.approx(1.0) and stats.is_file()
    first = stats.stat().st_mtime_ns
    run_search(parse_config(data), config_dir=chimera.parent, progress=False, work_dir=work)
    assert stats.stat().st_mtime_ns == first
