"""Architecture facts as data, and the few functions that read them.

`architecture_of(config)` finds the table for a Hugging Face config; `facts(config)`
gives the numbers the planner needs; `classify` and `expected_shape` interpret a
tensor name. No other module hard-codes a tensor name or config key.
"""

from __future__ import annotations

import ast
import functools
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import CheckpointError, PlanError
from .spec import Architecture, TensorClass, TensorRole
from .tables import ARCHITECTURES, MERGEKIT_MOE_OUTPUTS

__all__ = [
    "ARCHITECTURES",
    "MERGEKIT_MOE_OUTPUTS",
    "Architecture",
    "ModelFacts",
    "TensorRole",
    "TensorClass",
    "TensorId",
    "architecture_of",
    "check_architecture_name",
    "check_per_expert",
    "classify",
    "dim",
    "expected_shape",
    "extra_layer_indices",
    "facts",
    "fused_expert_roles",
    "optional_tensor_name",
    "set_dim",
    "shared_input_of",
    "tensor_name",
    "vocab_part",
]


def architecture_of(config: dict[str, Any], *, where: str = "config.json") -> Architecture:
    """The table for `config["architectures"][0]`; an unknown one is an error listing the supported ones."""
    names = config.get("architectures") or []
    name = names[0] if names else None
    if name not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise PlanError(f"{where}: unsupported architecture {name!r}; supported: {supported}")
    return ARCHITECTURES[name]


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _eval_formula(node: ast.AST, lookup) -> int | None:
    if isinstance(node, ast.Expression):
        return _eval_formula(node.body, lookup)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        return lookup(node.id)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_formula(node.left, lookup), _eval_formula(node.right, lookup)
        if left is None or right is None:
            return None
        return _BINOPS[type(node.op)](left, right)
    raise ValueError(f"unsupported formula element {ast.dump(node)}")


@functools.cache
def _parse(alternative: str) -> ast.Expression | None:
    """A formula's syntax tree, or None when the alternative is a plain config key."""
    return None if alternative.isidentifier() else ast.parse(alternative, mode="eval")


def dim(config: dict[str, Any], arch: Architecture, symbol: str | int) -> int | None:
    """Resolve a symbolic dimension of `arch` against `config`; None when the config does not define it."""
    if isinstance(symbol, int):
        return symbol
    if symbol not in arch.dims:
        value = config.get(symbol, arch.defaults.get(symbol))
        return value if isinstance(value, int) else None
    for alternative in arch.dims[symbol]:
        tree = _parse(alternative)
        if tree is None:
            value = config.get(alternative, arch.defaults.get(alternative))
        else:
            value = _eval_formula(tree, lambda name: dim(config, arch, name))
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def set_dim(config: dict[str, Any], arch: Architecture, symbol: str, value: int) -> None:
    """Set a dimension in a config: its first key, and every alias key the config already has.

    Configs saved by different transformers versions carry aliases side by side (Qwen3-MoE's
    `num_experts` and `num_local_experts`); leaving a stale alias makes loaders disagree.
    """
    keys = [k for k in arch.dims.get(symbol, (symbol,)) if k.isidentifier()]
    for i, key in enumerate(keys):
        if i == 0 or key in config:
            config[key] = value


@dataclass(frozen=True)
class ModelFacts:
    """The numbers of one model that planning needs, read through its architecture table."""

    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    intermediate_size: int | None
    moe_intermediate_size: int | None
    n_routed_experts: int
    experts_per_token: int
    n_shared_experts: int
    moe_layers: tuple[int, ...]
    tie_word_embeddings: bool
    scoring: str

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)


def _moe_layers(config: dict[str, Any], arch: Architecture, num_layers: int) -> tuple[int, ...]:
    get = lambda key: config.get(key, arch.defaults.get(key))  # noqa: E731
    if arch.moe_layer_rule == "first_k_dense":
        first, freq = int(get("first_k_dense_replace") or 0), int(get("moe_layer_freq") or 1)
        return tuple(i for i in range(num_layers) if i >= first and i % freq == 0)
    if arch.moe_layer_rule == "sparse_step":
        step, dense = int(get("decoder_sparse_step") or 1), set(get("mlp_only_layers") or [])
        return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    if arch.moe_layer_rule == "all":
        return tuple(range(num_layers))
    return ()


def facts(config: dict[str, Any], *, where: str = "config.json") -> ModelFacts:
    """Read a model's widths, depth and expert layout; a missing required key is an error naming it."""
    arch = architecture_of(config, where=where)

    def need(symbol: str) -> int:
        value = dim(config, arch, symbol)
        if value is None:
            keys = " or ".join(arch.dims.get(symbol, (symbol,)))
            raise CheckpointError(f"{where}: missing config key {keys} ({arch.name})")
        return value

    num_layers = need("layers")
    moe_layers = _moe_layers(config, arch, num_layers)
    return ModelFacts(
        architecture=arch.name,
        hidden_size=need("hidden"),
        num_layers=num_layers,
        vocab_size=need("vocab"),
        intermediate_size=dim(config, arch, "inter"),
        moe_intermediate_size=need("moe_inter") if moe_layers else None,
        n_routed_experts=need("n_experts") if moe_layers else 0,
        experts_per_token=need("top_k") if moe_layers else 0,
        n_shared_experts=dim(config, arch, "n_shared") or 0,
        moe_layers=moe_layers,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", arch.defaults.get("tie_word_embeddings", False))),
        scoring=arch.scoring,
    )


def extra_layer_indices(arch: Architecture, config: dict[str, Any], names: Sequence[str]) -> tuple[int, ...]:
    """The extra layers (DeepSeek-V3's MTP modules) a checkpoint carries: num_hidden_layers + i for each i below
    the config's count (`num_nextn_predict_layers`) whose tensors the checkpoint has. Checkpoints saved by
    transformers drop them though their config keeps the count, so presence is read from the names."""
    spec = arch.extra_layers
    if spec is None or not config.get(spec.count_key):
        return ()
    depth = dim(config, arch, "layers") or 0
    wanted = {arch.layer_module.format(layer=i) + ".": i for i in range(depth, depth + int(config[spec.count_key]))}
    found = {i for name in names for prefix, i in wanted.items() if name.startswith(prefix)}
    return tuple(sorted(found))


@dataclass(frozen=True)
class TensorId:
    """What a tensor name means in its architecture: role, layer and expert (None where not applicable)."""

    role: str
    tensor_class: TensorClass
    layer: int | None = None
    expert: int | None = None


@functools.cache
def _role_regexes(arch_name: str) -> tuple[tuple[str, re.Pattern[str]], ...]:
    arch = ARCHITECTURES[arch_name]
    out = []
    for role, spec in arch.roles.items():
        rx = re.escape(spec.pattern).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
        out.append((role, re.compile(rx + r"\Z")))
    return tuple(out)


def classify(arch: Architecture, name: str) -> TensorId | None:
    """The role of tensor `name` in `arch`, or None for a name the table does not describe."""
    for role, rx in _role_regexes(arch.name):
        m = rx.match(name)
        if m:
            groups = m.groupdict()
            layer = int(groups["layer"]) if groups.get("layer") is not None else None
            expert = int(groups["expert"]) if groups.get("expert") is not None else None
            return TensorId(role, arch.roles[role].tensor_class, layer, expert)
    return None


def shared_input_of(arch: Architecture, names: Sequence[str]) -> dict[str, str]:
    """weight -> the first of `names` that reads the same input tensor (itself when none does).

    Why: weights fed one tensor (`arch.shared_inputs`: an MLP's gate and up, attention's q, k, v)
    have one input statistic; computing and storing it once per group saves a factor of two or
    three on the largest of them.
    """
    group_of = {role: i for i, group in enumerate(arch.shared_inputs) for role in group}
    first: dict[tuple, str] = {}
    out = {}
    for name in names:
        tid = classify(arch, name)
        if tid is None or tid.role not in group_of:
            out[name] = name
            continue
        out[name] = first.setdefault((group_of[tid.role], tid.layer, tid.expert), name)
    return out


def vocab_part(arch: Architecture, role: str) -> Literal["embed", "head"] | None:
    """Which vocabulary matrix a role is, read from its shape: a row per token (first dimension `vocab`) is an
    embedding (`embed`) or an output head (`head`, class lm_head); None for every other role.

    Why: a union vocabulary rebuilds, and a merge method pads, exactly these rows (the MTP layer's own embedding
    and head included); both read this one fact from the table.
    """
    spec = arch.roles[role]
    if not spec.shape or spec.shape[0] != "vocab":
        return None
    return "head" if spec.tensor_class == "lm_head" else "embed"


def fused_expert_roles(arch: Architecture) -> tuple[str, ...]:
    """The roles of `arch` that hold every expert of a layer in one tensor (`TensorRole.expert_axis`)."""
    return tuple(role for role, spec in arch.roles.items() if spec.expert_axis is not None)


def check_per_expert(arch: Architecture, where: str | None = None) -> None:
    """Refuse what needs experts one by one (concat, grafting, `keep`) from a table whose experts are fused."""
    fused = fused_expert_roles(arch)
    if fused:
        names = ", ".join(arch.roles[r].pattern.removeprefix("model.layers.{layer}.") for r in fused)
        raise PlanError(f"{where + ': ' if where else ''}{arch.name} stores each layer's experts fused, one tensor "
                        f"per projection ({names}); concatenating, grafting or selecting experts needs them one by "
                        f"one, so it is not supported for this family: use merge_method: assembly (same family) or "
                        f"the base alone")


def optional_tensor_name(arch: Architecture, role: str, layer: int | None = None) -> str | None:
    """`tensor_name` of a role the family may lack (a router's bias, a q_norm): None where its table has none."""
    return tensor_name(arch, role, layer) if role in arch.roles else None


def tensor_name(arch: Architecture, role: str, layer: int | None = None, expert: int | None = None) -> str:
    """The checkpoint name of a role's tensor (the inverse of `classify`). An expert role asked of a table whose
    experts are fused (GPT-OSS) is a PlanError saying so, not a KeyError: no tensor holds one expert there."""
    if role not in arch.roles and role.startswith("expert_"):
        check_per_expert(arch)
    return arch.roles[role].pattern.format(layer=layer, expert=expert)


def expected_shape(config: dict[str, Any], name: str) -> tuple[int, ...] | None:
    """The shape `config` implies for tensor `name`, or None when the table does not say or cannot resolve it.

    The reader uses this to refuse a checkpoint whose tensors contradict its own config.
    """
    arch = ARCHITECTURES.get((config.get("architectures") or [None])[0])
    if arch is None:
        return None
    tid = classify(arch, name)
    if tid is None or arch.roles[tid.role].shape is None:
        return None
    depth = dim(config, arch, "layers") or 0
    extra = int(config.get(arch.extra_layers.count_key) or 0) if arch.extra_layers is not None else 0
    if tid.layer is not None and tid.layer >= depth + extra:
        return None  # a layer the config does not describe (past its decoder and MTP layers)
    shape = tuple(dim(config, arch, s) for s in arch.roles[tid.role].shape)
    return None if any(s is None for s in shape) else shape


def check_architecture_name(name: str) -> str:
    """A config's `architecture:` value, checked: a table's class name or model_type, or what mergekit-moe accepts
    (a case-insensitive prefix of one of its output names, "Qwen3 MoE", "qwen", "mixtral", ...). Which table it
    means can depend on the sources (mergekit's `qwen` is Qwen2-MoE or Qwen3-MoE): the planner decides."""
    tables = {a.name for a in ARCHITECTURES.values()} | {a.model_type for a in ARCHITECTURES.values()}
    if name in tables or any(out.lower().startswith(name.lower()) for out in MERGEKIT_MOE_OUTPUTS):
        return name
    raise ValueError(f"unsupported architecture {name!r}; supported: {', '.join(sorted(ARCHITECTURES))}, their "
                     f"model_type, or mergekit-moe's {', '.join(MERGEKIT_MOE_OUTPUTS)} (by prefix, as mergekit-moe)")
