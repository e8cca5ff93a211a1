"""Config -> Plan: a pure, serialisable description of the output checkpoint.

The plan reads only configs and safetensors headers, never weights. It fixes the
target config, every output tensor (name, dtype, shape) with the recipe that
produces it, and the shard layout, so `zenith-merge plan` can show the whole job
with its memory and disk needs before anything heavy runs, and the writer can lay
out each shard's header before the first tensor is computed.
"""

from __future__ import annotations

from pathlib import Path

from ..config import MergeConfig
from ..errors import PlanError
from .concat import plan_concat
from .models import Plan
from .opened_sources import check_moe_base_shared_experts, open_shared_sources, open_source, open_sources
from .output_arch import output_architecture
from .sources import resolve_model


def build_plan(cfg: MergeConfig, *, config_dir: Path | None = None, output_dir: str | Path | None = None) -> Plan:
    """Plan the merge that `cfg` describes, reading only configs and headers."""
    base = open_source("base", resolve_model(cfg.base_model, config_dir), cfg)
    try:
        if base.facts.is_moe:
            check_moe_base_shared_experts(cfg, base, config_dir)
        sources = open_sources(cfg, base, config_dir)
        shared = [] if base.facts.is_moe else open_shared_sources(cfg, config_dir)
        try:
            if cfg.merge_method != "concat":
                # same-family merges keep the base's architecture (a dense base stays dense): only a named
                # architecture is checked
                if cfg.architecture is not None and (out := output_architecture(cfg, base, sources, shared)).arch \
                        is not base.arch:
                    raise PlanError(f"architecture: {cfg.architecture or out.arch.name} needs merge_method: concat "
                                    f"(dense sources become experts); merge_method {cfg.merge_method} keeps the "
                                    f"base's architecture")
                if cfg.merge_method == "assembly":
                    from .assembly import plan_assembly

                    return plan_assembly(cfg, config_dir, output_dir, base, sources)
                from .methods import plan_method

                return plan_method(cfg, config_dir, output_dir, base, sources)
            return plan_concat(cfg, config_dir, output_dir, base, sources, output_architecture(cfg, base, sources, shared),
                               shared)
        finally:
            for s in [*sources, *shared]:
                if s.ckpt is not base.ckpt:
                    s.ckpt.close()
    finally:
        base.ckpt.close()
