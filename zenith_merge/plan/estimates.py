"""What a plan needs in memory: the writer's peak per tensor and the stages' forward passes and fits.
"""

from __future__ import annotations

import math

from ..config import MergeConfig
from .models import Estimates, PlannedTensor, StagePlan
from .opened_sources import OpenedSource

# What the interpreter, torch and transformers occupy before any tensor is read (measured: ~220 MB for torch).
FIXED_PROCESS_BYTES = 400 * 2**20
# What a stage's forward passes add on top: transformers' modules and CPU kernel caches (oneDNN keeps
# compiled kernels per input shape; measured up to ~550 MiB on bf16 alignment passes of the demo models).
STAGE_OVERHEAD_BYTES = 512 * 2**20


def estimate(tensors: list[PlannedTensor], input_bytes: dict[str, int], stage_bytes: int) -> Estimates:
    specs = [t.spec for t in tensors]
    largest = max(tensors, key=lambda t: t.spec.nbytes)
    peak = FIXED_PROCESS_BYTES + max(t.spec.nbytes + input_bytes[t.name] for t in tensors)
    return Estimates(tensor_count=len(tensors), total_bytes=sum(s.nbytes for s in specs),
                     largest_tensor=largest.name, largest_tensor_bytes=largest.spec.nbytes, peak_memory_bytes=peak,
                     stage_memory_bytes=stage_bytes)


def stage_memory(stages: StagePlan | None, sources: dict[str, OpenedSource], cfg: MergeConfig) -> int:
    """Bytes the largest stage holds: a model (two for an alignment fit: base and donor) as loaded for it; 0: none.

    A loaded model holds its parameters in the calibration dtype plus, while transformers maps
    the safetensors files, their pages (clean page cache, but counted in RSS). With
    `calibration_max_memory`, about the cap plus one layer's weights.
    """
    def loaded(key: str) -> int:
        ckpt = sources[key].ckpt
        stored = sum(ckpt.info(n).nbytes for n in ckpt.names())
        if cfg.calibration_max_memory is not None:
            return cfg.calibration_max_memory + stored // max(1, sources[key].facts.num_layers)
        if cfg.calibration_dtype == "stored":
            return 2 * stored
        width = 2 if cfg.calibration_dtype in ("bfloat16", "float16") else 4
        return stored + sum(width * math.prod(ckpt.info(n).shape) for n in ckpt.names())

    if stages is None:
        return 0
    loads = [loaded(k) for k in stages.usage]
    loads += [loaded("base") + loaded(k) + _fit_bytes(stages.align[k], sources["base"], sources[k], cfg)
              for k in stages.align]
    loads += [loaded("base")] if stages.prompt_vectors or stages.router_offsets else []
    # RegMean: one parent loaded, with the float64 sums of its largest group (one per distinct input)
    loads += [loaded(k) + st.sum_bytes for k, st in stages.regmean.items()]
    return FIXED_PROCESS_BYTES + STAGE_OVERHEAD_BYTES + max(loads) if loads else 0


def _fit_bytes(pairs, base: OpenedSource, donor: OpenedSource, cfg: MergeConfig) -> int:
    """The alignment fit's statistics at their largest: one group of layer pairs (`align.max_memory`)."""
    from ..maths.ridge import accumulator_bytes, pair_groups

    d_base, d_donor = base.facts.hidden_size, donor.facts.hidden_size
    group = max(len(g) for g in pair_groups(list(pairs), d_base, d_donor, cfg.align.max_memory))
    return group * accumulator_bytes(d_base, d_donor)


def training_memory(stages: StagePlan | None, tensors: list[PlannedTensor]) -> int:
    """Router training holds the merged model in float32 (plus transformers' overhead and activations)."""
    if stages is None or not stages.train_routers:
        return 0
    return FIXED_PROCESS_BYTES + STAGE_OVERHEAD_BYTES + 4 * sum(math.prod(t.shape) for t in tensors)
