"""The output folder's bookkeeping: atomic JSON files and the manifest of finished shards.

`.zenith/manifest.json` is `{"version": 1, "plan_id": ..., "shards": {filename: {"sha256": ..., "bytes": ...}}}`.
It is rewritten atomically after every finished shard, so after a crash it lists exactly
the shards that were complete, and a resume can trust it. Only the parent process writes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
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


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range's dirty pages, do not wait


@functools.cache
def _sync_file_range():
    """libc's sync_file_range (Linux), or None where there is none."""
    import ctypes
    import ctypes.util

    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


def stream_to_disk(fd: int, done: int, start: int, end: int) -> None:
    """Start writing bytes [start, end) of a file being written to disk, without waiting, and drop from
    the page cache the bytes [done, start) whose writeback an earlier call started.

    Why: a shard's final fsync would otherwise find gigabytes of dirty pages and write them all while
    the writer waits, and a merge's output would fill the page cache, evicting the sources' pages
    being read. Started tensor by tensor, the disk works while the next tensor is produced, and what
    is on disk leaves memory (as `dd oflag=nocache` does). Advisory: where the calls are missing or
    fail, only speed changes; pages still dirty are not dropped.
    """
    fn = _sync_file_range()
    if fn is not None and end > start:
        fn(fd, start, end - start, _SYNC_FILE_RANGE_WRITE)
    if start > done and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, done, start - done, os.POSIX_FADV_DONTNEED)


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


def copy_file_atomic(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` through a temporary file beside it, so `dst` is never seen half written
    (the merge's side files and `fp8-cast`'s share this). Links are followed: a Hugging Face cache
    snapshot's files are links to its blobs."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)

