"""Config -> Plan: a pure, serialisable description of the output checkpoint.

The plan reads only configs and safetensors headers, never weights. It fixes the
target config, every output tensor (name, dtype, shape) with the recipe that
produces it, and the shard layout, so `zenith-merge plan` can show the whole job
with its memory and disk needs before anything heavy runs, and the writer can lay
out each shard's header before the first tensor is computed.
"""

from __future__ import annotations

from pathlib import Path

from ..architectures import (
    ARCHITECTURES,
    Architecture,
)
from ..config import MergeConfig
from ..errors import PlanError
from .concat import plan_concat
from .models import Plan
from .opened_sources import OpenedSource, open_source, open_sources, reject_unsupported
from .sources import resolve_model


def _output_architecture(cfg: MergeConfig, base: OpenedSource, sources: list[OpenedSource]) -> Architecture:
    """The base's architecture, or the MoE twin of a dense base (asked for, or implied by dense donors)."""
    wanted = cfg.architecture
    if wanted is None and not base.facts.is_moe and base.arch.moe_counterpart \
            and any(s.key != "base" for s in sources):
        wanted = base.arch.moe_counterpart  # as mergekit-moe does: dense sources make their MoE twin
    if wanted is None or wanted == base.arch.name:
        return base.arch
    if wanted != base.arch.moe_counterpart or cfg.merge_method != "concat":
        twin = f" (its MoE twin {base.arch.moe_counterpart} can be built with merge_method: concat)" \
            if base.arch.moe_counterpart else ""
        raise PlanError(f"architecture: {wanted} differs from the base's {base.arch.name}; the output keeps the "
                        f"base's architecture (attention, norms, embeddings){twin}")
    return ARCHITECTURES[wanted]


def build_plan(cfg: MergeConfig, *, config_dir: Path | None = None, output_dir: str | Path | None = None) -> Plan:
    """Plan the merge that `cfg` describes, reading only configs and headers."""
    base_model = resolve_model(cfg.base_model, config_dir)
    reject_unsupported(cfg, base_model, config_dir)
    base = open_source("base", base_model, cfg)
    try:
        sources = open_sources(cfg, base, config_dir)
        try:
            out_arch = _output_architecture(cfg, base, sources)
            if cfg.merge_method == "assembly":
                from .assembly import plan_assembly

                return plan_assembly(cfg, config_dir, output_dir, base, sources)
            return plan_concat(cfg, config_dir, output_dir, base, sources, out_arch)
        finally:
            for s in sources:
                if s.ckpt is not base.ckpt:
                    s.ckpt.close()
    finally:
        base.ckpt.close()
