"""Which architecture the output is: the base's for an MoE base, and for dense sources the MoE architecture
mergekit-moe would choose for the same config (its `architecture:` names matched by prefix, its rules on the
sources' model types and shared experts, Mixtral first), written without remote code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..architectures import ARCHITECTURES, MERGEKIT_MOE_OUTPUTS, Architecture
from ..config import MergeConfig
from ..errors import PlanError
from .opened_sources import OpenedSource

# How the output's shared expert is built from `shared_experts[0]`: gated (Qwen2-MoE's sigmoid gate, its row from
# the gate mode) or ungated (DeepSeek's, always on).
SharedMode = Literal["gated", "ungated"]


@dataclass(frozen=True)
class OutputArchitecture:
    """The output's table, the shared expert's form (None: none), and the name it was chosen by."""

    arch: Architecture
    shared: SharedMode | None = None
    chosen_as: str | None = None


def _model_type(src: OpenedSource) -> str:
    return str(src.ckpt.config.get("model_type") or src.arch.model_type)


def _why_not(name: str, cfg: MergeConfig, types: list[str]) -> str | None:
    """Why mergekit-moe's output `name` cannot take these sources (its own rules), or None when it can."""
    _, inputs, shared_counts = MERGEKIT_MOE_OUTPUTS[name]
    shared = cfg.shared_experts or []
    if len(shared) not in shared_counts:
        return f"takes {' or '.join(map(str, shared_counts))} shared_experts entries, not {len(shared)}"
    if len(set(types)) != 1:
        return f"needs every model of one model_type (got {', '.join(sorted(set(types)))})"
    if types[0] not in inputs:
        return f"builds from {' / '.join(inputs)} models, not {types[0]}"
    if name == "Qwen MoE" and cfg.gate_mode not in ("random", "uniform_random") and not shared[0].positive_prompts:
        return f"gate_mode {cfg.gate_mode} computes the shared expert's gate row from shared_experts.0's prompts"
    if name == "DeepSeek MoE" and shared and (shared[0].positive_prompts or shared[0].negative_prompts):
        return "keeps its shared expert ungated: shared_experts.0 takes no prompts"
    return None


def output_architecture(cfg: MergeConfig, base: OpenedSource, sources: list[OpenedSource],
                        shared: list[OpenedSource]) -> OutputArchitecture:
    """The output architecture for `cfg` (see the module docstring); an impossible choice names `architecture`
    with each candidate's reason."""
    wanted = cfg.architecture
    if base.facts.is_moe:
        if wanted is None or wanted in (base.arch.name, base.arch.model_type) or any(
                out.lower().startswith(wanted.lower()) and (table == base.arch.name or out in base.arch.mergekit_moe_names)
                for out, (table, _, _) in MERGEKIT_MOE_OUTPUTS.items()):
            return OutputArchitecture(base.arch)
        raise PlanError(f"architecture: {wanted} differs from the base's {base.arch.name}; an MoE base keeps its "
                        f"architecture (attention, norms, embeddings)")
    if wanted is None and not any(s.key != "base" for s in sources) and not shared:
        return OutputArchitecture(base.arch)  # the dense base alone: rewritten as it is
    exact = {name for name, a in ARCHITECTURES.items() if wanted in (a.name, a.model_type) and a.moe_layer_rule != "none"}
    if exact and not any(table in exact for table, _, _ in MERGEKIT_MOE_OUTPUTS.values()):
        raise PlanError(f"architecture: {wanted} cannot be built from dense {base.arch.name} sources (mergekit-moe "
                        f"builds {', '.join(MERGEKIT_MOE_OUTPUTS)}; see README, mergekit-moe configs)")
    by_prefix = [name for name in MERGEKIT_MOE_OUTPUTS if wanted is None or name.lower().startswith(wanted.lower())]
    # a table's own name (MixtralForCausalLM, qwen2_moe) means that table as mergekit-moe writes it
    candidates = by_prefix or [name for name, (table, _, _) in MERGEKIT_MOE_OUTPUTS.items() if table in exact]
    types = [_model_type(s) for s in [base, *sources, *shared]]
    reasons = {name: _why_not(name, cfg, types) for name in candidates}
    fitting = [name for name in candidates if reasons[name] is None]
    if not fitting:
        said = f"architecture: {wanted}" if wanted else "architecture (not given)"
        raise PlanError(f"{said}: no MoE output fits these dense sources (as mergekit-moe decides): "
                        + "; ".join(f"{name} {why}" for name, why in reasons.items()))
    name = "Mixtral" if "Mixtral" in fitting else fitting[0]  # mergekit-moe's preference
    arch = ARCHITECTURES[MERGEKIT_MOE_OUTPUTS[name][0]]
    return OutputArchitecture(arch, arch.shared_expert if cfg.shared_experts or arch.shared_expert == "ungated"
                              else None, name)
