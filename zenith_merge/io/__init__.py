"""Checkpoint I/O: the lazy reader (`reader.Checkpoint`) and the streaming shard writer (`writer.write_checkpoint`).

Modules: `safetensors_format` (header parse/build, dtype codes), `reader`, `layout`
(output tensors and shard packing), `writer`, `manifest` (resume bookkeeping),
`parallel` (process-pool and Ray backends).
"""

from .layout import ShardSpec, TensorSpec, layout_shards
from .reader import Checkpoint, TensorInfo
from .writer import TensorSource, WriteResult, prepare_output_dir, write_checkpoint

__all__ = [
    "Checkpoint",
    "ShardSpec",
    "TensorInfo",
    "TensorSource",
    "TensorSpec",
    "WriteResult",
    "layout_shards",
    "prepare_output_dir",
    "write_checkpoint",
]
