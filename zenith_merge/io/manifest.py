"""The output folder's bookkeeping: atomic JSON files and the manifest of finished shards.

`.zenith/manifest.json` is `{"version": 1, "plan_id": ..., "shards": {filename: {"sha256": ..., "bytes": ...}}}`.
It is rewritten atomically after every finished shard, so after a crash it lists exactly
the shards that were complete, and a resume can trust it. Only the parent process writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import OutputError

MANIFEST_FILE = ".zenith/manifest.json"
MANIFEST_VERSION = 1
TMP_SUFFIX = ".tmp"


def temp_path(path: Path, tag: str = "") -> Path:
    """The hidden temporary name a file is written under before it is renamed into place."""
    return path.with_name(f".{path.name}{tag}{TMP_SUFFIX}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file whole under a temporary name, then rename it into place."""
    tmp = temp_path(Path(path))
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json_atomic(path: Path, data) -> None:
    """Write JSON so that readers see the old file or the new one, never a partial one, even after a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with tmp.open("w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in chunks (used only to verify shards on resume)."""
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        buf = bytearray(8 * 2**20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def read_manifest(out_dir: Path) -> dict | None:
    """The manifest of an output folder, or None when there is none.

    An unreadable manifest is an error rather than "no manifest": it is only ever replaced
    atomically, so it was damaged from outside and the folder's state is unknown.
    """
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not (isinstance(data, dict) and isinstance(data.get("shards"), dict)):
            raise ValueError("no 'shards' mapping")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise OutputError(f"{path}: unreadable manifest ({err}); the folder's state is unknown: use overwrite") from None
    return data


def write_manifest(out_dir: Path, plan_id: str, shards: dict[str, dict]) -> None:
    """Record `plan_id` and the finished shards (filename -> {"sha256", "bytes"})."""
    write_json_atomic(Path(out_dir) / MANIFEST_FILE,
                      {"version": MANIFEST_VERSION, "plan_id": plan_id, "shards": dict(sorted(shards.items()))})
