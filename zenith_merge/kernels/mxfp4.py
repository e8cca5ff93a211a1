"""MXFP4 (OCP microscaling FP4) as GPT-OSS ships its experts, decoded to BF16.

A weight W of shape (..., rows, cols) is stored as two uint8 tensors:

    W_blocks (..., cols, rows / 32, 16): each byte two e2m1 values, the low nibble first;
    W_scales (..., cols, rows / 32):     one e8m0 exponent per 32 values, biased by 127.

A value is FP4[nibble] * 2^(scale - 127), FP4 = {0, 0.5, 1, 1.5, 2, 3, 4, 6} and their negatives (bit 3 is
the sign). The blocks run along the last axis of W as the modelling code uses it, so the decoded
(..., cols, rows) tensor is transposed at the end: GPT-OSS's `gate_up_proj` (experts, hidden, 2 inter) is
stored as blocks (experts, 2 inter, hidden / 32, 16). This is transformers' own decoding
(`integrations.mxfp4.convert_moe_packed_tensors`, the same ops in the same dtype), so the bytes agree with
what transformers loads; a test compares them.
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def mxfp4_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The decoded weight's shape for blocks of shape (..., cols, groups, 16): (..., groups * 32, cols)."""
    *prefix, cols, groups, width = blocks_shape
    return (*prefix, groups * width * 2, cols)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight that MXFP4 `blocks` (uint8, (..., cols, groups, 16)) and `scales` (uint8, (..., cols, groups))
    hold, as `dtype`, shape `mxfp4_shape(blocks.shape)`, contiguous."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() < 3:
        raise ValueError(f"MXFP4 blocks and scales are uint8 (blocks at least 3-D); got {blocks.dtype}"
                         f"{list(blocks.shape)} and {scales.dtype}{list(scales.shape)}")
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 scales {list(scales.shape)} do not match blocks {list(blocks.shape)}")
    *prefix, cols, groups, width = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    rows = blocks.reshape(-1, width)
    out = torch.empty(rows.shape[0], width * 2, dtype=dtype)
    out[:, 0::2] = lut[(rows & 0x0F).to(torch.int)]
    out[:, 1::2] = lut[(rows >> 4).to(torch.int)]
    torch.ldexp(out, scales.reshape(-1, 1).to(torch.int32) - SCALE_BIAS, out=out)
    return out.reshape(*prefix, cols, groups * width * 2).transpose(-1, -2).contiguous()
