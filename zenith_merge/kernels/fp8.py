"""Block FP8 as DeepSeek-V3 ships it: `float8_e4m3fn` weights, one float32 `weight_scale_inv` per block.

For a weight W of shape (rows, cols) and blocks of (b0, b1) (128 x 128 in DeepSeek's config),

    W[i, j] = q[i, j] * s[i // b0, j // b1],     s of shape (ceil(rows / b0), ceil(cols / b1))

(edge blocks are ragged). Quantising takes s = amax(|W| over the block) / 448, e4m3's largest
finite value, and q = e4m3(W / s), rounded to nearest; an all-zero block gets s = 1.

Dequantisation has two implementations, a Triton kernel (CUDA) and torch ops (CPU). Both
produce float32 with one IEEE multiply per element, so they agree bit for bit; the caller
rounds to the output dtype once, in one place (`dequantize`), for both.

On CPU, torch's e4m3 -> float conversion is slow, so `dequantize` decodes the bytes with integer
ops instead (`_decode_scaled`): the same float32 products, bit for bit, at several times the speed.
It falls back to the plain definition (`_decode_plain`) wherever the trick's conditions fail.
"""

from __future__ import annotations

import math
import os

import torch

E4M3_MAX = 448.0
DEFAULT_BLOCK = (128, 128)
# Elements dequantised at a time on CPU: whole block rows, or rows of one block row. The fastest of
# 2^15 .. 2^21 for 4096-column weights on one thread (17 ms per 4096 x 4096 weight; 46 ms at 2^15,
# where per-op overhead dominates, 20 ms at 2^21); 2 MiB of int32 work, in L3 if not L2.
SLAB_ELEMENTS = 2**19

# The fast CPU decoding (`_decode_scaled`). An e4m3 byte S.EEEE.MMM, sign-extended to int32, shifted
# left by 20 and masked with 0x87F00000, is the float32 bit pattern S.000EEEE.MMM000...: the value
# q * 2^-120 exactly, float32's exponent bias (127) being e4m3's (7) plus 120, for normal and
# subnormal bytes alike (e4m3 subnormals 0.MMM * 2^-6 become float32 subnormals 0.MMM * 2^-126).
_E4M3_SHIFT = 20
_E4M3_MASK = 0x87F00000 - 2**32  # as a (negative) int32
_BIAS_GAP = 2.0**120


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
               dtype: torch.dtype = torch.bfloat16, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """A block-FP8 weight as `dtype`: the Triton kernel on CUDA, torch ops elsewhere, then one rounding.

    Equals `dequantize_torch(q, scale_inv, block).to(dtype)` bit for bit. `out`, a contiguous tensor
    of q's shape in `dtype`, receives the result and is returned, so that a caller converting many
    weights can reuse one buffer.
    """
    if q.dim() != 2:
        raise ValueError(f"block FP8 weights are 2-D, got shape {tuple(q.shape)}")
    if tuple(scale_inv.shape) != scale_shape(tuple(q.shape), block):
        raise ValueError(f"scales of shape {tuple(scale_inv.shape)} for a weight of shape {tuple(q.shape)} in "
                         f"{block[0]}x{block[1]} blocks; expected {scale_shape(tuple(q.shape), block)}")
    out = _output(q, dtype, out)
    if q.is_cuda and _triton_available():
        from .fp8_triton import dequantize_triton

        return out.copy_(dequantize_triton(q, scale_inv, block))
    if q.numel() == 0:
        return out
    # In slabs of rows, so the float32 work stays small (in cache) whatever the weight's size; each
    # product is computed in float32 and rounded once, on the copy into `out`.
    (rows, cols), (b0, b1) = q.shape, block
    s = scale_inv.to(torch.float32)
    fast = (q.device.type == "cpu" and q.dtype == torch.float8_e4m3fn and not _flushes_denormals()
            and not _has_nan_codes(q))
    scaled = s * _BIAS_GAP if fast else None
    # s * 2^120 must stay finite for the trick: a finite |s| >= 2^8 overflows (inf and NaN scales give
    # inf and NaN either way), and its block row is decoded the plain way.
    exact = (~(scaled.isinf() & s.isfinite()).any(1)).tolist() if fast else []
    scaled = _along_columns(scaled, b1, cols) if fast else None
    plain = None
    step = max(1, SLAB_ELEMENTS // cols)
    scratch = None if dtype == torch.float32 else torch.empty(min(step, rows) * cols, dtype=torch.int32,
                                                              device=q.device)
    for r, n in _slabs(rows, b0, step):
        rb = slice(r // b0, -(-(r + n) // b0))
        o = out[r:r + n]
        work = o.view(torch.int32) if scratch is None else scratch[:n * cols].view(n, cols)
        if fast and all(exact[rb]):
            _decode_scaled(q[r:r + n], scaled[rb], work)
        else:
            plain = _along_columns(s, b1, cols) if plain is None else plain
            _decode_plain(q[r:r + n], plain[rb], work)
        if scratch is not None:
            o.copy_(work.view(torch.float32))
    return out


def _output(q: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """`out` checked to fit the weight `q` as `dtype`, or a new tensor when None."""
    if out is None:
        return torch.empty(q.shape, dtype=dtype, device=q.device)
    if tuple(out.shape) != tuple(q.shape) or out.dtype != dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(q.shape)} on {q.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}"
                         f"{'' if out.is_contiguous() else ', not contiguous'}")
    return out


def _slabs(rows: int, b0: int, step: int):
    """(first row, row count) of each slab of about `step` rows: whole block rows, or rows of a single
    block row (when a block row alone is more than `step`, and for the ragged last block row)."""
    if step >= b0:
        step, whole = step // b0 * b0, rows // b0 * b0
        yield from ((r, min(step, whole - r)) for r in range(0, whole, step))
        if whole < rows:
            yield whole, rows - whole
        return
    for start in range(0, rows, b0):
        end = min(start + b0, rows)
        yield from ((r, min(step, end - r)) for r in range(start, end, step))


def _along_columns(s: torch.Tensor, b1: int, cols: int) -> torch.Tensor:
    """Each block's scale repeated over the columns it covers: (block rows, cols)."""
    return s.repeat_interleave(b1, 1)[:, :cols].contiguous()


def _scale_rows(work: torch.Tensor, s_cols: torch.Tensor) -> None:
    """work *= the scale of each element's block, in place; `work` is whole block rows or rows of one,
    `s_cols` those block rows' scales along the columns."""
    n, cols = work.shape
    nb = s_cols.shape[0]
    work.view(nb, n // nb, cols).mul_(s_cols[:, None, :])


def _decode_scaled(q: torch.Tensor, scaled_cols: torch.Tensor, work: torch.Tensor) -> None:
    """work (int32, viewed as float32 after) = q * s by the bit trick, for s * 2^120 given as
    `scaled_cols`: the float32 bits of q * 2^-120 (exact, see `_E4M3_MASK`) times s * 2^120, one
    float32 multiply whose real product is q * s, hence rounded as q * s is. Needs finite bytes,
    finite s * 2^120 (or an inf/NaN s) and subnormals kept (no flush to zero). All in float32, then
    copied to the output dtype: faster than the bfloat16-bits variant (int16 bits, one mixed-dtype
    multiply into the output), 12 against 15 ms per 4096 x 4096 weight on one thread."""
    work.copy_(q.view(torch.int8))  # sign-extends
    work.bitwise_left_shift_(_E4M3_SHIFT).bitwise_and_(_E4M3_MASK)
    _scale_rows(work.view(torch.float32), scaled_cols)


def _decode_plain(q: torch.Tensor, s_cols: torch.Tensor, work: torch.Tensor) -> None:
    """work (viewed as float32) = float32(q) * s, computed as `dequantize_torch` defines it."""
    f = work.view(torch.float32)
    f.copy_(q)
    _scale_rows(f, s_cols)


def _flushes_denormals() -> bool:
    """True when float32 subnormals are flushed to zero on this CPU thread (torch.set_flush_denormal(True)),
    which would zero the subnormal intermediates of `_decode_scaled`."""
    return bool(((torch.tensor([2.0**-126, 2.0**-127]) * 0.5) == 0).any())


def _has_nan_codes(q: torch.Tensor) -> bool:
    """True when q holds an e4m3 NaN (byte 0x7F or 0xFF), which the bit trick would decode as a number."""
    return bool(q.view(torch.uint8).max() == 0xFF) or bool(q.view(torch.int8).max() == 0x7F)


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
