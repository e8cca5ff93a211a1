"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", arXiv 2212.09849).

For one linear layer y = x W^T with parents W_1..W_n and G_i = E[x x^T] over the inputs the
layer sees in parent i on parent i's own domain, the merged weight minimises

    sum_i w_i E_i ||x W^T - x W_i^T||^2      =>      W^T = (sum_i w_i G_i)^-1 sum_i w_i G_i W_i^T

so each parent keeps its outputs on the inputs it actually receives, rather than every entry
being averaged. Where all G_i are equal (or proportional to the identity) this is the weighted
average sum_i w_i W_i / sum_i w_i. RegMean's regulariser scales each G_i's off-diagonal entries by
`off_diagonal` (1: the exact least-squares solution; 0: a per-input-feature weighted average),
and a ridge toward the weighted average keeps the sum invertible: the solved system is

    (sum_i w_i G_i + r I) W^T = sum_i w_i G_i W_i^T + r W_avg^T,    W_avg = sum_i w_i W_i / sum_i w_i

so an input direction no parent's text reached takes the average, not zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def shrink_off_diagonal(gram: torch.Tensor, off_diagonal: float) -> torch.Tensor:
    """G with its off-diagonal entries scaled by `off_diagonal`: off * G + (1 - off) * diag(G)."""
    if off_diagonal == 1.0:
        return gram
    return off_diagonal * gram + (1.0 - off_diagonal) * torch.diag(torch.diagonal(gram))


def regmean_merge(tensors: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], weights: Sequence[float], *,
                  off_diagonal: float = 1.0, ridge: float = 1e-4) -> torch.Tensor:
    """The RegMean merge of linear weights `tensors` (each out x in), in float32.

    `grams[i]` is parent i's (in x in) input second moment E[x x^T]; `weights[i]` its share (any
    positive scale: they are normalised). Solved in float64, with r = `ridge` times the mean diagonal
    of the summed Gram (where every Gram is zero, the result is the weighted average).
    """
    if not (len(tensors) == len(grams) == len(weights)) or not tensors:
        raise ValueError(f"regmean_merge: {len(tensors)} tensors, {len(grams)} Gram matrices, {len(weights)} weights")
    total = float(sum(weights))
    width = tensors[0].shape[-1]
    lhs = torch.zeros(width, width, dtype=torch.float64)
    rhs = torch.zeros(width, tensors[0].shape[0], dtype=torch.float64)
    average = torch.zeros_like(rhs)
    for t, g, w in zip(tensors, grams, weights):
        if tuple(g.shape) != (width, width) or t.shape != tensors[0].shape:
            raise ValueError(f"regmean_merge: a {tuple(t.shape)} weight with a {tuple(g.shape)} Gram matrix; "
                             f"expected {tuple(tensors[0].shape)} and ({width}, {width})")
        g = shrink_off_diagonal(g.to(torch.float64), off_diagonal) * (w / total)
        lhs += g
        rhs += g @ t.to(torch.float64).T
        average += t.to(torch.float64).T * (w / total)
    scale = float(torch.diagonal(lhs).mean()) if width else 0.0
    r = ridge * scale if scale > 0 else 1.0
    lhs += torch.eye(width, dtype=torch.float64) * r
    return torch.linalg.solve(lhs, rhs + r * average).T.to(torch.float32).contiguous()


def gram_groups(items: Sequence[tuple[str, int, int | None]], max_bytes: int | None) -> list[list[str]]:
    """Statistics (name, input width, decoder layer or None for what reads the last layer's output) in groups
    whose float64 sums (8 width^2 bytes each) fit in `max_bytes` (None: one group); a matrix larger than the
    budget is a group of its own. They are taken by depth (a stable sort by layer, None last), so each group
    covers few layers and its pass can end at its deepest."""
    ordered = sorted(items, key=lambda item: (item[2] is None, item[2] or 0))
    if max_bytes is None:
        return [[name for name, _, _ in ordered]] if ordered else []
    groups: list[list[str]] = []
    used = 0
    for name, width, _ in ordered:
        size = 8 * width * width
        if not groups or used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups
