"""The streaming shard writer: bounded memory, atomic files, resumable.

The plan knows every output tensor's name, dtype and shape before any weight is
read, so each shard's safetensors header is written first and its tensors are
then produced and appended one at a time: memory holds about one tensor, never a
shard. Each shard is written under a temporary name, fsync'd and renamed; the
manifest (`.zenith/manifest.json`, each finished shard's sha256) is rewritten
atomically after every shard; the index is written last. A run killed at any
point and resumed keeps the finished shards and ends byte-identical to an
uninterrupted run. Shards are independent, so they can be written in parallel by
local processes or Ray tasks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Literal, Protocol

import torch
from tqdm.auto import tqdm

from ..errors import OutputError
from .safetensors_format import build_header, dtype_code, itemsize

INDEX_FILE = "model.safetensors.index.json"
MANIFEST_FILE = ".zenith/manifest.json"
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor as the header needs it."""

    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class ShardSpec:
    """One output file and the tensors it holds, in order."""

    filename: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def layout_shards(tensors: Sequence[TensorSpec], max_shard_size: int, prefix: str = "model") -> list[ShardSpec]:
    """Pack tensors, in order, into shards of at most `max_shard_size` bytes of tensor data.

    A tensor larger than the limit gets a shard of its own. Names follow transformers:
    `model-00001-of-00003.safetensors`.
    """
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    groups = [g for g in groups if g]
    n = len(groups)
    return [ShardSpec(f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]


class TensorSource(Protocol):
    """What the writer pulls tensors from. Must be picklable: it is sent to worker processes."""

    def produce(self, spec: TensorSpec) -> torch.Tensor | bytes | bytearray | memoryview: ...


@dataclass
class WriteResult:
    """What a write did: shards written now, shards kept from an earlier run, sha256 per shard."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)
    total_bytes: int = 0


def _as_bytes(spec: TensorSpec, data) -> memoryview:
    if isinstance(data, torch.Tensor):
        code = dtype_code(data.dtype)
        if code != spec.dtype or tuple(data.shape) != tuple(spec.shape):
            raise OutputError(f"tensor {spec.name!r}: produced {code}{list(data.shape)}, planned {spec.dtype}{list(spec.shape)}")
        if data.numel() == 0:
            return memoryview(b"")
        flat = data.detach().contiguous().reshape(-1)
        return memoryview(flat.view(torch.uint8).numpy())
    view = memoryview(data).cast("B")
    if view.nbytes != spec.nbytes:
        raise OutputError(f"tensor {spec.name!r}: produced {view.nbytes} bytes, planned {spec.nbytes}")
    return view


def _atomic_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(out_dir: Path, shard: ShardSpec, source: TensorSource, on_bytes=None) -> tuple[str, str, int]:
    """Write one shard atomically; return (filename, sha256, size). The unit of work of a worker."""
    final = out_dir / shard.filename
    tmp = out_dir / f".{shard.filename}{TMP_SUFFIX}"
    digest = hashlib.sha256()
    header = build_header([(t.name, t.dtype, t.shape) for t in shard.tensors])
    with tmp.open("wb") as f:
        f.write(header)
        digest.update(header)
        for spec in shard.tensors:
            data = _as_bytes(spec, source.produce(spec))
            f.write(data)
            digest.update(data)
            if on_bytes:
                on_bytes(spec.nbytes)
            del data
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, final)
    return shard.filename, digest.hexdigest(), size


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(out_dir: Path) -> dict | None:
    """The manifest of an output folder, or None when there is none."""
    path = out_dir / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a manifest is only ever replaced atomically; an unreadable one is treated as absent


def prepare_output_dir(out_dir: Path, *, resume: bool, overwrite: bool, source_dirs: Sequence[Path]) -> None:
    """Make sure `out_dir` may be written: never a source's folder, never a non-empty folder by accident."""
    out = Path(out_dir).resolve()
    for src in source_dirs:
        src = Path(src).resolve()
        if out == src or out.is_relative_to(src) or src.is_relative_to(out):
            raise OutputError(f"output folder {out} overlaps source model folder {src}; source models are never modified")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise OutputError(f"output folder {out} is not empty: pass --resume to continue an interrupted merge, "
                              f"or --overwrite to replace it")
        if not (out / ".zenith").is_dir():
            raise OutputError(f"output folder {out} is not a zenith-merge output (no .zenith/); refusing to delete "
                              f"its contents with --overwrite: choose an empty folder")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _finished(out_dir: Path, shards: Sequence[ShardSpec], manifest: dict | None, verify: bool) -> dict[str, dict]:
    if not manifest:
        return {}
    done = {}
    for shard in shards:
        entry = manifest.get("shards", {}).get(shard.filename)
        path = out_dir / shard.filename
        if not entry or not path.is_file() or path.stat().st_size != entry["bytes"]:
            continue
        if verify and _file_sha256(path) != entry["sha256"]:
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
) -> WriteResult:
    """Write `shards` into `out_dir` (which `prepare_output_dir` has checked), then the index.

    With `resume`, shards the manifest records for the same `plan_id`, present with the recorded
    size (and sha256, when `verify_on_resume`), are kept; the rest are rewritten.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out_dir)
    if manifest and manifest.get("plan_id") != plan_id:
        if resume:
            raise OutputError(f"{out_dir} was written from a different plan (plan {str(manifest.get('plan_id'))[:12]}, "
                              f"now {plan_id[:12]}): the config or a source changed; use --overwrite")
        manifest = None
    for stale in out_dir.glob(f".*{TMP_SUFFIX}"):
        stale.unlink()

    done = _finished(out_dir, shards, manifest if resume else None, verify_on_resume)
    state = {"plan_id": plan_id, "shards": dict(done)}
    _atomic_json(out_dir / MANIFEST_FILE, state)
    result = WriteResult(skipped=sorted(done))
    todo = [s for s in shards if s.filename not in done]

    bar = tqdm(total=sum(s.nbytes for s in shards), initial=sum(s.nbytes for s in shards if s.filename in done),
               unit="B", unit_scale=True, unit_divisor=1024, desc="writing shards", disable=not progress)

    def record(filename: str, sha: str, size: int) -> None:
        state["shards"][filename] = {"sha256": sha, "bytes": size}
        _atomic_json(out_dir / MANIFEST_FILE, state)
        result.written.append(filename)

    try:
        if workers <= 1 or len(todo) <= 1:
            for shard in todo:
                record(*write_shard(out_dir, shard, source, on_bytes=bar.update))
        elif backend == "ray":
            _write_with_ray(out_dir, todo, source, workers, record, bar)
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(write_shard, out_dir, shard, source): shard for shard in todo}
                for fut in as_completed(futures):
                    record(*fut.result())
                    bar.update(futures[fut].nbytes)
    finally:
        bar.close()

    weight_map = {t.name: s.filename for s in shards for t in s.tensors}
    total = sum(s.nbytes for s in shards)
    _atomic_json(out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    result.sha256 = {name: e["sha256"] for name, e in state["shards"].items()}
    result.total_bytes = total
    return result


def _write_with_ray(out_dir, todo, source, workers, record, bar) -> None:
    try:
        import ray
    except ImportError:
        raise OutputError("backend: ray needs Ray: pip install 'zenith-merge[distributed]'") from None
    if not ray.is_initialized():
        ray.init(num_cpus=workers, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    task = ray.remote(num_cpus=1)(write_shard)
    pending = {task.remote(out_dir, shard, source): shard for shard in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            record(*ray.get(ref))
            bar.update(pending.pop(ref).nbytes)
