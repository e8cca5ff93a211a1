"""After the stages: the plan simplified (identity grafts become copies) and resolved against what the
stages measured (usage-based selection, artefact hashes).
"""

from __future__ import annotations

from pathlib import Path

from ..architectures import (
    ARCHITECTURES,
    optional_tensor_name,
    tensor_name,
)
from ..errors import PlanError
from ..io.reader import Checkpoint
from ..maths.routing import RoutingSpec, routing_spec
from .experts import compensation
from .models import SLOT_ROLES, CopyRecipe, ExpertRecipe, ExpertSlot, Plan, RouterRecipe


def source_tensor(plan: Plan, slot: ExpertSlot, proj: str) -> str:
    """The source checkpoint's name of one projection of a slot's expert."""
    arch = ARCHITECTURES[plan.sources[slot.source].architecture]
    return tensor_name(arch, SLOT_ROLES[slot.kind][proj], slot.source_layer, slot.expert)


def source_router(plan: Plan, slot: ExpertSlot, part: str) -> str | None:
    """The source's router tensor (weight or bias) of a slot's layer, or None where the source has none."""
    arch = ARCHITECTURES[plan.sources[slot.source].architecture]
    role = "router" if part == "weight" else "router_bias"
    return optional_tensor_name(arch, role, slot.source_layer)


def _identity_slot(layer: int, j: int, slot: ExpertSlot) -> bool:
    """The base's own expert j of `layer`, in its own place j."""
    return slot.source == "base" and slot.kind == "routed" and slot.expert == j and slot.source_layer == layer


def simplify(plan: Plan) -> Plan:
    """Turn recipes that only copy into `CopyRecipe`s, so their bytes are copied exactly (and fast).

    An expert slot copies when its source needs no map, no scale and no padding; a router
    copies when every slot is the base's own expert in its own place.
    """
    opened: dict[str, Checkpoint] = {}

    def info(key: str, name: str):
        if key not in opened:
            opened[key] = Checkpoint.open(Path(plan.sources[key].path), check_shapes=False)
        return opened[key].info(name)

    try:
        out = []
        for t in plan.tensors:
            r = t.recipe
            if isinstance(r, ExpertRecipe):
                slot = plan.slot(r.layer, r.slot)
                src = source_tensor(plan, slot, r.proj)
                tr = plan.transforms[slot.source]
                unmapped = tr.align in ("none", "identity") and not tr.noise_scale and not tr.random_experts
                if unmapped and (slot.scale == 1.0 or r.proj != "down") and info(slot.source, src).shape == t.shape:
                    t = t.model_copy(update={"recipe": CopyRecipe(source=slot.source, tensor=src)})
            elif isinstance(r, RouterRecipe) and r.part != "shared" and not plan.stages.train_routers:
                le = plan.layer_experts(r.layer)
                name = source_router(plan, le.slots[0], r.part)
                if all(_identity_slot(r.layer, j, s) for j, s in enumerate(le.slots)) and \
                        name is not None and info("base", name).shape == t.shape:
                    t = t.model_copy(update={"recipe": CopyRecipe(source="base", tensor=name)})
            out.append(t)
    finally:
        for ckpt in opened.values():
            ckpt.close()
    return plan.model_copy(update={"tensors": tuple(out)})


def resolve(plan: Plan, usage: dict[str, dict[int, dict]] | None = None, artefacts: dict[str, str] | None = None) -> Plan:
    """The plan with every open slot filled from the stages' results, ready to write.

    `usage[source][source_layer]` has `order` (expert indices, most used first) and
    `mean_total` (the mean total weight of a token's picked experts).
    """
    usage = usage or {}
    out_routing = routing_spec(plan.target_config)
    table = []
    for le in plan.expert_table:
        row = []
        for slot in le.slots:
            update = {}
            if slot.expert is None and slot.kind == "routed":
                stats = usage.get(slot.source, {}).get(slot.source_layer)
                if stats is None:
                    raise PlanError(f"no expert usage for {slot.source} layer {slot.source_layer}: run the usage stage")
                update["expert"] = stats["order"][slot.rank]
            if slot.scale is None:
                src_spec = RoutingSpec(**plan.transforms[slot.source].routing) if slot.kind == "routed" else None
                src_w = usage.get(slot.source, {}).get(slot.source_layer, {}).get("mean_total")
                out_w = usage.get("base", {}).get(le.layer, {}).get("mean_total")
                update["scale"] = compensation(src_spec, out_routing, source_measured=src_w, output_measured=out_w)
                if update["scale"] is None:
                    raise PlanError(f"no measured routing weight for {slot.source} layer {slot.source_layer}")
            row.append(slot.model_copy(update=update) if update else slot)
        table.append(le.model_copy(update={"slots": tuple(row)}))
    plan = plan.model_copy(update={"expert_table": tuple(table), "artefacts": dict(artefacts or {})})
    return simplify(plan)
