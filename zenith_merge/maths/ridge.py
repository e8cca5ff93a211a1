"""Ridge least squares from streamed batches: the linear maps between two models' spaces."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RidgeFit:
    """A fitted map y ~ W x: W (d_y, d_x) in float64, in-sample R^2, and the number of samples."""

    W: torch.Tensor
    r2: float
    n: int


class RidgeAccumulator:
    """Ridge regression y ~ W x from streamed batches, in memory independent of the number of samples.

    W = argmin_W  sum_t ||y_t - W x_t||^2 + lam ||W||_F^2
      = (Y^T X) (X^T X + lam I)^{-1}           X (n, d_x), Y (n, d_y), W (d_y, d_x)

    No intercept: W is folded into bias-free linear layers. Only the sufficient statistics are kept,
    in float64: X^T X, Y^T X, sum ||y||^2 and sum y. Then

      SSE = sum ||y||^2 - 2 tr(W X^T Y) + tr(W X^T X W^T)
      SST = sum ||y||^2 - ||sum y||^2 / n     (centred per output dimension)
      R^2 = 1 - SSE / SST
    """

    def __init__(self, d_x: int, d_y: int):
        self.d_x, self.d_y = d_x, d_y
        self.xtx = torch.zeros(d_x, d_x, dtype=torch.float64)
        self.ytx = torch.zeros(d_y, d_x, dtype=torch.float64)
        self.yy = torch.zeros((), dtype=torch.float64)
        self.y_sum = torch.zeros(d_y, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch of pairs: x (n, d_x), y (n, d_y), rows paired."""
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[1] != self.d_x or y.shape[1] != self.d_y:
            raise ValueError(f"expected x (n, {self.d_x}) and y (n, {self.d_y}), got {tuple(x.shape)} and {tuple(y.shape)}")
        x = x.detach().to("cpu", torch.float64)
        y = y.detach().to("cpu", torch.float64)
        self.xtx += x.T @ x
        self.ytx += y.T @ x
        self.yy += (y * y).sum()
        self.y_sum += y.sum(0)
        self.n += x.shape[0]

    def fit(self, ridge: float) -> RidgeFit:
        """Solve for W with lam = ridge * trace(X^T X) / d_x (ridge relative to the mean squared input)."""
        if self.n == 0:
            raise ValueError("no samples to fit")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        lam = ridge * torch.trace(self.xtx) / self.d_x
        gram = self.xtx + lam * torch.eye(self.d_x, dtype=torch.float64)
        # W^T = gram^{-1} (Y^T X)^T; gram is symmetric positive (semi)definite
        factor, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            w = torch.cholesky_solve(self.ytx.T, factor).T
        else:  # singular without ridge: minimum-norm least squares
            w = (torch.linalg.pinv(gram, hermitian=True) @ self.ytx.T).T
        sse = self.yy - 2 * (w * self.ytx).sum() + ((w @ self.xtx) * w).sum()
        sst = self.yy - (self.y_sum @ self.y_sum) / self.n
        r2 = 1.0 - float(sse.clamp_min(0) / sst) if float(sst) > 0 else float("nan")
        return RidgeFit(W=w.contiguous(), r2=r2, n=self.n)


def accumulator_bytes(d_base: int, d_donor: int) -> int:
    """Bytes of the float64 statistics one layer pair's fits hold: X^T X and Y^T X for A and for B.

    8 (d_b^2 + d_d d_b) + 8 (d_d^2 + d_b d_d) = 8 (d_b + d_d)^2
    """
    return 8 * (d_base + d_donor) ** 2


def pair_groups(pairs: Sequence[tuple[int, int]], d_base: int, d_donor: int,
                max_bytes: int | None) -> list[list[tuple[int, int]]]:
    """Layer pairs split into groups whose statistics fit in `max_bytes` (None: one group); at least one a group."""
    pairs = list(pairs)
    if max_bytes is None:
        return [pairs]
    size = max(1, max_bytes // accumulator_bytes(d_base, d_donor))
    return [pairs[i:i + size] for i in range(0, len(pairs), size)]
