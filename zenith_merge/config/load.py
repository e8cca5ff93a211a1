"""Reading a config: YAML with duplicate keys refused, validation errors as one message per key, and the
config's relative paths resolved against its folder.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ConfigError
from .mergekit_yaml import from_mergekit_yaml, is_mergekit_yaml
from .schema import MergeConfig

MAX_SHOWN_ERRORS = 20  # problems listed; the rest are counted
MAX_SHOWN_CHARS = 200  # of a value given, shown (our own messages up to 5x that)


def _short(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _format_validation_error(err: ValidationError, where: str) -> str:
    """One line per problem (the first MAX_SHOWN_ERRORS, long values cut): a config of 100,000 bad values is
    one readable message, not megabytes of them."""
    lines = []
    errors = err.errors()
    for e in errors[:MAX_SHOWN_ERRORS]:
        path = _short(".".join(str(p) for p in e["loc"]) or "(top level)")
        msg = _short(e["msg"].removeprefix("Value error, "), 5 * MAX_SHOWN_CHARS)
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        shown = e.get("input")
        if e["type"] == "missing" or isinstance(shown, dict) or isinstance(shown, list) and len(shown) > 10:
            value = ""
        else:
            value = "" if (text := repr(shown)) in msg else f" (got {_short(text)})"
        lines.append(f"  {path}: {msg}{value}")
    if len(errors) > MAX_SHOWN_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_SHOWN_ERRORS} more problems")
    return f"{where}: invalid config\n" + "\n".join(lines)


def parse_config(data: Any, *, where: str = "config") -> MergeConfig:
    """Validate a config mapping; every problem is reported with its key path and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys at the top level, got {type(data).__name__}")
    if is_mergekit_yaml(data):
        try:
            data = from_mergekit_yaml(data)
        except ConfigError as err:
            raise ConfigError(f"{where}: mergekit-yaml config: {err}") from None
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, where)) from None


# libyaml's C parser where PyYAML has it (about 10x faster: a 4 MiB config parses in well under a second),
# else the pure-Python one; both give the same events and nodes.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_BaseLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last silently), and
    reads dates and times as the text they are (no config key takes one; `2024-13-01` would otherwise be
    a ValueError from the date constructor)."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

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


MAX_CONFIG_BYTES = 4 * 2**20  # a config with long prompts is some kilobytes
MAX_DEPTH = 32  # a zenith config nests 4 levels, a mergekit one 5
MAX_NODES = 200_000  # values after aliases are expanded ("billion laughs" stays below it, or is refused)
MAX_NUMBER_CHARS = 64
MAX_INT = 2**63 - 1
_NUMBER = re.compile(r"[-+]?[0-9][0-9_.,:eExXoObBa-fA-F+-]*")
_STR_TAG = "tag:yaml.org,2002:str"


def _check_events(text: str, path: Path) -> None:
    """Bound a YAML text before anything is built from it: nesting depth and the number of values, both
    counted with aliases expanded (an alias stands for every node of what it repeats, as deep as it goes),
    recursive aliases, number length, and no explicit tags (`!!int x`, `!!python/...`: a config writes
    values plainly). The event parser holds one event at a time."""
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, depth) of what it stands for
    stack: list[list] = []  # per open collection: [nodes so far, deepest child so far, its anchor]

    def add(line: int, nodes: int, depth: int) -> None:
        """A child of `nodes` nodes, `depth` levels deep, joins the innermost open collection."""
        if len(stack) + depth > MAX_DEPTH:
            raise ConfigError(f"{path}: line {line}: nested more than {MAX_DEPTH} levels deep (aliases expanded)")
        if (stack[-1][0] + nodes if stack else nodes) > MAX_NODES:
            raise ConfigError(f"{path}: more than {MAX_NODES} values once aliases are expanded (an alias bomb?); "
                              f"write the config without so many repeated anchors")
        if stack:
            stack[-1][0] += nodes
            stack[-1][1] = max(stack[-1][1], depth)

    for event in yaml.parse(text, Loader=_BaseLoader):
        line = event.start_mark.line + 1 if event.start_mark else 0
        tag = getattr(event, "tag", None)
        if tag not in (None, "!", _STR_TAG) and not isinstance(event, yaml.AliasEvent):
            shown = tag.replace("tag:yaml.org,2002:", "!!")
            raise ConfigError(f"{path}: line {line}: YAML tag {shown} is not accepted in a config; write the value "
                              f"plainly")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(stack) >= MAX_DEPTH:
                raise ConfigError(f"{path}: line {line}: nested more than {MAX_DEPTH} levels deep")
            stack.append([1, 0, event.anchor])
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            nodes, deepest, anchor = stack.pop()
            if anchor:
                sizes[anchor] = (nodes, deepest + 1)
            add(line, nodes, deepest + 1)
        elif isinstance(event, yaml.ScalarEvent):
            if not event.style and len(event.value) > MAX_NUMBER_CHARS and _NUMBER.fullmatch(event.value):  # plain
                raise ConfigError(f"{path}: line {line}: a number of {len(event.value)} characters; give a "
                                  f"plausible value")
            if event.anchor:
                sizes[event.anchor] = (1, 0)
            add(line, 1, 0)
        elif isinstance(event, yaml.AliasEvent):
            if any(entry[2] == event.anchor for entry in stack):
                raise ConfigError(f"{path}: line {line}: alias *{event.anchor} is inside the collection it names (a "
                                  f"recursive value); write the config without it")
            add(line, *sizes.get(event.anchor, (1, 0)))


def read_yaml(path: str | Path) -> Any:
    """A YAML config file's data, duplicate keys refused, errors naming the file.

    Bounded before any Python structure is built (size, depth, alias expansion, number length, tags), so
    a hostile file is an error, not a hang; non-finite numbers and integers past 64 bits are refused
    with their key path.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {len(raw)} bytes; a config is at most {MAX_CONFIG_BYTES} bytes (is this the "
                          f"right file?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    try:
        _check_events(text, path)
        loader = _UniqueKeyLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        if "maximum nesting depth" in str(getattr(err, "problem", "")):  # libyaml's own limit (1000 levels)
            raise ConfigError(f"{path}: line {mark.line + 1 if mark else '?'}: nested more than {MAX_DEPTH} levels "
                              f"deep") from None
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except (ValueError, TypeError, OverflowError) as err:  # a value the YAML constructors cannot build
        raise ConfigError(f"{path}: a value YAML cannot read ({err})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deep") from None
    _check_numbers(data, path, ())
    return data


def _check_numbers(value: Any, path: Path, keys: tuple) -> None:
    """Refuse NaN, infinities and integers past 64 bits anywhere in `value`, naming the key path."""
    where = ".".join(str(k) for k in keys) or "(top level)"
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: {where}: {value} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise ConfigError(f"{path}: {where}: {value} is out of range")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_numbers(v, path, (*keys, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_numbers(v, path, (*keys, i))


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
    for group, key in (("experts", "source_model"), ("shared_experts", "source_model"), ("models", "model")):
        for e in out.get(group) or []:  # models: a mergekit-yaml config's
            if isinstance(e, dict) and key in e:
                e[key] = fix(e[key])
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
