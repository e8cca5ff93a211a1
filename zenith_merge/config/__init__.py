"""The YAML configs zenith-merge reads: their schemas (`schema`) and loading them from files (`load`)."""

from .load import load_config, parse_config, resolve_path, with_absolute_paths
from .schema import (
    ALL_DEMO_NAMES,
    DEMO_NAMES,
    DEMO_SCHEME,
    FP8_DEMO_NAMES,
    PROMPT_GATE_MODES,
    TENSOR_CLASSES,
    ExpertSource,
    GateMode,
    MergeConfig,
    SearchSettings,
    parse_byte_size,
)

__all__ = ["ALL_DEMO_NAMES", "DEMO_NAMES", "DEMO_SCHEME", "FP8_DEMO_NAMES", "PROMPT_GATE_MODES", "TENSOR_CLASSES", "ExpertSource", "GateMode", "MergeConfig",
           "SearchSettings", "load_config", "parse_byte_size", "parse_config", "resolve_path", "with_absolute_paths"]
