"""fp8_output: which output weights become block FP8, each with its `weight_scale_inv`.
"""

from __future__ import annotations

from typing import Any

from ..architectures import (
    ARCHITECTURES,
)
from ..architectures.fp8 import quantizable, quantization_config
from ..config import MergeConfig
from ..errors import PlanError
from ..io.reader import Checkpoint
from .models import Fp8ScaleRecipe, PlannedTensor, StagePlan


def as_fp8(cfg: MergeConfig, stages: StagePlan | None, tensors: list[PlannedTensor], input_bytes: dict[str, int],
            target: dict[str, Any], base: Checkpoint) -> tuple[list[PlannedTensor], dict[str, int], dict[str, Any]]:
    """fp8_output: the projection weights DeepSeek-V3 stores as block FP8 become F8_E4M3, each followed by
    its float32 `weight_scale_inv`; the output config gets DeepSeek-V3's `quantization_config`. A weight
    outside those classes that the base stores as FP8 (an MTP `eh_proj` quantised as the other projections)
    stays FP8 too: the output keeps the base's storage. The DeepSeek-V3 release stores `eh_proj` in BF16
    (vLLM builds it as an unquantised Linear), and there it stays BF16."""
    from ..kernels.fp8 import DEFAULT_BLOCK, scale_shape

    if stages is not None and stages.train_routers:
        raise PlanError("fp8_output: not with router.train_steps or align.train_steps yet (training reads the "
                        "written merge back); write BF16, then `zenith-merge fp8-cast OUT OUT-fp8 --to fp8`")
    arch = ARCHITECTURES[target["architectures"][0]]
    out, sizes = [], dict(input_bytes)
    for t in tensors:
        if t.recipe.kind == "mla" and t.recipe.part == "kv_a_proj" and t.shape[1] % DEFAULT_BLOCK[0]:
            # the latent's rows hold c * I, c near 1e-5: a block sharing rows with the keys would round c to 0
            raise PlanError(f"fp8_output: {t.name} (MLA from dense models) needs the hidden size "
                            f"({t.shape[1]}) a multiple of the FP8 block ({DEFAULT_BLOCK[0]}); write BF16")
        if not (quantizable(arch, t.name, t.shape) or base.is_fp8(t.name)):
            out.append(t)
            continue
        scale = f"{t.name}_scale_inv"
        out.append(t.model_copy(update={"dtype": "F8_E4M3"}))
        out.append(PlannedTensor(name=scale, dtype="F32", shape=scale_shape(t.shape, DEFAULT_BLOCK),
                                 recipe=Fp8ScaleRecipe(tensor=t.name, via=t.dtype)))
        sizes[scale] = input_bytes.get(t.name, 0)
    return out, sizes, {**target, "quantization_config": quantization_config(DEFAULT_BLOCK)}
