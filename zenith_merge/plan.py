"""Config -> Plan: a pure, serialisable description of the output checkpoint.

The plan reads only configs and safetensors headers, never weights. It fixes the
target config, every output tensor (name, dtype, shape) with the recipe that
produces it, and the shard layout, so `zenith-merge plan` can show the whole job
with its memory and disk needs before anything heavy runs, and the writer can lay
out each shard's header before the first tensor is computed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .architectures import architecture_of, classify, facts
from .config import MergeConfig
from .errors import PlanError
from .io.reader import Checkpoint
from .io.writer import ShardSpec, TensorSpec, layout_shards
from .sources import SourceModel, fingerprint, resolve_model, tokenizer_files

PLAN_FORMAT_VERSION = 1
PLAN_FILE = ".zenith/plan.json"

# Output dtype names (the config's `dtype`) as safetensors codes, and the codes that may be converted.
DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
CONVERTIBLE_CODES = frozenset({"F64", "F32", "F16", "BF16"})
# What the interpreter, torch and transformers occupy before any tensor is read (measured: ~220 MB for torch).
FIXED_PROCESS_BYTES = 400 * 2**20


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CopyRecipe(_Frozen):
    """Copy a source tensor, converting its dtype only when the output dtype differs."""

    kind: Literal["copy"] = "copy"
    source: str
    tensor: str


Recipe = Annotated[CopyRecipe, Field(discriminator="kind")]


class PlannedTensor(_Frozen):
    """One output tensor: what it is and how to make it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    recipe: Recipe

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)


class PlannedSource(_Frozen):
    """A source model as the plan saw it: reference, folder, architecture and fingerprint."""

    ref: str
    path: str
    architecture: str
    fingerprint: str


class PlannedShard(_Frozen):
    filename: str
    tensors: tuple[str, ...]
    nbytes: int


class Estimates(_Frozen):
    """Sizes the user should know before a long run."""

    tensor_count: int
    total_bytes: int
    largest_tensor: str
    largest_tensor_bytes: int
    peak_memory_bytes: int = Field(description="interpreter + the largest tensor's inputs and output")


class Plan(_Frozen):
    """The full output description. `plan_id` identifies it for resume."""

    format_version: int = PLAN_FORMAT_VERSION
    method: Literal["passthrough"]
    config: dict[str, Any]
    output_dir: str
    sources: dict[str, PlannedSource]
    target_config: dict[str, Any]
    side_files: dict[str, str] = Field(description="output file name -> source key it is copied from")
    tensors: tuple[PlannedTensor, ...]
    shards: tuple[PlannedShard, ...]
    estimates: Estimates

    @property
    def plan_id(self) -> str:
        """sha256 of everything that determines the output bytes (not where they are written)."""
        payload = self.model_dump(mode="json", exclude={"output_dir", "estimates"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def shard_specs(self) -> list[ShardSpec]:
        """The shard layout in the writer's terms."""
        by_name = {t.name: t.spec for t in self.tensors}
        return [ShardSpec(s.filename, tuple(by_name[n] for n in s.tensors)) for s in self.shards]

    def save(self, out_dir: Path) -> Path:
        """Write the plan to `<out>/.zenith/plan.json` atomically."""
        path = out_dir / PLAN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.model_dump_json(indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, out_dir: Path) -> Plan:
        """Read `<out>/.zenith/plan.json`."""
        path = Path(out_dir) / PLAN_FILE
        if not path.is_file():
            raise PlanError(f"{path}: no plan here; is {out_dir} a zenith-merge output folder?")
        return cls.model_validate_json(path.read_text())


def _output_dtype(code: str, role: str | None, keep_fp32_roles: tuple[str, ...], want: str | None) -> str:
    if want is None or code not in CONVERTIBLE_CODES or role in keep_fp32_roles:
        return code
    return DTYPE_CODES[want]


def _target_dtype_keys(config: dict[str, Any], want: str | None) -> dict[str, Any]:
    if want is None:
        return config
    out = dict(config, dtype=want)
    if "torch_dtype" in out:
        out["torch_dtype"] = want
    return out


def _output_path(cfg: MergeConfig, config_dir: Path | None, override: str | Path | None) -> Path:
    """`--output` is taken from the working directory, the config's `output_dir` from the config's folder."""
    if override is not None:
        return Path(override).expanduser().resolve()
    path = Path(cfg.output_dir).expanduser()
    return (path if path.is_absolute() or config_dir is None else config_dir / path).resolve()


def _reject_unsupported(cfg: MergeConfig, base: SourceModel, config_dir: Path | None) -> None:
    """Refuse what this version cannot plan yet, naming the key, instead of producing a wrong output."""
    for i, expert in enumerate(cfg.experts):
        if resolve_model(expert.source_model, config_dir, build_demo=False).path != base.path:
            raise PlanError(
                f"experts.{i}.source_model: grafting experts from another model ({expert.source_model}) is not "
                f"supported yet; this version merges the base's own experts only (passthrough)"
            )
    for i, shared in enumerate(cfg.shared_experts or []):
        if resolve_model(shared.source_model, config_dir, build_demo=False).path != base.path:
            raise PlanError(f"shared_experts.{i}.source_model: shared experts from another model are not supported yet")
    tok = cfg.tokenizer
    if tok is not None and tok.source not in ("union", "base"):
        if resolve_model(tok.source, config_dir, build_demo=False).path != base.path:
            raise PlanError("tokenizer.source: a tokenizer from another model is not supported yet")


def build_plan(cfg: MergeConfig, *, config_dir: Path | None = None, output_dir: str | Path | None = None) -> Plan:
    """Plan the merge that `cfg` describes, reading only configs and headers."""
    base = resolve_model(cfg.base_model, config_dir)
    _reject_unsupported(cfg, base, config_dir)
    ckpt = Checkpoint.open(base.path, allow_pickle=cfg.allow_pickle)
    arch = architecture_of(ckpt.config, where=str(base.path / "config.json"))
    base_facts = facts(ckpt.config, where=str(base.path / "config.json"))
    if cfg.architecture is not None and cfg.architecture != arch.name:
        raise PlanError(
            f"architecture: {cfg.architecture} differs from the base's {arch.name}; converting the base's "
            f"architecture is not supported"
        )

    tensors = []
    for name in ckpt.names():
        info = ckpt.info(name)
        tid = classify(arch, name)
        dtype = _output_dtype(info.dtype, tid.role if tid else None, arch.keep_fp32_roles, cfg.dtype)
        tensors.append(PlannedTensor(name=name, dtype=dtype, shape=info.shape, recipe=CopyRecipe(source="base", tensor=name)))
    ckpt.close()

    target = _target_dtype_keys(dict(ckpt.config), cfg.dtype)
    if cfg.experts_per_token is not None and base_facts.is_moe:
        if cfg.experts_per_token > base_facts.n_routed_experts:
            raise PlanError(
                f"experts_per_token: {cfg.experts_per_token} is more than the {base_facts.n_routed_experts} "
                f"routed experts of {cfg.base_model}"
            )
        target[arch.dims["top_k"][0]] = cfg.experts_per_token

    specs = [t.spec for t in tensors]
    shards = layout_shards(specs, cfg.max_shard_size)
    largest = max(tensors, key=lambda t: t.spec.nbytes)
    source_bytes = {t.name: ckpt.info(t.name).nbytes for t in tensors}
    peak = FIXED_PROCESS_BYTES + max(t.spec.nbytes + source_bytes[t.name] for t in tensors)
    return Plan(
        method="passthrough",
        config=cfg.model_dump(mode="json"),
        output_dir=str(_output_path(cfg, config_dir, output_dir)),
        sources={"base": PlannedSource(ref=base.ref, path=str(base.path), architecture=arch.name,
                                       fingerprint=fingerprint(base.path))},
        target_config=target,
        side_files={name: "base" for name in tokenizer_files(base.path)},
        tensors=tuple(tensors),
        shards=tuple(PlannedShard(filename=s.filename, tensors=tuple(t.name for t in s.tensors), nbytes=s.nbytes)
                     for s in shards),
        estimates=Estimates(tensor_count=len(tensors), total_bytes=sum(s.nbytes for s in specs),
                            largest_tensor=largest.name, largest_tensor_bytes=largest.spec.nbytes,
                            peak_memory_bytes=peak),
    )
