"""Which source expert fills which output slot: layer map, expert slots, routing groups, scales.

Pure functions over model facts (no weights): the planner calls them to lay out the
output's MoE layers before anything heavy runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..architectures import ModelFacts
from ..errors import PlanError
from ..maths.routing import RoutingSpec, routed_total


def candidate_layers(f: ModelFacts) -> tuple[int, ...]:
    """The layers of a source that can give experts: its MoE layers, or every layer of a dense model."""
    return f.moe_layers if f.is_moe else tuple(range(f.num_layers))


def map_layers(base_layers: Sequence[int], base_depth: int, source_layers: Sequence[int], source_depth: int) -> dict[int, int]:
    """Base layer -> source layer by relative depth: the source layer nearest to l / (L_base - 1) of the way down.

    depth(l) = l / (L - 1) for a model of L layers; ties go to the shallower layer.
    """
    if not source_layers:
        raise PlanError("the source has no layer to take experts from")
    out = {}
    for layer in base_layers:
        rel = layer / (base_depth - 1) if base_depth > 1 else 0.0
        target = rel * (source_depth - 1)
        out[layer] = min(source_layers, key=lambda s: (abs(s - target), s))
    return out


@dataclass(frozen=True)
class SourceSlots:
    """What one `experts[]` entry contributes to every output MoE layer."""

    key: str
    routed: int  # routed experts kept per layer (0 for a dense donor)
    dense_mlp: bool  # the donor's MLP as one expert
    shared_as_routed: bool  # the donor's shared expert as one more routed expert

    @property
    def count(self) -> int:
        return self.routed + int(self.dense_mlp) + int(self.shared_as_routed)


def routing_groups(base: RoutingSpec, sources: Sequence[SourceSlots], top_k: int, *, base_included: bool) -> tuple[int, int]:
    """(n_group, topk_group) of the output: groups of the base's group size, never mixing base and donor experts.

    Keeping the base's group size keeps the base's own routing unchanged (the base preservation
    property). Each source fills whole groups where its count allows; donors whose counts do not
    (a dense donor gives one expert) share groups with each other, never with the base. A base
    without groups (n_group 1) keeps none.
    """
    total = sum(s.count for s in sources)
    if base.n_group <= 1:
        return 1, 1
    size = base.group_size
    donors = [(i, s) for i, s in enumerate(sources) if s.key != "base"]
    odd = [i for i, s in donors if s.count % size]
    if sum(s.count for _, s in donors) % size:
        names = ", ".join(f"experts.{i}" for i in odd)
        raise PlanError(
            f"{names}: {' and '.join(str(sources[i].count) for i in odd)} experts per layer, but the base routes in "
            f"groups of {size} (n_group {base.n_group}); keep a multiple of {size} (experts[].keep), or donors that "
            f"together fill whole groups, so the base's routing stays as it was")
    n_group = total // size
    topk_group = min(n_group, max(base.topk_group, math.ceil(top_k / size)))
    if topk_group * size < top_k:
        raise PlanError(f"experts_per_token: {top_k} experts per token need {math.ceil(top_k / size)} groups of "
                        f"{size}, but the output has only {n_group}")
    return n_group, topk_group


def compensation(source: RoutingSpec | None, output: RoutingSpec, *, source_measured: float | None = None,
                 output_measured: float | None = None) -> float | None:
    """Factor on a grafted expert's down projection so its source's experts keep their output scale.

    c = S_source / S_output, where S is the total weight of a token's picked experts
    (routing.routed_total): `scaling` under normalised top-k weights (DeepSeek-V3: 2.5,
    Qwen3-MoE: 1), measured otherwise, and 1 for an always-on MLP (a dense donor's, or a shared
    expert; pass None). A token whose picks all land on one source's experts then gets that
    source's MoE output at the source's scale, whatever the top-k or scoring of either model;
    and a dense model's MLP keeps its scale in a normalised MoE, as in mergekit-moe. None when a
    needed measurement is missing.
    """
    s_src = 1.0 if source is None else routed_total(source, source_measured)
    s_out = routed_total(output, output_measured)
    if s_src is None or s_out is None:
        return None
    return s_src / s_out
