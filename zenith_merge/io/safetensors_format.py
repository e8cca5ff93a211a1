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
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

# safetensors dtype code -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        DTYPES[_code] = getattr(torch, _name)
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
FP8_CODES = frozenset({"F8_E4M3", "F8_E5M2"})
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors dtype code."""
    return DTYPES[code].itemsize


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code."""
    return DTYPES[code]


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype."""
    return CODES[dtype]


@dataclass(frozen=True)
class HeaderEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to data_start
    end: int


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header."""

    path: Path
    tensors: dict[str, HeaderEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: Path) -> Header:
    """Parse and validate the header of a safetensors file; refuse truncated or corrupt files by name."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name}: truncated safetensors file ({file_size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > file_size:
                kind = "truncated" if n <= MAX_HEADER_BYTES else "corrupt"
                raise CheckpointError(f"{path.name}: {kind} safetensors file (header of {n} bytes, file of {file_size})")
            raw = f.read(n)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    metadata = data.pop("__metadata__", None) or {}
    data_start, data_len = 8 + n, file_size - 8 - n
    tensors: dict[str, HeaderEntry] = {}
    for name, e in data.items():
        try:
            code, shape, (begin, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: corrupt header entry for tensor {name!r}") from None
        if code not in DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name!r} has unknown dtype {code!r}")
        if end - begin != math.prod(shape) * itemsize(code) or begin < 0:
            raise CheckpointError(f"{path.name}: corrupt header: tensor {name!r} {code}{list(shape)} spans {end - begin} bytes")
        if end > data_len:
            raise CheckpointError(
                f"{path.name}: truncated file: tensor {name!r} ends at byte {data_start + end}, the file has {file_size}")
        tensors[name] = HeaderEntry(code, shape, begin, end)
    spans = sorted((t.begin, t.end, name) for name, t in tensors.items() if t.end > t.begin)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path.name}: corrupt header: tensors {a!r} and {b!r} overlap")
    return Header(path, tensors, metadata, data_start, file_size)


def build_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """The header bytes (length prefix included) laying `entries` out contiguously in the given order.

    The JSON is padded with spaces to a multiple of 8 bytes, as the safetensors library does, so
    tensor data starts aligned.
    """
    obj: dict[str, object] = {"__metadata__": metadata if metadata is not None else {"format": "pt"}}
    offset = 0
    for name, code, shape in entries:
        size = math.prod(shape) * itemsize(code)
        obj[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
