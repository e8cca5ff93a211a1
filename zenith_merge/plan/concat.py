"""merge_method: concat: the expert table (base slots, grafted donor slots), routers, the union vocabulary's
tensors, and the stages that feed them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..architectures import (
    Architecture,
    classify,
    expected_shape,
    extra_layer_indices,
    facts,
    set_dim,
    tensor_name,
    vocab_part,
)
from ..config import PROMPT_GATE_MODES, ExpertSource, MergeConfig
from ..errors import PlanError
from ..io.safetensors_format import itemsize
from ..maths.mla import GQA_ONLY_KEYS, mla_config
from ..maths.routing import RoutingSpec, routing_spec
from .experts import SourceSlots, compensation, routing_groups
from .models import (
    EXPERT_ROLES,
    SHARED_ROLES,
    CopyRecipe,
    ExpertRecipe,
    ExpertSlot,
    LayerExperts,
    MlaRecipe,
    Plan,
    PlannedTensor,
    RouterRecipe,
    SourceTransform,
    StagePlan,
    VocabRecipe,
    ZerosRecipe,
)
from .opened_sources import OpenedSource, source_layers
from .output import finish_plan, output_dtype, target_dtype_keys
from .output_arch import OutputArchitecture
from .vocab import VocabPlan, plan_vocab

log = logging.getLogger("zenith_merge.plan")

_GENERATED_CLASSES = ("routed_experts", "router")


def _copy_tensor(base: OpenedSource, name: str, cfg: MergeConfig, target: dict[str, Any],
                 arch: Architecture | None = None) -> PlannedTensor:
    """A base tensor copied into the output; under the output architecture's name for its role when the output is
    another architecture (a dense base's attention in its MoE form), refused when that architecture has no place
    for it."""
    info = base.ckpt.info(name)
    tid = classify(base.arch, name)
    out_name = name
    if arch is not None and arch is not base.arch:
        if tid is None or tid.role not in arch.roles:
            hint = " (mergekit-moe's qwen keeps attention biases)" if tid and tid.role.endswith("_bias") else ""
            raise PlanError(f"{base.model.path}: tensor {name} has no place in {arch.name} (the output architecture); "
                            f"choose another `architecture`{hint}")
        out_name = tensor_name(arch, tid.role, tid.layer, tid.expert)
    dtype = output_dtype(info.dtype, tid.role if tid else None, base.arch.keep_fp32_roles, cfg.dtype)
    shape = expected_shape(target, out_name) or info.shape
    return PlannedTensor(name=out_name, dtype=dtype, shape=shape,
                         recipe=CopyRecipe(source="base", tensor=name, pad=shape != info.shape))


def _slots_of(src: OpenedSource) -> SourceSlots:
    """How many experts per layer one `experts[]` entry gives, with its errors named by key."""
    f, entry, i = src.facts, src.entry, src.index
    if not f.is_moe and not (src.arch.roles.get("mlp_gate") and f.intermediate_size):
        raise PlanError(f"{src.where}: has no MoE layers and no MLP to take an expert from")
    keep = None if entry.keep == "all" else entry.keep
    shared = entry.shared_expert == "routed"
    if shared and not f.n_shared_experts:
        raise PlanError(f"experts.{i}.shared_expert: routed, but {entry.source_model} has no shared expert")
    if shared and src.key == "base":
        raise PlanError(f"experts.{i}.shared_expert: the base keeps its own shared expert; 'routed' is for donors")
    if not f.is_moe:
        if keep not in (None, 1):
            raise PlanError(f"experts.{i}.keep: {keep}, but {entry.source_model} is dense: its MLP is one expert")
        return SourceSlots(src.key, routed=0, dense_mlp=True, shared_as_routed=False)
    if keep is not None and keep > f.n_routed_experts:
        raise PlanError(f"experts.{i}.keep: {keep} is more than the {f.n_routed_experts} routed experts per layer "
                        f"of {entry.source_model}")
    return SourceSlots(src.key, routed=keep or f.n_routed_experts, dense_mlp=False, shared_as_routed=shared)


def _align_mode(cfg: MergeConfig, src: OpenedSource, base: OpenedSource) -> str:
    if src.key == "base":
        return "none"
    same_width = src.facts.hidden_size == base.facts.hidden_size
    if cfg.align.mode == "identity" and not same_width:
        raise PlanError(f"align.mode: identity, but {src.where} has hidden size {src.facts.hidden_size} and the "
                        f"base {base.facts.hidden_size}; use align.mode: fit (or auto)")
    if cfg.align.mode == "fit" or not same_width:
        return "fit"
    return "identity"


def _check_gate_mode(cfg: MergeConfig, src: OpenedSource, slots: SourceSlots) -> None:
    if src.key == "base" and not slots.dense_mlp:
        return  # the base's own experts keep the base's router rows
    if cfg.gate_mode == "transfer" and (slots.dense_mlp or slots.shared_as_routed):
        what = "a dense MLP" if slots.dense_mlp else "a shared expert"
        raise PlanError(f"gate_mode: transfer needs the source's router rows, but {src.where} gives {what}, "
                        f"which no router picks; use gate_mode: random")


def plan_concat(cfg, config_dir, output_dir, base: OpenedSource, sources: list[OpenedSource], out: OutputArchitecture,
                shared: list[OpenedSource] = ()) -> Plan:
    """Experts side by side: the base's body, the listed sources' experts in `experts[]` order.

    `out` is the output's architecture: the base's, or the MoE form of a dense base (whose MLPs then become
    routed experts, as mergekit-moe does), with a shared expert from `shared` where it has one.
    """
    from ..architectures import check_per_expert

    for s in (base, *sources, *shared) if sources or shared else ():  # the base alone is copied as it is
        check_per_expert(s.arch, s.where)
    arch = out.arch
    bf = base.facts
    converting = arch.name != base.arch.name
    donors = [s for s in sources if s.key != "base"]
    base_entry = next((s for s in sources if s.key == "base"), None)
    selecting = any(s.entry.keep != "all" for s in sources)
    if donors and not bf.is_moe and not converting:  # a dense base with an MoE form is converted (see above)
        raise PlanError(f"base_model: {cfg.base_model} is dense ({base.arch.name}); an MoE base is needed")
    if shared and not arch.shared_expert:
        raise PlanError(f"shared_experts: {arch.name} has no shared expert; remove shared_experts or choose an "
                        f"architecture with one (mergekit-moe's qwen)")
    top_k = cfg.experts_per_token or bf.experts_per_token or 2
    perturbing = base_entry is not None and bool(base_entry.entry.random_experts or base_entry.entry.noise_scale)
    if not donors and not selecting and not converting and not perturbing:  # the base alone: a bit-identical rewrite
        target = target_dtype_keys(dict(base.ckpt.config), cfg.dtype)
        if cfg.experts_per_token is not None and bf.is_moe:
            if top_k > bf.n_routed_experts:
                raise PlanError(f"experts_per_token: {top_k} is more than the {bf.n_routed_experts} routed experts "
                                f"of {cfg.base_model}")
            set_dim(target, arch, "top_k", top_k)
        tensors = [_copy_tensor(base, n, cfg, target) for n in base.ckpt.names()]
        return finish_plan(cfg, config_dir, output_dir, method="passthrough", base=base, sources=sources, target=target,
                       tensors=tensors, input_bytes={t.name: base.ckpt.info(t.name).nbytes for t in tensors})

    slots = [_slots_of(s) for s in sources]
    for s, sl in zip(sources, slots):
        _check_gate_mode(cfg, s, sl)
    total = sum(sl.count for sl in slots)
    if top_k > total:
        raise PlanError(f"experts_per_token: {top_k} is more than the {total} experts the output has per layer")
    base_routing = routing_spec(base.ckpt.config)
    n_group, topk_group = routing_groups(base_routing, slots, top_k, base_included=base_entry is not None)

    # the output's expert size is the largest source's; smaller experts are padded with zeros
    def inter(src: OpenedSource, sl: SourceSlots) -> int:
        f = src.facts
        sizes = [f.moe_intermediate_size] if sl.routed else []
        sizes += [f.intermediate_size] if sl.dense_mlp else []
        sizes += [f.moe_intermediate_size * f.n_shared_experts] if sl.shared_as_routed else []
        return max(sizes)

    moe_inter = max([bf.moe_intermediate_size or 0] + [inter(s, sl) for s, sl in zip(sources, slots)]
                    # DeepSeek's shared expert is moe_intermediate_size wide: a narrower one is padded
                    + [s.facts.intermediate_size for s in shared if arch.shared_expert == "ungated"])
    target = target_dtype_keys(dict(base.ckpt.config), cfg.dtype)
    if converting:
        if target.get("sliding_window") and target.get("use_sliding_window", True):
            log.warning("sliding_window %s of %s is dropped: %s attends to the whole context (as mergekit-moe "
                        "writes it)", target["sliding_window"], cfg.base_model, arch.name)
        if arch.dense_attention == "mla":
            target = {k: v for k, v in target.items() if k not in GQA_ONLY_KEYS}
            try:
                target.update(mla_config(dict(base.ckpt.config)))
            except ValueError as err:
                raise PlanError(f"{base.model.path}/config.json: {err}") from None
            log.warning("%s from dense %s models: its MLA holds their attention through per-dimension rope "
                        "frequencies (rope_scaling longrope), which transformers reads; vLLM, SGLang and llama.cpp "
                        "read a DeepSeek rope_scaling as YaRN or not at all and compute another function: to serve "
                        "there, use architecture: mixtral (or qwen, with a shared expert)", arch.name, base.arch.name)
        target.update(architectures=[arch.name], model_type=arch.model_type, **arch.from_dense_config)
        target.pop("auto_map", None)
        if out.chosen_as == "DeepSeek MoE" and top_k == 1:  # DeepSeek-MoE v1 renormalises only for top-k > 1
            target[arch.routing_keys["norm_topk_prob"]] = False
    shared_slot = _shared_slot(cfg, base, shared)
    if shared_slot is not None and out.shared == "gated":
        set_dim(target, arch, "shared_inter", shared[0].facts.intermediate_size)
    set_dim(target, arch, "n_experts", total)
    set_dim(target, arch, "top_k", top_k)
    set_dim(target, arch, "moe_inter", moe_inter)
    if "n_group" in arch.routing_keys:
        target[arch.routing_keys["n_group"]] = n_group
        target[arch.routing_keys["topk_group"]] = topk_group
    vocab = _vocab_plan(cfg, config_dir, base, sources)
    if vocab is not None:
        set_dim(target, arch, "vocab", vocab.padded_size)
    out_routing = routing_spec(target)
    moe_layers = facts(target).moe_layers

    layer_map = {s.key: source_layers(s, moe_layers, bf.num_layers) if s.key != "base"
                 else {layer: layer for layer in moe_layers} for s in [*sources, *shared]}
    transforms, usage = {}, {}
    for s in shared:
        transforms[s.key] = SourceTransform(align=_align_mode(cfg, s, base), routing=asdict(routing_spec(s.ckpt.config)),
                                            prompts=tuple(s.entry.positive_prompts),
                                            negative_prompts=tuple(s.entry.negative_prompts),
                                            noise_scale=s.entry.noise_scale or None)
    for s, sl in zip(sources, slots):
        spec = routing_spec(s.ckpt.config)
        transforms[s.key] = SourceTransform(align=_align_mode(cfg, s, base), routing=asdict(spec),
                                            prompts=tuple(s.entry.positive_prompts),
                                            negative_prompts=tuple(s.entry.negative_prompts),
                                            noise_scale=s.entry.noise_scale or None,
                                            random_experts=s.entry.random_experts)
        # dense sources become experts as mergekit-moe writes them: unscaled (residual_scale aside), so a
        # DeepSeek-MoE top-1 (weights not renormalised) weighs each by its probability, as DeepSeek-MoE v1 does
        needs_measure = (sl.routed and s.key != "base" and not spec.norm_topk_prob) or \
            (s.key != "base" and not out_routing.norm_topk_prob and not converting)
        if s.entry.keep != "all" or needs_measure:
            if not s.entry.positive_prompts:
                why = f"keep: {s.entry.keep} picks" if s.entry.keep != "all" else "unnormalised routing weights are"
                raise PlanError(f"experts.{s.index}.positive_prompts: {why} measured on the source's prompts; "
                                f"give some")
            usage[s.key] = tuple(sorted(set(layer_map[s.key].values())))
    if any(s.key != "base" for s in sources) and not out_routing.norm_topk_prob and not converting:
        if base_entry is None or not base_entry.entry.positive_prompts:
            raise PlanError("experts: the output's routing weights are not normalised, so scale compensation "
                            "measures the base's own routing on its prompts; list the base among experts with "
                            "positive_prompts")
        usage["base"] = tuple(moe_layers)

    def scaled(c: float | None, entry: ExpertSource) -> float | None:  # mergekit's residual_scale, on down
        return c if c is None or entry.residual_scale is None else c * entry.residual_scale

    table = []
    for layer in moe_layers:
        row = []
        for s, sl in zip(sources, slots):
            src_layer = layer_map[s.key][layer]
            spec = RoutingSpec(**transforms[s.key].routing)
            scale = scaled(1.0 if s.key == "base" else compensation(spec, out_routing), s.entry)
            for r in range(sl.routed):
                chosen = s.entry.keep == "all"
                row.append(ExpertSlot(source=s.key, source_layer=src_layer, expert=r if chosen else None,
                                      rank=None if chosen else r, scale=scale))
            if sl.dense_mlp:
                row.append(ExpertSlot(source=s.key, source_layer=src_layer, kind="dense_mlp",
                                      scale=scaled(1.0 if converting else compensation(None, out_routing), s.entry)))
            if sl.shared_as_routed:
                row.append(ExpertSlot(source=s.key, source_layer=src_layer, kind="shared",
                                      scale=scaled(compensation(None, out_routing), s.entry)))
        table.append(LayerExperts(layer=layer, slots=tuple(row), shared_gate=out.shared if converting else None,
                                  shared=None if shared_slot is None else shared_slot.model_copy(
                                      update={"source_layer": layer_map[shared_slot.source][layer]})))
    table += _extra_layer_rows(cfg, base, base_entry, table) if not converting else []

    align = {s.key: tuple(sorted(layer_map[s.key].items())) for s in sources if transforms[s.key].align == "fit"}
    vectors = tuple(s.key for s, sl in zip(sources, slots) if cfg.gate_mode in PROMPT_GATE_MODES
                    and (s.key != "base" or sl.dense_mlp))
    if out.shared == "gated" and cfg.gate_mode in PROMPT_GATE_MODES:
        vectors += tuple(s.key for s in shared)
    offsets = _calibrated_sources(cfg, sources, arch)
    tensors, input_bytes = _concat_tensors(cfg, base, target, table, arch, vocab, sources)
    return finish_plan(cfg, config_dir, output_dir, method="concat", base=base, sources=[*sources, *shared],
                   target=target, tensors=tensors, input_bytes=input_bytes, vocab=vocab,
                   layer_map={s.key: layer_map[s.key] for s in [*sources, *shared]}, expert_table=tuple(table),
                   transforms=transforms, stages=StagePlan(usage=usage, align=align, prompt_vectors=vectors,
                                                           router_offsets=offsets,
                                                           train_routers=_training_steps(cfg, donors, align),
                                                           train_maps=tuple(align) if cfg.align.train_steps else ()))


def _extra_layer_rows(cfg: MergeConfig, base: OpenedSource, base_entry: OpenedSource | None, table: list[LayerExperts]
                      ) -> list[LayerExperts]:
    """Expert-table rows of the base's extra layers (MTP): each follows the last MoE layer (see LayerExperts),
    so the output's expert count holds in them too, as vLLM and SGLang load MTP modules with the model's
    config."""
    extra = extra_layer_indices(base.arch, base.ckpt.config, base.ckpt.names())
    if not extra or not table:
        return []
    if base_entry is not None and base_entry.entry.keep != "all":
        raise PlanError(f"experts.{base_entry.index}.keep: the base's MTP layer(s) {list(extra)} would need their own "
                        f"expert usage, which no forward pass measures; keep all of the base's experts")
    last = table[-1]
    return [LayerExperts(layer=layer, like=last.layer,
                         slots=tuple(s.model_copy(update={"source_layer": layer})
                                     if s.source == "base" and s.kind == "routed" else s for s in last.slots))
            for layer in extra]


def _vocab_plan(cfg: MergeConfig, config_dir: Path | None, base: OpenedSource, sources: list[OpenedSource]) -> VocabPlan | None:
    """The union vocabulary's plan (None: the base's tokenizer serves)."""
    donors = [s for s in sources if s.key != "base"]
    rows = base.ckpt.info(tensor_name(base.arch, "embed")).shape[0]
    return plan_vocab(cfg, config_dir, {"base": base.model.path, **{s.key: s.model.path for s in donors}},
                      {"base": base.facts.hidden_size, **{s.key: s.facts.hidden_size for s in donors}}, rows)


def _vocab_input_bytes(name: str, shape: tuple[int, ...], base: OpenedSource, sources: list[OpenedSource],
                       vocab: VocabPlan) -> int:
    """What building a union embedding/lm_head holds: the output, the base's tensor, each donor's rows."""
    donor_bytes = 0
    for s in sources:
        if s.key in vocab.donors:
            donor_bytes += max(s.ckpt.info(n).nbytes for n in s.ckpt.names()
                               if (tid := classify(s.arch, n)) is not None and tid.role in ("embed", "lm_head"))
    return base.ckpt.info(name).nbytes + donor_bytes + 2 * 8 * VOCAB_CHUNK_ROWS * shape[-1]


# Rows of a union embedding computed at a time (float64 work copies of this many rows).
VOCAB_CHUNK_ROWS = 4096


def _training_steps(cfg: MergeConfig, donors: list[OpenedSource], fitted: dict) -> int:
    """Steps of training after the first write, checked: router rows need grafted experts, maps need a fit."""
    if cfg.router.train_steps and not donors and cfg.router.train == "grafted":
        raise PlanError("router.train_steps: no grafted experts to train router rows for (router.train: grafted); "
                        "add a donor to experts, or use router.train: all")
    if cfg.align.train_steps and not fitted:
        raise PlanError("align.train_steps: no fitted maps to train (they exist only where a donor's width differs "
                        "from the base's, with align.mode auto or fit)")
    if cfg.align.teacher_data and not cfg.align.train_steps:
        raise PlanError("align.teacher_data: the teacher loss is part of alignment training; set align.train_steps")
    if cfg.align.teacher_data and len(fitted) > 1:
        raise PlanError(f"align.teacher_data: one donor can teach; this merge fits maps for {', '.join(fitted)}")
    return max(cfg.router.train_steps, cfg.align.train_steps)


def _calibrated_sources(cfg: MergeConfig, sources: list[OpenedSource], arch: Architecture) -> tuple[str, ...]:
    """The grafted sources whose selection bias `router.calibrate` offsets (on by default for gate_mode transfer)."""
    want = cfg.router.calibrate if cfg.router.calibrate is not None else cfg.gate_mode == "transfer"
    if not want:
        return ()
    if "router_bias" not in arch.roles:
        if cfg.router.calibrate:
            raise PlanError(f"router.calibrate: the output ({arch.name}) has no selection bias to offset; "
                            f"calibration works on DeepSeek-V3 outputs (e_score_correction_bias)")
        return ()
    grafted = [s for s in sources if s.key != "base"]
    missing = [s for s in grafted if not s.entry.positive_prompts]
    if missing and cfg.router.calibrate:
        raise PlanError(f"experts.{missing[0].index}.positive_prompts: router.calibrate measures where each "
                        f"source's prompts are routed; give some")
    return tuple(s.key for s in grafted if s.entry.positive_prompts)


def _concat_tensors(cfg: MergeConfig, base: OpenedSource, target: dict[str, Any], table: list[LayerExperts],
                    arch: Architecture, vocab: VocabPlan | None = None,
                    sources: list[OpenedSource] = ()) -> tuple[list[PlannedTensor], dict[str, int]]:
    """Output tensors in the base's order; each MoE layer's router and experts generated where the base has them
    (where a dense base has its MLP, when the output is its MoE twin), the embedding and lm_head from the union
    vocabulary's token map when there is one."""
    moe = {le.layer: le for le in table}
    generated = _GENERATED_CLASSES + (("dense_mlp",) if arch.name != base.arch.name else ())
    tensors: list[PlannedTensor] = []
    input_bytes: dict[str, int] = {}
    done: set[int] = set()
    for name in base.ckpt.names():
        tid = classify(base.arch, name)
        if tid is not None and tid.layer in moe and tid.tensor_class in generated:
            if tid.layer not in done:
                done.add(tid.layer)
                for t in _layer_tensors(cfg, base, target, moe[tid.layer], arch):
                    tensors.append(t)
                    input_bytes[t.name] = 3 * 4 * math.prod(t.shape)  # float32 work copies: source, map, result
            continue
        if arch.dense_attention == "mla" and tid is not None and tid.role in _MLA_PARTS:
            for t in _mla_tensors(cfg, base, name, tid, target, arch):
                tensors.append(t)
                # the result (built in its dtype) twice while written, the source projection
                input_bytes[t.name] = 2 * itemsize(t.dtype) * math.prod(t.shape) + base.ckpt.info(name).nbytes
            continue
        t = _copy_tensor(base, name, cfg, target, arch)
        part = vocab_part(base.arch, tid.role) if vocab is not None and tid is not None else None
        if part is not None:
            # the model's own embedding and head (no layer) are the union's; an extra layer's are rebuilt by name
            t = t.model_copy(update={"recipe": VocabRecipe(part=part, tensor=None if tid.layer is None else name)})
            tensors.append(t)
            input_bytes[name] = _vocab_input_bytes(name, t.shape, base, sources, vocab)
            continue
        tensors.append(t)
        input_bytes[t.name] = base.ckpt.info(name).nbytes + (4 * math.prod(t.shape) if t.recipe.pad else 0)
    if arch is not base.arch:  # what the output architecture has that a dense base may lack (zeros, as mergekit)
        present = {t.name for t in tensors}
        for layer in range(base.facts.num_layers):
            for role in arch.zeros_from_dense:
                name = tensor_name(arch, role, layer)
                if name not in present:
                    shape = expected_shape(target, name)
                    code = output_dtype(tensors[0].dtype, role, arch.keep_fp32_roles, cfg.dtype)
                    tensors.append(PlannedTensor(name=name, dtype=code, shape=shape, recipe=ZerosRecipe()))
                    input_bytes[name] = 0
    return tensors, input_bytes


def _layer_tensors(cfg: MergeConfig, base: OpenedSource, target: dict[str, Any], le: LayerExperts,
                   arch: Architecture) -> list[PlannedTensor]:
    layer = le.layer
    role = "expert_gate" if base.facts.is_moe else "mlp_gate"
    any_expert = tensor_name(base.arch, role, layer, 0)
    expert_code = base.ckpt.info(any_expert).dtype if any_expert in base.ckpt else "BF16"
    out = []
    router = tensor_name(arch, "router", layer)
    router_code = base.ckpt.info(router).dtype if router in base.ckpt else expert_code
    out.append(PlannedTensor(name=router, dtype=output_dtype(router_code, "router", arch.keep_fp32_roles, cfg.dtype),
                             shape=expected_shape(target, router), recipe=RouterRecipe(layer=layer, part="weight")))
    if "router_bias" in arch.roles:
        bias = tensor_name(arch, "router_bias", layer)
        code = base.ckpt.info(bias).dtype if bias in base.ckpt else "F32"
        out.append(PlannedTensor(name=bias, dtype=output_dtype(code, "router_bias", arch.keep_fp32_roles, cfg.dtype),
                                 shape=expected_shape(target, bias), recipe=RouterRecipe(layer=layer, part="bias")))
    dtype = output_dtype(expert_code, "expert_gate", arch.keep_fp32_roles, cfg.dtype)
    for j in range(len(le.slots)):
        for proj, role in EXPERT_ROLES.items():
            name = tensor_name(arch, role, layer, j)
            out.append(PlannedTensor(name=name, dtype=dtype, shape=expected_shape(target, name),
                                     recipe=ExpertRecipe(layer=layer, slot=j, proj=proj)))
    if le.shared is not None or le.shared_gate == "ungated":  # the shared expert (slot index len(slots))
        for proj, role in SHARED_ROLES.items():  # (DeepSeek's, always on, without shared_experts: zeros)
            name = tensor_name(arch, role, layer)
            recipe = ZerosRecipe() if le.shared is None else ExpertRecipe(layer=layer, slot=len(le.slots), proj=proj)
            out.append(PlannedTensor(name=name, dtype=dtype, shape=expected_shape(target, name), recipe=recipe))
    if le.shared is not None and le.shared_gate == "gated":  # and its gate row
        name = tensor_name(arch, "shared_router", layer)
        out.append(PlannedTensor(name=name, dtype=output_dtype(router_code, "router", arch.keep_fp32_roles, cfg.dtype),
                                 shape=expected_shape(target, name), recipe=RouterRecipe(layer=layer, part="shared")))
    return out


# A dense layer's attention roles and the MLA weights each becomes (maths/mla.py); kv_a_norm comes with kv_a_proj.
_MLA_PARTS = {"q_proj": ("q_proj",), "k_proj": ("kv_a_proj", "kv_a_norm"), "v_proj": ("kv_b_proj",)}


def _mla_tensors(cfg: MergeConfig, base: OpenedSource, name: str, tid, target: dict[str, Any], arch: Architecture
                 ) -> list[PlannedTensor]:
    """The MLA weights a dense base's q, k or v projection becomes (the output is DeepSeek from dense models)."""
    code = output_dtype(base.ckpt.info(name).dtype, tid.role, base.arch.keep_fp32_roles, cfg.dtype)
    if code == "F16":
        said = "dtype: float16" if cfg.dtype else f"float16 (the dtype of {cfg.base_model}; no dtype: given)"
        raise PlanError(f"{said} for {arch.name} from dense models: its MLA keeps the latent near 1e-5 "
                        f"(maths/mla.py), below float16's normal range, where it would lose its bits; set dtype: "
                        f"bfloat16 or float32")
    out = []
    for part in _MLA_PARTS[tid.role]:
        out_name = tensor_name(arch, part, tid.layer)
        out.append(PlannedTensor(name=out_name, dtype=code, shape=expected_shape(target, out_name),
                                 recipe=MlaRecipe(layer=tid.layer, part=part)))
    return out


def _shared_slot(cfg: MergeConfig, base: OpenedSource, shared: list[OpenedSource]) -> ExpertSlot | None:
    """The output's shared expert: shared_experts.0's MLP, down scaled by its residual_scale."""
    if not shared:
        return None
    src = shared[0]
    if cfg.gate_mode == "transfer":
        raise PlanError("gate_mode: transfer takes router rows from MoE sources; a shared expert's gate row needs "
                        "prompts (gate_mode hidden, ...) or gate_mode random")
    if src.facts.is_moe or not src.facts.intermediate_size:
        raise PlanError(f"{src.where}: a shared expert is built from a dense model's MLP; {src.arch.name} has none")
    if src.facts.hidden_size != base.facts.hidden_size:
        raise PlanError(f"{src.where}: hidden size {src.facts.hidden_size}, the base's {base.facts.hidden_size}; "
                        f"the shared expert reads the base's residual stream as it is")
    return ExpertSlot(source=src.key, source_layer=0, kind="dense_mlp", scale=src.entry.residual_scale or 1.0)
