"""The exact maths of grafting: zero padding, folding maps into experts, interpolation."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zenith_merge.maths.graft import expert_forward, fold_projection, interpolate, pad_to, relative_difference


def _expert(gen, hidden, inter):
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in
            ((inter, hidden), (inter, hidden), (hidden, inter))]


@settings(max_examples=60, deadline=None)
@given(hidden=st.integers(1, 24), inter=st.integers(1, 24), extra=st.integers(0, 24), tokens=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1))
def test_padding_the_intermediate_dimension_keeps_the_function(hidden, inter, extra, tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    gate, up, down = _expert(gen, hidden, inter)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    big = inter + extra
    padded = pad_to(gate, (big, hidden)), pad_to(up, (big, hidden)), pad_to(down, (hidden, big))
    assert padded[0].shape == (big, hidden) and padded[2].shape == (hidden, big)
    assert torch.equal(padded[0][:inter], gate) and not padded[0][inter:].any() and not padded[2][:, inter:].any()
    torch.testing.assert_close(expert_forward(x, *padded), expert_forward(x, gate, up, down), rtol=1e-12, atol=1e-12)


def test_pad_refuses_to_shrink():
    import pytest

    with pytest.raises(ValueError, match="cannot pad"):
        pad_to(torch.zeros(4, 3), (2, 3))


@settings(max_examples=40, deadline=None)
@given(d_base=st.integers(1, 12), d_src=st.integers(1, 12), inter=st.integers(1, 12), scale=st.floats(0.1, 4.0),
       seed=st.integers(0, 2**31 - 1))
def test_folded_expert_is_the_source_expert_between_the_maps(d_base, d_src, inter, scale, seed):
    """E'(x) = c * B . E(A . x): folding A into gate/up and c * B into down composes the maps exactly."""
    gen = torch.Generator().manual_seed(seed)
    gate, up, down = _expert(gen, d_src, inter)
    A = torch.randn(d_src, d_base, generator=gen, dtype=torch.float64)
    B = torch.randn(d_base, d_src, generator=gen, dtype=torch.float64)
    x = torch.randn(5, d_base, generator=gen, dtype=torch.float64)
    folded = [fold_projection(w, p, A=A, B=B, scale=scale).double() for w, p in
              ((gate, "gate"), (up, "up"), (down, "down"))]
    want = scale * (expert_forward(x @ A.T, gate, up, down) @ B.T)
    # the fold runs in float32: its error scales with the output's magnitude
    torch.testing.assert_close(expert_forward(x, *folded), want, rtol=1e-4, atol=1e-5 * (1 + want.abs().max().item()))


def test_identity_fold_is_the_same_tensor():
    w = torch.randn(6, 4)
    for proj in ("gate", "up", "down"):
        assert torch.equal(fold_projection(w, proj), w)


def test_interpolation_and_relative_difference():
    a, b = torch.full((3, 3), 2.0), torch.full((3, 3), 4.0)
    assert torch.equal(interpolate([a, b], [1.0, 1.0]), torch.full((3, 3), 3.0))
    assert torch.equal(interpolate([a, b], [3.0, 1.0]), torch.full((3, 3), 2.5))
    assert relative_difference(b, a) == 1.0 and relative_difference(a, a) == 0.0
    assert relative_difference(a, torch.zeros(3, 3)) == float("inf")
