"""A merge method's parameters for one tensor, resolved as mergekit 0.1.5 resolves them.

For each parameter: the model's own `parameters` first, then the config's top-level ones; within one,
a value is a scalar, a gradient (a list of numbers, interpolated linearly at t; a list of other values
picks the element at floor(t (n - 1))), or a list of `{filter, value}` conditions, of which the first
whose filter is `*`, absent, or a substring of the tensor's name applies (none applying: the next
source, then the method's default; a required parameter with none is an error naming it).

t is the layer's relative depth, layer / (layers - 1) (1 for a one-layer model), and 0 for tensors
outside the layers (embeddings, final norm, head), as mergekit sets it. A layer past the model's
`num_hidden_layers` (DeepSeek-V3's MTP module, which mergekit does not know) takes t = 1.

zenith-merge adds one filter form mergekit does not have: `class:<tensor class>` (`class:routed_experts`,
`class:attention`, ...) matches the tensors of that class, so experts can be merged with other
parameters than attention whatever the family's tensor names are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import PlanError
from ..maths.methods import Method, Parameter, validate

CLASS_FILTER = "class:"


def relative_depth(layer: int | None, layers: int) -> float:
    """mergekit's t for a tensor of `layer` (None: outside the layers) in a model of `layers` layers."""
    if layer is None:
        return 0.0
    if layers <= 1:
        return 1.0
    return min(1.0, layer / (layers - 1))


def _matches(flt: str | None, name: str, tensor_class: str | None) -> bool:
    if flt is None or flt == "*":
        return True
    if flt.startswith(CLASS_FILTER):
        return tensor_class == flt[len(CLASS_FILTER):]
    return bool(name) and flt in name


def evaluate(setting: Any, parameter: Parameter, name: str, tensor_class: str | None, t: float, where: str) -> Any:
    """One setting's value for tensor `name` at depth t, or None when no condition applies."""

    def check(value: Any) -> Any:
        try:
            return validate(parameter, value)
        except ValueError as err:
            raise PlanError(f"{where}: {err}") from None

    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, bool | int | float | str):
        return check(setting)
    if all(isinstance(e, bool | int | float | str) for e in setting):
        values = [check(e) for e in setting]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return check((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        if _matches(cond.get("filter"), name, tensor_class):
            return evaluate(cond["value"], parameter, name, tensor_class, t, where)
    return None


def resolve(parameter: Parameter, scopes: Sequence[tuple[str, Mapping[str, Any]]], name: str,
            tensor_class: str | None, t: float) -> Any:
    """The parameter's value from the first scope (key path, settings) that gives one, else its default."""
    for where, settings in scopes:
        if parameter.name in settings:
            value = evaluate(settings[parameter.name], parameter, name, tensor_class, t, f"{where}.{parameter.name}")
            if value is not None:
                return value
    if parameter.required:
        raise PlanError(f"{name}: the merge method needs parameter {parameter.name!r} and no setting gives one "
                        f"for this tensor (set it under parameters: or in each model's parameters:)")
    return validate(parameter, parameter.default)


def tensor_parameters(method: Method, inputs: Sequence[tuple[str, Mapping[str, Any]]], base: int | None,
                      top: Mapping[str, Any], name: str, tensor_class: str | None, t: float
                      ) -> tuple[dict[str, Any], tuple[dict[str, Any], ...]]:
    """(shared parameters, each input's parameters) of one output tensor. `inputs`: (key path, parameters) per
    input in mergekit's order; the base input gets only the parameters every input takes (mergekit's scope)."""
    shared_scopes = [("parameters", top)]
    shared = {p.name: resolve(p, shared_scopes, name, tensor_class, t) for p in method.parameters
              if p.scope == "shared"}
    per_input = []
    for i, (where, own) in enumerate(inputs):
        scopes = [(where, own), ("parameters", top)]
        per_input.append({p.name: resolve(p, scopes, name, tensor_class, t) for p in method.parameters
                          if p.scope == "input" or (p.scope == "non_base" and i != base)})
    return shared, tuple(per_input)


def unused_parameters(method: Method, inputs: Sequence[tuple[str, Mapping[str, Any]]], top: Mapping[str, Any]
                      ) -> list[str]:
    """Key paths of parameters the method does not take (mergekit ignores them; zenith-merge says so)."""
    known = {p.name for p in method.parameters}
    return [f"{where}.{k}" for where, settings in (("parameters", top), *inputs) for k in settings if k not in known]
