"""The exact maths of grafting and assembly, on single tensors.

An expert is a SiLU-gated FFN, E(x) = down . (silu(gate . x) * (up . x)), with gate/up of
shape (inter, hidden) and down of shape (hidden, inter). Everything here keeps an expert a
plain FFN of that form, so the output loads with no custom code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`t` grown with zeros at the end of each dimension to `shape`.

    Zero rows of gate/up give silu(0) * 0 = 0 in the new units, and zero columns of down add
    nothing, so a padded expert computes exactly the same function.
    """
    if tuple(t.shape) == tuple(shape):
        return t
    if len(shape) != t.dim() or any(s < d for s, d in zip(shape, t.shape)):
        raise ValueError(f"cannot pad a tensor of shape {tuple(t.shape)} to {tuple(shape)}")
    pad = []
    for s, d in reversed(list(zip(shape, t.shape))):
        pad += [0, s - d]
    return F.pad(t, pad)


def fold_projection(w: torch.Tensor, proj: str, *, A: torch.Tensor | None = None, B: torch.Tensor | None = None,
                    scale: float = 1.0) -> torch.Tensor:
    """One expert projection mapped into the base's hidden space (float32).

    gate' = gate . A and up' = up . A, with A (d_source, d_base) taking the base's normalised MoE
    input to the source's; down' = scale * B . down, with B (d_base, d_source) taking the
    source's residual stream to the base's. None means identity.
    """
    w = w.float()
    if proj in ("gate", "up"):
        return w if A is None else w @ A.float()
    if proj != "down":
        raise ValueError(f"unknown expert projection {proj!r}")
    out = w if B is None else B.float() @ w
    return out if scale == 1.0 else out * scale


def expert_forward(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """E(x) = down . (silu(gate . x) * (up . x)) for rows of x: the function an expert computes."""
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def relative_difference(w: torch.Tensor, ref: torch.Tensor) -> float:
    """||w - ref||_F / ||ref||_F (inf when ref is zero and w is not): how far a parent is from the base."""
    w, ref = w.float(), ref.float()
    num = torch.linalg.vector_norm(w - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def interpolate(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i W_i / sum_i w_i, in float32."""
    total = float(sum(weights))
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights):
        out.add_(t.float(), alpha=w / total)
    return out


def rescaled_to_norm(noise: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`noise` scaled to W's Frobenius norm: a random stand-in for W that keeps nothing of W but its size
    (the `random_experts` control). noise * ||W||_F / ||noise||_F."""
    return noise * (torch.linalg.vector_norm(w.float()) / torch.linalg.vector_norm(noise).clamp_min(1e-30))
