"""Positioned reads, shared by the reader and the writer, and `ByteRange`, a tensor's bytes left on disk.

A `ByteRange` is what a same-dtype copy hands the writer instead of the bytes
themselves: the writer streams it from the source file in fixed-size chunks, so
copying a 2 GB expert tensor never holds 2 GB. It is a plain value (a path and
two numbers), so it crosses process boundaries.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

COPY_CHUNK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class ByteRange:
    """`nbytes` bytes of `file` starting at absolute byte `offset`."""

    file: Path
    offset: int
    nbytes: int


def pread_into(f, view: memoryview, offset: int, lock: threading.Lock | None, what: str) -> None:
    """Fill `view` from raw file `f` at `offset`, refusing a short read as a truncated file.

    Uses `os.preadv` where the platform has it (no shared file position, so concurrent reads
    need no lock); elsewhere seeks and reads, under `lock` when `f` is shared between threads.
    """
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(f.fileno(), [view[done:]], offset + done)
        else:
            with lock or contextlib.nullcontext():
                f.seek(offset + done)
                n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{f.name}: truncated file while reading {what} (did it change after it was opened?)")
        done += n
