"""Planning a merge method (mergekit-yaml's linear, ties, dare_ties, slerp, model_stock, ...) over same-family
models, tensor by tensor: every tensor of the base's layout, routed experts slot by slot (expert i with expert i:
children of one parent keep their parent's expert identities), routers and score-correction biases by the same
method, DeepSeek's MTP layers included.

Each output tensor gets a `MethodRecipe` with its parameters already resolved (filters and gradients applied:
plan/method_parameters.py), so plan.json shows exactly what each tensor is made with, and the writer only runs
the maths (maths/methods.py). Random methods (dare, della) draw from a generator seeded by the config's seed
and the tensor's name: a merge is reproducible, and a resumed or parallel write gives the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any

from ..architectures import classify, dim, extra_layer_indices, set_dim, tensor_name, vocab_part
from ..config import MergeConfig
from ..errors import PlanError
from ..maths.methods import METHODS, Method
from .assembly import check_same_family
from .method_parameters import relative_depth, tensor_parameters, unused_parameters
from .models import CopyRecipe, MethodRecipe, Plan, PlannedTensor
from .opened_sources import OpenedSource
from .output import DTYPE_CODES, finish_plan, output_dtype, target_dtype_keys

log = logging.getLogger("zenith_merge.plan")

# The dtype a stored tensor is read in (block FP8 is read dequantised to BF16, as DeepSeek's own cast gives it).
_READ_AS = {"F64": "F64", "F32": "F32", "F16": "F16", "BF16": "BF16"}
_PROMOTION = ("F16", "BF16", "F32", "F64")  # torch.promote_types over these: F16 + BF16 -> F32


def promoted(codes: list[str]) -> str:
    """torch.promote_types over safetensors float codes (mergekit's merge dtype when `dtype` is not given)."""
    out = None
    for code in codes:
        code = _READ_AS.get(code, "BF16")
        if out is None or out == code:
            out = code
        elif {out, code} == {"F16", "BF16"}:
            out = "F32"
        else:
            out = max(out, code, key=_PROMOTION.index)
    return out or "F32"


def tensor_seed(seed: int, name: str) -> int:
    """The random methods' generator seed for one tensor: the config's seed and the tensor's name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % 2**63


def method_inputs(cfg: MergeConfig, base: OpenedSource, sources: list[OpenedSource]
                  ) -> tuple[list[OpenedSource], int | None]:
    """The method's inputs in mergekit's order (experts[] as listed; the base model is among them, appended
    by the config reader when mergekit's config did not list it) and the index of the method's base."""
    if not cfg.method_base or METHODS[cfg.merge_method].base == "none":  # linear: the base is one more input
        return sources, None
    at = [i for i, s in enumerate(sources) if s.model.path == base.model.path]
    if not at:
        raise PlanError(f"base_model: {cfg.base_model} is not among experts[]; list it (a merge method's base is "
                        f"one of its inputs)")
    return sources, at[0]


def check_inputs(method: Method, n: int, base: int | None) -> None:
    """Refuse input counts and base settings the method cannot take, as mergekit's contract does."""
    name = method.name
    if method.base == "required" and base is None:
        raise PlanError(f"merge_method {name}: needs base_model")
    non_base = n - (base is not None)
    for what, count, lo, hi in (("models", n, method.min_inputs, method.max_inputs),
                                ("models besides the base", non_base, method.min_non_base, method.max_non_base)):
        if count < lo or (hi is not None and count > hi):
            want = f"{lo}" if lo == hi else f"at least {lo}" + (f" and at most {hi}" if hi is not None else "")
            raise PlanError(f"merge_method {name}: takes {want} {what}, the config gives {count}")


def try_parameters(method: Method, n: int, base: int | None, shared: dict[str, Any],
                   per_input: tuple[dict[str, Any], ...], name: str, seen: set[str]) -> None:
    """Run the method once on small tensors with these parameters, so that values it refuses (della's epsilon
    past density, ...) stop the plan, naming the tensor, instead of the write hours later."""
    import torch

    from ..maths.methods import merge

    key = repr((sorted(shared.items()), [sorted(p.items()) for p in per_input]))
    if key in seen:
        return
    seen.add(key)
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 4, generator=gen) for _ in range(n)]
    try:
        merge(method.name, tensors, base, per_input, shared, torch.Generator().manual_seed(0))
    except ValueError as err:
        raise PlanError(f"{name}: merge_method {method.name}: {err}") from None


# What each method holds beyond its inputs, in bytes per element of the tensor: measured on two BF16 inputs of
# 50M elements (peak RSS; TIES and breadcrumbs sort a float32 copy of each task vector's magnitudes with
# int64 indices, DELLA ranks them, DARE draws a float mask). Scaled by the merge dtype's width over BF16's.
SCRATCH_BYTES = {"linear": 8, "task_arithmetic": 8, "ties": 28, "breadcrumbs": 28, "breadcrumbs_ties": 28,
                 "dare_linear": 11, "dare_ties": 11, "della": 26, "della_linear": 26, "slerp": 5, "nuslerp": 8,
                 "model_stock": 12, "passthrough": 0}

_FUSED = {"expert_gate": ("expert_gate", "expert_up"), "expert_up": ("expert_gate", "expert_up"),
          "expert_down": ("expert_down",)}


def fused_names(arch, config: dict, roles: tuple[str, ...], layer: int) -> tuple[tuple[str, ...], ...]:
    """expert_scope layer: a layer's expert tensors as transformers 5 fuses them (gate_up_proj: each expert's
    gate and up rows concatenated, down_proj: each expert's down; the experts stacked), by expert."""
    return tuple(tuple(tensor_name(arch, r, layer, e) for r in roles) for e in range(dim(config, arch, "n_experts")))


def _layout(cfg: MergeConfig, base: OpenedSource, tid, stacks: dict) -> tuple[dict[str, Any], int | None]:
    """How a tensor's experts are seen by the method: a fused tensor expert by expert (expert_axis), or
    (expert_scope layer) rows of its layer's fused experts; {} for a plain tensor. With the bytes of the
    layer's fused tensor per input (None: the tensor's own)."""
    if tid is None:
        return {}, None
    axis = base.arch.roles[tid.role].expert_axis
    if cfg.expert_scope == "expert" and axis is not None:
        return {"expert_axis": axis}, None
    if cfg.expert_scope == "layer" and tid.role in _FUSED:
        key = (_FUSED[tid.role], tid.layer)
        if key not in stacks:
            stack = fused_names(base.arch, base.ckpt.config, *key)
            stacks[key] = (stack, sum(base.ckpt.info(n).nbytes for names in stack for n in names))
        stack, nbytes = stacks[key]
        row = 0 if tid.role != "expert_up" else base.ckpt.info(stack[tid.expert][0]).shape[0]
        return {"fused": key[0], "layer": tid.layer, "expert": tid.expert, "row": row}, nbytes
    return {}, None


def tokenizer_rows(base: OpenedSource) -> int:
    """How many tokens the base tokenizer has below the config's vocab_size (mergekit's stripped tokenizer):
    the rows of a method_vocab output. Token ids must run from 0 without gaps, as mergekit indexes rows by id."""
    from tokenizers import Tokenizer

    path = Path(base.model.path) / "tokenizer.json"
    if not path.is_file():
        raise PlanError(f"{base.where}: tokenizer_source needs the base's tokenizer.json to count its tokens")
    size = dim(base.ckpt.config, base.arch, "vocab")
    ids = {i for i in Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True).values() if i < size}
    if ids != set(range(len(ids))):
        raise PlanError(f"{path}: token ids below vocab_size {size} have gaps; tokenizer_source resizes the "
                        f"embedding to the tokens, which needs them to run from 0")
    return len(ids)


def plan_method(cfg: MergeConfig, config_dir, output_dir, base: OpenedSource, sources: list[OpenedSource]) -> Plan:
    """Every base tensor merged by `cfg.merge_method` across the inputs, with its parameters for that tensor."""
    method = METHODS[cfg.merge_method]
    inputs, base_index = method_inputs(cfg, base, sources)
    check_inputs(method, len(inputs), base_index)
    for s in inputs:
        if s.model.path != base.model.path:
            check_same_family(base, s)
    settings = [(f"{s.field}.{s.index}.parameters", s.entry.parameters) for s in inputs]
    for where in unused_parameters(method, settings, cfg.parameters):
        log.warning("%s: merge_method %s takes no such parameter (mergekit ignores it too); it has no effect",
                    where, method.name)
    target: dict[str, Any] = target_dtype_keys(dict(base.ckpt.config), cfg.dtype)
    if cfg.experts_per_token is not None:
        set_dim(target, base.arch, "top_k", cfg.experts_per_token)
    layers = int(base.ckpt.config.get("num_hidden_layers", 1))
    extra = set(extra_layer_indices(base.arch, base.ckpt.config, base.ckpt.names()))
    keys = tuple(s.key for s in inputs)
    vocab: dict[str, int] = {}
    if cfg.method_vocab is not None:  # mergekit's tokenizer_source: the rows of the tokenizer's tokens
        rows = tokenizer_rows(base)
        pad = cfg.method_vocab.pad_to_multiple_of or 1
        vocab = {"vocab_rows": rows, "vocab_out": -(-rows // pad) * pad}
        set_dim(target, base.arch, "vocab", vocab["vocab_out"])
    tensors, input_bytes, seen, stacks = [], {}, set(), {}
    for name in base.ckpt.names():
        info = base.ckpt.info(name)
        for s in inputs:
            if name not in s.ckpt or s.ckpt.info(name).shape != info.shape:
                found = s.ckpt.info(name).shape if name in s.ckpt else "missing"
                raise PlanError(f"{s.where}: tensor {name} is {found}, the base's {info.shape}; a merge method "
                                f"needs every tensor in every model")
        tid = classify(base.arch, name)
        layer = tid.layer if tid is not None else None
        t = 1.0 if layer in extra else relative_depth(layer, layers)
        shared, per_input = tensor_parameters(method, settings, base_index, cfg.parameters, name,
                                              tid.tensor_class if tid else None, t)
        try_parameters(method, len(inputs), base_index, shared, per_input, name, seen)
        held, work = info.nbytes, 0
        shape = info.shape
        rows = vocab if vocab and tid is not None and vocab_part(base.arch, tid.role) else {}
        if rows:
            shape = (rows["vocab_out"], *info.shape[1:])
        if info.dtype not in _READ_AS:  # integer buffers are copied from the base, as mergekit copies them
            recipe = CopyRecipe(source="base", tensor=name)
        elif method.name == "passthrough" and per_input[0].get("scale") in (None, 1.0) and not rows:
            recipe = CopyRecipe(source=keys[0], tensor=name)
        else:
            layout, fused_bytes = _layout(cfg, base, tid, stacks)
            held = fused_bytes or held
            merge_dtype = (DTYPE_CODES[cfg.merge_dtype] if cfg.merge_dtype
                           else promoted([s.ckpt.info(name).dtype for s in inputs]))
            work = {"F64": 8, "F32": 4}.get(merge_dtype, 2)
            # one draw per fused tensor: the seed of its first name
            seed_name = stacks[(layout["fused"], layer)][0][0][0] + " (fused)" if "fused" in layout else name
            recipe = MethodRecipe(tensor=name, tensor_class=tid.tensor_class if tid else "other", method=method.name,
                                  sources=keys, base=base_index, inputs=per_input, shared=shared,
                                  merge_dtype=merge_dtype, seed=tensor_seed(cfg.seed, seed_name) if method.random
                                  else None, **layout, **rows)
        dtype = output_dtype(info.dtype, tid.role if tid else None, base.arch.keep_fp32_roles, cfg.dtype)
        tensors.append(PlannedTensor(name=name, dtype=dtype, shape=shape, recipe=recipe))
        # the inputs as stored, cast to the merge dtype, and the method's own scratch
        elements = held // max(1, info.nbytes // max(1, math.prod(info.shape)))
        input_bytes[name] = (len(inputs) * (held + work * elements) + SCRATCH_BYTES[method.name] * work // 2 * elements
                             if isinstance(recipe, MethodRecipe) else held)
    return finish_plan(cfg, config_dir, output_dir, method="method", base=base, sources=sources, target=target,
                       tensors=tensors, input_bytes=input_bytes)
