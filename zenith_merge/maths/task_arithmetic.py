"""Generalized task arithmetic: task_arithmetic, ties, dare_*, breadcrumbs*, della*, as mergekit 0.1.5 does it.

Every method here is one formula over the task vectors delta_i = theta_i - theta_base of the non-base inputs
(in input order, the base removed):

    delta_i' = S(delta_i)                                    sparsify (or not)
    m_p      = [sgn(w_i delta_i',p) = gamma_p]               sign consensus (TIES methods), else m = 1
    theta    = theta_base + lambda * sum_i w_i delta_i' m_i / D,
    D_p      = sum_i w_i m_i,p  when normalize               (a zero divisor becomes 1;
                                                              without consensus |sum_i w_i| < 1e-8 becomes 1)

`VARIANTS` names S, the consensus and the defaults of `normalize` and `rescale` for each method. The
arithmetic runs in the inputs' dtype (the weights are rounded to it too) and follows mergekit's order of
operations step for step, so the result is bitwise mergekit's: the deltas are packed into one (n, *shape)
tensor, multiplied by the weights in place, then summed over the first axis.

The random sparsifiers draw from `generator` exactly as mergekit draws from the global RNG (one
`torch.bernoulli` per non-base input, in input order, none when density >= 1), so
`torch.manual_seed(s)` + mergekit equals `generator=torch.Generator().manual_seed(s)` here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della"]


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype mergekit's random sparsifiers compute in: CPU float16/32/64 go to float32 (no CPU
    float16 bernoulli); bfloat16 and any non-CPU tensor stay as they are."""
    return t.dtype if t.device.type != "cpu" or t.dtype == torch.bfloat16 else torch.float32


def _apply_mask(t: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """t * mask, times ||t||_1 / ||t * mask||_1 when `rescale` and both norms are >= 1e-7."""
    kept = t * mask
    if not rescale:
        return kept
    before = t.abs().sum()
    after = kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def magnitude_prune(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """TIES "trim" (arXiv:2306.01708): keep the k = max(1, floor(density * n)) largest |delta_p|, zero the rest.

    density >= 1 returns `delta` itself; density <= 0 or an empty tensor gives zeros. Ties in |delta| are
    broken by torch.argsort (unstable), as mergekit breaks them.
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    keep = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    keep[torch.argsort(magnitudes, descending=True)[:k]] = 1
    return _apply_mask(delta, keep.reshape_as(delta), rescale)


def magnitude_outliers_prune(delta: torch.Tensor, density: float, gamma: float = 0.01,
                             rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs (arXiv:2312.06795): drop the floor(gamma * n) largest |delta_p| (outliers) and then
    the smallest, keeping floor(density * n) entries: sorted ascending by |delta|, positions
    [b, b + floor(density * n)) with b = max(0, n - floor(density * n) - floor(gamma * n)).

    density >= 1 returns `delta` itself (outliers are then kept too).
    """
    if density >= 1:
        return delta
    n = delta.numel()
    n_keep = int(density * n)
    n_outliers = int(gamma * n)
    start = max(0, n - n_keep - n_outliers)  # fewer outliers dropped when density needs them
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    ascending = torch.sort(magnitudes, descending=False).indices
    keep = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    keep[ascending[start:start + n_keep]] = 1
    return _apply_mask(delta, keep.reshape_as(delta), rescale)


def random_drop(delta: torch.Tensor, density: float, rescale: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE (arXiv:2311.03099): m_p ~ Bernoulli(density) independently, delta' = m * delta (* ||delta||_1 /
    ||m delta||_1 with `rescale`; DARE's own 1/density scaling is this in expectation).

    density >= 1 returns `delta` itself and draws nothing. The mask is drawn in `_work_dtype`.
    """
    if density >= 1:
        return delta
    if not density >= 0 and delta.numel():  # mergekit's bernoulli fails on it
        raise ValueError(f"DARE density must be in [0, 1], got {density}")
    work = _work_dtype(delta)
    keep = torch.bernoulli(torch.full_like(delta, density, dtype=work), generator=generator)
    return _apply_mask(delta.to(work), keep, rescale).to(delta.dtype)


def della_drop(delta: torch.Tensor, density: float, epsilon: float = 0.15, rescale: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """DELLA's MagPrune (arXiv:2406.11617): keep entry p with probability
    p_keep = density - epsilon + 2 * epsilon * (r_p - r_min) / (r_max - r_min), where r_p is the rank
    (1 = smallest) of |delta_p| along dim 1 (a 1-D tensor is ranked along its length; a 3-D one along its
    second axis, as mergekit does), then rescale as DARE does.

    density >= 1 returns `delta`; density <= 0 gives zeros. Otherwise density +/- epsilon must lie in
    (0, 1), and dim 1 needs at least two entries unless the tensor is empty (mergekit fails there: a NaN
    probability, or a reduction over an empty axis).
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della needs density +/- epsilon inside (0, 1); got density {density}, "
                         f"epsilon {epsilon}")
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    if rows.dim() < 2 or rows.shape[1] == 0 or (rows.shape[1] == 1 and rows.numel() > 0):
        raise ValueError(f"della ranks magnitudes along dim 1, which has fewer than 2 entries in shape "
                         f"{tuple(delta.shape)}; mergekit cannot sparsify it either")
    work = _work_dtype(delta)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, descending=False), dim=1).to(work) + 1
    lowest = ranks.min(dim=1, keepdim=True).values
    highest = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lowest) / (highest - lowest)).clamp(0, 1)
    keep_probability = (density - epsilon) + rank_norm * 2 * epsilon
    keep = torch.bernoulli(keep_probability, generator=generator).to(work)
    return _apply_mask(rows.to(work), keep, rescale).to(delta.dtype).reshape(delta.shape)


def sign_consensus(deltas: torch.Tensor, int8_mask: bool = False) -> torch.Tensor:
    """TIES "elect" (arXiv:2306.01708), mergekit's "sum" rule, on weighted deltas stacked on dim 0:
    gamma_p = +1 if sum_i delta_i,p >= 0 else -1; the mask is sgn(delta_i,p) == gamma_p (zeros never agree).

    `int8_mask` only picks the dtype the signs are compared in; the mask is the same.
    """
    dtype = torch.int8 if int8_mask else deltas.dtype
    signs = deltas.sign().to(dtype)
    elected = (deltas.sum(dim=0) >= 0).to(dtype) * 2 - 1
    return signs == elected


@dataclass(frozen=True)
class Variant:
    """One of mergekit's generalized task arithmetic methods: which sparsifier, whether TIES sign consensus,
    and its defaults for `normalize` and `rescale`."""

    sparsifier: Sparsifier | None
    consensus: bool
    normalize: bool
    rescale: bool


VARIANTS: dict[str, Variant] = {
    "task_arithmetic": Variant(None, consensus=False, normalize=False, rescale=False),
    "ties": Variant("magnitude", consensus=True, normalize=True, rescale=False),
    "dare_ties": Variant("random", consensus=True, normalize=False, rescale=True),
    "dare_linear": Variant("random", consensus=False, normalize=False, rescale=True),
    "breadcrumbs": Variant("magnitude_outliers", consensus=False, normalize=False, rescale=False),
    "breadcrumbs_ties": Variant("magnitude_outliers", consensus=True, normalize=False, rescale=False),
    "della": Variant("della", consensus=True, normalize=True, rescale=True),
    "della_linear": Variant("della", consensus=False, normalize=False, rescale=True),
}


def _sparsify(sparsifier: Sparsifier, delta: torch.Tensor, density: float, gamma: float, epsilon: float,
              rescale: bool, generator: torch.Generator | None) -> torch.Tensor:
    if sparsifier == "magnitude":
        return magnitude_prune(delta, density, rescale)
    if sparsifier == "random":
        return random_drop(delta, density, rescale, generator)
    if sparsifier == "magnitude_outliers":
        return magnitude_outliers_prune(delta, density, gamma, rescale)
    if sparsifier == "della":
        return della_drop(delta, density, epsilon, rescale, generator)
    raise ValueError(f"unknown sparsifier {sparsifier!r}")


def generalized_task_arithmetic(
    base: torch.Tensor, others: Sequence[torch.Tensor], weights: Sequence[float], *,
    sparsifier: Sparsifier | None = None, consensus: bool = False, densities: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None, epsilons: Sequence[float] | None = None, normalize: bool = False,
    rescale: bool = False, lam: float = 1.0, int8_mask: bool = False, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """theta_base + lambda * sum_i w_i S(theta_i - theta_base) m_i / D (see the module docstring).

    Task arithmetic arXiv:2212.04089; `others` are the non-base inputs in input order; `densities`,
    `gammas`, `epsilons` (default 1, 0.01, 0.15) go with them. No other input returns `base` itself.
    """
    if not others:
        return base
    n = len(others)
    densities = [1.0] * n if densities is None else list(densities)
    gammas = [0.01] * n if gammas is None else list(gammas)
    epsilons = [0.15] * n if epsilons is None else list(epsilons)
    if not len(weights) == len(densities) == len(gammas) == len(epsilons) == n:
        raise ValueError(f"task arithmetic needs one weight/density/gamma/epsilon per non-base input ({n})")

    deltas = base.new_empty((n, *base.shape))
    for i, other in enumerate(others):
        delta = other - base
        if sparsifier is not None:
            delta = _sparsify(sparsifier, delta, densities[i], gammas[i], epsilons[i], rescale, generator)
        deltas[i] = delta

    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    while w.dim() < deltas.dim():  # (n, 1, ..., 1): broadcast over each delta
        w.unsqueeze_(-1)
    deltas.mul_(w)

    if consensus:
        agree = sign_consensus(deltas, int8_mask)
        mixed = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)
