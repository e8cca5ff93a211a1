"""A lazy, validating view over a local Hugging Face model folder.

Opening reads only `config.json`, the index and each shard's safetensors header,
so it is cheap even for a 163-shard DeepSeek-V3. Tensors are then read one at a
time with positioned reads (`preadv`) into a fresh buffer, not through
safetensors' memory map: pages of a mapped file stay resident and count toward
the process's RSS while the file is mapped, so streaming a 4 GB checkpoint
through `safe_open` grows RSS towards the size of the files, whereas a merge
here should hold about one tensor whatever the checkpoint's size (bench/).

Every inconsistency is refused with the file and tensor named: an index entry
pointing outside the folder, a missing shard, a tensor the index and the shard
disagree on, a truncated or corrupt file, a shape or dtype that contradicts
config.json. Pickled `.bin` checkpoints are read only when asked to
(`allow_pickle`), and then with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..architectures import expected_shape
from ..errors import CheckpointError
from .safetensors_format import CODES, FLOAT_CODES, FP8_CODES, read_header, torch_dtype

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is; known from headers alone."""

    name: str
    dtype: str  # safetensors code: "BF16", "F32", ...
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in `file` (-1 for pickled tensors)
    nbytes: int


def _inside(folder: Path, entry: str, index_name: str) -> Path:
    """The path of an index entry, refused unless it stays inside `folder` (symlinks resolved)."""
    p = Path(entry)
    if p.is_absolute() or ".." in p.parts:
        raise CheckpointError(f"{folder / index_name}: entry {entry!r} points outside the model folder")
    full = folder / p
    if full.exists() and not full.resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(f"{folder / index_name}: entry {entry!r} is a link to {full.resolve()}, outside the model folder")
    if not full.is_file():
        raise CheckpointError(f"{folder}: shard {entry!r} named in {index_name} is missing")
    return full


def _read_index(folder: Path, index_name: str) -> dict[str, str]:
    try:
        weight_map = json.loads((folder / index_name).read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder / index_name}: unreadable index ({err})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{folder / index_name}: 'weight_map' is not a mapping")
    return weight_map


def _read_into(fd: int, buf: bytearray, offset: int, file: Path, name: str) -> None:
    view, done = memoryview(buf), 0
    while done < len(buf):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{file.name}: truncated file while reading tensor {name!r}")
        done += n


class Checkpoint:
    """A lazy view over a local model folder (safetensors, single or sharded; `.bin` on request)."""

    def __init__(self, path: Path, config: dict, infos: dict[str, TensorInfo], pickled: dict[Path, dict] | None = None):
        self.path = path
        self.config = config
        self._infos = infos
        self._fds: dict[Path, int] = {}
        self._pickled = pickled

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, allow_pickle: bool = False, check_shapes: bool = True) -> Checkpoint:
        """Open a model folder, reading only config, index and headers, and validate them."""
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such model folder")
        config = {}
        if (folder / "config.json").is_file():
            try:
                config = json.loads((folder / "config.json").read_text())
            except json.JSONDecodeError as err:
                raise CheckpointError(f"{folder / 'config.json'}: not valid JSON ({err})") from None

        if (folder / SAFETENSORS_INDEX).is_file():
            ckpt = cls._open_safetensors(folder, config, _read_index(folder, SAFETENSORS_INDEX))
        elif (folder / SAFETENSORS_SINGLE).is_file() or any(folder.glob("*.safetensors")):
            files = [folder / SAFETENSORS_SINGLE] if (folder / SAFETENSORS_SINGLE).is_file() else \
                sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("."))
            ckpt = cls._open_safetensors(folder, config, None, files)
        elif (folder / PICKLE_INDEX).is_file() or (folder / PICKLE_SINGLE).is_file():
            ckpt = cls._open_pickle(folder, config, allow_pickle)
        else:
            raise CheckpointError(
                f"{folder}: no weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, *.safetensors, "
                f"{PICKLE_INDEX}, {PICKLE_SINGLE})")
        ckpt._validate(check_shapes)
        return ckpt

    @classmethod
    def _open_safetensors(cls, folder: Path, config: dict, weight_map: dict[str, str] | None,
                          files: list[Path] | None = None) -> Checkpoint:
        if weight_map is not None:
            files = []
            for entry in dict.fromkeys(weight_map.values()):
                files.append(_inside(folder, entry, SAFETENSORS_INDEX))
        infos: dict[str, TensorInfo] = {}
        for file in files:
            header = read_header(file)
            for name, e in sorted(header.tensors.items(), key=lambda kv: kv[1].begin):
                if name in infos:
                    raise CheckpointError(f"{folder}: tensor {name!r} appears in both {infos[name].file.name} and {file.name}")
                if weight_map is not None and weight_map.get(name) is None:
                    raise CheckpointError(f"{file.name}: tensor {name!r} is not listed in {SAFETENSORS_INDEX}")
                if weight_map is not None and (folder / weight_map[name]).resolve() != file.resolve():
                    raise CheckpointError(
                        f"{file.name}: tensor {name!r} is here but {SAFETENSORS_INDEX} places it in {weight_map[name]}")
                infos[name] = TensorInfo(name, e.dtype, e.shape, file, header.data_start + e.begin, e.end - e.begin)
        if weight_map is not None:
            for name, entry in weight_map.items():
                if name not in infos:
                    raise CheckpointError(f"{entry}: tensor {name!r} listed in {SAFETENSORS_INDEX} is absent from the shard")
        return cls(folder, config, infos)

    @classmethod
    def _open_pickle(cls, folder: Path, config: dict, allow_pickle: bool) -> Checkpoint:
        if (folder / PICKLE_INDEX).is_file():
            files = [_inside(folder, e, PICKLE_INDEX) for e in dict.fromkeys(_read_index(folder, PICKLE_INDEX).values())]
        else:
            files = [folder / PICKLE_SINGLE]
        if not allow_pickle:
            raise CheckpointError(
                f"{files[0]}: pickled .bin checkpoint; pickles can run code when loaded, so they are read only on "
                f"request: convert it to safetensors, or set allow_pickle: true in the config (read with weights_only)")
        pickled, infos = {}, {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # torch raises many types for a bad pickle
                raise CheckpointError(f"{file.name}: cannot load with weights_only ({err})") from None
            pickled[file] = state
            for name, t in state.items():
                if t.dtype not in CODES:
                    raise CheckpointError(f"{file.name}: tensor {name!r} has unsupported dtype {t.dtype}")
                infos[name] = TensorInfo(name, CODES[t.dtype], tuple(t.shape), file, -1, t.numel() * t.element_size())
        return cls(folder, config, infos, pickled)

    def _validate(self, check_shapes: bool) -> None:
        quantized = bool(self.config.get("quantization_config"))
        for info in self._infos.values():
            where = f"{info.file.name}: tensor {info.name!r}"
            if info.dtype in FP8_CODES and not quantized:
                raise CheckpointError(f"{where} is {info.dtype} but config.json has no quantization_config "
                                      f"(an FP8 checkpoint must say how its scales are laid out)")
            if not check_shapes:
                continue
            want = expected_shape(self.config, info.name)
            if want is None:
                continue
            if tuple(info.shape) != want:
                raise CheckpointError(f"{where} has shape {tuple(info.shape)} but config.json implies {want}")
            if info.dtype not in FLOAT_CODES:
                raise CheckpointError(f"{where} has dtype {info.dtype}; a floating-point weight was expected")

    # -- access --------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in file order (shard by shard, by offset)."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and location of a tensor (no data read)."""
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def files(self) -> list[Path]:
        """The weight files of this checkpoint."""
        return list(dict.fromkeys(i.file for i in self._infos.values()))

    def read_bytes(self, name: str) -> bytearray:
        """A tensor's raw little-endian bytes, in a buffer of their own."""
        info = self.info(name)
        if self._pickled is not None:
            t = self._pickled[info.file][name].contiguous()
            return bytearray(t.view(torch.uint8).numpy().tobytes()) if t.numel() else bytearray()
        buf = bytearray(info.nbytes)
        if info.nbytes:
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
            _read_into(fd, buf, info.offset, info.file, name)
        return buf

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in memory of its own (not a view of a mapped file)."""
        info = self.info(name)
        dtype = torch_dtype(info.dtype)
        if self._pickled is not None:
            return self._pickled[info.file][name].clone()
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        buf = self.read_bytes(name)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(info.shape)

    def close(self) -> None:
        """Close the file descriptors opened for reading."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
