"""The output's side of a plan: dtypes, config.json keys, the output folder, and `finish_plan`, which turns
planned tensors into a Plan (FP8 output, shard layout, side files, estimates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..architectures import (
    ARCHITECTURES,
)
from ..config import MergeConfig
from ..io.writer import layout_shards
from .estimates import estimate, stage_memory, training_memory
from .fp8 import as_fp8
from .models import UNION_SIDE_FILES, Plan, PlannedShard, PlannedTensor, retrained
from .opened_sources import OpenedSource, planned_source
from .resolve import simplify
from .sources import tokenizer_files

# Output dtype names (the config's `dtype`) as safetensors codes, and the codes that may be converted.
DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
CONVERTIBLE_CODES = frozenset({"F64", "F32", "F16", "BF16"})


def output_dtype(code: str, role: str | None, keep_fp32_roles: tuple[str, ...], want: str | None) -> str:
    if want is None or code not in CONVERTIBLE_CODES or role in keep_fp32_roles:
        return code
    return DTYPE_CODES[want]


def target_dtype_keys(config: dict[str, Any], want: str | None) -> dict[str, Any]:
    """The output config's dtype keys; a block-FP8 source's `quantization_config` is dropped (its weights are
    read dequantised, and a leftover one makes transformers load the output as FP8)."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if want is None:
        return config
    out = dict(config, dtype=want)
    if "torch_dtype" in out:
        out["torch_dtype"] = want
    return out


def output_path(cfg: MergeConfig, config_dir: Path | None, override: str | Path | None) -> Path:
    """`--output` is taken from the working directory, the config's `output_dir` from the config's folder."""
    if override is not None:
        return Path(override).expanduser().resolve()
    path = Path(cfg.output_dir).expanduser()
    return (path if path.is_absolute() or config_dir is None else config_dir / path).resolve()


def finish_plan(cfg: MergeConfig, config_dir: Path | None, output_dir, *, method: str, base: OpenedSource,
            sources: list[OpenedSource], target: dict[str, Any], tensors: list[PlannedTensor],
            input_bytes: dict[str, int], **extra) -> Plan:
    stages = extra.get("stages")
    if cfg.fp8_output:
        tensors, input_bytes, target = as_fp8(cfg, stages, tensors, input_bytes, target, base.ckpt)
    specs, break_before = [t.spec for t in tensors], None
    if stages is not None and stages.train_routers:
        # what training changes in shards of their own, after the rest: training rewrites only those
        arch = ARCHITECTURES[target["architectures"][0]]
        table = extra.get("expert_table", ())
        trained = [t.spec for t in tensors if retrained(arch, stages, table, t)]
        specs = [t.spec for t in tensors if not retrained(arch, stages, table, t)] + trained
        break_before = len(specs) - len(trained)
    shards = layout_shards(specs, cfg.max_shard_size, break_before=break_before)
    planned = {"base": planned_source(base)}
    planned.update({s.key: planned_source(s) for s in sources if s.key not in planned})
    side_files = {name: "base" for name in tokenizer_files(base.model.path)}
    if extra.get("vocab") is not None:
        from ..vocab.output_files import union_file_names

        side_files = {name: UNION_SIDE_FILES for name in union_file_names(base.model.path)}
    from .sources import custom_code_files  # auto_map's modules: from the base, with or without the union

    side_files |= dict.fromkeys(custom_code_files(base.model.path, target), "base")
    plan = Plan(
        method=method, config=cfg.model_dump(mode="json"), output_dir=str(output_path(cfg, config_dir, output_dir)),
        sources=planned, target_config=target, side_files=side_files,
        tensors=tuple(tensors),
        shards=tuple(PlannedShard(filename=s.filename, tensors=tuple(t.name for t in s.tensors), nbytes=s.nbytes)
                     for s in shards),
        estimates=estimate(tensors, input_bytes,
                             max(stage_memory(extra.get("stages"), {s.key: s for s in (base, *sources)}, cfg),
                                 training_memory(stages, tensors))),
        **extra)
    return simplify(plan) if plan.resolved else plan
