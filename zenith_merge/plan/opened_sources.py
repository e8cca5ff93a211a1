"""The sources a plan reads, opened: each model's checkpoint headers, architecture and facts, with its
`experts[]` entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..architectures import (
    Architecture,
    ModelFacts,
    architecture_of,
    facts,
)
from ..config import ExpertSource, MergeConfig
from ..errors import PlanError
from ..io.reader import Checkpoint
from .experts import candidate_layers, map_layers
from .models import PlannedSource
from .sources import SourceModel, fingerprint, resolve_model


@dataclass
class OpenedSource:
    """A source while planning: where it is, what it is, and the open checkpoint's headers."""

    key: str
    model: SourceModel
    ckpt: Checkpoint
    arch: Architecture
    facts: ModelFacts
    entry: ExpertSource | None = None
    index: int | None = None
    field: str = "experts"  # the config list the entry is in (experts or shared_experts)

    @property
    def where(self) -> str:
        key = "model" if self.field == "models" else "source_model"  # models: a mergekit-yaml config's list
        return f"{self.field}.{self.index}.{key} ({self.model.ref})" if self.index is not None else "base_model"


def source_layers(s: OpenedSource, moe_layers: Sequence[int], base_depth: int) -> dict[int, int]:
    """Output MoE layer -> the source layer its experts come from: `experts[].layers` where given, else by
    relative depth (`map_layers`)."""
    candidates = candidate_layers(s.facts)
    out = map_layers(moe_layers, base_depth, candidates, s.facts.num_layers)
    for layer, source_layer in (getattr(s.entry, "layers", None) or {}).items():
        if layer not in out:
            raise PlanError(f"experts.{s.index}.layers.{layer}: the output's MoE layers are {list(moe_layers)}")
        if source_layer not in candidates:
            raise PlanError(f"experts.{s.index}.layers.{layer}: {s.entry.source_model} has no layer {source_layer} "
                            f"to take experts from; its {'MoE ' if s.facts.is_moe else ''}layers are {list(candidates)}")
        out[layer] = source_layer
    return out


def open_source(key: str, model: SourceModel, cfg: MergeConfig, entry=None, index=None) -> OpenedSource:
    ckpt = Checkpoint.open(model.path, allow_pickle=cfg.allow_pickle)
    where = str(model.path / "config.json")
    return OpenedSource(key, model, ckpt, architecture_of(ckpt.config, where=where), facts(ckpt.config, where=where),
                   entry, index)


def check_moe_base_shared_experts(cfg: MergeConfig, base: OpenedSource, config_dir: Path | None) -> None:
    """An MoE base keeps its own shared expert: `shared_experts` may only name the base, and only where it has one
    (a Qwen3-MoE has none: the key is refused, never dropped)."""
    for i, shared in enumerate(cfg.shared_experts or []):
        if not base.facts.n_shared_experts and "shared_gate" not in base.arch.roles:
            raise PlanError(f"shared_experts.{i}: {base.arch.name} has no shared expert; remove shared_experts, or "
                            f"list that model under experts (its MLP becomes a routed expert)")
        if shared.noise_scale is not None or shared.residual_scale is not None:
            raise PlanError(f"shared_experts.{i}: noise_scale / residual_scale apply to experts[] entries; the "
                            f"output keeps the base's shared expert as it is")
        if resolve_model(shared.source_model, config_dir, build_demo=False).path != base.model.path:
            raise PlanError(f"shared_experts.{i}.source_model: the output keeps the base's shared expert; a donor's "
                            f"shared expert joins as a routed expert with experts[].shared_expert: routed")


def open_sources(cfg: MergeConfig, base: OpenedSource, config_dir: Path | None) -> list[OpenedSource]:
    """One `OpenedSource` per `experts[]` entry; the first entry naming the base means its own experts. A model
    may be listed again (mergekit-moe's upcycling: each entry its own slots, `noise_scale` seeded per slot),
    except an MoE source with `keep`, whose picks would repeat."""
    out: list[OpenedSource] = []
    seen: dict[Path, int] = {}
    for i, entry in enumerate(cfg.experts):
        model = resolve_model(entry.source_model, config_dir)
        if model.path in seen:
            first = cfg.experts[seen[model.path]]
            if entry.keep != "all" or first.keep != "all":
                raise PlanError(f"experts.{i}.source_model: {entry.source_model} is already experts.{seen[model.path]}"
                                f" and keep picks its most used experts, which would be the same twice; list it once")
        seen.setdefault(model.path, i)
        if model.path == base.model.path and seen[model.path] == i:
            out.append(OpenedSource("base", base.model, base.ckpt, base.arch, base.facts, entry, i))
        else:
            out.append(open_source(f"donor{i}", model, cfg, entry, i))
        if cfg.config_format == "mergekit-yaml":
            out[-1].field = "models"
    return out


def open_shared_sources(cfg: MergeConfig, config_dir: Path | None) -> list[OpenedSource]:
    """The `shared_experts[]` entries of a dense merge, opened (keys shared0, ...)."""
    out = []
    for i, entry in enumerate(cfg.shared_experts or []):
        model = resolve_model(entry.source_model, config_dir)
        src = open_source(f"shared{i}", model, cfg, entry, i)
        out.append(OpenedSource(src.key, src.model, src.ckpt, src.arch, src.facts, entry, i, field="shared_experts"))
    return out


def planned_source(src: OpenedSource) -> PlannedSource:
    return PlannedSource(ref=src.model.ref, path=str(src.model.path), architecture=src.arch.name,
                         fingerprint=fingerprint(src.model.path))
