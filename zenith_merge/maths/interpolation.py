"""Interpolation merges: linear, slerp, nuslerp, model_stock, passthrough, as mergekit 0.1.5 computes them.

Each follows mergekit's order of operations and working dtype so the result is bitwise mergekit's:
linear and slerp accumulate in float32 (float64 for float64 inputs) and return the inputs' dtype; nuslerp,
model_stock and passthrough compute in the inputs' dtype. linear and slerp are "batched" kernels in mergekit,
which see each tensor with a leading axis of length 1; they keep that axis internally for the same rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# mergekit's slerp works on at most this many elements per row of scratch at a time; the chunking changes
# the rounding of the norms and the dot product, so it is part of the result.
SLERP_CHUNK = 1024 * 1024


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Model soups (arXiv:2203.05482): theta = sum_i w_i theta_i (/ sum_i w_i when `normalize`).

    The weights are rounded to float32 (float64 inputs: float64), the sum accumulates there by addcmul in
    input order and is divided once at the end, then cast back to the inputs' dtype. A weight sum of 0
    divides by zero, as in mergekit.
    """
    first = tensors[0]
    if not first.is_floating_point():
        raise ValueError(f"linear merging needs floating-point tensors, got {first.dtype}")
    if len(weights) != len(tensors):
        raise ValueError(f"linear needs one weight per input: {len(weights)} weights, {len(tensors)} inputs")
    acc = _accumulation_dtype(first)
    w = torch.tensor([list(weights)], dtype=acc, device=first.device)  # (1, n)
    coefficient_shape = (1,) * (first.dim() + 1)
    total = torch.zeros((1, *first.shape), dtype=acc, device=first.device)
    for tensor, coefficient in zip(tensors, w.unbind(1)):
        total.addcmul_(tensor.unsqueeze(0), coefficient.reshape(coefficient_shape))
    if normalize:
        total.div_(w.sum(dim=1).reshape(coefficient_shape))
    return total.to(first.dtype)[0]


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985) of the flattened tensors, v0 the base:

        theta = arccos(<v0/|v0|, v1/|v1|>),  result = sin((1-t) theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1

    on the unnormalised tensors, and (1-t) v0 + t v1 when |cos theta| > dot_threshold (0.9995). Norms of
    at most eps count as 1. Works in float32 (float64 for float64 inputs) in chunks of SLERP_CHUNK elements:
    |v| is the norm of the chunk norms and the dot the sum of the chunk dots, as mergekit computes them; the
    result is written straight into the inputs' dtype.
    """
    acc = _accumulation_dtype(v0)
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([t], dtype=acc, device=v0.device).reshape(-1, 1)
    width = a.shape[1]
    if width == 0:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    starts = range(0, width, SLERP_CHUNK)

    def chunk(x: torch.Tensor, start: int) -> torch.Tensor:
        return x[:, start:start + SLERP_CHUNK].to(acc)

    norm_a = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(chunk(a, s), dim=1, keepdim=True) for s in starts]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(chunk(b, s), dim=1, keepdim=True) for s in starts]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    cos = torch.stack([((chunk(a, s) / norm_a) * (chunk(b, s) / norm_b)).sum(dim=1, keepdim=True)
                       for s in starts]).sum(dim=0).clamp(-1, 1)
    nearly_parallel = cos.abs() > dot_threshold
    theta = torch.acos(torch.where(nearly_parallel, 0, cos))
    sin_theta = torch.sin(theta)
    coefficient_a = torch.where(nearly_parallel, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coefficient_b = torch.where(nearly_parallel, tt, torch.sin(tt * theta) / sin_theta)

    out = torch.empty_like(a)
    for s in starts:
        out[:, s:s + SLERP_CHUNK] = coefficient_a * chunk(a, s) + coefficient_b * chunk(b, s)
    return out.reshape(v0.shape)


def _nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool,
                  eps: float = 1e-8) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    parallel = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(parallel, 0, cos))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    out = torch.where(parallel, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None,
            row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """mergekit's NuSLERP: slerp between the two non-base inputs with t = w_1 / (w_0 + w_1) (0.5 when
    |w_0 + w_1| < 1e-6), in the inputs' dtype; with a base, slerp of the task vectors added to the base:
    theta_base + slerp(t, theta_0 - theta_base, theta_1 - theta_base).

    `flatten` (default) slerps the whole tensors; otherwise each row of the last axis is slerped on its own
    (`row_wise`: each column, i.e. along dim 0). Vectors whose cos^2 is within 1e-16 of 1 interpolate
    linearly; norms below 1e-7 count as 1e-7.
    """
    if len(tensors) != 2 or len(weights) != 2:
        raise ValueError(f"nuslerp needs exactly two non-base inputs and weights, got {len(tensors)}")
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is None:
        return _nuslerp_pair(t, tensors[0], tensors[1], row_wise, flatten)
    return base + _nuslerp_pair(t, tensors[0] - base, tensors[1] - base, row_wise, flatten)


def model_stock(base: torch.Tensor, others: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock (arXiv:2403.19522): with N = len(others) fine-tuned weights, the mean pairwise cosine of
    their offsets from the base cos theta, t = N cos theta / (1 + (N - 1) cos theta) and
    theta = t * mean_i(theta_i) + (1 - t) * theta_base, in the inputs' dtype.

    The cosine is of whole tensors, or per row of the last axis with `filter_wise`. Norm products below
    1e-6 count as 1e-6; where |1 + (N - 1) cos theta| < 1e-6 the base is kept (t = 0).
    """
    if len(others) < 2:
        raise ValueError(f"model_stock needs at least two non-base inputs, got {len(others)}")
    shape = base.shape
    if filter_wise:
        if base.dim() == 1:
            base = base.unsqueeze(0)
            others = [o.unsqueeze(0) for o in others]
    else:
        base = base.reshape(-1)
        others = [o.reshape(-1) for o in others]

    offsets = [o - base for o in others]
    cosines = []
    for i, x in enumerate(offsets):
        for y in offsets[i + 1:]:
            norms = torch.norm(x, dim=-1) * torch.norm(y, dim=-1)
            cosines.append(((x * y).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(others)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    mean = sum(others) / n  # the builtin sum (0 + theta_1 + ...), as mergekit adds them
    return (t * mean + (1 - t) * base).reshape(shape)


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The single input unchanged (the same tensor object), or `tensor * scale`."""
    return tensor if scale is None else tensor * scale
