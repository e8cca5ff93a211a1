"""The maths of union embedding rows: SLERP between a base row and a mapped donor row, and norm matching.

A donor row d reaches the base's space through a map M (identity when the widths agree,
else a ridge fit over the tokens both vocabularies share): m = M d. Its norm is then matched
to the base's distribution of row norms, so a transferred token is neither louder nor
quieter than the base's own. A shared token's row is slerp(base row, matched m, t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Below this angle (radians) from parallel or antiparallel, the general SLERP formula loses
# precision (it divides by sin(omega)); the limits are used instead.
_EPS_ANGLE = 1e-4


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.clamp_min(torch.finfo(x.dtype).tiny), norm


def _orthogonal(u: torch.Tensor) -> torch.Tensor:
    """For unit rows u, a unit row orthogonal to each: the basis vector least aligned with u, minus its u part."""
    e = torch.zeros_like(u)
    e.scatter_(-1, u.abs().argmin(dim=-1, keepdim=True), 1.0)
    v = e - (e * u).sum(-1, keepdim=True) * u
    return _unit(v)[0]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of the rows of `a` (t=0) and `b` (t=1), in float64.

    Direction: along the great circle from â to b̂,
        dir = (sin((1-t) W) â + sin(t W) b̂) / sin W,    W = angle(a, b) = 2 atan2(|â - b̂|, |â + b̂|)
    Norm: interpolated linearly, (1-t)|a| + t|b|, so rows of equal norm keep it.
    Parallel rows keep their direction. Antiparallel rows have no single great circle: the
    one through a fixed direction orthogonal to â is taken. A zero row has no direction: the
    other row's is used.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs rows of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a64, b64 = a.double(), b.double()
    ua, na = _unit(a64)
    ub, nb = _unit(b64)
    ua = torch.where(na > 0, ua, ub)
    ub = torch.where(nb > 0, ub, ua)
    omega = 2 * torch.atan2(torch.linalg.vector_norm(ua - ub, dim=-1, keepdim=True),
                            torch.linalg.vector_norm(ua + ub, dim=-1, keepdim=True))
    sin = torch.sin(omega)
    general = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / torch.where(sin == 0, 1.0, sin)
    near = _unit((1 - t) * ua + t * ub)[0]
    # near-antiparallel: dir = cos(t W) â + sin(t W) ô, with ô the unit part of b̂ orthogonal to â
    # (sin W is too small to divide by); exactly antiparallel rows take a fixed orthogonal ô
    perp = ub - (ua * ub).sum(-1, keepdim=True) * ua
    perp_norm = torch.linalg.vector_norm(perp, dim=-1, keepdim=True)
    o = torch.where(perp_norm > 1e-12, perp / perp_norm.clamp_min(1e-300), _orthogonal(ua))
    opposite = torch.cos(t * omega) * ua + torch.sin(t * omega) * o
    direction = torch.where(omega < _EPS_ANGLE, near, torch.where(omega > math.pi - _EPS_ANGLE, opposite, general))
    return direction * ((1 - t) * na + t * nb)


@dataclass(frozen=True)
class NormStats:
    """Mean, spread and range of a set of rows' norms."""

    mean: float
    std: float
    low: float
    high: float

    @classmethod
    def of(cls, norms: torch.Tensor) -> NormStats:
        """The statistics of a 1-D tensor of norms (zero rows, never used, left out)."""
        n = norms.double()
        n = n[n > 0]
        if n.numel() == 0:
            return cls(0.0, 0.0, 0.0, 0.0)
        return cls(float(n.mean()), float(n.std()) if n.numel() > 1 else 0.0, float(n.min()), float(n.max()))


def match_norms(rows: torch.Tensor, source: NormStats, target: NormStats) -> torch.Tensor:
    """Rows rescaled so their norms follow `target`'s distribution as they followed `source`'s.

    |r'| = mu_t + sigma_t (|r| - mu_s) / sigma_s, clamped to the target's range; the direction
    is kept. A source without spread maps every row to the target's mean norm.
    """
    unit, norm = _unit(rows.double())
    z = (norm - source.mean) / source.std if source.std > 0 else torch.zeros_like(norm)
    want = (target.mean + target.std * z).clamp(target.low, target.high)
    return torch.where(norm > 0, unit * want, torch.zeros_like(unit))
