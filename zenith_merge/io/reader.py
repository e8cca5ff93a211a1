"""A lazy, validating view over a local Hugging Face model folder.

Opening reads only `config.json`, the index and each shard's safetensors header,
so it is cheap even for a 163-shard DeepSeek-V3. Tensors are then read one at a
time with positioned reads into a buffer of their own (or, with `read_stored_into`, one
the caller reuses), not through safetensors' memory map: pages of a memory-mapped file stay resident and count toward the process's
RSS while the file is mapped, so streaming a 4 GB checkpoint through `safe_open`
grows RSS to the size of the files, whereas a merge here should peak at about
twice the largest tensor whatever the checkpoint's size (bench/ measures it).
Pages read with `pread` land in the kernel's page cache, which the kernel can
drop at will and which is not charged to the process. (Measured with safetensors
0.8: reading every tensor of a 400 MB file of 20 MB tensors grew RSS by 387 MiB
through `safe_open`, by 23 MiB here. safetensors 0.8 added `backend="pread"`,
which behaves like this reader, but we support older versions.)

The folder is read the way transformers reads it: `model.safetensors.index.json`
if present, else `model.safetensors`; pickled `pytorch_model.bin` (single or
indexed) only on request (`allow_pickle`), and then with `torch.load(weights_only=True)`.

Every inconsistency is refused with the file and tensor named: an index entry
pointing outside the folder, a missing shard, a tensor the index and the shard
disagree on, a truncated or corrupt file, a shape or dtype that contradicts
config.json, FP8 weights without a `quantization_config`.

GPT-OSS's MXFP4 experts (`quantization_config.quant_method: mxfp4`, each weight stored as `<name>_blocks`
and `<name>_scales`) are read as the BF16 tensor `<name>` transformers would load (`kernels.mxfp4`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..architectures import expected_shape
from ..errors import CheckpointError
from ..kernels.fp8 import scale_shape
from ..kernels.mxfp4 import dequantize_mxfp4, mxfp4_shape
from .byte_range import ByteRange, pread_into
from .json_files import read_json_file
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
    offset: int  # absolute byte offset of the data in `file` (-1 for pickled tensors)
    nbytes: int


def _hf_cache_blobs(folder: Path) -> Path | None:
    """The `blobs/` folder when `folder` is a Hugging Face hub snapshot, whose files are links into it."""
    folder = folder.absolute()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return (folder.parent.parent / "blobs").resolve()
    return None


def _inside(folder: Path, entry: object, listed_in: str | None) -> Path:
    """The file an index entry names, refused unless it exists and stays inside `folder`.

    Links out of the folder are refused (an index must not make us read arbitrary files), except
    the links of a Hugging Face hub cache snapshot into its own `blobs/`, which is how
    `huggingface_hub.snapshot_download` lays every model out.
    """
    where = f"{folder / listed_in}: entry {entry!r}" if listed_in else str(folder / str(entry))
    if not isinstance(entry, str) or not entry:
        raise CheckpointError(f"{where} is not a file name")
    p = Path(entry)
    if p.is_absolute() or ".." in p.parts:
        raise CheckpointError(f"{where} points outside the model folder")
    full = folder / p
    if full.exists():
        target = full.resolve()
        blobs = _hf_cache_blobs(folder)
        if not target.is_relative_to(folder.resolve()) and not (blobs and target.is_relative_to(blobs)):
            raise CheckpointError(f"{where} is a link to {target}, outside the model folder")
    if not full.is_file():
        raise CheckpointError(f"{folder}: shard {entry!r} named in {listed_in} is missing")
    return full


def _read_json(path: Path) -> dict:
    return read_json_file(path, error=CheckpointError)


def _weight_map(folder: Path, index_name: str) -> dict[str, str]:
    weight_map = _read_json(folder / index_name).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{folder / index_name}: no 'weight_map' mapping tensor names to files")
    return weight_map


def _index_files(folder: Path, weight_map: dict[str, str], index_name: str) -> dict[Path, set[str]]:
    """The files an index names, validated, in file-name order (shard 1 first), each with its listed tensors."""
    files = {entry: _inside(folder, entry, index_name) for entry in dict.fromkeys(weight_map.values())}
    by_file: dict[Path, set[str]] = {path: set() for path in sorted(files.values(), key=lambda p: p.name)}
    for name, entry in weight_map.items():
        by_file[files[entry]].add(name)
    return by_file


def _check_against_index(file: Path, names: list[str], listed: set[str], weight_map: dict[str, str],
                         index_name: str) -> None:
    """Refuse a shard whose tensors (`names`) differ from those the index gives it (`listed`)."""
    for name in names:
        if name not in listed:
            if name in weight_map:
                raise CheckpointError(f"{file}: tensor {name!r} is in this shard but {index_name} places it in "
                                      f"{weight_map[name]!r}")
            raise CheckpointError(f"{file}: tensor {name!r} is in this shard but not listed in {index_name}")
    absent = listed.difference(names)
    if absent:
        more = f" ({len(absent) - 1} more)" if len(absent) > 1 else ""
        raise CheckpointError(f"{file}: tensor {min(absent)!r} is listed in {index_name} but absent from this shard{more}")


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, unpickled with `weights_only` (no code runs), memory-mapped where the format allows."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as err:  # torch raises many types for a bad or unsafe pickle
        raise CheckpointError(f"{file}: cannot load with weights_only=True ({err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: not a state dict (a {type(state).__name__})")
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{file}: entry {name!r} is a {type(t).__name__}, not a tensor")
        if t.dtype not in CODES:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold")
    return state


def block_fp8_scheme(config: dict, where: str) -> tuple[int, int] | None:
    """The weight block of a config's block-FP8 `quantization_config` (DeepSeek-V3's: fp8, e4m3, [128, 128]),
    None when it declares none; an FP8 scheme we cannot read is refused, naming the key."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "fp8":
        return None
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"{where}: quantization_config.fmt is {fmt!r}; only e4m3 block FP8 (DeepSeek-V3's) "
                              f"is supported")
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size is {block!r}; expected two positive "
                              f"integers such as [128, 128] (per-tensor FP8 is not supported)")
    return int(block[0]), int(block[1])


class Checkpoint:
    """A lazy view over a local Hugging Face model folder.

    Use `Checkpoint.open(path)`; close it (or use it as a context manager) to release the
    file handles it caches, one per shard. Reads are positioned and thread-safe.
    """

    def __init__(self, path: Path, config: dict, infos: dict[str, TensorInfo], *, pickled: bool = False):
        self.path = path
        self.config = config
        self._infos = infos
        self._pickled = pickled
        self._handles: dict[Path, object] = {}  # shard -> raw file object (safetensors) or state dict (.bin)
        self._lock = threading.Lock()
        self._fp8: dict[str, tuple[TensorInfo, TensorInfo]] = {}  # block-FP8 weight -> (stored weight, scale_inv)
        self._block: tuple[int, int] | None = None
        self._mxfp4: dict[str, tuple[TensorInfo, TensorInfo]] = {}  # MXFP4 weight -> (blocks, scales)

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, allow_pickle: bool = False, check_shapes: bool = True) -> Checkpoint:
        """Open a model folder, reading only config, index and headers, and validate them.

        `check_shapes=False` skips the comparison of tensor shapes and dtypes with config.json
        (for folders whose config is known to be stale); the file-level checks always run.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such model folder")
        config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        if (folder / SAFETENSORS_INDEX).is_file():
            weight_map = _weight_map(folder, SAFETENSORS_INDEX)
            files = _index_files(folder, weight_map, SAFETENSORS_INDEX)
            ckpt = cls(folder, config, cls._safetensors_infos(folder, files, weight_map))
        elif (folder / SAFETENSORS_SINGLE).is_file():
            files = {_inside(folder, SAFETENSORS_SINGLE, None): set()}
            ckpt = cls(folder, config, cls._safetensors_infos(folder, files, None))
        elif (folder / PICKLE_INDEX).is_file() or (folder / PICKLE_SINGLE).is_file():
            ckpt = cls._open_pickle(folder, config, allow_pickle)
        else:
            found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
            hint = f"; found {', '.join(found[:5])} but no index saying what they hold" if found else ""
            raise CheckpointError(f"{folder}: no weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
                                  f"{PICKLE_INDEX}, {PICKLE_SINGLE}){hint}")
        ckpt._resolve_fp8()
        ckpt._resolve_mxfp4()
        ckpt._validate(check_shapes)
        return ckpt

    @staticmethod
    def _safetensors_infos(folder: Path, files: dict[Path, set[str]],
                           weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        for file, listed in files.items():
            header = read_header(file)
            if weight_map is not None:
                _check_against_index(file, list(header.tensors), listed, weight_map, SAFETENSORS_INDEX)
            for name, e in header.tensors.items():
                if name in infos:
                    raise CheckpointError(f"{folder}: tensor {name!r} appears in both {infos[name].file.name} and "
                                          f"{file.name}")
                infos[name] = TensorInfo(name, e.dtype, e.shape, file, header.data_start + e.begin, e.end - e.begin)
        return infos

    @classmethod
    def _open_pickle(cls, folder: Path, config: dict, allow_pickle: bool) -> Checkpoint:
        weight_map = _weight_map(folder, PICKLE_INDEX) if (folder / PICKLE_INDEX).is_file() else None
        files = _index_files(folder, weight_map, PICKLE_INDEX) if weight_map is not None else \
            {_inside(folder, PICKLE_SINGLE, None): set()}
        if not allow_pickle:
            raise CheckpointError(
                f"{next(iter(files))}: pickled .bin checkpoint; a pickle can run code when loaded, so it is read "
                f"only on request: convert the model to safetensors, or opt in with `allow_pickle: true` in the "
                f"merge config (Checkpoint.open(..., allow_pickle=True)); it is then read with "
                f"torch.load(weights_only=True)")
        ckpt = cls(folder, config, {}, pickled=True)
        for file, listed in files.items():
            state = _torch_load(file)
            if weight_map is not None:
                _check_against_index(file, list(state), listed, weight_map, PICKLE_INDEX)
            for name, t in state.items():
                if name in ckpt._infos:
                    raise CheckpointError(f"{folder}: tensor {name!r} appears in both {ckpt._infos[name].file.name} "
                                          f"and {file.name}")
                ckpt._infos[name] = TensorInfo(name, CODES[t.dtype], tuple(t.shape), file, -1,
                                               t.numel() * t.element_size())
            ckpt._handles[file] = state
        return ckpt

    def _resolve_fp8(self) -> None:
        """Block-FP8 weights become logical BF16 tensors (dequantised on read); their scales leave the view."""
        stored = [i for i in self._infos.values() if i.dtype in FP8_CODES]
        if not stored:
            return
        where = self.path / "config.json"
        self._block = block_fp8_scheme(self.config, str(where))
        for info in stored:
            at = f"{info.file}: tensor {info.name!r}"
            if self._block is None:
                raise CheckpointError(
                    f"{at} is {info.dtype} but config.json has no quantization_config (quant_method fp8 with "
                    f"weight_block_size), so its scales cannot be interpreted")
            if info.dtype != "F8_E4M3":
                raise CheckpointError(f"{at} is {info.dtype}, but quantization_config says e4m3 (F8_E4M3)")
            if len(info.shape) != 2:
                raise CheckpointError(f"{at} is FP8 with shape {info.shape}; block FP8 weights are 2-D")
            scale_name = info.name + "_scale_inv"
            scale = self._infos.get(scale_name)
            if scale is None:
                raise CheckpointError(f"{at} is FP8 but its scale tensor {scale_name!r} is missing")
            want = scale_shape(info.shape, self._block)
            if tuple(scale.shape) != want or scale.dtype not in ("F32", "BF16"):
                raise CheckpointError(f"{scale.file}: tensor {scale_name!r} is {scale.dtype}{list(scale.shape)}; the "
                                      f"scales of {info.name!r} {list(info.shape)} in {self._block[0]}x"
                                      f"{self._block[1]} blocks must be F32{list(want)}")
            self._fp8[info.name] = (info, scale)
        for name, (info, scale) in self._fp8.items():
            del self._infos[scale.name]
            n = info.shape[0] * info.shape[1]
            self._infos[name] = TensorInfo(name, "BF16", info.shape, info.file, info.offset, 2 * n)

    def _resolve_mxfp4(self) -> None:
        """MXFP4 weights (`<name>_blocks` + `<name>_scales`, uint8) become logical BF16 tensors `<name>`."""
        qc = self.config.get("quantization_config")
        if not isinstance(qc, dict) or qc.get("quant_method") != "mxfp4":
            return
        for blocks in [i for i in self._infos.values() if i.name.endswith("_blocks")]:
            name = blocks.name.removesuffix("_blocks")
            scales = self._infos.get(name + "_scales")
            at = f"{blocks.file}: tensor {blocks.name!r}"
            if scales is None:
                raise CheckpointError(f"{at} is MXFP4 but its scales {name + '_scales'!r} are missing")
            if blocks.dtype != "U8" or scales.dtype != "U8" or len(blocks.shape) < 3 or \
                    tuple(scales.shape) != tuple(blocks.shape[:-1]):
                raise CheckpointError(f"{at}: MXFP4 blocks {blocks.dtype}{list(blocks.shape)} with scales {scales.dtype}"
                                      f"{list(scales.shape)}; expected U8 (..., groups, 16) and U8 (..., groups)")
            shape = mxfp4_shape(tuple(blocks.shape))
            self._mxfp4[name] = (blocks, scales)
            del self._infos[blocks.name], self._infos[scales.name]
            # BF16: two bytes a value, two values a stored byte
            self._infos[name] = TensorInfo(name, "BF16", shape, blocks.file, blocks.offset, 4 * blocks.nbytes)

    def _validate(self, check_shapes: bool) -> None:
        for info in self._infos.values():
            where = f"{info.file}: tensor {info.name!r}"
            if info.dtype in FP8_CODES:  # not block FP8 (those were resolved): a format we cannot read
                raise CheckpointError(
                    f"{where} is {info.dtype} without a {info.name}_scale_inv block scale; only DeepSeek-style "
                    f"block FP8 is supported")
            want = expected_shape(self.config, info.name) if check_shapes else None
            if want is None:
                continue
            if tuple(info.shape) != tuple(want):
                raise CheckpointError(f"{where} has shape {tuple(info.shape)} but config.json implies {tuple(want)}")
            if info.dtype not in FLOAT_CODES:
                raise CheckpointError(f"{where} has dtype {info.dtype}; a floating-point weight was expected")

    @property
    def fp8_block(self) -> tuple[int, int] | None:
        """The block of this checkpoint's FP8 weights ((128, 128) for DeepSeek-V3), None when it has none."""
        return self._block

    def is_fp8(self, name: str) -> bool:
        """True for a weight stored as block FP8 (read dequantised)."""
        return name in self._fp8

    def stored_info(self, name: str) -> TensorInfo:
        """A tensor as stored: for a block-FP8 weight its F8_E4M3 entry, for `<weight>_scale_inv` the scales', for
        an MXFP4 weight its `_blocks`."""
        if name in self._fp8:
            return self._fp8[name][0]
        if name in self._mxfp4:
            return self._mxfp4[name][0]
        weight = name.removesuffix("_scale_inv")
        if weight != name and weight in self._fp8:
            return self._fp8[weight][1]
        return self.info(name)

    # -- access --------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in file order: shard by shard (by file name), by offset within a shard."""
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
        """The weight files of this checkpoint, in the order `names()` visits them."""
        return list(dict.fromkeys(i.file for i in self._infos.values()))

    def _handle(self, file: Path):
        with self._lock:
            handle = self._handles.get(file)
            if handle is None:
                handle = _torch_load(file) if self._pickled else open(file, "rb", buffering=0)
                self._handles[file] = handle
            return handle

    def read_bytes(self, name: str) -> bytearray:
        """A tensor's raw little-endian bytes in a buffer of their own: the fast path for same-dtype copies."""
        if name in self._fp8 or name in self._mxfp4:  # the logical (dequantised) tensor's bytes
            return bytearray(self.read(name).reshape(-1).view(torch.uint8).numpy())
        return self._stored_bytes(self.info(name))

    def _stored_bytes(self, info: TensorInfo) -> bytearray:
        name = info.name
        if self._pickled:
            t = self._handle(info.file)[name]
            return bytearray(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else bytearray()
        buf = bytearray(info.nbytes)
        if info.nbytes:
            pread_into(self._handle(info.file), memoryview(buf), info.offset, self._lock, f"tensor {name!r}")
        return buf

    def byte_range(self, name: str) -> ByteRange | None:
        """Where a tensor's raw bytes lie on disk, for the writer to copy in chunks; None for pickled tensors.

        The fastest same-dtype copy: nothing is read until the writer streams it, and never all at once.
        """
        info = self.info(name)
        stored = self._pickled or self.stored_info(name) is not info  # FP8, MXFP4: not the bytes read
        return None if stored else ByteRange(info.file, info.offset, info.nbytes)

    def stored_byte_range(self, name: str) -> ByteRange | None:
        """Where a tensor's bytes lie on disk as stored: a block-FP8 weight's float8 bytes, or (for
        `<weight>_scale_inv`) its scales'. The writer copies them untouched: an FP8 copy keeps both its
        weight and its scale bytes exactly. None for pickled tensors."""
        info = self.stored_info(name)
        return None if self._pickled else ByteRange(info.file, info.offset, info.nbytes)

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in memory of its own (not a view of a mapped file); block-FP8 weights dequantised to BF16."""
        if name in self._fp8:
            from ..kernels.fp8 import dequantize

            q_info, s_info = self._fp8[name]
            return dequantize(self._stored(q_info), self._stored(s_info), self._block)
        if name in self._mxfp4:
            return dequantize_mxfp4(*(self._stored(i) for i in self._mxfp4[name]))
        return self._stored(self.info(name))

    def read_stored(self, name: str) -> torch.Tensor:
        """A tensor as stored: for a block-FP8 weight, its float8 values; for `<weight>_scale_inv`, its scales."""
        return self._stored(self.stored_info(name))

    def read_stored_into(self, name: str, buffer, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A tensor as stored (as `read_stored`), or its rows [start, stop), read into the start of `buffer`
        (writable, large enough) and viewed there instead of in memory of its own: a caller converting
        tensor after tensor, or a large one piece by piece, reuses one buffer, so its memory stays flat.
        The tensor is valid until the buffer is reused."""
        info = self.stored_info(name)
        offset, nbytes, shape = 0, info.nbytes, tuple(info.shape)
        if rows is not None:
            start, stop = rows
            if not shape or not 0 <= start <= stop <= shape[0]:
                raise ValueError(f"tensor {name!r} of shape {shape}: no rows [{start}, {stop})")
            row = info.nbytes // shape[0] if shape[0] else 0
            offset, nbytes, shape = start * row, (stop - start) * row, (stop - start, *shape[1:])
        view = memoryview(buffer).cast("B")
        if view.readonly or len(view) < nbytes:
            raise ValueError(f"tensor {name!r}: a writable buffer of {nbytes} bytes is needed, got "
                             f"{'a read-only one' if view.readonly else f'{len(view)} bytes'}")
        dtype = torch_dtype(info.dtype)
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        view = view[:nbytes]
        flat = torch.frombuffer(view, dtype=torch.uint8)
        if self._pickled:
            t = self._handle(info.file)[name]
            t = t if rows is None else t[rows[0]:rows[1]]
            flat.copy_(t.contiguous().reshape(-1).view(torch.uint8))
        else:
            pread_into(self._handle(info.file), view, info.offset + offset, self._lock, f"tensor {name!r}")
        return flat.view(dtype).reshape(shape)

    def read_scale(self, name: str) -> torch.Tensor:
        """The block scales (`weight_scale_inv`) of a block-FP8 weight."""
        if name not in self._fp8:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not block FP8")
        return self._stored(self._fp8[name][1])

    def _stored(self, info: TensorInfo) -> torch.Tensor:
        name = info.name
        if self._pickled:
            return self._handle(info.file)[name].clone(memory_format=torch.contiguous_format)
        dtype = torch_dtype(info.dtype)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(self._stored_bytes(info), dtype=torch.uint8).view(dtype).reshape(info.shape)

    def close(self) -> None:
        """Release the cached file handles (and memory-mapped .bin state dicts); reads reopen them."""
        with self._lock:
            handles, self._handles = self._handles, {}
        for h in handles.values():
            if hasattr(h, "close"):
                h.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # A checkpoint sent to a worker process reopens its files there.
        state = dict(self.__dict__)
        state["_handles"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass
