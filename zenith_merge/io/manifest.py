"""The output folder's bookkeeping: atomic JSON files and the manifest of finished shards.

`.zenith/manifest.json` is `{"version": 1, "plan_id": ..., "state": "writing" | "complete",
"shards": {filename: {"sha256": ..., "bytes": ...}}}`, and once complete `"files"` too.
It is rewritten atomically after every finished shard, so after a crash it lists exactly
the shards that were complete, and a resume can trust it. Only the parent process writes it.

Completion is explicit: `mark_complete` is the last step of a merge or cast, after every other file
(config, tokenizer, model card, reports); it records every file a client loads and every report with its
sha256 and sets `"state": "complete"`. Anything that starts writing into the folder first sets the state
back to "writing" (`mark_writing`). A folder whose manifest is not complete was interrupted, whatever else
is in it; the smoke test fails it and `--resume` finishes it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

from ..errors import OutputError
from .failpoints import step

MANIFEST_FILE = ".zenith/manifest.json"
MANIFEST_VERSION = 1
TMP_SUFFIX = ".tmp"
STATE_WRITING, STATE_COMPLETE = "writing", "complete"
REPORT_SUFFIXES = frozenset({".json", ".md", ".png"})


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
    step(f"wrote {Path(path).name}")


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
    step(f"wrote {path.name}")


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
    """Record `plan_id` and the finished shards (filename -> {"sha256", "bytes"}); the folder is being written."""
    write_json_atomic(Path(out_dir) / MANIFEST_FILE,
                      {"version": MANIFEST_VERSION, "plan_id": plan_id, "state": STATE_WRITING,
                       "shards": dict(sorted(shards.items()))})


def is_complete(out_dir: Path) -> bool:
    """True when the folder's manifest says its last write finished (`mark_complete`)."""
    manifest = read_manifest(out_dir)
    return manifest is not None and manifest.get("state") == STATE_COMPLETE


def mark_writing(out_dir: Path) -> None:
    """Before anything is written into a finished folder: it is no longer complete until `mark_complete`."""
    manifest = read_manifest(out_dir)
    if manifest is not None and manifest.get("state") != STATE_WRITING:
        write_manifest(out_dir, manifest.get("plan_id"), manifest["shards"])


def completed_files(out_dir: Path) -> list[Path]:
    """The files a completion record covers: every file at the folder's top level (what a client loads) and
    the reports in `.zenith/` (JSON, Markdown, PNG); not the manifest, temporaries, or stage artefacts (each
    is keyed to its plan already)."""
    out_dir = Path(out_dir)
    zdir = out_dir / ".zenith"
    top = [p for p in out_dir.iterdir() if p.is_file()]
    reports = [p for p in zdir.iterdir() if p.is_file() and p.suffix in REPORT_SUFFIXES] if zdir.is_dir() else []
    return sorted(p for p in top + reports
                  if not p.name.startswith(".") and p != out_dir / MANIFEST_FILE)


def mark_complete(out_dir: Path) -> None:
    """The last step of a write: record every completed file's sha256 (shards from the manifest, hashed as
    they were written; the others now) and set the state to complete, in one atomic rename."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise OutputError(f"{out_dir / MANIFEST_FILE}: missing; the folder cannot be marked complete")
    shards = manifest["shards"]
    files = {}
    for path in completed_files(out_dir):
        rel = path.relative_to(out_dir).as_posix()
        files[rel] = shards.get(rel) or {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    write_json_atomic(out_dir / MANIFEST_FILE, {**manifest, "state": STATE_COMPLETE, "files": files})


@contextlib.contextmanager
def changing(out_dir: Path):
    """Around a command that changes files of a finished folder on purpose (the smoke test's reports,
    update-config, a new routing report): the folder is marked as being written while it runs, and complete
    again, with the new sha256s, when it ends well. A folder that was not complete stays as it was."""
    was_complete = is_complete(out_dir)
    if was_complete:
        mark_writing(out_dir)
    yield
    if was_complete:
        mark_complete(out_dir)


def remove_temporaries(out_dir: Path) -> None:
    """Delete the temporary files a killed run left (`.NAME.tmp`, `.NAME.PID.tmp`, `.NAME.tmp-PID`) in the
    folder and in `.zenith/` (and its subfolders), before a resume writes again."""
    out_dir = Path(out_dir)
    for folder in [out_dir, *(p for p in (out_dir / ".zenith").rglob("*") if p.is_dir()), out_dir / ".zenith"]:
        if folder.is_dir():
            for tmp in folder.glob(".*"):
                if tmp.is_file() and (tmp.name.endswith(TMP_SUFFIX) or f"{TMP_SUFFIX}-" in tmp.name):
                    tmp.unlink(missing_ok=True)


def copy_file_atomic(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` through a temporary file beside it, so `dst` is never seen half written
    (the merge's side files and `fp8-cast`'s share this). Links are followed: a Hugging Face cache
    snapshot's files are links to its blobs."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
    step(f"copied {dst.name}")

