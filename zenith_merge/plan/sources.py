"""Source models: resolve a config's model references to folders, fingerprint them, and name the side files
(tokenizer, generation config, custom code) a merged folder carries from them.

A fingerprint is cheap yet tells two parents of the same layout apart (DeepSeek-V3 and R1 share config,
index and headers): besides config, index, safetensors headers and file sizes it hashes a fixed sample of
each weight file's data, a few MiB per file however large the file. A resumed merge compares it to the one
its interrupted run planned from, so it can tell that its inputs are still the ones it started with.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DEMO_SCHEME, resolve_path
from ..errors import CheckpointError, OutputError, PlanError
from ..io.json_files import read_json_file

log = logging.getLogger(__name__)

# Files of a model folder that describe its tokenizer and generation defaults (tiktoken.model: Kimi-K2's
# vocabulary, read by the custom code its tokenizer_config.json names; it ships no tokenizer.json).
TOKENIZER_FILE_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "*.tiktoken",
    "tiktoken.model",
)
GENERATION_CONFIG = "generation_config.json"
# The configs whose `auto_map` names custom-code modules of the folder (transformers' trust_remote_code).
AUTO_MAP_CONFIGS = ("config.json", "tokenizer_config.json")
# The fingerprint's data sample: the first and last SAMPLE_BYTES of each weight file's data section and
# SAMPLE_RANGES evenly spaced ranges between (1.1 MiB a file at most; a shorter section is read whole).
SAMPLE_RANGES = 16
SAMPLE_BYTES = 64 * 2**10
# Pickled weights (read with `allow_pickle`) fingerprinted beside the safetensors files.
PICKLE_FILES = ("pytorch_model*.bin",)
# A module name an `auto_map` entry may give: one file beside config.json.
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# `from .name import ...` / `import .name` in a custom-code file: a module of the same folder it needs.
_RELATIVE_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+\.([A-Za-z_]\w*)[ \t]+import\b|import[ \t]+\.([A-Za-z_]\w*))",
                              re.MULTILINE)


@dataclass(frozen=True)
class SourceModel:
    """A resolved source: the reference as written in the config and the folder it names."""

    ref: str
    path: Path

    @property
    def is_demo(self) -> bool:
        return self.ref.startswith(DEMO_SCHEME)


def resolve_model(ref: str, config_dir: Path | None = None, *, build_demo: bool = True) -> SourceModel:
    """Turn `demo://<name>` or a folder into a `SourceModel`; demo models are built on first use."""
    if ref.startswith(DEMO_SCHEME):
        from ..demo.cache import demo_path, ensure_demo

        name = ref[len(DEMO_SCHEME):]
        return SourceModel(ref, ensure_demo(name) if build_demo else demo_path(name))
    path = resolve_path(ref, config_dir)
    if not path.is_dir():
        raise CheckpointError(f"{ref}: no such model folder ({path})")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a Hugging Face model folder (no config.json)")
    return SourceModel(ref, path)


def _safetensors_header(file: Path) -> bytes:
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return head
        (n,) = struct.unpack("<Q", head)
        return f.read(min(n, 100 * 2**20))


def sample_offsets(start: int, end: int) -> list[int]:
    """The offsets of the ranges the fingerprint reads from a data section `[start, end)`: every
    SAMPLE_BYTES of a short one, else its first and last SAMPLE_BYTES and SAMPLE_RANGES evenly spaced
    ranges between. Fixed by the section's bounds alone, so two runs read the same bytes."""
    length = end - start
    if length <= 0:
        return []
    if length <= (SAMPLE_RANGES + 2) * SAMPLE_BYTES:
        return list(range(start, end, SAMPLE_BYTES))
    gaps = SAMPLE_RANGES + 1
    return [start + i * (length - SAMPLE_BYTES) // gaps for i in range(gaps + 1)]


def _data_sample(file: Path, start: int) -> Iterator[bytes]:
    """The sampled ranges of `file` from `start` (its data section) to its end, read with `os.pread`."""
    fd = os.open(file, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        for offset in sample_offsets(min(start, end), end):
            yield os.pread(fd, min(SAMPLE_BYTES, end - offset), offset)
    finally:
        os.close(fd)


def fingerprint(path: Path) -> str:
    """A sha256 that identifies a model folder's weights: its config and index, each safetensors file's
    name, size and header, and a fixed sample of every weight file's data (`sample_offsets`).

    The sample is what tells two parents of one layout apart (DeepSeek-V3 and R1 have the same config,
    index and headers); it reads at most (SAMPLE_RANGES + 2) * SAMPLE_BYTES of data a file, so a 1 TB
    release costs a few hundred MB of reads. A change confined to bytes the sample misses (a few tensors
    edited in place) goes unseen.
    """
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        header = _safetensors_header(f)
        h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0" + header)
        for chunk in _data_sample(f, 8 + len(header)):
            h.update(chunk)
    for f in sorted({f for pattern in PICKLE_FILES for f in path.glob(pattern) if f.is_file()}):
        h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
        for chunk in _data_sample(f, 0):
            h.update(chunk)
    return h.hexdigest()


def check_unchanged(sources: Mapping[str, Any], where: Path) -> None:
    """Refuse to go on with a run whose sources changed since it was planned.

    `sources`: the interrupted run's planned sources (key -> object with `ref`, `path`, `fingerprint`, as
    in `.zenith/plan.json`), `where`: its output folder. A source folder whose files were replaced (a
    parent swapped for another of the same layout) would otherwise mix two models' tensors in one output;
    the error names the source and says how to go on.
    """
    for key, src in sources.items():
        folder = Path(src.path)
        now = fingerprint(folder) if folder.is_dir() else None
        if now != src.fingerprint:
            what = (f"its fingerprint was {src.fingerprint[:12]}, now {now[:12]}: its files were replaced, or that "
                    f"run was planned by another zenith-merge version"
                    if now is not None else "the folder is gone")
            named = src.ref if src.ref == str(folder) else f"{src.ref}, {folder}"
            raise OutputError(f"source {key!r} ({named}) changed since the interrupted run in {where} "
                              f"({what}); resuming would mix its old and new weights: restore it, or start "
                              f"again with --overwrite")


def tokenizer_files(path: Path) -> list[str]:
    """Names of the tokenizer and generation-config files present in a model folder; the JSON ones are
    parsed here, so that a corrupt one fails the plan naming it, before any shard is written (they are
    copied byte for byte, and read back to patch the output's config)."""
    found = {f.name for pattern in TOKENIZER_FILE_PATTERNS for f in path.glob(pattern) if f.is_file()}
    if (path / GENERATION_CONFIG).is_file():
        found.add(GENERATION_CONFIG)
    for name in sorted(found):
        if name.endswith(".json"):
            read_json_file(path / name, error=CheckpointError)
    return sorted(found)


def _auto_map_modules(auto_map: Any, where: str) -> Iterator[tuple[str, str]]:
    """(module file, `auto_map` key) for each local module an `auto_map` names; remote references are logged."""
    if not isinstance(auto_map, dict):
        return
    for key, value in auto_map.items():
        for ref in value if isinstance(value, list | tuple) else [value]:
            if ref is None:  # AutoTokenizer's [slow, fast] pair with one missing
                continue
            if not isinstance(ref, str) or "." not in ref:
                raise PlanError(f"{where}: auto_map.{key} is {ref!r}, not a module.Class reference")
            if "--" in ref:  # "owner/repo--module.Class": transformers fetches that code from the Hub
                log.info("%s: auto_map.%s names %s in another repository; not carried", where, key, ref)
                continue
            module = ref.rsplit(".", 1)[0]
            if not _MODULE.fullmatch(module):
                raise PlanError(f"{where}: auto_map.{key} is {ref!r}, not a module.Class reference")
            yield f"{module}.py", key


def custom_code_files(folder: Path, config: Mapping[str, Any]) -> list[str]:
    """The custom-code files a merged folder needs from the base `folder`: the modules named by `config`'s
    `auto_map` (the output's config.json) and by the base's tokenizer_config.json `auto_map` (the output's
    tokenizer_config.json keeps it, copied or in the union's), and the same-folder modules those import.

    `"configuration_deepseek.DeepseekV3Config"` names `configuration_deepseek.py`; a value may be a list
    (AutoTokenizer's `[slow, fast]`, `null` for a missing one). A `"owner/repo--module.Class"` value names
    another repository's code, which transformers fetches itself: it is not carried (logged).

    A local module absent from `folder` is a `PlanError` naming the file and the `auto_map` key: the output
    would keep an `auto_map` pointing at nothing, and `trust_remote_code` loads (vLLM and SGLang with
    `--trust-remote-code`) would fail after the whole merge. The fix, in the message: put the file in the
    base folder, or remove the entry from the base's config. The plan refuses before any weight is read.
    """
    needed: dict[str, str] = {}  # file -> what names it
    maps = [("config.json", config.get("auto_map"))]
    tok = folder / "tokenizer_config.json"
    if tok.is_file():
        maps.append(("tokenizer_config.json", read_json(tok).get("auto_map")))
    for name, auto_map in maps:
        for file, key in _auto_map_modules(auto_map, f"{folder / name}"):
            needed.setdefault(file, f"auto_map.{key} of {name}")
    todo = list(needed)
    while todo:
        file = todo.pop()
        path = folder / file
        if not path.is_file():
            fix = ", or remove that entry from the base's config" if needed[file].startswith("auto_map") else ""
            raise PlanError(f"{path}: custom-code file named by {needed[file]} is not in the base folder; the "
                            f"output's config would point at a missing file. Copy {file} from the release into "
                            f"{folder}{fix}")
        for match in _RELATIVE_IMPORT.finditer(path.read_text(encoding="utf-8", errors="replace")):
            imported = f"{match.group(1) or match.group(2)}.py"
            if imported not in needed:
                needed[imported] = f"a relative import in {file}"
                todo.append(imported)
    return sorted(needed)


def side_file_kind(name: str) -> str:
    """What a side file is, in words, for the model card's file list."""
    if name.endswith(".py"):
        return "custom code (trust_remote_code)"
    if name == GENERATION_CONFIG:
        return "generation defaults"
    if name.startswith("chat_template"):
        return "chat template"
    return "tokenizer"


def read_json(path: Path) -> dict:
    """A JSON file as a dict, with an error naming the file when it is unreadable."""
    return read_json_file(path, error=CheckpointError)
