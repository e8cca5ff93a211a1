"""mergekit-yaml's configs (mergekit 0.1.5), read with mergekit's meaning and turned into a zenith `MergeConfig`.

A mergekit-yaml config names a `merge_method`, an optional `base_model`, and `models[]`, each with
`parameters` (weight, density, epsilon, gamma, t, ...); top-level `parameters` apply to every model.
A parameter value is a number (or bool or string), a list of numbers (a gradient over the layers,
interpolated at t = layer / (layers - 1)), or a list of `{filter, value}` conditions (the first whose
`filter` is a substring of the tensor's name wins; `*` or none matches all). mergekit resolves a
parameter from the model's own `parameters` first, then the top-level ones.

The models become `experts[]` entries in mergekit's input order (the listed models, then the base when
it is not listed); `dtype` is the dtype the maths runs in (`merge_dtype`), `out_dtype` (or else `dtype`)
the output's. Keys mergekit has that zenith-merge does not support (`slices`, `modules`, LoRA references,
a union tokenizer across different vocabularies) are refused by name; zenith-merge's own writing keys
(`fp8_output`, `max_shard_size`, ...) may be added.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from ..errors import ConfigError

# mergekit 0.1.5's method names that zenith-merge runs (maths/methods.py: tests check the two lists agree);
# `regmean`, zenith's own (same-family assembly with RegMean-solved linear weights), is read as assembly.
MethodName = Literal["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                     "della", "della_linear", "slerp", "nuslerp", "model_stock", "passthrough"]
MERGEKIT_METHODS: tuple[str, ...] = get_args(MethodName)
# mergekit methods refused by name (with the reason shown).
UNSUPPORTED_METHODS = {
    "karcher": "the Karcher mean", "multislerp": "multi-model SLERP", "sce": "SCE", "arcee_fusion": "Arcee Fusion",
    "nearswap": "NearSwap", "ram": "RAM", "ramplus_tl": "RAM+",
}
MERGEKIT_KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "tokenizer", "chat_template", "name")
# zenith-merge keys a mergekit-yaml config may carry (how the output is written, not what it computes).
ZENITH_KEYS = ("output_dir", "max_shard_size", "fp8_output", "workers", "backend", "allow_pickle", "allow_nonfinite",
               "seed", "routing_report", "expert_scope", "search", "regmean")


def is_mergekit_yaml(data: Any) -> bool:
    """True for a mergekit-yaml config: `models:`, `slices:` or `modules:` and no `experts:` (which mergekit-moe
    and zenith configs have)."""
    return isinstance(data, dict) and "experts" not in data and any(k in data for k in ("models", "slices", "modules"))


def _model_ref(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: a model reference is a local folder or demo://<name> (a mapping such as "
                          f"{{model: ..., lora: ...}} is not supported), got {value!r}")
    if "+" in value and not value.startswith("demo://"):
        raise ConfigError(f"{where}: {value!r}: LoRA references (model+lora) are not supported; merge the LoRA "
                          f"into its model first")
    return value


def _check_setting(value: Any, where: str) -> None:
    """mergekit's ParameterSetting: a scalar, a list of scalars (a gradient), one {filter, value} condition or a
    list of them (each value a scalar or gradient)."""
    scalar = (bool, int, float, str)
    if isinstance(value, scalar):
        return
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, scalar) for v in value):
        return
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, cond in enumerate(value):
            unknown = sorted(set(cond) - {"filter", "value"})
            if unknown or "value" not in cond:
                raise ConfigError(f"{where}.{i}: a condition is {{filter: <part of a tensor name>, value: ...}}"
                                  + (f"; unknown key {unknown[0]!r}" if unknown else "; value is missing"))
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise ConfigError(f"{where}.{i}.filter: must be text (part of a tensor name), got {cond['filter']!r}")
            v = cond["value"]
            if not (isinstance(v, scalar) or (isinstance(v, list) and v and all(isinstance(e, scalar) for e in v))):
                raise ConfigError(f"{where}.{i}.value: must be a number, bool, text or a list of them, got {v!r}")
        return
    raise ConfigError(f"{where}: must be a number, bool, text, a list of numbers (a gradient over the layers) or "
                      f"a list of {{filter, value}} conditions, got {value!r}")


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping of parameter names to values, got {value!r}")
    for name, setting in value.items():
        if not isinstance(name, str):
            raise ConfigError(f"{where}: parameter names are text, got {name!r}")
        _check_setting(setting, f"{where}.{name}")
    return dict(value)


def _tokenizer(data: dict[str, Any], models: list[str]) -> dict[str, Any] | None:
    """mergekit's `tokenizer_source` / `tokenizer` -> zenith's `method_vocab`. Same-family parents share one
    tokenizer (the plan checks it), so a source that is one of the models means the base's: mergekit then
    resizes the embedding and head to that tokenizer's tokens (padding rows dropped; `pad_to_multiple_of` pads
    them again with the mean row). A union across different vocabularies belongs to merge_method: concat."""
    pad = None
    if data.get("tokenizer") is not None:
        tok = data["tokenizer"]
        if not isinstance(tok, dict):
            raise ConfigError(f"tokenizer: a mapping such as {{source: base}}, got {tok!r}")
        extra = sorted(set(tok) - {"source", "pad_to_multiple_of"})
        if extra:
            raise ConfigError(f"tokenizer.{extra[0]}: not supported with merge methods: the parents share one "
                              f"tokenizer, which the output keeps")
        source, pad = tok.get("source"), tok.get("pad_to_multiple_of")
    else:
        source = data.get("tokenizer_source")
    if source is None:
        return None
    if source == "base" or source in models:
        return {"pad_to_multiple_of": pad}
    raise ConfigError(f"tokenizer_source: {source!r}: merge methods here keep the base's tokenizer (the parents "
                      f"must share it); a union vocabulary across models is merge_method: concat's "
                      f"tokenizer.source: union")


def from_mergekit_yaml(data: dict[str, Any]) -> dict[str, Any]:
    """The zenith `MergeConfig` mapping of a mergekit-yaml config; ConfigError naming the key it cannot run."""
    unknown = sorted(set(data) - set(MERGEKIT_KEYS) - set(ZENITH_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key in a mergekit-yaml config (mergekit's keys: "
                          f"{', '.join(MERGEKIT_KEYS)}; zenith's: {', '.join(ZENITH_KEYS)})")
    for key in ("slices", "modules"):
        if data.get(key) is not None:
            raise ConfigError(f"{key}: not supported: zenith-merge merges whole models (models: [...]); layer "
                              f"ranges and per-module merges are mergekit's")
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise ConfigError(f"merge_method: required (one of {', '.join(MERGEKIT_METHODS)}, regmean), got {method!r}")
    if method in UNSUPPORTED_METHODS:
        raise ConfigError(f"merge_method: {method} ({UNSUPPORTED_METHODS[method]}) is not supported; methods: "
                          f"{', '.join(MERGEKIT_METHODS)}, regmean")
    if method not in MERGEKIT_METHODS and method != "regmean":
        raise ConfigError(f"merge_method: unknown method {method!r}; methods: {', '.join(MERGEKIT_METHODS)}, regmean")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError("models: a list of {model: <folder>, parameters: {...}} entries, at least one")
    entries = []
    for i, m in enumerate(models):
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"models.{i}: each entry is {{model: <folder>, parameters: {{...}}}}, got {m!r}")
        extra = sorted(set(m) - {"model", "parameters"})
        if extra:
            raise ConfigError(f"models.{i}.{extra[0]}: unknown key (an entry has model and parameters)")
        entries.append({"source_model": _model_ref(m["model"], f"models.{i}.model"),
                        "parameters": _parameters(m.get("parameters"), f"models.{i}.parameters")})
    base = data.get("base_model")
    if base is not None:
        base = _model_ref(base, "base_model")
        if all(e["source_model"] != base for e in entries):  # mergekit adds the base as the last input
            entries.append({"source_model": base, "parameters": {}})
    out: dict[str, Any] = {k: data[k] for k in ZENITH_KEYS if k in data and k != "regmean"}
    out.setdefault("routing_report", False)
    dtype, out_dtype = data.get("dtype"), data.get("out_dtype")
    if dtype is not None:
        out["merge_dtype"] = dtype
    if out_dtype or dtype:
        out["dtype"] = out_dtype or dtype
    vocab = _tokenizer(data, [base, *(e["source_model"] for e in entries)])
    if vocab is not None:
        out["method_vocab"] = vocab
    if data.get("chat_template") is not None:
        raise ConfigError("chat_template: not supported: the output keeps the base's chat template")
    top = _parameters(data.get("parameters"), "parameters")
    if method == "regmean":
        return {**out, **_regmean(entries, top, base, data.get("regmean"))}
    if data.get("regmean") is not None:
        raise ConfigError("regmean: only with merge_method: regmean")
    return {**out, "config_format": "mergekit-yaml", "merge_method": method,
            "base_model": base or entries[0]["source_model"],
            "method_base": base is not None, "parameters": top, "experts": entries}


def _regmean(entries: list[dict[str, Any]], top: dict[str, Any], base: str | None, settings: Any) -> dict[str, Any]:
    """merge_method: regmean -> zenith's assembly with RegMean: each model's `weight` (a number) weighs its
    Gram matrices; `regmean:` holds assembly.regmean's settings (data: one text list per model, ...)."""
    if not isinstance(settings, dict) or "data" not in settings:
        raise ConfigError("regmean: merge_method regmean needs regmean.data: one list of text files (or demo:code / "
                          "demo:maths) per model, each model's own domain")
    unknown = sorted(set(top) - {"weight"})
    if unknown:
        raise ConfigError(f"parameters.{unknown[0]}: regmean takes only weight")
    weights = []
    for i, e in enumerate(entries):
        w = e["parameters"].get("weight", top.get("weight", 1.0))
        if isinstance(w, bool) or not isinstance(w, int | float):
            raise ConfigError(f"models.{i}.parameters.weight: regmean weighs each model by one number, got {w!r}")
        extra = sorted(set(e["parameters"]) - {"weight"})
        if extra:
            raise ConfigError(f"models.{i}.parameters.{extra[0]}: regmean takes only weight")
        weights.append(float(w))
    return {"config_format": "mergekit-yaml", "merge_method": "assembly", "base_model": base or entries[0]["source_model"],
            "experts": [{"source_model": e["source_model"]} for e in entries],
            "assembly": {"weights": {"default": weights}, "regmean": settings}}
