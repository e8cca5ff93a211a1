"""The safetensors file format, read and written directly.

Layout: an 8-byte little-endian header length N, N bytes of JSON
(`{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets": [begin, end]}}`,
offsets relative to the first byte after the header), then the tensor bytes.
Parsing here validates everything a corrupt or truncated file can get wrong, so
errors name the file and tensor instead of surfacing as a crash deep in a merge.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .failpoints import step
from .json_files import loads_bounded

# safetensors dtype code -> torch dtype. Codes whose torch dtype this torch build lacks are left out.
DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
        ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu"),
        ("C64", "complex64"),
    )
    if hasattr(torch, name)
}
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# Sub-byte codes the format defines but that have no one-element-per-item torch dtype.
UNSUPPORTED_CODES = frozenset({"F4", "F6_E2M3", "F6_E3M2"})
FP8_CODES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"})
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"}) | FP8_CODES
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
HEADER_DEPTH = 4  # {name: {"shape": [...]}}, and __metadata__'s {key: value}: 3 levels; one spare
DEFAULT_METADATA = {"format": "pt"}  # transformers refuses files without it


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors dtype code."""
    return DTYPES[code].itemsize


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code."""
    return DTYPES[code]


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype (KeyError for one the format cannot store)."""
    return CODES[dtype]


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a header; `begin`/`end` are relative to `Header.data_start`."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header."""

    path: Path
    tensors: dict[str, HeaderEntry]  # in file order (by offset)
    metadata: dict[str, str]
    data_start: int  # absolute offset of the first data byte
    file_size: int


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: Path, name: str, raw: object, data_len: int, file_size: int, data_start: int) -> HeaderEntry:
    """Validate one header entry against the format and the file's size."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header (entry is not an object)")
    code, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_count(s) for s in shape)):
        raise CheckpointError(f"{where}: corrupt safetensors header (shape {shape!r})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: corrupt safetensors header (data_offsets {offsets!r})")
    if not isinstance(code, str):
        raise CheckpointError(f"{where}: corrupt safetensors header (dtype {code!r})")
    if code in UNSUPPORTED_CODES:
        raise CheckpointError(f"{where} has dtype {code}, which zenith-merge does not support yet")
    if code not in DTYPES:
        raise CheckpointError(f"{where} has unknown dtype {code!r} (a corrupt header, or a dtype newer than "
                              f"zenith-merge knows)")
    begin, end = offsets
    if end - begin != math.prod(shape) * itemsize(code):
        raise CheckpointError(
            f"{where}: corrupt safetensors header ({code}{shape} needs {math.prod(shape) * itemsize(code)} bytes, "
            f"its offsets span {end - begin})")
    if end > data_len:
        raise CheckpointError(
            f"{where}: truncated file (the tensor ends at byte {data_start + end}, the file has {file_size} bytes)")
    return HeaderEntry(code, tuple(shape), begin, end)


def read_header(path: Path) -> Header:
    """Parse and validate the header of a safetensors file, reading nothing past it.

    Refuses, naming the file (and tensor): a header longer than the file ("truncated"), JSON
    that does not parse or does not describe tensors ("corrupt"), unknown dtypes, byte spans
    that disagree with dtype and shape, tensors ending past the end of the file, and overlaps.
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({file_size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: corrupt safetensors file (header length {n} is implausible)")
            if 8 + n > file_size:
                raise CheckpointError(
                    f"{path}: truncated safetensors file (header of {n} bytes, file of {file_size})")
            raw = f.read(n)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    data = loads_bounded(raw, where=f"{path}: corrupt safetensors header", error=CheckpointError, finite=True,
                         max_depth=HEADER_DEPTH)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = data.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start = 8 + n
    entries = {name: _entry(path, name, e, file_size - data_start, file_size, data_start) for name, e in data.items()}
    ordered = sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    spans = [(name, e) for name, e in ordered if e.end > e.begin]
    for (a, ea), (b, eb) in zip(spans, spans[1:]):
        if eb.begin < ea.end:
            raise CheckpointError(f"{path}: corrupt safetensors header (tensors {a!r} and {b!r} overlap)")
    return Header(path, dict(ordered), metadata, data_start, file_size)


def build_header(
    tensors: Sequence[tuple[str, str, Sequence[int]]], metadata: dict[str, str] | None = None
) -> bytes:
    """The header bytes (length prefix included) for `tensors` laid out contiguously in the given order.

    Knowing every name, dtype and shape up front is what lets the writer put the header first
    and stream the data after it. The JSON is padded with spaces to a multiple of 8 bytes, as
    the safetensors library does, so tensor data starts aligned. `metadata` defaults to
    `{"format": "pt"}`, which transformers requires.
    """
    obj: dict[str, object] = {"__metadata__": dict(DEFAULT_METADATA if metadata is None else metadata)}
    offset = 0
    for name, code, shape in tensors:
        if name in obj:
            raise ValueError(f"tensor {name!r} appears twice in one safetensors header")
        size = math.prod(shape) * itemsize(code)
        obj[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def save_keyed(tensors: dict[str, torch.Tensor], path: Path, key: str) -> Path:
    """Write a stage artefact atomically (temporary name, then rename) with the plan key it belongs to."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"key": key})
    os.replace(tmp, path)
    step(f"wrote {path.name}")
    return path


def saved_key(path: Path) -> str | None:
    """The plan key a stage artefact written by `save_keyed` belongs to (None when there is no file)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return None
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("key")
