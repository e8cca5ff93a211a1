"""The streaming shard writer: bounded memory, atomic files, resumable.

The plan knows every output tensor's name, dtype and shape before any weight is
read, so each shard's safetensors header is written first and its tensors are
then produced and appended one at a time: memory holds about one tensor, never a
shard. Each shard is written under a hidden temporary name, fsync'd and renamed;
the manifest (`.zenith/manifest.json`, each finished shard's sha256 and size) is
rewritten atomically after every shard, and the index after the shards; the folder is
complete only when the merge's last step marks the manifest so (`manifest.mark_complete`),
after its config, tokenizer and reports. A run killed at any point and resumed keeps the
finished shards and ends byte-identical to an uninterrupted run. Shards are
independent, so they can be written in parallel by local processes or Ray tasks.

Bytes are written in the host's byte order, which is little-endian on every
platform torch ships for, as safetensors requires.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from tqdm import tqdm

from ..errors import CheckpointError, OutputError
from .byte_range import COPY_CHUNK_BYTES, ByteRange, pread_into
from .failpoints import step
from .finite import nonfinite_count
from .layout import ShardSpec, TensorSpec, layout_shards
from .manifest import (
    MANIFEST_FILE,
    file_sha256,
    fsync_dir,
    mark_writing,
    read_manifest,
    remove_temporaries,
    stream_to_disk,
    temp_path,
    write_json_atomic,
    write_manifest,
)
from .parallel import import_ray, write_with_pool, write_with_ray
from .safetensors_format import CODES, build_header, itemsize

__all__ = [
    "ByteRange",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "ShardSpec",
    "TensorSource",
    "TensorSpec",
    "WriteResult",
    "layout_shards",
    "prepare_output_dir",
    "read_manifest",
    "write_checkpoint",
    "write_shard",
]

INDEX_FILE = "model.safetensors.index.json"
ZENITH_DIR = ".zenith"
WRITEBACK_BYTES = 8 * 2**20  # written bytes after which their writeback to disk is started


class TensorSource(Protocol):
    """What the writer pulls tensors from. Must be picklable: it is sent to worker processes.

    `produce` returns the tensor for `spec` with exactly its dtype and shape, or its raw
    little-endian bytes (written as they are: the fast path for same-dtype copies), or a
    `ByteRange` of a file holding those bytes (copied in chunks: the fastest path, and the
    only one that never holds the whole tensor).
    """

    def produce(self, spec: TensorSpec) -> torch.Tensor | bytes | bytearray | memoryview | ByteRange: ...


@dataclass(frozen=True)
class WriteResult:
    """What a write did: shards written now and kept from an earlier run (in shard order), bytes, sha256s."""

    written: list[str]
    skipped: list[str]
    total_bytes: int  # tensor bytes of the whole checkpoint, as the index's total_size
    sha256: dict[str, str]  # every shard of the checkpoint


def _as_bytes(spec: TensorSpec, data) -> memoryview:
    """The bytes to write for `spec`, refused unless they are exactly what the header promised."""
    if isinstance(data, torch.Tensor):
        code = CODES.get(data.dtype, str(data.dtype))
        if code != spec.dtype or tuple(data.shape) != tuple(spec.shape):
            raise OutputError(f"tensor {spec.name!r}: produced {code}{list(data.shape)}, "
                              f"planned {spec.dtype}{list(spec.shape)}")
        if data.numel() == 0:
            return memoryview(b"")
        flat = data.detach().cpu().contiguous().reshape(-1)
        return memoryview(flat.view(torch.uint8).numpy())
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise OutputError(f"tensor {spec.name!r}: produced a {type(data).__name__}, not a tensor or "
                          f"contiguous bytes") from None
    if view.nbytes != spec.nbytes:
        raise OutputError(f"tensor {spec.name!r}: produced {view.nbytes} bytes, planned {spec.nbytes} "
                          f"({spec.dtype}{list(spec.shape)})")
    return view


class _HashingSink:
    """Writes views to a file while a second thread hashes them (sha256 releases the GIL, and so does
    the write): the hash costs no wall time where a core is free.

    `write(view)` returns a future; the view's memory must not change until it is done. One
    hashing thread takes the views in the order they were written, so the digest is the file's.
    """

    def __init__(self, f):
        self._f = f
        self._digest = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="zenith-sha256")
        self._pos = 0  # bytes written so far
        self._streamed = (0, 0)  # bytes dropped from the page cache, bytes whose writeback has started

    def write(self, view) -> Future:
        done = self._pool.submit(self._digest.update, view)
        view = memoryview(view).cast("B")
        while view:  # a raw file may write less than asked
            view = view[self._f.write(view):]
        self._appended()
        return done

    def _appended(self) -> None:
        self._pos = self._f.tell()
        dropped, started = self._streamed
        if self._pos - started >= WRITEBACK_BYTES:  # the disk writes while the next tensor is made
            stream_to_disk(self._f.fileno(), dropped, started, self._pos)
            self._streamed = (started, self._pos)

    def hexdigest(self) -> str:
        self._pool.shutdown(wait=True)
        return self._digest.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _RangeCopier:
    """Streams `ByteRange`s into the shard through two alternating chunk buffers (one is hashed while the
    other is read and written), source files opened once.

    (Copying inside the kernel with copy_file_range while hashing a mapping of the source was tried: on
    the release-width FP8 Chimera it took 11.5 s against 9.1 s for these buffers, medians of three
    interleaved runs; bench/RESULTS.md "Release layouts at real widths".)
    """

    def __init__(self):
        self._files: dict[Path, object] = {}
        self._bufs: list[memoryview] = []
        self._pending: list[Future | None] = [None, None]

    def copy(self, spec: TensorSpec, rng: ByteRange, sink: _HashingSink) -> int:
        """Stream `rng` into `sink`; returns how many NaN/Inf values it held (counted chunk by chunk)."""
        if rng.nbytes != spec.nbytes:
            raise OutputError(f"tensor {spec.name!r}: produced a range of {rng.nbytes} bytes, planned {spec.nbytes} "
                              f"({spec.dtype}{list(spec.shape)})")
        if rng.nbytes == 0:
            return 0
        f = self._files.get(rng.file)
        if f is None:
            f = self._files[rng.file] = open(rng.file, "rb", buffering=0)  # closed in close()
        item = itemsize(spec.dtype)
        need = min(max(COPY_CHUNK_BYTES, item), rng.nbytes)
        if not self._bufs or len(self._bufs[0]) < need:
            self.wait()
            self._bufs = [memoryview(bytearray(need)), memoryview(bytearray(need))]
        size = len(self._bufs[0]) - len(self._bufs[0]) % item  # whole elements in every chunk (counted apart)
        bad = 0
        for k, start in enumerate(range(0, rng.nbytes, size)):
            i = k % 2
            if self._pending[i] is not None:
                self._pending[i].result()
            chunk = self._bufs[i][:min(size, rng.nbytes - start)]
            pread_into(f, chunk, rng.offset + start, None, f"tensor {spec.name!r}")
            self._pending[i] = sink.write(chunk)
            bad += nonfinite_count(chunk, spec.dtype)
        return bad

    def wait(self) -> None:
        """Until every chunk handed to the sink is hashed."""
        for i, done in enumerate(self._pending):
            if done is not None:
                done.result()
            self._pending[i] = None

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _refuse_nonfinite(spec: TensorSpec, count: int, data) -> None:
    origin = (f"copied from {data.file}" if isinstance(data, ByteRange)
              else "computed from the sources: `zenith-merge plan` shows its recipe")
    raise CheckpointError(f"tensor {spec.name!r}: {count} NaN/Inf value{'s' * (count != 1)} ({origin}); refused, "
                          f"so that a broken weight is not passed on silently: fix the source, or set "
                          f"allow_nonfinite: true to write them (finished shards are kept for --resume)")


def write_shard(out_dir: Path, shard: ShardSpec, source: TensorSource,
                on_bytes: Callable[[int], None] | None = None, *,
                allow_nonfinite: bool = False) -> tuple[str, str, int]:
    """Write one shard atomically and return (filename, sha256, size): the unit of work of a worker.

    The sha256 is computed from the bytes as they are written, so the file is never read back.
    Every float tensor's NaN/Inf values are counted on the way (`finite.nonfinite_count`); unless
    `allow_nonfinite`, a tensor with any is refused, naming it, its count and where it came from.
    The temporary name carries the process id, so a worker orphaned by a killed parent can
    never write into a file a resumed run is writing.
    """
    final = Path(out_dir) / shard.filename
    tmp = temp_path(final, f".{os.getpid()}")
    header = build_header([(t.name, t.dtype, t.shape) for t in shard.tensors])
    copier = _RangeCopier()
    sink = None
    try:
        with tmp.open("wb", buffering=0) as f:  # unbuffered: chunks go straight to the file
            sink = _HashingSink(f)
            sink.write(header).result()
            for spec in shard.tensors:
                data = source.produce(spec)
                if isinstance(data, ByteRange):
                    bad = copier.copy(spec, data, sink)
                else:
                    view = _as_bytes(spec, data)
                    done = sink.write(view)
                    bad = nonfinite_count(view, spec.dtype)
                    done.result()
                if bad and not allow_nonfinite:
                    _refuse_nonfinite(spec, bad, data)
                del data
                step(f"tensor {spec.name}")  # drop this tensor before producing the next
                if on_bytes is not None:
                    on_bytes(spec.nbytes)
            copier.wait()
            digest = sink.hexdigest()
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, final)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:  # a failed write() names no file: say which
            err.filename = str(tmp)
        raise
    finally:
        copier.close()
        if sink is not None:
            sink.close()
    fsync_dir(final.parent)
    step(f"wrote {shard.filename}")
    return shard.filename, digest, size


def _check_layout(shards: Sequence[ShardSpec]) -> None:
    seen_files, seen_tensors = set(), set()
    for shard in shards:
        name = shard.filename
        if name in seen_files or Path(name).name != name or name.startswith(".") or not name.endswith(".safetensors"):
            raise ValueError(f"bad or repeated shard file name {name!r}")
        seen_files.add(name)
        for t in shard.tensors:
            if t.name in seen_tensors:
                raise ValueError(f"tensor {t.name!r} is planned twice")
            seen_tensors.add(t.name)


def _finished_shards(out_dir: Path, shards: Sequence[ShardSpec], manifest: dict, verify: bool) -> dict[str, dict]:
    """The shards a manifest records that are still on disk as they were written."""
    done = {}
    for shard in shards:
        entry = manifest["shards"].get(shard.filename)
        path = out_dir / shard.filename
        if not isinstance(entry, dict) or not path.is_file() or path.stat().st_size != entry.get("bytes"):
            continue
        if verify and file_sha256(path) != entry.get("sha256"):
            continue
        done[shard.filename] = entry
    return done


def write_checkpoint(
    out_dir: Path,
    shards: Sequence[ShardSpec],
    source: TensorSource,
    *,
    plan_id: str,
    resume: bool = False,
    workers: int = 1,
    backend: Literal["local", "ray"] = "local",
    progress: bool = True,
    verify_on_resume: bool = True,
    carry: tuple[str, frozenset[str]] | None = None,
    allow_nonfinite: bool = False,
) -> WriteResult:
    """Write `shards` into `out_dir`, pulling each tensor from `source`, then the index.

    Without `resume`, `out_dir` must be empty or new (`prepare_output_dir` checks it). With it,
    shards the manifest records for the same `plan_id` that are present with the recorded size
    (and sha256, when `verify_on_resume`) are kept and the rest rewritten; a manifest from another
    plan is refused. `workers > 1` writes shards concurrently in local processes; `backend="ray"`
    runs them as Ray tasks (at most `workers` at a time) on a filesystem the cluster shares.
    Output bytes do not depend on `workers` or `backend`. `carry=(earlier_plan_id, shards)`: a
    manifest of that earlier plan is accepted on resume, and of its finished shards those named
    are kept (their bytes are the same under both plans; router training relies on it).
    A tensor holding NaN/Inf values is refused unless `allow_nonfinite` (`write_shard`).
    """
    _check_layout(shards)
    if backend not in ("local", "ray"):
        raise OutputError(f"backend: {backend!r} is not one of 'local', 'ray'")
    if backend == "ray":
        import_ray()  # refuse before touching the folder
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out_dir) if resume else None
    if manifest is not None and carry is not None and manifest.get("plan_id") == carry[0] != plan_id:
        manifest = {**manifest, "shards": {k: v for k, v in manifest["shards"].items() if k in carry[1]}}
    elif manifest is not None and manifest.get("plan_id") != plan_id:
        raise OutputError(f"{out_dir}: the output folder was written from a different plan (plan "
                          f"{str(manifest.get('plan_id'))[:12]}, now {plan_id[:12]}): the config or a source changed; "
                          f"use overwrite to start again")
    mark_writing(out_dir)  # no longer complete, before anything changes
    (out_dir / INDEX_FILE).unlink(missing_ok=True)  # it comes back after the shards
    remove_temporaries(out_dir)

    done = _finished_shards(out_dir, shards, manifest, verify_on_resume) if manifest else {}
    records = dict(done)
    write_manifest(out_dir, plan_id, records)
    todo = [s for s in shards if s.filename not in done]

    def record(filename: str, sha256: str, size: int) -> None:
        records[filename] = {"sha256": sha256, "bytes": size}
        write_manifest(out_dir, plan_id, records)

    total = sum(s.nbytes for s in shards)
    shard_writer = functools.partial(write_shard, allow_nonfinite=allow_nonfinite)  # picklable, for the backends
    with tqdm(total=total, initial=total - sum(s.nbytes for s in todo), unit="B", unit_scale=True,
              unit_divisor=1024, desc="writing shards", disable=not progress, dynamic_ncols=True) as bar:
        if backend == "ray":
            write_with_ray(shard_writer, out_dir, todo, source, workers, record, bar.update)
        elif workers > 1 and len(todo) > 1:
            write_with_pool(shard_writer, out_dir, todo, source, workers, record, bar.update)
        else:
            for shard in todo:
                record(*shard_writer(out_dir, shard, source, on_bytes=bar.update))

    weight_map = {t.name: s.filename for s in shards for t in s.tensors}
    write_json_atomic(out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return WriteResult(
        written=[s.filename for s in todo],
        skipped=[s.filename for s in shards if s.filename in done],
        total_bytes=total,
        sha256={s.filename: records[s.filename]["sha256"] for s in shards},
    )


def prepare_output_dir(out_dir: Path, *, resume: bool, overwrite: bool, source_dirs: Sequence[Path]) -> None:
    """Make sure `out_dir` may be written, and create it.

    Refuses an output folder that is, or is inside, a source model's folder (or contains one):
    sources are never modified. Refuses a non-empty folder unless `resume` (which needs a
    previous zenith-merge output there: a `.zenith/` folder) or `overwrite`. `overwrite` empties
    the folder entirely, but only a folder that holds a previous zenith-merge output, so that a
    mistyped path cannot wipe unrelated files.
    """
    if resume and overwrite:
        raise OutputError("resume and overwrite exclude each other: resume keeps finished shards, overwrite deletes them")
    out = Path(out_dir).resolve()
    for src in source_dirs:
        src = Path(src).resolve()
        if out == src or out.is_relative_to(src) or src.is_relative_to(out):
            raise OutputError(f"output folder {out} overlaps source model folder {src}; source models are never "
                              f"modified: choose another output folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        ours = (out / ZENITH_DIR).is_dir()
        if not (resume or overwrite):
            raise OutputError(f"output folder {out} is not empty: pass --resume to continue an interrupted merge, "
                              f"or --overwrite to replace it")
        if not ours:
            raise OutputError(f"output folder {out} is not empty and is not a zenith-merge output (no {ZENITH_DIR}/): "
                              f"nothing to {'resume' if resume else 'overwrite'}; choose an empty folder")
        if overwrite:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        else:
            mark_writing(out)  # a resumed folder is not complete until the run that continues it says so
            remove_temporaries(out)
    out.mkdir(parents=True, exist_ok=True)
