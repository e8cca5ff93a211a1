"""How release_layout makes a checkpoint's bytes fast and deterministically: one PCG64 stream per tensor, values
from inverse-CDF tables (BF16/float32 from normal quantiles of 16-bit indices, FP8 codes from 256 quantiles
scaled to +-448), children of one parent as a small delta on each value; see release_layout's docstring.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np

from .release_configs import BLOCK, FP8_MAX

CHUNK_ELEMENTS = 2**21  # values generated (and written) at a time
WEIGHT_STD = 0.02  # projections, embeddings, head, routers
NORM_STD = 0.05  # norms: 1 +- this
BIAS_STD = 0.05  # e_score_correction_bias
SCALE_JITTER = 0.1  # block scales: base x (1 + this x z)
DTYPE_BYTES = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


@dataclass(frozen=True)
class ReleaseTensor:
    """One tensor of a release checkpoint: its on-disk name, safetensors dtype and shape, and how it is drawn.

    `kind` is "weight" (a quantisable projection: drawn as FP8 codes with block scales, written as
    F8_E4M3, or dequantised to BF16), "scale" (the `weight_scale_inv` of weight `of`) or "normal"
    (BF16/F32 values mean + std x N(0, 1)). `key` names the random stream: the MTP layer's copies
    of the embedding and the head draw the main model's, so they are byte-identical to them.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str = "normal"
    mean: float = 0.0
    std: float = WEIGHT_STD
    of: str = ""
    key: str = ""

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data on disk."""
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


@cache
def _z16() -> np.ndarray:
    """Standard normal quantiles at the midpoints of 65,536 equal-probability bins (float32), computed with
    `statistics.NormalDist` (pure Python: the same on every machine)."""
    from statistics import NormalDist

    inv = NormalDist().inv_cdf
    return np.array([inv((k + 0.5) / 65536) for k in range(65536)], dtype=np.float32)


@cache
def _fp8_tables() -> tuple[bytes, np.ndarray, float]:
    """(byte -> float8_e4m3fn code of the byte's normal quantile, the float32 value of every FP8 code, the
    standard deviation of the codes' values). The 256 quantiles are scaled so that the outermost two are
    -448 and +448, as every block of a block-quantised weight has its amax at 448; no code is NaN."""
    from statistics import NormalDist

    import torch

    inv = NormalDist().inv_cdf
    z = [inv((k + 0.5) / 256) for k in range(256)]
    values = torch.tensor([FP8_MAX * v / z[-1] for v in z], dtype=torch.float32)
    codes = values.to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes()
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    std = float(np.sqrt(np.mean(np.square(every[np.frombuffer(codes, np.uint8)].astype(np.float64)))))
    return codes, every, std


@cache
def _bf16_table(mean: float, std: float) -> np.ndarray:
    """uint16 index -> the BF16 bits of mean + std x its normal quantile."""
    import torch

    return (torch.from_numpy(_z16()).double() * std + mean).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _stream(seed: int, key: str, salt: str) -> np.random.PCG64:
    """The PCG64 bit stream of tensor `key` for `seed` (`salt` separates a tensor's streams)."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return np.random.PCG64(np.random.SeedSequence([seed, *np.frombuffer(digest[:16], dtype=np.uint32).tolist()]))


def _raw(bits: np.random.PCG64, n: int) -> np.ndarray:
    """The next `n` bytes of a stream (uint8, whole 64-bit words drawn)."""
    return bits.random_raw(-(-n // 8)).view(np.uint8)[:n]


@dataclass(frozen=True)
class Seeds:
    """Where the values come from: `base` draws the values; `delta`, if set, draws a child's noise of
    `scale` x (a value's typical magnitude)."""

    base: int
    delta: int | None = None
    scale: float = 0.0


class Values:
    """Produces the bytes of each release tensor, chunk by chunk, from `Seeds`.

    Byte -> FP8 code lookups go through `bytes.translate` (fast), the other tables through numpy
    indexing; conversions and arithmetic run in torch on the caller's thread (`torch_threads(1)`).
    """

    def __init__(self, seeds: Seeds):
        self.seeds = seeds
        self.fp8_codes, self.fp8_values, self.fp8_std = _fp8_tables()
        self.scale_base = WEIGHT_STD / self.fp8_std  # dequantised weights: std ~ WEIGHT_STD

    def _streams(self, key: str, salt: str) -> tuple[np.random.PCG64, np.random.PCG64 | None]:
        s = self.seeds
        return _stream(s.base, key, salt), (None if s.delta is None else _stream(s.delta, key, "delta-" + salt))

    def _fp8(self, bits: np.random.PCG64, n: int) -> np.ndarray:
        """n FP8 codes drawn from `bits` (uint8), values ~N(0, fp8_std) with amax 448."""
        return np.frombuffer(_raw(bits, n).tobytes().translate(self.fp8_codes), dtype=np.uint8)

    def _noise(self, bits: np.random.PCG64, n: int, scale: float):
        """n values of standard deviation `scale` (float32 torch tensor): uniform on 256 levels, one byte each."""
        import torch

        return torch.from_numpy(_raw(bits, n).view(np.int8)).float().mul_(scale * math.sqrt(12) / 256)

    def chunks(self, t: ReleaseTensor) -> Iterator[memoryview]:
        """The tensor's bytes on disk, a few MB at a time."""
        if t.kind == "scale":
            yield memoryview(self.scales(t.of, t.shape))
        elif t.kind == "weight":
            yield from self._weight(t)
        else:
            yield from self._normal(t)

    def scales(self, weight: str, shape: tuple[int, ...]) -> np.ndarray:
        """The float32 `weight_scale_inv` of `weight`: WEIGHT_STD / std(codes) x (1 + 0.1 z), all > 0."""
        n = math.prod(shape)
        bits, delta = self._streams(weight, "scale")
        s = np.float32(self.scale_base) * (np.float32(1) + np.float32(SCALE_JITTER) * _z16()[_raw(bits, 2 * n).view(np.uint16)])
        if delta is not None:  # a child's scales: x (1 + delta z)
            s *= (self._noise(delta, n, self.seeds.scale) + 1).numpy()
        return s.astype(np.float32).reshape(shape)

    def _weight(self, t: ReleaseTensor) -> Iterator[memoryview]:
        """A quantisable weight: FP8 codes, or (BF16) their dequantisation by the block scales, whole blocks
        of rows at a time."""
        import torch

        rows, cols = t.shape
        key = t.key or t.name
        bits, delta = self._streams(key, "codes")
        step = max(BLOCK, (CHUNK_ELEMENTS // cols) // BLOCK * BLOCK)
        scale = None
        if t.dtype == "BF16":
            scale = torch.from_numpy(self.scales(key, (-(-rows // BLOCK), -(-cols // BLOCK))))
            if cols % BLOCK:  # partial column blocks: scales expanded to every column
                scale = scale.repeat_interleave(BLOCK, dim=1)[:, :cols]
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            n = (r1 - r0) * cols
            codes = self._fp8(bits, n)
            if delta is not None:  # a child: noise added to the values, codes rounded again
                v = torch.from_numpy(self.fp8_values[codes])
                v.add_(self._noise(delta, n, self.seeds.scale * self.fp8_std)).clamp_(-FP8_MAX, FP8_MAX)
                codes = v.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            if scale is None:
                yield memoryview(codes)
                continue
            v = torch.from_numpy(self.fp8_values[codes])
            blocks = scale[r0 // BLOCK:-(-r1 // BLOCK)]
            if cols % BLOCK == 0 and (r1 - r0) % BLOCK == 0:
                v = v.view(-1, BLOCK, cols // BLOCK, BLOCK).mul_(blocks.view(-1, 1, cols // BLOCK, 1))
            else:
                full = blocks.repeat_interleave(BLOCK, dim=0)[: r1 - r0]
                if cols % BLOCK == 0:
                    v = v.view(r1 - r0, cols // BLOCK, BLOCK).mul_(full.unsqueeze(-1))
                else:
                    v = v.view(r1 - r0, cols).mul_(full)
            yield memoryview(v.to(torch.bfloat16).view(torch.int16).numpy())

    def _normal(self, t: ReleaseTensor) -> Iterator[memoryview]:
        """BF16 or float32 values mean + std x N(0, 1) (a 65,536-quantile table), plus a child's noise."""
        import torch

        total = math.prod(t.shape)
        bits, delta = self._streams(t.key or t.name, "values")
        typical = math.sqrt(t.mean**2 + t.std**2) * self.seeds.scale
        for start in range(0, total, CHUNK_ELEMENTS):
            n = min(CHUNK_ELEMENTS, total - start)
            idx = _raw(bits, 2 * n).view(np.uint16)
            if t.dtype == "BF16":
                table = _bf16_table(t.mean, t.std)[idx]
                if delta is None:
                    yield memoryview(table)
                    continue
                v = torch.from_numpy(table.view(np.int16)).view(torch.bfloat16).float()
            else:
                v = torch.from_numpy(_z16()[idx] * np.float32(t.std) + np.float32(t.mean))
            if delta is not None:
                v.add_(self._noise(delta, n, typical))
            out = v.to(torch.bfloat16).view(torch.int16) if t.dtype == "BF16" else v
            yield memoryview(out.numpy())
