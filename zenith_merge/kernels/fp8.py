"""Block FP8 as DeepSeek-V3 ships it: `float8_e4m3fn` weights, one float32 `weight_scale_inv` per block.

For a weight W of shape (rows, cols) and blocks of (b0, b1) (128 x 128 in DeepSeek's config),

    W[i, j] = q[i, j] * s[i // b0, j // b1],     s of shape (ceil(rows / b0), ceil(cols / b1))

(edge blocks are ragged). Quantising takes s = amax(|W| over the block) / 448, e4m3's largest
finite value, and q = e4m3(W / s), rounded to nearest; an all-zero block gets s = 1.

Dequantisation has two implementations, a Triton kernel (CUDA) and torch ops (CPU). Both
produce float32 with one IEEE multiply per element, so they agree bit for bit; the caller
rounds to the output dtype once, in one place (`dequantize`), for both.
"""

from __future__ import annotations

import math
import os

import torch

E4M3_MAX = 448.0
DEFAULT_BLOCK = (128, 128)
SLAB_ROWS = 1024  # rows dequantised at a time on CPU


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The shape of a weight's scale tensor: one entry per (ragged) block."""
    rows, cols = shape
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Each block's scale repeated over its elements, cut to `shape` at the ragged edges."""
    return scale.repeat_interleave(block[0], 0)[:shape[0]].repeat_interleave(block[1], 1)[:, :shape[1]]


def dequantize_torch(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """q * s per block, in float32, with torch ops (any device)."""
    return q.to(torch.float32) * _expand(scale_inv.to(torch.float32), tuple(q.shape), block)


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A block-FP8 weight as `dtype`: the Triton kernel on CUDA, torch ops elsewhere, then one rounding."""
    if q.dim() != 2:
        raise ValueError(f"block FP8 weights are 2-D, got shape {tuple(q.shape)}")
    if q.is_cuda and _triton_available():
        from .fp8_triton import dequantize_triton

        return dequantize_triton(q, scale_inv, block).to(dtype)
    # in slabs of whole block rows, so the float32 work stays small whatever the weight's size. Each
    # product is computed in float32 (e4m3 -> bfloat16 is exact) and rounded once, on store into `out`.
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    (rows, cols), (b0, b1) = q.shape, block
    step = b0 * max(1, SLAB_ROWS // b0)
    for r in range(0, rows, step):
        qs, o = q[r:r + step].to(torch.bfloat16), out[r:r + step]
        n = qs.shape[0]
        ss = scale_inv[r // b0:-(-(r + n) // b0)].to(torch.float32)
        if n % b0 == 0 and cols % b1 == 0:  # whole blocks: the scales broadcast, nothing expanded
            torch.mul(qs.view(n // b0, b0, cols // b1, b1), ss[:, None, :, None], out=o.view(n // b0, b0, cols // b1, b1))
        else:
            torch.mul(qs, _expand(ss, (n, cols), block), out=o)
    return out


def quantize(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(q as float8_e4m3fn, scale_inv as float32) with amax scaling per block."""
    if w.dim() != 2:
        raise ValueError(f"block FP8 weights are 2-D, got shape {tuple(w.shape)}")
    w = w.to(torch.float32)
    rows, cols = w.shape
    sr, sc = scale_shape((rows, cols), block)
    padded = torch.zeros(sr * block[0], sc * block[1], dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w.abs()
    amax = padded.view(sr, block[0], sc, block[1]).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (w / _expand(scale, (rows, cols), block)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def e4m3_error_bound(scale_inv: torch.Tensor) -> torch.Tensor:
    """Largest |dequant(quant(w)) - w| per block: half a unit in the last place at e4m3's top binade
    (3 mantissa bits: 2^-4 relative to the binade's base, 256 for values in [256, 448]), times the
    block's scale."""
    return scale_inv.to(torch.float32) * 16.0


def _triton_available() -> bool:
    if os.environ.get("ZENITH_NO_TRITON") == "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
