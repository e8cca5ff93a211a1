"""The maths of union embedding rows: SLERP (closed form, norms, (anti)parallel rows) and norm matching."""

from __future__ import annotations

import math

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from zenith_merge.vocab.rows import NormStats, match_norms, slerp

dims = st.integers(2, 24)
ts = st.floats(0.0, 1.0)
seeds = st.integers(0, 2**31 - 1)


def _rows(seed: int, n: int, d: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ua, ub = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    return 2 * torch.atan2((ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1))


@settings(max_examples=60, deadline=None)
@given(seed=seeds, d=dims, t=ts)
def test_slerp_of_unit_rows_matches_the_closed_form(seed, d, t):
    a, b = _rows(seed, 5, d), _rows(seed + 1, 5, d)
    a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.arccos((a * b).sum(-1).clamp(-1, 1)).unsqueeze(-1)
    want = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    torch.testing.assert_close(slerp(a, b, t), want, rtol=1e-7, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(seed=seeds, d=dims, t=ts, scale=st.floats(1e-3, 1e3))
def test_slerp_preserves_a_common_norm_and_moves_by_t_times_the_angle(seed, d, t, scale):
    a, b = _rows(seed, 4, d), _rows(seed + 1, 4, d)
    a = a / a.norm(dim=-1, keepdim=True) * scale
    b = b / b.norm(dim=-1, keepdim=True) * scale
    out = slerp(a, b, t)
    torch.testing.assert_close(out.norm(dim=-1), torch.full((4,), scale, dtype=torch.float64), rtol=1e-9, atol=0)
    torch.testing.assert_close(_angle(a, out), t * _angle(a, b), rtol=1e-6, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, d=dims, t=ts)
def test_slerp_interpolates_unequal_norms_linearly(seed, d, t):
    a, b = _rows(seed, 3, d), 3 * _rows(seed + 1, 3, d)
    torch.testing.assert_close(slerp(a, b, t).norm(dim=-1), (1 - t) * a.norm(dim=-1) + t * b.norm(dim=-1))


@settings(max_examples=40, deadline=None)
@given(seed=seeds, d=dims)
@example(seed=715, d=2)  # nearly antiparallel rows: the endpoint must still be b itself
def test_slerp_endpoints_are_the_rows_themselves(seed, d):
    a, b = _rows(seed, 3, d), _rows(seed + 1, 3, d)
    torch.testing.assert_close(slerp(a, b, 0.0), a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=1e-12, atol=1e-12)
    assert torch.equal(slerp(a.float(), b.float(), 0.0).float(), a.float())  # t=0 keeps a base row exactly


@settings(max_examples=40, deadline=None)
@given(seed=seeds, d=dims, t=ts, k=st.floats(0.1, 10.0))
def test_slerp_of_parallel_rows_keeps_their_direction(seed, d, t, k):
    a = _rows(seed, 3, d)
    out = slerp(a, k * a, t)
    torch.testing.assert_close(out, a * ((1 - t) + t * k), rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, d=dims, t=ts)
def test_slerp_of_antiparallel_rows_turns_through_a_half_circle_keeping_the_norm(seed, d, t):
    a = _rows(seed, 3, d)
    out = slerp(a, -a, t)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=-1), a.norm(dim=-1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_angle(a, out), torch.full((3,), t * math.pi, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


def test_slerp_with_a_zero_row_takes_the_other_rows_direction():
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    out = slerp(a, b, 0.25)
    torch.testing.assert_close(out, torch.tensor([[2.25, 3.0], [0.0, 0.5], [0.0, 0.0]], dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(seed=seeds, d=dims, mean=st.floats(2.0, 5.0), std=st.floats(0.05, 0.4))  # no row below 0
def test_matched_norms_follow_the_target_distribution_and_keep_directions(seed, d, mean, std):
    rows = _rows(seed, 200, d) * torch.rand(200, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    source = NormStats.of(rows.norm(dim=-1))
    target = NormStats(mean=mean, std=std, low=0.0, high=1e9)
    out = match_norms(rows, source, target)
    norms = out.norm(dim=-1)
    assert abs(float(norms.mean()) - mean) < 1e-9 * mean + 1e-9
    assert abs(float(norms.std()) - std) < 1e-6
    torch.testing.assert_close(out / norms.unsqueeze(-1), rows / rows.norm(dim=-1, keepdim=True))


def test_matched_norms_stay_in_the_targets_range():
    rows = torch.tensor([[10.0, 0.0], [0.0, 1.0], [0.5, 0.0], [0.0, 0.0]])
    out = match_norms(rows, NormStats.of(rows.norm(dim=-1)), NormStats(mean=1.0, std=5.0, low=0.5, high=2.0))
    norms = out.norm(dim=-1)
    assert float(norms[:3].min()) >= 0.5 - 1e-12 and float(norms.max()) <= 2.0 + 1e-12
    assert float(norms[3]) == 0.0  # a zero row (padding) stays zero
