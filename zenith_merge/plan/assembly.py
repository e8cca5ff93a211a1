"""Planning same-family assembly (Assembly of Experts, arXiv 2506.14794): one body, tensors interpolated.

Children of one parent share architecture, widths and tokenizer, so every tensor of one
lines up with the same-named tensor of the other. Each output tensor is
W = sum_i w_i W_i / sum_i w_i with weights per tensor class; a one-hot weight is a plain
copy (bit for bit), which is how the R1T "Chimera" recipe (routed experts from R1, all
else from V3) comes out exact.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any

from ..architectures import classify, extra_layer_indices, set_dim, shared_input_of
from ..config import MergeConfig
from ..errors import PlanError
from ..maths.regmean import gram_groups
from .models import AssembleRecipe, CopyRecipe, Plan, PlannedTensor, RegMeanStage, StagePlan
from .opened_sources import OpenedSource
from .output import finish_plan, output_dtype, target_dtype_keys

log = logging.getLogger(__name__)

# Config values that must agree between parents for their tensors to line up (beyond the attention layout).
_SHAPE_KEYS = ("hidden", "layers", "vocab", "inter", "moe_inter", "n_experts", "n_shared")


# The file holding a tokenizer's vocabulary, first found wins: tokenizers' tokenizer.json, else Kimi-K2's
# tiktoken.model (read by the custom code its tokenizer_config.json names), sentencepiece's tokenizer.model, BPE's
# vocab.json.
_VOCABULARY_FILES = ("tokenizer.json", "tiktoken.model", "tokenizer.model", "vocab.json")


def _tokenizer_digest(folder: Path) -> tuple[str, str] | None:
    """(the folder's vocabulary file, its sha256), None where it has none of `_VOCABULARY_FILES`."""
    for name in _VOCABULARY_FILES:
        if (folder / name).is_file():
            return name, hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return None


def check_same_family(base: OpenedSource, src: OpenedSource) -> None:
    """Refuse a parent whose architecture, layout or tokenizer differs from the base's, naming what differs."""
    from ..architectures import dim

    if src.arch.name != base.arch.name:
        raise PlanError(f"{src.where}: is {src.arch.name}, the base {base.arch.name}; assembly and the merge "
                        f"methods combine tensors of one architecture (merge_method: concat grafts experts across "
                        f"architectures)")
    for sym in _SHAPE_KEYS:
        a, b = dim(base.ckpt.config, base.arch, sym), dim(src.ckpt.config, src.arch, sym)
        if a != b:
            raise PlanError(f"{src.where}: {base.arch.dims.get(sym, (sym,))[0]} is {b}, the base's {a}; "
                            f"assembly needs the same widths and expert layout")
    for key in base.arch.attention_layout_keys:
        a, b = base.ckpt.config.get(key), src.ckpt.config.get(key)
        if a != b:
            raise PlanError(f"{src.where}: incompatible attention layout: {key} is {b!r}, the base's {a!r} "
                            f"(head and rope layouts must agree to interpolate attention)")
    theirs, ours = _tokenizer_digest(src.model.path), _tokenizer_digest(base.model.path)
    if theirs != ours:
        raise PlanError(f"{src.where}: its {(ours or theirs)[0]} differs from the base's; assembly needs one tokenizer "
                        f"(embedding rows must mean the same tokens)")


def _regmean_stage(source: OpenedSource, names: list[str], regmean) -> RegMeanStage:
    """One parent's RegMean statistics: its weights, text, and the passes that fit them in `max_memory`."""
    distinct = dict.fromkeys(shared_input_of(source.arch, names).values())
    size = {n: source.ckpt.info(n).shape[-1] for n in distinct}
    groups = gram_groups([(n, size[n], getattr(classify(source.arch, n), "layer", None)) for n in distinct],
                         regmean.max_memory)
    return RegMeanStage(tensors=tuple(names), data=tuple(regmean.data[source.index]), max_tokens=regmean.max_tokens,
                        max_memory=regmean.max_memory, matrices=len(size), passes=len(groups),
                        sum_bytes=max(sum(8 * size[n] ** 2 for n in g) for g in groups))


def mtp_weights(weights: dict[str, list[float]], tensor_class: str) -> list[float]:
    """The weights of a tensor of an extra (MTP) layer: `assembly.weights.mtp` when given, for the whole layer;
    otherwise its own class's, as in the layers it extends (its attention as attention, its experts as
    routed_experts), and MTP's own projection (eh_proj, class mtp) as attention."""
    if "mtp" in weights:
        return weights["mtp"]
    own = "attention" if tensor_class == "mtp" else tensor_class
    return weights.get(own, weights["default"])


def plan_assembly(cfg: MergeConfig, config_dir, output_dir, base: OpenedSource, sources: list[OpenedSource]) -> Plan:
    """Every base tensor, interpolated across the `experts[]` parents with the config's per-class weights."""
    for s in sources:
        if s.key != "base":
            check_same_family(base, s)
    settings = cfg.assembly
    target: dict[str, Any] = target_dtype_keys(dict(base.ckpt.config), cfg.dtype)
    if cfg.experts_per_token is not None:
        set_dim(target, base.arch, "top_k", cfg.experts_per_token)
    regmean = settings.regmean
    needs_grams: dict[str, list[str]] = {}
    unsolved: dict[str, list[str]] = {}  # a RegMean class's weights stored fused (GPT-OSS's experts: 3-D)
    tensors, input_bytes = [], {}
    extra = set(extra_layer_indices(base.arch, base.ckpt.config, base.ckpt.names()))
    for name in base.ckpt.names():
        info = base.ckpt.info(name)
        tid = classify(base.arch, name)
        tclass = tid.tensor_class if tid else "other"
        in_extra = tid is not None and tid.layer in extra
        weights = mtp_weights(settings.weights, tclass) if in_extra else \
            settings.weights.get(tclass, settings.weights["default"])
        used = [(s, w) for s, w in zip(sources, weights) if w > 0]
        for s, _ in used:
            if name not in s.ckpt or s.ckpt.info(name).shape != info.shape:
                found = s.ckpt.info(name).shape if name in s.ckpt else "missing"
                raise PlanError(f"{s.where}: tensor {name} is {found}, the base's {info.shape}; "
                                f"assembly needs every tensor in every parent")
        keys = tuple(s.key for s, _ in used)
        if len(used) == 1 and (settings.threshold == 0 or keys[0] == "base"):
            recipe = CopyRecipe(source=keys[0], tensor=name)
        else:
            # an MTP layer never runs in transformers' forward pass, so it has no RegMean statistics: interpolated
            wanted = regmean is not None and tclass in regmean.classes and len(used) > 1 and not in_extra
            solve = wanted and len(info.shape) == 2 and name.endswith(".weight")
            if wanted and not solve and len(info.shape) > 2:
                unsolved.setdefault(tclass, []).append(name)
            recipe = AssembleRecipe(tensor=name, tensor_class=tclass, sources=keys,
                                    weights=tuple(w for _, w in used), threshold=settings.threshold, regmean=solve,
                                    off_diagonal=regmean.off_diagonal if solve else 1.0,
                                    ridge=regmean.ridge if solve else 0.0)
            for key in keys if solve else ():
                needs_grams.setdefault(key, []).append(name)
        dtype = output_dtype(info.dtype, tid.role if tid else None, base.arch.keep_fp32_roles, cfg.dtype)
        tensors.append(PlannedTensor(name=name, dtype=dtype, shape=info.shape, recipe=recipe))
        reads = len(set(keys) | {"base"}) if isinstance(recipe, AssembleRecipe) else 1
        input_bytes[name] = reads * info.nbytes + (8 * math.prod(info.shape) if reads > 1 else 0)
    for tclass, names in unsolved.items():
        log.warning("assembly.regmean.classes %s: %s stores %d of its tensors fused (e.g. %s, 3-D); RegMean solves "
                    "one linear weight at a time, so these are interpolated by assembly.weights", tclass,
                    base.arch.name, len(names), names[0])
    stages = StagePlan(regmean={s.key: _regmean_stage(s, needs_grams[s.key], regmean)
                                for s in sources if s.key in needs_grams}) if needs_grams else None
    extra = {"stages": stages} if stages is not None else {}
    return finish_plan(cfg, config_dir, output_dir, method="assembly", base=base, sources=sources, target=target,
                   tensors=tensors, input_bytes=input_bytes, **extra)
