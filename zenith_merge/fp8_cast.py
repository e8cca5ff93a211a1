"""`zenith-merge fp8-cast IN OUT`: a whole checkpoint from block FP8 to BF16, or back (`to="fp8"`).

What DeepSeek-V3 ships as `fp8_cast_bf16.py`, with bounded memory: one tensor (and its output)
at a time through zenith-merge's streaming writer, instead of whole shards kept cached. The
output keeps the input's shard files. To BF16: every block-FP8 weight is dequantised and its
`weight_scale_inv` dropped; config.json loses `quantization_config` (a leftover one makes
transformers load the BF16 weights as FP8 again). To FP8: the 2-D projection weights of attention
and of the MLPs and experts are quantised per block (amax / 448), each followed by its
`weight_scale_inv`, and config.json gets DeepSeek-V3's `quantization_config`; norms, routers,
embeddings and the head pass through as they are, as DeepSeek leaves them. Tokenizer, generation
config and the other side files are copied. Shards are written atomically with a manifest, so an
interrupted cast continues with `resume`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .architectures import architecture_of
from .architectures.fp8 import quantizable, quantization_config
from .errors import CheckpointError
from .io.dequantize import StreamingDequantizer, torch_threads
from .io.layout import ShardSpec, TensorSpec
from .io.manifest import copy_file_atomic, mark_complete, write_json_atomic
from .io.reader import Checkpoint
from .io.writer import WriteResult, prepare_output_dir, write_checkpoint
from .kernels.fp8 import DEFAULT_BLOCK, quantize, scale_shape

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
SKIPPED_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json")


@dataclass
class CastSource:
    """The writer's tensor source for a cast: dequantised (to BF16) or quantised (to FP8) tensors.
    Picklable; the checkpoint reopens its files in each worker."""

    path: str
    to: str
    block: tuple[int, int]
    _ckpt: Checkpoint | None = None
    _last: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    _dequantizer: StreamingDequantizer | None = None  # reused buffers (to BF16)

    def _checkpoint(self) -> Checkpoint:
        if self._ckpt is None:
            self._ckpt = Checkpoint.open(self.path, check_shapes=False)
        return self._ckpt

    def produce(self, spec: TensorSpec):
        """One output tensor: a raw byte range when unchanged, else the converted tensor."""
        ckpt = self._checkpoint()
        if spec.name.endswith("_scale_inv") and self.to == "fp8":
            return self._quantized(spec.name.removesuffix("_scale_inv"))[1]
        if self.to == "fp8" and spec.dtype == "F8_E4M3":
            return self._quantized(spec.name)[0]
        if ckpt.is_fp8(spec.name):
            return self._dequantized(spec.name)
        return ckpt.byte_range(spec.name) or ckpt.read_bytes(spec.name)

    def _dequantized(self, name: str) -> torch.Tensor:
        """A block-FP8 weight as BF16, in flat memory (`StreamingDequantizer`: reused buffers)."""
        if self._dequantizer is None:
            self._dequantizer = StreamingDequantizer()
        return self._dequantizer(self._checkpoint(), name)

    def _quantized(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, scale_inv) of one weight, computed once for the weight and its scale (written next to each other)."""
        if self._last is None or self._last[0] != name:
            self._last = (name, quantize(self._checkpoint().read(name), self.block))
        return self._last[1]

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None
        self._last = self._dequantizer = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ckpt": None, "_last": None, "_dequantizer": None}


def cast_plan(ckpt: Checkpoint, to: Literal["bf16", "fp8"], block: tuple[int, int]) -> list[ShardSpec]:
    """The output shards: the input's files, each with its tensors converted (scales dropped or added)."""
    arch = architecture_of(ckpt.config, where=str(ckpt.path / "config.json")) if to == "fp8" else None
    by_file: dict[str, list[TensorSpec]] = {}
    for name in ckpt.names():
        info = ckpt.info(name)
        specs = by_file.setdefault(info.file.name, [])
        if to == "bf16":
            specs.append(TensorSpec(name, "BF16" if ckpt.is_fp8(name) else info.dtype, info.shape))
        elif ckpt.is_fp8(name) or quantizable(arch, name, info.shape):
            specs.append(TensorSpec(name, "F8_E4M3", info.shape))
            specs.append(TensorSpec(name + "_scale_inv", "F32", scale_shape(info.shape, block)))
        else:
            specs.append(TensorSpec(name, info.dtype, info.shape))
    return [ShardSpec(file, tuple(specs)) for file, specs in by_file.items()]


def _cast_id(ckpt: Checkpoint, to: str, block: tuple[int, int]) -> str:
    """What identifies a cast's output bytes: the input's headers (names, dtypes, shapes, sizes), direction, block."""
    infos = [ckpt.info(n) for n in ckpt.names()]
    payload = [to, list(block)] + [[i.name, i.dtype, list(i.shape), i.file.name, i.file.stat().st_size] for i in infos]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def fp8_cast(src: str | Path, dst: str | Path, *, to: Literal["bf16", "fp8"] = "bf16",
             block: tuple[int, int] | None = None, resume: bool = False, overwrite: bool = False,
             workers: int = 1, progress: bool = True, allow_nonfinite: bool = False) -> WriteResult:
    """Convert the checkpoint in `src` into `dst` (see the module docstring); returns what the writer did."""
    src, dst = Path(src), Path(dst)
    with Checkpoint.open(src, check_shapes=False) as ckpt:
        if to == "bf16" and ckpt.fp8_block is None:
            raise CheckpointError(f"{src}: no block-FP8 weights to dequantise (config.json has no fp8 "
                                  f"quantization_config, or no tensor is F8_E4M3)")
        if to == "fp8" and ckpt.fp8_block is not None:
            raise CheckpointError(f"{src}: already block FP8; cast it to bf16 first to quantise it again")
        block = block or ckpt.fp8_block or DEFAULT_BLOCK
        shards = cast_plan(ckpt, to, block)
        cast_id = _cast_id(ckpt, to, block)
        config = dict(ckpt.config)
    prepare_output_dir(dst, resume=resume, overwrite=overwrite, source_dirs=[src])
    source = CastSource(str(src), to, block)
    try:
        with torch_threads(1) if to == "bf16" else contextlib.nullcontext():
            result = write_checkpoint(dst, shards, source, plan_id=cast_id, resume=resume, workers=workers,
                                      progress=progress, allow_nonfinite=allow_nonfinite)
    finally:
        source.close()
    config.pop("quantization_config", None)
    if to == "fp8":
        config["quantization_config"] = quantization_config(block)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix not in WEIGHT_FILES and f.name not in SKIPPED_FILES:
            copy_file_atomic(f, dst / f.name)
    write_json_atomic(dst / "config.json", config)
    mark_complete(dst)
    return result
