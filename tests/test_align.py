"""Hidden-space alignment: the streamed ridge fit is the closed-form one, tokens pair by end offset,
the artefact round-trips, and a fit on the demo pair gives finite maps of the right shapes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zenith_merge.errors import CalibrationError
from zenith_merge.stages.align import (
    Alignment,
    RidgeAccumulator,
    accumulator_bytes,
    fit_alignment,
    fit_alignment_groups,
    interleaved_passages,
    load_alignment,
    pair_by_offsets,
    pair_groups,
    read_info,
    read_maps,
    save_alignment,
    save_alignment_groups,
    split_passages,
)

# ------------------------------------------------------------------ ridge maths


def _closed_form(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge as ordinary least squares on augmented data: [X; sqrt(lam) I] W^T = [Y; 0]."""
    d_x = x.shape[1]
    lam = ridge * float((x * x).sum()) / d_x
    x_aug = torch.cat([x, math.sqrt(lam) * torch.eye(d_x, dtype=x.dtype)])
    y_aug = torch.cat([y, torch.zeros(d_x, y.shape[1], dtype=y.dtype)])
    return torch.linalg.lstsq(x_aug, y_aug, driver="gelsd").solution.T


def _r2(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    sse = ((y - x @ w.T) ** 2).sum()
    sst = ((y - y.mean(0)) ** 2).sum()
    return float(1 - sse / sst)


def test_ridge_recovers_a_known_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 24, generator=g)
    w_true = torch.randn(9, 24, generator=g)
    y = x @ w_true.T + 1e-3 * torch.randn(4000, 9, generator=g)
    acc = RidgeAccumulator(24, 9)
    for lo in range(0, 4000, 512):
        acc.add(x[lo:lo + 512], y[lo:lo + 512])
    fit = acc.fit(1e-8)
    assert fit.n == 4000 and fit.W.shape == (9, 24) and fit.W.dtype == torch.float64
    torch.testing.assert_close(fit.W.float(), w_true, rtol=0, atol=1e-4)
    assert fit.r2 > 0.99999
    # a large ridge shrinks W and costs fit
    shrunk = acc.fit(10.0)
    assert shrunk.W.norm() < 0.2 * fit.W.norm() and shrunk.r2 < fit.r2


@settings(max_examples=60, deadline=None, database=None)  # no .hypothesis/ in the repo
@given(
    d_x=st.integers(1, 12),
    d_y=st.integers(1, 8),
    extra=st.integers(2, 40),
    ridge=st.sampled_from([0.0, 1e-4, 1e-2, 0.5, 3.0]),
    cuts=st.lists(st.floats(0, 1), max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_streamed_fit_equals_closed_form(d_x, d_y, extra, ridge, cuts, seed):
    g = torch.Generator().manual_seed(seed)
    n = 2 * d_x + extra
    x = torch.randn(n, d_x, generator=g, dtype=torch.float64) * torch.rand(d_x, generator=g, dtype=torch.float64).add(0.1)
    y = x @ torch.randn(d_x, d_y, generator=g, dtype=torch.float64) + torch.randn(n, d_y, generator=g, dtype=torch.float64)
    y += torch.randn(d_y, generator=g, dtype=torch.float64)  # an offset: SST must be centred

    whole = RidgeAccumulator(d_x, d_y)
    whole.add(x, y)
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    split = RidgeAccumulator(d_x, d_y)
    for lo, hi in zip(bounds, bounds[1:]):
        split.add(x[lo:hi], y[lo:hi])

    expected = _closed_form(x, y, ridge)
    fit, fit_split = whole.fit(ridge), split.fit(ridge)
    assert fit.n == fit_split.n == n
    torch.testing.assert_close(fit.W, expected, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(fit_split.W, fit.W, rtol=1e-10, atol=1e-12)
    assert fit.r2 == pytest.approx(_r2(x, y, expected), rel=1e-7, abs=1e-9)
    assert fit_split.r2 == pytest.approx(fit.r2, rel=1e-9, abs=1e-12)


def test_accumulator_rejects_bad_shapes_and_empty_fits():
    acc = RidgeAccumulator(3, 2)
    with pytest.raises(ValueError, match="no samples"):
        acc.fit(0.1)
    with pytest.raises(ValueError, match=r"x \(n, 3\)"):
        acc.add(torch.zeros(4, 3), torch.zeros(5, 2))


# ------------------------------------------------------------------ pairing


def test_pair_by_offsets_hand_made():
    # end offsets; a has two tokens ending at 8 (byte-level BPE splitting one character in two)
    ends_a = torch.tensor([3, 7, 8, 8, 9, 10])
    ends_b = torch.tensor([3, 5, 7, 9, 10])
    idx_a, idx_b = pair_by_offsets(ends_a, ends_b)
    assert idx_a.tolist() == [0, 1, 4, 5] and idx_b.tolist() == [0, 2, 3, 4]
    assert torch.equal(ends_a[idx_a], ends_b[idx_b])
    # the last of tokens sharing an end is the one paired
    idx_a, idx_b = pair_by_offsets(torch.tensor([2, 4, 4]), torch.tensor([4]))
    assert idx_a.tolist() == [2] and idx_b.tolist() == [0]
    empty_a, empty_b = pair_by_offsets(torch.tensor([1, 2]), torch.tensor([3]))
    assert empty_a.numel() == empty_b.numel() == 0
    assert [t.numel() for t in pair_by_offsets(torch.zeros(0, dtype=torch.long), torch.tensor([3]))] == [0, 0]
    with pytest.raises(ValueError, match="non-decreasing"):
        pair_by_offsets(torch.tensor([3, 1]), torch.tensor([1, 3]))


def test_split_passages_cuts_at_line_ends():
    text = "".join(f"line {i} " + "x" * (i % 7) + "\n" for i in range(60)) + "y" * 250
    passages = split_passages(text, 100)
    assert "".join(passages) == text
    assert all(len(p) <= 100 for p in passages)
    assert all(p.endswith("\n") for p in passages[:-3])  # the 250-char tail is cut hard


def test_interleaved_passages_give_every_text_its_share_of_a_budget():
    """A fit stopped at a token budget must see every calibration text, not only the first ones."""
    long_code = "".join(f"code {i}\n" for i in range(300))
    maths, chat = "".join(f"maths {i}\n" for i in range(40)), "chat\n"
    passages = list(interleaved_passages([long_code, maths, chat], 50))
    per_text = [split_passages(t, 50) for t in (long_code, maths, chat)]
    assert sorted(passages) == sorted(p for ps in per_text for p in ps)  # nothing lost or repeated
    for ps in per_text:  # each text's passages keep their order
        assert [p for p in passages if p in ps] == ps
    first = passages[:3 * len(per_text[2])]
    assert {p.split()[0] for p in first} == {"code", "maths", "chat"}
    head = passages[:2 * len(per_text[1])]  # while maths lasts, code and maths alternate
    assert sum(p.startswith("maths") for p in head) >= len(per_text[1]) - 1
    assert list(interleaved_passages([], 50)) == [] and list(interleaved_passages(["", "a\n"], 50)) == ["a\n"]


# ------------------------------------------------------------------ artefact


def _alignment() -> Alignment:
    g = torch.Generator().manual_seed(1)
    pairs = [(1, 0), (3, 2)]
    return Alignment(
        pairs=pairs,
        A={p: torch.randn(6, 8, generator=g) for p in pairs},
        B={p: torch.randn(8, 6, generator=g) for p in pairs},
        r2_A={(1, 0): 0.25, (3, 2): 0.5}, r2_B={(1, 0): 0.125, (3, 2): 0.75},
        n_tokens=1234, ridge=0.01, d_base=8, d_donor=6, meta={"base": "b", "donor": "d"},
    )


def test_save_load_round_trip(tmp_path):
    original = _alignment()
    folder = save_alignment(original, tmp_path / ".zenith")
    assert sorted(p.name for p in folder.iterdir()) == ["align.json", "align.safetensors"]
    info = json.loads((folder / "align.json").read_text())
    assert info["pairs"] == [[1, 0], [3, 2]] and info["r2"]["A"]["A.3.2"] == 0.5 and info["n_tokens"] == 1234
    loaded = load_alignment(folder)
    assert loaded.pairs == original.pairs and loaded.n_tokens == 1234 and loaded.ridge == 0.01
    assert (loaded.d_base, loaded.d_donor) == (8, 6) and loaded.r2_B == original.r2_B and loaded.meta == original.meta
    for pair in original.pairs:
        assert torch.equal(loaded.A[pair], original.A[pair]) and torch.equal(loaded.B[pair], original.B[pair])
        assert loaded.A[pair].dtype == torch.float32


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(CalibrationError, match="no complete alignment"):
        load_alignment(tmp_path)
    bad = _alignment()
    bad.A[(3, 2)] = torch.zeros(6, 7)
    save_alignment(bad, tmp_path)
    with pytest.raises(CalibrationError, match=r"A\.3\.2 of shape \(6, 8\)"):
        load_alignment(tmp_path)


# ------------------------------------------------------------------ end to end on the demo pair


@pytest.mark.demo
def test_fit_alignment_on_demo_models(tmp_path):
    from zenith_merge.demo import calibration_text, ensure_demo

    base, donor = ensure_demo("zen-tiny"), ensure_demo("qwen3-moe-tiny")
    texts = [calibration_text("code")[:3000], calibration_text("maths")[:3000]]
    layers = lambda layer: (f"model.layers.{layer}.mlp", f"model.layers.{layer}")  # noqa: E731
    pairs = [(1, 0), (2, 1), (3, 2)]
    alignment = fit_alignment(base, donor, pairs, texts, base_points=layers, donor_points=dict(enumerate(
        [layers(0), layers(1), layers(2)])), ridge=1e-2, max_tokens=1500, progress=False)
    assert alignment.pairs == pairs and (alignment.d_base, alignment.d_donor) == (128, 96)
    assert 0 < alignment.n_tokens <= 1500
    for pair in pairs:
        a, b = alignment.A[pair], alignment.B[pair]
        assert a.shape == (96, 128) and b.shape == (128, 96)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        print(f"pair {pair}: R^2 A {alignment.r2_A[pair]:.3f}  B {alignment.r2_B[pair]:.3f}  ({alignment.n_tokens} tokens)")
        # in-sample R^2 of a ridge fit lies in [0, 1]; unrelated models give little, identical ones ~1
        assert 0.05 < alignment.r2_A[pair] < 0.99 and 0.05 < alignment.r2_B[pair] < 0.99
    loaded = load_alignment(save_alignment(alignment, tmp_path))
    assert torch.equal(loaded.A[(2, 1)], alignment.A[(2, 1)]) and loaded.r2_B == alignment.r2_B


def test_pair_groups_fit_the_budget_and_keep_one_pair_at_least():
    pairs = [(i + 1, i) for i in range(7)]
    one = accumulator_bytes(128, 96)
    assert one == 8 * (128 + 96) ** 2
    assert pair_groups(pairs, 128, 96, None) == [pairs]
    assert pair_groups(pairs, 128, 96, 3 * one + 1) == [pairs[:3], pairs[3:6], pairs[6:]]
    assert pair_groups(pairs, 128, 96, 1) == [[p] for p in pairs]


def test_grouped_fit_gives_the_same_maps_one_group_at_a_time(tmp_path):
    """With a budget of one layer pair, each pair is fitted in its own pass and saved before the next: same maps."""
    from zenith_merge.demo import calibration_text, ensure_demo

    base, donor = ensure_demo("zen-tiny"), ensure_demo("qwen3-moe-tiny")
    texts = [calibration_text("maths")[:2000]]
    layers = lambda layer: (f"model.layers.{layer}.mlp", f"model.layers.{layer}")  # noqa: E731
    pairs = [(1, 0), (2, 1), (3, 2)]
    kwargs = dict(base_points=layers, donor_points=layers, max_tokens=600, progress=False)
    whole = fit_alignment(base, donor, pairs, texts, **kwargs)
    groups = fit_alignment_groups(base, donor, pairs, texts, max_accumulator_bytes=accumulator_bytes(128, 96),
                                  **kwargs)
    folder = save_alignment_groups(groups, tmp_path / "grouped")
    assert sorted(p.name for p in folder.iterdir()) == ["align-0.safetensors", "align-1.safetensors",
                                                        "align-2.safetensors", "align.json"]
    for pair in pairs:
        a, b = read_maps(folder, pair)
        assert torch.equal(a, whole.A[pair]) and torch.equal(b, whole.B[pair])
    info = json.loads((folder / "align.json").read_text())
    assert info["files"]["A.2.1"] == "align-1.safetensors" and set(info["sha256"]) == {
        "align-0.safetensors", "align-1.safetensors", "align-2.safetensors"}
    assert load_alignment(folder).r2_A == whole.r2_A


def test_saving_groups_lets_each_groups_maps_go_before_the_next_is_fitted(tmp_path):
    """Memory holds one group: by the time the next group is asked for, the last one's maps are freed."""
    import gc
    import weakref

    seen: list[weakref.ref] = []

    def groups():
        for k in range(3):
            gc.collect()
            assert all(ref() is None for ref in seen), f"group {k - 1}'s maps still alive while group {k} is fitted"
            pair = (k + 1, k)
            a, b = torch.randn(3, 4), torch.randn(4, 3)
            seen.extend([weakref.ref(a), weakref.ref(b)])
            yield Alignment(pairs=[pair], A={pair: a}, B={pair: b}, r2_A={pair: 0.5}, r2_B={pair: 0.5},
                            n_tokens=10, ridge=1e-2, d_base=4, d_donor=3)
            del a, b

    folder = save_alignment_groups(groups(), tmp_path / "fit")
    assert read_info(folder)["pairs"] == [[1, 0], [2, 1], [3, 2]]
