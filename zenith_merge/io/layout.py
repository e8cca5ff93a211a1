"""What the writer writes: output tensors and their packing into shards.

Everything here is known before any weight is read, which is what lets the writer
put each shard's header first and then stream its tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .safetensors_format import itemsize


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor as a safetensors header needs it."""

    name: str
    dtype: str  # safetensors code: "BF16", "F32", ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class ShardSpec:
    """One output file and the tensors it holds, in file order."""

    filename: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (the header comes on top)."""
        return sum(t.nbytes for t in self.tensors)


def shard_name(i: int, n: int, prefix: str = "model") -> str:
    """The file name of shard `i` (1-based) of `n`, as transformers names them."""
    return f"{prefix}-{i:05d}-of-{n:05d}.safetensors"


def layout_shards(tensors: Sequence[TensorSpec], max_shard_size: int, prefix: str = "model",
                  break_before: int | None = None) -> list[ShardSpec]:
    """Pack tensors, in the given order, into shards of at most `max_shard_size` bytes of tensor data.

    Greedy, like transformers and mergekit: a shard is closed when the next tensor would push it
    over the limit, and a tensor larger than the limit gets a shard of its own. Keeping plan order
    keeps a layer's tensors together; the result depends only on the arguments. Shards are named
    `model-00001-of-00003.safetensors` (always indexed, even when there is one). `break_before`
    starts a new shard at that tensor index, so the tensors from there on share no shard with the
    ones before (router training rewrites only those).
    """
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes, not {max_shard_size}")
    groups: list[list[TensorSpec]] = []
    size = 0
    for i, t in enumerate(tensors):
        if not groups or (groups[-1] and (size + t.nbytes > max_shard_size or i == break_before)):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    return [ShardSpec(shard_name(i + 1, n, prefix), tuple(g)) for i, g in enumerate(groups)]
