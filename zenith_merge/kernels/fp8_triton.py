"""The Triton kernel of block-FP8 dequantisation: one program per (128 x 128) block, float32 out.

The e4m3 bytes are decoded from their bits (sign, 4 exponent bits with bias 7, 3 mantissa bits;
exponent 0 is subnormal, S.1111.111 is NaN) with integer and exact float32 operations, so the
kernel gives the same float32 values as torch's conversion under the interpreter
(TRITON_INTERPRET=1, which tests use on CPU) and on a GPU alike. Each value is then multiplied
once by its block's scale, as the torch path does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, out_ptr, rows, cols, s_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    br = tl.program_id(0)
    bc = tl.program_id(1)
    r = br * BLOCK_R + tl.arange(0, BLOCK_R)
    c = bc * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    offsets = r[:, None] * cols + c[None, :]
    bits = tl.load(q_ptr + offsets, mask=mask, other=0).to(tl.int32)
    sign = tl.where((bits & 0x80) != 0, -1.0, 1.0)
    exponent = (bits >> 3) & 0xF
    mantissa = (bits & 0x7).to(tl.float32)
    normal = (1.0 + mantissa * 0.125) * tl.exp2((exponent - 7).to(tl.float32))
    subnormal = mantissa * 0.001953125  # m / 8 * 2^-6
    value = sign * tl.where(exponent == 0, subnormal, normal)
    value = tl.where((exponent == 15) & ((bits & 0x7) == 7), float("nan"), value)
    scale = tl.load(s_ptr + br * s_cols + bc)
    tl.store(out_ptr + offsets, value * scale, mask=mask)


def dequantize_triton(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """q * s per block, in float32, by the Triton kernel (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""
    rows, cols = q.shape
    q_bytes = q.contiguous().view(torch.uint8)
    s = scale_inv.to(torch.float32).contiguous()
    out = torch.empty((rows, cols), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(rows, block[0]), triton.cdiv(cols, block[1]))
    _dequant_kernel[grid](q_bytes, s, out, rows, cols, s.shape[1], BLOCK_R=block[0], BLOCK_C=block[1])
    return out
