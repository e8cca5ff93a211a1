"""How an MoE block turns router logits into expert choices and weights, as plain maths.

The planner needs two things from a router that differ between architectures:
which experts a token picks (for expert usage and selection) and how much the picked
experts' outputs are scaled (for scale compensation when experts move between
models). Both are written here once, from an architecture's routing settings,
instead of in per-architecture code:

    DeepSeek-V3 (sigmoid):  s = sigmoid(z); pick top-k of s + bias within the best
                            `topk_group` of `n_group` groups (group score: sum of its
                            two best s + bias); w = s_picked [/ sum s_picked] * scaling
    Qwen3-MoE  (softmax):   p = softmax(z); pick top-k of p; w = p_picked [/ sum p_picked]
    DeepSeek-V2 (softmax):  as Qwen3-MoE, within the best groups when `topk_method` is
                            group_limited_greedy (group score: its best p); w times scaling
    dense MLP:              one expert, always on, w = 1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..architectures import architecture_of, dim


@dataclass(frozen=True)
class RoutingSpec:
    """The routing of one model's MoE layers."""

    scoring: Literal["sigmoid", "softmax", "none"]
    n_experts: int
    top_k: int
    norm_topk_prob: bool = False
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["top2_sum", "max"] = "top2_sum"

    @property
    def group_size(self) -> int:
        return self.n_experts // max(1, self.n_group)


def routing_spec(config: dict[str, Any], *, where: str = "config.json") -> RoutingSpec:
    """The routing settings of a model config, read through its architecture table."""
    arch = architecture_of(config, where=where)
    if arch.scoring == "none":
        return RoutingSpec("none", n_experts=1, top_k=1)

    def setting(name: str, fallback: Any) -> Any:
        key = arch.routing_keys.get(name)
        if key is None:
            return fallback
        value = config.get(key, arch.defaults.get(key, fallback))
        return fallback if value is None else value

    grouped = setting("topk_method", None) != "greedy"
    return RoutingSpec(
        scoring=arch.scoring,
        n_experts=dim(config, arch, "n_experts") or 0,
        top_k=dim(config, arch, "top_k") or 0,
        norm_topk_prob=bool(setting("norm_topk_prob", False)),
        scaling=float(setting("scaling", 1.0)),
        n_group=int(setting("n_group", 1)) if grouped else 1,
        topk_group=int(setting("topk_group", 1)) if grouped else 1,
        group_score=arch.group_score,
    )


def route(logits: torch.Tensor, spec: RoutingSpec, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert indices (tokens, top_k) and their weights for router logits (tokens, n_experts)."""
    logits = logits.float()
    if spec.scoring == "sigmoid":
        scores = logits.sigmoid()
        choice = scores + (bias.float() if bias is not None else 0.0)
    else:
        scores = choice = logits.softmax(dim=-1)
    if spec.n_group > 1:
        grouped = choice.view(-1, spec.n_group, spec.group_size)
        group_scores = grouped.amax(-1) if spec.group_score == "max" else \
            grouped.topk(min(2, spec.group_size), dim=-1).values.sum(-1)
        keep = group_scores.topk(spec.topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~mask.repeat_interleave(spec.group_size, dim=1), float("-inf"))
    idx = choice.topk(spec.top_k, dim=-1).indices
    weights = scores.gather(1, idx)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return idx, weights * spec.scaling


def routed_total(spec: RoutingSpec, mean_total: float | None = None) -> float | None:
    """The total weight a token's picked experts get together: what scale compensation matches.

    With normalised top-k weights it is exactly `scaling` (the weights of one token sum to it).
    Without normalisation it depends on the router's scores, so it is the measured mean over
    tokens of the summed weights, as `route` gives them (None when not measured). A dense MLP
    is always on with weight 1.
    """
    if spec.scoring == "none":
        return 1.0
    if spec.norm_topk_prob:
        return spec.scaling
    return mean_total
