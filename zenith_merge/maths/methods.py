"""mergekit-yaml's merge methods as data (`METHODS`) and one entry point (`merge`), bitwise equal to mergekit 0.1.5.

The mathematics lives in `task_arithmetic` (task_arithmetic, ties, dare_*, breadcrumbs*, della*) and
`interpolation` (linear, slerp, nuslerp, model_stock, passthrough); this module holds each method's
parameters, base policy and input counts as mergekit's registry declares them, mergekit's parameter
validation (`validate`), and `merge`, which binds one output tensor's inputs and parameters to the maths.

Input order (the planner must pass tensors in it, since sums are rounded in it and random masks are drawn
in it):

* `models:` configs: the models in config order, then `base_model` appended last when it is set and not
  among them (mergekit's `MergePlanner.normalize_config`). `slices:` configs: the slice's `sources` in
  order (the base must be one of them); pre-/post-layer weights use the first/last slice's sources.
* The base is the input equal to the slice's `base_model`, else the config's `base_model`.
* linear and passthrough ignore the base (mergekit's BasePolicy.IGNORED: "none" here): a configured base is
  an ordinary input in its place, with its own `weight`.
* Every other method takes the non-base inputs in that order with the base removed
  (`TensorGroup.non_base`); slerp's two inputs are the base (v0, t = 0) and the other (v1).
* Inputs missing an optional tensor are dropped before the method sees them (the planner's business:
  mergekit's OptionalTensorPolicy), and non-floating buffers are copied, not merged.

Dtypes: `merge` promotes the tensors to one dtype as mergekit does (a no-op when the caller has cast them to
the merge dtype) and returns what mergekit's method returns: the inputs' dtype for every method here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from zenith_merge.maths import interpolation
from zenith_merge.maths.task_arithmetic import VARIANTS, generalized_task_arithmetic


@dataclass(frozen=True)
class Parameter:
    """One merge parameter as mergekit's ParameterSpec declares it; `scope` is its ParameterScope:
    "shared" (one per tensor), "input" (every input incl. the base), "non_base" (every input but the base)."""

    name: str
    kind: Literal["float", "bool", "int", "str"]
    scope: Literal["shared", "input", "non_base"]
    default: object = None
    required: bool = False


@dataclass(frozen=True)
class Method:
    """A merge method: its parameters, base policy and input counts (mergekit's InputContract: inputs
    include the base where it is one)."""

    name: str
    parameters: tuple[Parameter, ...]
    base: Literal["required", "optional", "none"]
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    random: bool = False
    reference: str = ""
    summary: str = ""


def _task_arithmetic_method(name: str, reference: str, summary: str) -> Method:
    variant = VARIANTS[name]
    extra = {"magnitude_outliers": (Parameter("gamma", "float", "non_base", 0.01),),
             "della": (Parameter("epsilon", "float", "non_base", 0.15),)}.get(variant.sparsifier or "", ())
    return Method(
        name,
        parameters=(Parameter("int8_mask", "bool", "shared", False),
                    Parameter("normalize", "bool", "shared", variant.normalize),
                    Parameter("rescale", "bool", "shared", variant.rescale),
                    Parameter("lambda", "float", "shared", 1.0),
                    Parameter("weight", "float", "non_base", required=True),
                    Parameter("density", "float", "non_base", 1.0),
                    *extra),
        base="required", random=variant.sparsifier in ("random", "della"), reference=reference, summary=summary)


_ARXIV = "https://arxiv.org/abs/"
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("linear", (Parameter("weight", "float", "input", required=True),
                      Parameter("normalize", "bool", "shared", True)),
           base="none", reference=_ARXIV + "2203.05482",
           summary="weighted average of the inputs (model soups)"),
    _task_arithmetic_method("task_arithmetic", _ARXIV + "2212.04089",
                            "base + lambda * weighted sum of task vectors"),
    _task_arithmetic_method("ties", _ARXIV + "2306.01708",
                            "task vectors trimmed to the largest magnitudes, sign consensus, averaged"),
    _task_arithmetic_method("dare_linear", _ARXIV + "2311.03099",
                            "task vectors randomly dropped and rescaled, summed"),
    _task_arithmetic_method("dare_ties", _ARXIV + "2311.03099",
                            "task vectors randomly dropped and rescaled, with TIES sign consensus"),
    _task_arithmetic_method("breadcrumbs", _ARXIV + "2312.06795",
                            "task vectors without their largest outliers and smallest entries, summed"),
    _task_arithmetic_method("breadcrumbs_ties", _ARXIV + "2312.06795",
                            "breadcrumbs sparsification with TIES sign consensus"),
    _task_arithmetic_method("della", _ARXIV + "2406.11617",
                            "task vectors dropped with magnitude-ranked probabilities, sign consensus"),
    _task_arithmetic_method("della_linear", _ARXIV + "2406.11617",
                            "task vectors dropped with magnitude-ranked probabilities, summed"),
    Method("slerp", (Parameter("t", "float", "shared", required=True),),
           base="required", min_inputs=2, max_inputs=2, reference="https://en.wikipedia.org/wiki/Slerp",
           summary="spherical interpolation from the base (t = 0) to the other input (t = 1)"),
    Method("nuslerp", (Parameter("weight", "float", "non_base", required=True),
                       Parameter("nuslerp_row_wise", "bool", "shared", False),
                       Parameter("nuslerp_flatten", "bool", "shared", True)),
           base="optional", min_non_base=2, max_non_base=2,
           reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
           summary="slerp of two inputs by relative weight, of their task vectors when there is a base"),
    Method("model_stock", (Parameter("filter_wise", "bool", "shared", False),),
           base="required", min_inputs=3, reference=_ARXIV + "2403.19522",
           summary="base and the average of the others, interpolated by their offsets' mean cosine"),
    Method("passthrough", (Parameter("scale", "float", "input", None),),
           base="none", max_inputs=1, summary="the one input, optionally scaled"),
)}

_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def _number_text(text: str) -> str:
    """A numeric string as pydantic reads it: whitespace stripped, then underscores removed unless one
    leads, trails or doubles. ValueError for text that float()/int() would read and pydantic would not."""
    text = text.strip()
    if not text.isascii():  # Python reads other scripts' digits; pydantic does not
        raise ValueError
    if "_" in text:
        if text.startswith("_") or text.endswith("_") or "__" in text:
            raise ValueError
        text = text.replace("_", "")
    return text


def _parse_int(text: str) -> int:
    digits = _number_text(text)
    head, dot, zeros = digits.partition(".")  # "1.00" is 1; "1." and "1e3" are refused
    if dot and not (zeros and set(zeros) == {"0"}):
        raise ValueError
    return int(head)


def validate(parameter: Parameter, value: object) -> object:
    """The value as mergekit's ParameterSpec.validate (pydantic, lax mode) would give it; ValueError with a
    one-line reason when mergekit would refuse it. None is allowed only for an optional parameter whose
    default is None (passthrough's scale)."""
    kind = parameter.kind
    if value is None:
        if parameter.default is None and not parameter.required:
            return None
        raise ValueError(f"{parameter.name}: a {kind} is needed, got None")
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode()
        except UnicodeDecodeError:
            raise ValueError(f"{parameter.name}: {value!r} is not valid UTF-8") from None
    bad = ValueError(f"{parameter.name}: {value!r} is not a valid {kind}")
    if kind == "str":
        if not isinstance(value, str):
            raise bad
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad
    if kind == "float":
        if isinstance(value, float):
            return value
        try:
            if isinstance(value, int):  # bool included: True -> 1.0
                return float(value)
            if isinstance(value, str):
                return float(_number_text(value))
        except (ValueError, OverflowError):
            raise bad from None
        raise bad
    if kind == "int":
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            if math.isfinite(value) and value == int(value) and abs(value) < 2.0**63:  # pydantic: i64 only
                return int(value)
            raise bad
        if isinstance(value, str):
            try:
                return _parse_int(value)
            except ValueError:
                pass
        raise bad
    raise ValueError(f"{parameter.name}: unknown parameter kind {kind!r}")


def _bind(method: Method, scope_of: tuple[str, ...], given: Mapping[str, object], where: str) -> dict[str, object]:
    """`given` checked against the method's parameters of the scopes in `scope_of`, defaults filled in."""
    wanted = {p.name: p for p in method.parameters if p.scope in scope_of}
    unknown = sorted(set(given) - set(wanted))
    if unknown:
        raise ValueError(f"{method.name}: unknown parameter(s) {', '.join(unknown)} for {where}")
    bound = {}
    for name, p in wanted.items():
        if name in given:
            bound[name] = validate(p, given[name])
        elif p.required:
            raise ValueError(f"{method.name}: missing required parameter {name} for {where}")
        else:
            bound[name] = validate(p, p.default)
    return bound


def _check_counts(method: Method, count: int, has_base: bool) -> None:
    non_base = count - int(has_base)
    if method.base == "required" and not has_base:
        raise ValueError(f"{method.name} needs a base input")
    if count < method.min_inputs or (method.max_inputs is not None and count > method.max_inputs):
        raise ValueError(f"{method.name} takes {method.min_inputs}..{method.max_inputs or 'any'} inputs, "
                         f"got {count}")
    if non_base < method.min_non_base or (method.max_non_base is not None and non_base > method.max_non_base):
        raise ValueError(f"{method.name} takes {method.min_non_base}..{method.max_non_base or 'any'} "
                         f"non-base inputs, got {non_base}")


def merge(method: str, tensors: Sequence[torch.Tensor], base: int | None, inputs: Sequence[Mapping[str, object]],
          shared: Mapping[str, object], generator: torch.Generator | None = None) -> torch.Tensor:
    """tensors: every input of one output tensor, in mergekit's input order (module docstring), already
    cast to one dtype by the caller (the merge dtype); base: the index of the method's base among them or
    None; inputs[i]: input i's resolved parameters (the base's only has 'input'-scope ones, as mergekit
    resolves them); shared: the shared parameters. Returns the merged tensor in the dtype mergekit's method
    returns. Random methods draw from `generator` (None: torch's global RNG), on the tensors' device."""
    spec = METHODS.get(method)
    if spec is None:
        raise ValueError(f"unknown merge method {method!r}; known: {', '.join(METHODS)}")
    if len(inputs) != len(tensors):
        raise ValueError(f"{method}: {len(tensors)} tensors but {len(inputs)} parameter sets")
    if base is not None and not 0 <= base < len(tensors):
        raise ValueError(f"{method}: base index {base} outside the {len(tensors)} inputs")
    if spec.base == "none":
        base = None
    _check_counts(spec, len(tensors), base is not None)
    first = tensors[0]
    if any(t.shape != first.shape for t in tensors) or any(t.device != first.device for t in tensors):
        raise ValueError(f"{method}: inputs differ in shape or device: {[tuple(t.shape) for t in tensors]}")
    if not all(t.is_floating_point() for t in tensors):
        raise ValueError(f"{method}: non-floating tensors are copied, not merged (mergekit's buffer rule)")
    dtype = first.dtype
    for t in tensors[1:]:  # mergekit promotes each group's inputs to one dtype
        dtype = torch.promote_types(dtype, t.dtype)
    tensors = [t.to(dtype) for t in tensors]

    options = _bind(spec, ("shared",), shared, "the tensor")
    per_input = [_bind(spec, ("input",) if i == base else ("input", "non_base"), given, f"input {i}")
                 for i, given in enumerate(inputs)]
    with torch.autocast(device_type=first.device.type, enabled=False):  # as mergekit runs its kernels
        return _dispatch(method, tensors, base, per_input, options, generator)


def _dispatch(method: str, tensors: list[torch.Tensor], base: int | None, per_input: list[dict[str, object]],
              options: dict[str, object], generator: torch.Generator | None) -> torch.Tensor:
    others = [i for i in range(len(tensors)) if i != base]

    def column(name: str, indices: Sequence[int]) -> list:
        return [per_input[i][name] for i in indices]

    if method == "linear":
        return interpolation.linear(tensors, column("weight", range(len(tensors))), options["normalize"])
    if method == "passthrough":
        return interpolation.passthrough(tensors[0], per_input[0]["scale"])
    base_tensor = None if base is None else tensors[base]
    if method == "slerp":
        return interpolation.slerp(options["t"], base_tensor, tensors[others[0]])
    if method == "nuslerp":
        return interpolation.nuslerp([tensors[i] for i in others], column("weight", others), base_tensor,
                                     options["nuslerp_row_wise"], options["nuslerp_flatten"])
    if method == "model_stock":
        return interpolation.model_stock(base_tensor, [tensors[i] for i in others], options["filter_wise"])
    variant = VARIANTS[method]
    return generalized_task_arithmetic(
        base_tensor, [tensors[i] for i in others], column("weight", others),
        sparsifier=variant.sparsifier, consensus=variant.consensus, densities=column("density", others),
        gammas=column("gamma", others) if variant.sparsifier == "magnitude_outliers" else None,
        epsilons=column("epsilon", others) if variant.sparsifier == "della" else None,
        normalize=options["normalize"], rescale=options["rescale"], lam=options["lambda"],
        int8_mask=options["int8_mask"], generator=generator)
