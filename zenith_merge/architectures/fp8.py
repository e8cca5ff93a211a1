"""The block-FP8 form of the families, as DeepSeek-V3 ships it: which weights are stored quantised, and the
`quantization_config` that says so in config.json. `fp8-cast` and the planner's `fp8_output` both read it."""

from __future__ import annotations

from . import classify

# The tensor classes whose 2-D weights DeepSeek-V3 stores as block FP8 (its routers, norms,
# embeddings and head stay in BF16/F32).
QUANTIZED_CLASSES = ("attention", "routed_experts", "shared_experts", "dense_mlp")


def quantization_config(block: tuple[int, int]) -> dict:
    """The `quantization_config` DeepSeek-V3's config.json carries for block FP8."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}


def quantizable(arch, name: str, shape: tuple[int, ...]) -> bool:
    """True for a weight the FP8 form stores quantised: a 2-D projection of attention, an MLP or an expert
    (an MTP layer's included; its eh_proj, class mtp, stays BF16 as in the release unless a source stores it
    as FP8)."""
    tid = classify(arch, name)
    return (tid is not None and tid.tensor_class in QUANTIZED_CLASSES and len(shape) == 2
            and name.endswith(".weight"))
