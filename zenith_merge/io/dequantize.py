"""Block-FP8 weights dequantised to BF16 in flat memory, weight after weight.

A merge or cast that writes BF16 from FP8 parents dequantises every weight it copies. Reading a
whole weight and allocating its BF16 result each time costs memory and time at release sizes (a
7168 x 18432 expert projection is 264 MB in BF16). `StreamingDequantizer` instead reads the FP8
bytes a few block rows at a time into one reused buffer and dequantises into a second reused
buffer that only grows to the largest weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..kernels.fp8 import dequantize
from .reader import Checkpoint

READ_CHUNK_BYTES = 4 * 2**20  # FP8 bytes read at a time (whole block rows)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, then restored.

    Dequantising runs one thread: its slab-sized ops are short, and with two or more each one is an
    OpenMP parallel region that waits for every thread of the team to be scheduled, which on a busy
    machine costs a time slice per region. Measured on 2 cores busy with another process: 97 s with
    2 threads, 25 s with 1, for the 2 GiB input of bench/fp8_cast.py. The writer's hashing thread and
    its writes use the other cores; `workers` parallelises across shards.
    """
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class StreamingDequantizer:
    """Dequantises block-FP8 weights of any checkpoint into reused buffers (see the module docstring).

    The tensor returned is valid until the next call: a caller hands it to the writer, which is done
    with a tensor before it asks for the next (`write_shard` waits on the sink's write, after which
    the bytes are written and hashed). Each block row's values depend on its bytes and scales alone,
    so dequantising piece by piece gives the bytes of one whole pass. Not shared between processes:
    each worker makes its own (`__getstate__` drops the buffers).
    """

    def __init__(self) -> None:
        self._stored: bytearray | None = None  # FP8 bytes of a few block rows of the weight being read
        self._out: torch.Tensor | None = None  # BF16 values (flat), grown to the largest weight

    def __call__(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        """Weight `name` of `ckpt` (stored as block FP8) as BF16, in the reused output buffer."""
        (rows, cols), (b0, _) = ckpt.stored_info(name).shape, ckpt.fp8_block
        step = max(1, READ_CHUNK_BYTES // max(cols, 1) // b0) * b0
        if self._stored is None or len(self._stored) < min(step, rows) * cols:
            self._stored = None  # free the smaller buffer before allocating the larger one
            self._stored = bytearray(min(step, rows) * cols)  # one byte per e4m3 value
        if self._out is None or self._out.numel() < rows * cols:
            self._out = None
            self._out = torch.empty(rows * cols, dtype=torch.bfloat16)
        out, scale = self._out[:rows * cols].view(rows, cols), ckpt.read_scale(name)
        with torch_threads(1):
            for r in range(0, rows, step):
                q = ckpt.read_stored_into(name, self._stored, rows=(r, min(r + step, rows)))
                dequantize(q, scale[r // b0:-(-(r + len(q)) // b0)], ckpt.fp8_block, out=out[r:r + len(q)])
        return out

    def clear(self) -> None:
        """Drop the buffers."""
        self._stored = self._out = None

    def __getstate__(self) -> dict:
        return {"_stored": None, "_out": None}
