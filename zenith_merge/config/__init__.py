"""The YAML configs zenith-merge reads: their schemas (`schema`) and loading them from files (`load`)."""

from .schema import (
    DEMO_SCHEME,
    PROMPT_GATE_MODES,
    TENSOR_CLASSES,
    ExpertSource,
    GateMode,
    MergeConfig,
    SearchSettings,
    load_config,
    parse_byte_size,
    parse_config,
    resolve_path,
    with_absolute_paths,
)

__all__ = ["DEMO_SCHEME", "PROMPT_GATE_MODES", "TENSOR_CLASSES", "ExpertSource", "GateMode", "MergeConfig",
           "SearchSettings", "load_config", "parse_byte_size", "parse_config", "resolve_path", "with_absolute_paths"]
