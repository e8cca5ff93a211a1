"""Counting NaN and infinite values in tensor bytes, fast enough to run on every byte the writer writes.

A float is non-finite when its exponent bits are all ones (IEEE formats), so with the sign bit masked
off, the integer view of a non-finite value is at least the exponent mask:

    non-finite(x)  <=>  (bits(x) & ~sign) >= exponent_mask

One AND and one max over the integer view answer "any?" (measured at 10-30 GB/s per core on 16 MB
chunks, against about 0.2 GB/s for counting with `torch.isfinite`); the exact count is taken only when
the answer is yes. The FP8 formats differ: E4M3FN has no infinity and one NaN pattern per sign
(0x7F, 0xFF); the FNUZ formats have a single NaN, 0x80, and no infinity; E8M0 (a scale) has NaN 0xFF.
"""

from __future__ import annotations

import threading
import warnings

import torch

# safetensors code -> (integer view, mask clearing the sign, smallest masked value that is non-finite)
_MASKED = {
    "F64": (torch.int64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    "F32": (torch.int32, 0x7FFF_FFFF, 0x7F80_0000),
    "F16": (torch.int16, 0x7FFF, 0x7C00),
    "BF16": (torch.int16, 0x7FFF, 0x7F80),
    "F8_E4M3": (torch.uint8, 0x7F, 0x7F),
    "F8_E5M2": (torch.uint8, 0x7F, 0x7C),
    "F8_E8M0": (torch.uint8, 0xFF, 0xFF),
}
_SINGLE_NAN = {"F8_E4M3FNUZ": 0x80, "F8_E5M2FNUZ": 0x80}


def checks(code: str) -> bool:
    """Whether values of safetensors dtype `code` can be non-finite (floats; integers cannot)."""
    return code in _MASKED or code in _SINGLE_NAN


def nonfinite_count(data: memoryview | bytes | bytearray | torch.Tensor, code: str) -> int:
    """How many NaN or infinite values the bytes `data` of dtype `code` hold (0 for integer dtypes)."""
    raw = data.detach().reshape(-1).view(torch.uint8) if isinstance(data, torch.Tensor) else data
    if not checks(code) or len(raw) == 0:
        return 0
    if isinstance(raw, torch.Tensor):
        as_int = raw.view(_MASKED[code][0] if code in _MASKED else torch.uint8)
    else:
        view = _MASKED[code][0] if code in _MASKED else torch.uint8
        with warnings.catch_warnings():  # read-only bytes are fine: nothing here writes to them
            warnings.simplefilter("ignore", UserWarning)
            as_int = torch.frombuffer(raw, dtype=view)
    if code in _SINGLE_NAN:
        return int((as_int == _SINGLE_NAN[code]).sum())
    _, mask, bound = _MASKED[code]
    if mask == 0xFF:  # E8M0: every bit is exponent
        return int((as_int == bound).sum())
    masked = torch.bitwise_and(as_int, mask, out=_scratch(as_int))
    if int(masked.max()) < bound:
        return 0
    return int((masked >= bound).sum())


_local = threading.local()


def _scratch(like: torch.Tensor) -> torch.Tensor:
    """A buffer shaped as `like`, reused by this thread: a fresh 16 MiB tensor per chunk costs its page
    faults, more than the AND and the max themselves."""
    need = like.numel() * like.element_size()
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < need:
        buf = _local.buf = torch.empty(need, dtype=torch.uint8)
    return buf[:need].view(like.dtype)
