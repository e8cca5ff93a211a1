"""Source models: resolve a config's model references to folders, and fingerprint them.

A fingerprint is cheap (config, index and safetensors headers, file sizes; no
weights are hashed) yet changes whenever a source's files are replaced, so a
resumed merge can tell that its inputs are still the ones it was planned from.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .config import DEMO_SCHEME, resolve_path
from .errors import CheckpointError

# Files of a model folder that describe its tokenizer and generation defaults.
TOKENIZER_FILE_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "*.tiktoken",
)
GENERATION_CONFIG = "generation_config.json"


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
        from .demo import demo_dir, ensure_demo

        name = ref[len(DEMO_SCHEME):]
        if build_demo:
            return SourceModel(ref, ensure_demo(name))
        return SourceModel(ref, demo_dir() / name)
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


def fingerprint(path: Path) -> str:
    """A sha256 over a model folder's config, index, safetensors headers and file sizes."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0" + _safetensors_header(f))
    return h.hexdigest()


def tokenizer_files(path: Path) -> list[str]:
    """Names of the tokenizer and generation-config files present in a model folder."""
    found = {f.name for pattern in TOKENIZER_FILE_PATTERNS for f in path.glob(pattern) if f.is_file()}
    if (path / GENERATION_CONFIG).is_file():
        found.add(GENERATION_CONFIG)
    return sorted(found)


def read_json(path: Path) -> dict:
    """A JSON file as a dict, with an error naming the file when it is unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read JSON ({err})") from None
