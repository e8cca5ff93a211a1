"""Reading a config: YAML with duplicate keys refused, validation errors as one message per key, and the
config's relative paths resolved against its folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ConfigError
from .schema import MergeConfig


def _format_validation_error(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        shown = e.get("input")
        value = "" if e["type"] == "missing" or isinstance(shown, dict) or repr(shown) in msg else f" (got {shown!r})"
        lines.append(f"  {path}: {msg}{value}")
    return f"{where}: invalid config\n" + "\n".join(lines)


def parse_config(data: Any, *, where: str = "config") -> MergeConfig:
    """Validate a config mapping; every problem is reported with its key path and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, where)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.name}: line {line}: key {key!r} is given twice in one mapping (first on "
                                  f"line {seen[key]}); give it once")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a YAML merge config file."""
    return parse_config(read_yaml(path), where=str(path))


def read_yaml(path: str | Path) -> Any:
    """A YAML config file's data, duplicate keys refused, errors naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return data


# Config entries that name files or models, relative to the config's folder: (path of keys, is a list).
_PATH_KEYS = ((("base_model",), False), (("output_dir",), False), (("align", "calibration"), True),
              (("align", "teacher_data"), True), (("router", "data"), True), (("tokenizer", "protect"), True),
              (("search", "keep"), True), (("search", "gain"), True))


def with_absolute_paths(data: dict, config_dir: Path) -> dict:
    """A copy of raw config `data` whose relative file and model paths are absolute (demo references kept),
    so that it means the same thing when written into another folder."""
    import copy

    out = copy.deepcopy(data)

    def fix(v):
        if not isinstance(v, str) or v.startswith(("demo:", "/", "~")):
            return v
        return str((config_dir / v).resolve())

    for keys, is_list in _PATH_KEYS:
        parent = out
        for k in keys[:-1]:
            parent = parent.get(k) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or keys[-1] not in parent:
            continue
        v = parent[keys[-1]]
        parent[keys[-1]] = [fix(x) for x in v] if is_list and isinstance(v, list) else fix(v)
    for group in ("experts", "shared_experts"):
        for e in out.get(group) or []:
            if isinstance(e, dict) and "source_model" in e:
                e["source_model"] = fix(e["source_model"])
    tokenizer = out.get("tokenizer") or {}
    if isinstance(tokenizer, dict) and tokenizer.get("source") not in (None, "union", "base"):
        tokenizer["source"] = fix(tokenizer["source"])  # a model folder
    for rule in (tokenizer.get("tokens") or {}).values():
        if isinstance(rule, dict) and "source" in rule:
            rule["source"] = fix(rule["source"])
    regmean = (out.get("assembly") or {}).get("regmean")
    if isinstance(regmean, dict) and isinstance(regmean.get("data"), list):
        regmean["data"] = [[fix(x) for x in v] if isinstance(v, list) else v for v in regmean["data"]]
    return out


def resolve_path(ref: str, config_dir: Path | None) -> Path:
    """A local model reference as an absolute path (relative ones are taken from the config's folder)."""
    p = Path(ref).expanduser()
    if not p.is_absolute() and config_dir is not None:
        p = config_dir / p
    return p.resolve()
