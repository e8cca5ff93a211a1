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
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..architectures import (
    ARCHITECTURES,
    Architecture,
    ModelFacts,
    architecture_of,
    classify,
    expected_shape,
    extra_layer_indices,
    facts,
    set_dim,
    tensor_name,
)
from ..config import PROMPT_GATE_MODES, ExpertSource, MergeConfig
from ..errors import PlanError
from ..io.reader import Checkpoint
from ..io.writer import ShardSpec, TensorSpec, layout_shards
from ..maths.routing import RoutingSpec, routing_spec
from .experts import SourceSlots, candidate_layers, compensation, map_layers, routing_groups
from .sources import SourceModel, fingerprint, resolve_model, tokenizer_files
from .vocab import VocabPlan, plan_vocab

PLAN_FORMAT_VERSION = 1
PLAN_FILE = ".zenith/plan.json"
# `Plan.side_files` value of files the tokenizer stage writes (the union tokenizer), not copied from a source.
UNION_SIDE_FILES = "union"

# Output dtype names (the config's `dtype`) as safetensors codes, and the codes that may be converted.
DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
CONVERTIBLE_CODES = frozenset({"F64", "F32", "F16", "BF16"})
# What the interpreter, torch and transformers occupy before any tensor is read (measured: ~220 MB for torch).
FIXED_PROCESS_BYTES = 400 * 2**20
# What a stage's forward passes add on top: transformers' modules and CPU kernel caches (oneDNN keeps
# compiled kernels per input shape; measured up to ~550 MiB on bf16 alignment passes of the demo models).
STAGE_OVERHEAD_BYTES = 512 * 2**20


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CopyRecipe(_Frozen):
    """Copy a source tensor, converting its dtype only when the output dtype differs.

    `pad_to` (the output shape) pads with zeros: a smaller intermediate dimension grown to the
    output's, which leaves a SiLU-gated FFN's function unchanged (zero rows of gate/up give
    silu(0) * 0 = 0, zero columns of down add nothing).
    """

    kind: Literal["copy"] = "copy"
    source: str
    tensor: str
    pad: bool = False


class ExpertRecipe(_Frozen):
    """One projection of the expert in output slot `slot` of `layer`, from the plan's expert table.

    gate' = pad(gate . A), up' = pad(up . A), down' = pad(c * B . down): A maps the base's
    normalised MoE input into the source's, B the source's residual stream back into the
    base's (identity where widths agree), c is the slot's scale compensation.
    """

    kind: Literal["expert"] = "expert"
    layer: int
    slot: int
    proj: Literal["gate", "up", "down"]


class RouterRecipe(_Frozen):
    """The router of output `layer` (its weight rows or its score-correction bias), one row per slot."""

    kind: Literal["router"] = "router"
    layer: int
    part: Literal["weight", "bias"]


class AssembleRecipe(_Frozen):
    """W = sum_i w_i W_i / sum_i w_i over same-family parents, or the base's tensor where no parent
    differs from it by more than `threshold` in normalised Frobenius norm."""

    kind: Literal["assemble"] = "assemble"
    tensor: str
    tensor_class: str
    sources: tuple[str, ...]
    weights: tuple[float, ...]
    threshold: float
    regmean: bool = Field(False, description="a linear weight merged by RegMean from the sources' saved Gram "
                                             "matrices (assembly.regmean) instead of interpolated")
    off_diagonal: float = 1.0
    ridge: float = 0.0


class VocabRecipe(_Frozen):
    """The embedding (`embed`) or lm_head (`head`) of the union vocabulary, row by row from the token map:
    base rows copied, shared tokens SLERPed toward the mapped donor row, donor-only tokens transferred.
    `tensor`: the base's tensor whose rows are taken, where not the model's own (an MTP layer's embedding
    or head)."""

    kind: Literal["vocab"] = "vocab"
    part: Literal["embed", "head"]
    tensor: str | None = None


class Fp8ScaleRecipe(_Frozen):
    """The block scales (`weight_scale_inv`) of output weight `tensor`, written as block FP8 (fp8_output):
    amax / 448 per block of the tensor its own recipe makes."""

    kind: Literal["fp8_scale"] = "fp8_scale"
    tensor: str
    via: str = Field(description="the dtype the tensor would have had, rounded to before quantising (so the "
                                 "output equals `fp8-cast --to fp8` of the merge written without fp8_output)")


Recipe = Annotated[CopyRecipe | ExpertRecipe | RouterRecipe | AssembleRecipe | VocabRecipe | Fp8ScaleRecipe,
                   Field(discriminator="kind")]


class ExpertSlot(_Frozen):
    """What fills one output expert slot: a source's routed expert, its dense MLP, or its shared expert."""

    source: str
    source_layer: int
    kind: Literal["routed", "dense_mlp", "shared"] = "routed"
    expert: int | None = Field(None, description="the source's expert index; None until usage picks it")
    rank: int | None = Field(None, description="picked as the source's rank-th most used expert (keep: N)")
    scale: float | None = Field(None, description="scale compensation c on down; None until measured")


class LayerExperts(_Frozen):
    """The experts of one output MoE layer, slot by slot.

    An extra layer (DeepSeek-V3's MTP module, past num_hidden_layers) follows the last MoE layer: the base's
    slots hold the extra layer's own experts, the other sources' slots the same experts as in the last
    layer, and `like` names that layer, whose alignment maps, prompt vectors and selection offsets its
    grafted slots and router rows take (no forward pass runs an MTP layer to compute its own).
    """

    layer: int
    slots: tuple[ExpertSlot, ...]
    like: int | None = None

    @property
    def stage_layer(self) -> int:
        """The layer whose stage artefacts (maps, prompt vectors, offsets) this layer's slots use."""
        return self.layer if self.like is None else self.like


class SourceTransform(_Frozen):
    """How a source's experts reach the output's hidden space, and how its router weighs them."""

    align: Literal["none", "identity", "fit"] = Field(description="none: the base's own experts")
    routing: dict[str, Any] = Field(description="the source's RoutingSpec (scoring, top_k, normalisation, ...)")
    prompts: tuple[str, ...] = Field((), description="the source's positive prompts (expert usage, router rows)")
    negative_prompts: tuple[str, ...] = Field((), description="the source's negative prompts (router rows)")
    random_experts: bool = Field(False, description="a control: the source's experts replaced by random weights of "
                                                    "the same norm")
    noise_scale: float | None = Field(None, description="mergekit's noise_scale: std of Gaussian noise added to "
                                                        "the source's expert weights (seeded)")


class RegMeanStage(_Frozen):
    """One parent's RegMean statistics: which weights, on which text (config items), with how many tokens."""

    tensors: tuple[str, ...]
    data: tuple[str, ...]
    max_tokens: int
    max_memory: int | None = None
    matrices: int = Field(0, description="distinct Gram matrices (weights reading one input share one)")
    passes: int = Field(1, description="passes over the text: groups of matrices that fit in max_memory")
    sum_bytes: int = Field(0, description="float64 sums of the largest group, held during its pass")


class StagePlan(_Frozen):
    """The small computations a merge needs before writing, with their inputs."""

    usage: dict[str, tuple[int, ...]] = Field(default_factory=dict,
                                              description="source -> layers whose expert usage is counted")
    align: dict[str, tuple[tuple[int, int], ...]] = Field(
        default_factory=dict, description="source -> (base layer, source layer) pairs to fit A and B for")
    prompt_vectors: tuple[str, ...] = Field((), description="sources whose router rows start from their prompts' "
                                                            "direction in the base's MoE input (gate_mode hidden...)")
    router_offsets: tuple[str, ...] = Field((), description="sources whose selection bias is calibrated on the "
                                                            "sources' prompts (router.calibrate)")
    train_routers: int = Field(0, description="training steps once the merge is written: router.train_steps, or "
                                              "align.train_steps when maps train (the routers train with them)")
    train_maps: tuple[str, ...] = Field((), description="sources whose maps A and B train (align.train_steps)")
    regmean: dict[str, RegMeanStage] = Field(default_factory=dict, description="source -> the linear weights whose "
                                                                                "input Gram matrices it computes")

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
    stage_memory_bytes: int = Field(0, description="the stages' forward passes: the models loaded together, in "
                                                   "float32 on CPU, unless offloaded (0: no stage)")


class Plan(_Frozen):
    """The full output description. `plan_id` identifies it for resume.

    A plan whose expert table still has open slots (experts picked by usage, scales measured)
    is completed by `resolve` once the stages have run; only a resolved plan is written.
    """

    format_version: int = PLAN_FORMAT_VERSION
    method: Literal["passthrough", "concat", "assembly"]
    config: dict[str, Any]
    output_dir: str
    sources: dict[str, PlannedSource]
    target_config: dict[str, Any]
    side_files: dict[str, str] = Field(description="output file name -> source key it is copied from")
    layer_map: dict[str, dict[int, int]] = Field(default_factory=dict,
                                                 description="source -> {output layer: source layer}")
    expert_table: tuple[LayerExperts, ...] = ()
    transforms: dict[str, SourceTransform] = Field(default_factory=dict)
    stages: StagePlan = Field(default_factory=StagePlan)
    artefacts: dict[str, str] = Field(default_factory=dict, description="stage artefact -> sha256 (when resolved)")
    vocab: VocabPlan | None = Field(None, description="the union vocabulary (tokenizer.source: union)")
    tensors: tuple[PlannedTensor, ...]
    shards: tuple[PlannedShard, ...]
    estimates: Estimates

    @property
    def resolved(self) -> bool:
        """True when every slot names its expert and scale, so every recipe can run."""
        return all((s.expert is not None or s.kind != "routed") and s.scale is not None
                   for le in self.expert_table for s in le.slots)

    @property
    def needs_stages(self) -> bool:
        """True when stages must run (or their saved artefacts be checked) before writing."""
        st = self.stages
        return (not self.resolved or bool(st.align) or bool(st.prompt_vectors) or bool(st.router_offsets)
                or bool(st.regmean) or self.vocab is not None)

    def layer_experts(self, layer: int) -> LayerExperts:
        """The expert table's row of output `layer`."""
        for le in self.expert_table:
            if le.layer == layer:
                return le
        raise KeyError(f"layer {layer} is not an MoE layer of the plan")

    def slot(self, layer: int, slot: int) -> ExpertSlot:
        """The expert table's entry for output `layer`, `slot`."""
        return self.layer_experts(layer).slots[slot]

    @property
    def retrained_shards(self) -> tuple[str, ...]:
        """The shards training rewrites: those holding the routers and the experts whose maps train (last)."""
        if not self.stages.train_routers:
            return ()
        arch = ARCHITECTURES[self.target_config["architectures"][0]]
        changed = {t.name for t in self.tensors if retrained(arch, self.stages, self.expert_table, t)}
        return tuple(s.filename for s in self.shards if changed.intersection(s.tensors))

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


def retrained(arch: Architecture, stages: StagePlan, table, t: PlannedTensor) -> bool:
    """True for a tensor that training after the first write changes: a router tensor, or an expert
    tensor of a source whose maps train (`table`: the plan's expert table)."""
    if is_router(arch, t.name):
        return True
    r = t.recipe
    if stages.train_maps and isinstance(r, ExpertRecipe):
        return next(le for le in table if le.layer == r.layer).slots[r.slot].source in stages.train_maps
    return False


def is_router(arch: Architecture, name: str) -> bool:
    """True for a router tensor (weight rows or selection bias) of `arch`: what router training changes."""
    tid = classify(arch, name)
    return tid is not None and tid.role in ("router", "router_bias")


# Roles the planner generates per MoE layer instead of copying (experts by slot, router by row).
_EXPERT_ROLES = {"gate": "expert_gate", "up": "expert_up", "down": "expert_down"}
_DENSE_ROLES = {"gate": "mlp_gate", "up": "mlp_up", "down": "mlp_down"}
_SHARED_ROLES = {"gate": "shared_gate", "up": "shared_up", "down": "shared_down"}
SLOT_ROLES = {"routed": _EXPERT_ROLES, "dense_mlp": _DENSE_ROLES, "shared": _SHARED_ROLES}
_GENERATED_CLASSES = ("routed_experts", "router")


@dataclass
class _Source:
    """A source while planning: where it is, what it is, and the open checkpoint's headers."""

    key: str
    model: SourceModel
    ckpt: Checkpoint
    arch: Architecture
    facts: ModelFacts
    entry: ExpertSource | None = None
    index: int | None = None

    @property
    def where(self) -> str:
        return f"experts.{self.index}.source_model ({self.model.ref})" if self.index is not None else "base_model"


def _source_layers(s: _Source, moe_layers: Sequence[int], base_depth: int) -> dict[int, int]:
    """Output MoE layer -> the source layer its experts come from: `experts[].layers` where given, else by
    relative depth (`map_layers`)."""
    candidates = candidate_layers(s.facts)
    out = map_layers(moe_layers, base_depth, candidates, s.facts.num_layers)
    for layer, source_layer in (s.entry.layers if s.entry is not None else {}).items():
        if layer not in out:
            raise PlanError(f"experts.{s.index}.layers.{layer}: the output's MoE layers are {list(moe_layers)}")
        if source_layer not in candidates:
            raise PlanError(f"experts.{s.index}.layers.{layer}: {s.entry.source_model} has no layer {source_layer} "
                            f"to take experts from; its {'MoE ' if s.facts.is_moe else ''}layers are {list(candidates)}")
        out[layer] = source_layer
    return out


def _open_source(key: str, model: SourceModel, cfg: MergeConfig, entry=None, index=None) -> _Source:
    ckpt = Checkpoint.open(model.path, allow_pickle=cfg.allow_pickle)
    where = str(model.path / "config.json")
    return _Source(key, model, ckpt, architecture_of(ckpt.config, where=where), facts(ckpt.config, where=where),
                   entry, index)


def _reject_unsupported(cfg: MergeConfig, base: SourceModel, config_dir: Path | None) -> None:
    """Refuse what this version cannot plan yet, naming the key, instead of producing a wrong output."""
    for i, shared in enumerate(cfg.shared_experts or []):
        if shared.noise_scale is not None or shared.residual_scale is not None:
            raise PlanError(f"shared_experts.{i}: noise_scale / residual_scale apply to experts[] entries; the "
                            f"output keeps the base's shared expert as it is")
        if resolve_model(shared.source_model, config_dir, build_demo=False).path != base.path:
            raise PlanError(f"shared_experts.{i}.source_model: the output keeps the base's shared expert; a donor's "
                            f"shared expert joins as a routed expert with experts[].shared_expert: routed")


def _sources(cfg: MergeConfig, base: _Source, config_dir: Path | None) -> list[_Source]:
    """One `_Source` per `experts[]` entry; the base listed among them means its own experts."""
    out: list[_Source] = []
    seen: dict[Path, int] = {}
    for i, entry in enumerate(cfg.experts):
        model = resolve_model(entry.source_model, config_dir)
        if model.path in seen:
            raise PlanError(f"experts.{i}.source_model: {entry.source_model} is already experts.{seen[model.path]}; "
                            f"list each model once (keep: N chooses how many of its experts join)")
        seen[model.path] = i
        if model.path == base.model.path:
            out.append(_Source("base", base.model, base.ckpt, base.arch, base.facts, entry, i))
        else:
            out.append(_open_source(f"donor{i}", model, cfg, entry, i))
    return out


def _output_dtype(code: str, role: str | None, keep_fp32_roles: tuple[str, ...], want: str | None) -> str:
    if want is None or code not in CONVERTIBLE_CODES or role in keep_fp32_roles:
        return code
    return DTYPE_CODES[want]


def _as_fp8(cfg: MergeConfig, stages: StagePlan | None, tensors: list[PlannedTensor], input_bytes: dict[str, int],
            target: dict[str, Any], base: Checkpoint) -> tuple[list[PlannedTensor], dict[str, int], dict[str, Any]]:
    """fp8_output: the projection weights DeepSeek-V3 stores as block FP8 become F8_E4M3, each followed by
    its float32 `weight_scale_inv`; the output config gets DeepSeek-V3's `quantization_config`. A weight
    outside those classes that the base stores as FP8 (an MTP `eh_proj` quantised as the other projections)
    stays FP8 too: the output keeps the base's storage. The DeepSeek-V3 release stores `eh_proj` in BF16
    (vLLM builds it as an unquantised Linear), and there it stays BF16."""
    from ..fp8_cast import quantizable, quantization_config
    from ..kernels.fp8 import DEFAULT_BLOCK, scale_shape

    if stages is not None and stages.train_routers:
        raise PlanError("fp8_output: not with router.train_steps or align.train_steps yet (training reads the "
                        "written merge back); write BF16, then `zenith-merge fp8-cast OUT OUT-fp8 --to fp8`")
    arch = ARCHITECTURES[target["architectures"][0]]
    out, sizes = [], dict(input_bytes)
    for t in tensors:
        if not (quantizable(arch, t.name, t.shape) or base.is_fp8(t.name)):
            out.append(t)
            continue
        scale = f"{t.name}_scale_inv"
        out.append(t.model_copy(update={"dtype": "F8_E4M3"}))
        out.append(PlannedTensor(name=scale, dtype="F32", shape=scale_shape(t.shape, DEFAULT_BLOCK),
                                 recipe=Fp8ScaleRecipe(tensor=t.name, via=t.dtype)))
        sizes[scale] = input_bytes.get(t.name, 0)
    return out, sizes, {**target, "quantization_config": quantization_config(DEFAULT_BLOCK)}


def _target_dtype_keys(config: dict[str, Any], want: str | None) -> dict[str, Any]:
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


def _planned_source(src: _Source) -> PlannedSource:
    return PlannedSource(ref=src.model.ref, path=str(src.model.path), architecture=src.arch.name,
                         fingerprint=fingerprint(src.model.path))


def _estimates(tensors: list[PlannedTensor], input_bytes: dict[str, int], stage_bytes: int) -> Estimates:
    specs = [t.spec for t in tensors]
    largest = max(tensors, key=lambda t: t.spec.nbytes)
    peak = FIXED_PROCESS_BYTES + max(t.spec.nbytes + input_bytes[t.name] for t in tensors)
    return Estimates(tensor_count=len(tensors), total_bytes=sum(s.nbytes for s in specs),
                     largest_tensor=largest.name, largest_tensor_bytes=largest.spec.nbytes, peak_memory_bytes=peak,
                     stage_memory_bytes=stage_bytes)


def _finish(cfg: MergeConfig, config_dir: Path | None, output_dir, *, method: str, base: _Source,
            sources: list[_Source], target: dict[str, Any], tensors: list[PlannedTensor],
            input_bytes: dict[str, int], **extra) -> Plan:
    stages = extra.get("stages")
    if cfg.fp8_output:
        tensors, input_bytes, target = _as_fp8(cfg, stages, tensors, input_bytes, target, base.ckpt)
    specs, break_before = [t.spec for t in tensors], None
    if stages is not None and stages.train_routers:
        # what training changes in shards of their own, after the rest: training rewrites only those
        arch = ARCHITECTURES[target["architectures"][0]]
        table = extra.get("expert_table", ())
        trained = [t.spec for t in tensors if retrained(arch, stages, table, t)]
        specs = [t.spec for t in tensors if not retrained(arch, stages, table, t)] + trained
        break_before = len(specs) - len(trained)
    shards = layout_shards(specs, cfg.max_shard_size, break_before=break_before)
    planned = {"base": _planned_source(base)}
    planned.update({s.key: _planned_source(s) for s in sources if s.key not in planned})
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
        estimates=_estimates(tensors, input_bytes,
                             max(_stage_memory(extra.get("stages"), {s.key: s for s in (base, *sources)}, cfg),
                                 _training_memory(stages, tensors))),
        **extra)
    return simplify(plan) if plan.resolved else plan


def _stage_memory(stages: StagePlan | None, sources: dict[str, _Source], cfg: MergeConfig) -> int:
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


def _fit_bytes(pairs, base: _Source, donor: _Source, cfg: MergeConfig) -> int:
    """The alignment fit's statistics at their largest: one group of layer pairs (`align.max_memory`)."""
    from ..maths.ridge import accumulator_bytes, pair_groups

    d_base, d_donor = base.facts.hidden_size, donor.facts.hidden_size
    group = max(len(g) for g in pair_groups(list(pairs), d_base, d_donor, cfg.align.max_memory))
    return group * accumulator_bytes(d_base, d_donor)


def _training_memory(stages: StagePlan | None, tensors: list[PlannedTensor]) -> int:
    """Router training holds the merged model in float32 (plus transformers' overhead and activations)."""
    if stages is None or not stages.train_routers:
        return 0
    return FIXED_PROCESS_BYTES + STAGE_OVERHEAD_BYTES + 4 * sum(math.prod(t.shape) for t in tensors)


def _output_architecture(cfg: MergeConfig, base: _Source, sources: list[_Source]) -> Architecture:
    """The base's architecture, or the MoE twin of a dense base (asked for, or implied by dense donors)."""
    wanted = cfg.architecture
    if wanted is None and not base.facts.is_moe and base.arch.moe_counterpart \
            and any(s.key != "base" for s in sources):
        wanted = base.arch.moe_counterpart  # as mergekit-moe does: dense sources make their MoE twin
    if wanted is None or wanted == base.arch.name:
        return base.arch
    if wanted != base.arch.moe_counterpart or cfg.merge_method != "concat":
        twin = f" (its MoE twin {base.arch.moe_counterpart} can be built with merge_method: concat)" \
            if base.arch.moe_counterpart else ""
        raise PlanError(f"architecture: {wanted} differs from the base's {base.arch.name}; the output keeps the "
                        f"base's architecture (attention, norms, embeddings){twin}")
    return ARCHITECTURES[wanted]


def build_plan(cfg: MergeConfig, *, config_dir: Path | None = None, output_dir: str | Path | None = None) -> Plan:
    """Plan the merge that `cfg` describes, reading only configs and headers."""
    base_model = resolve_model(cfg.base_model, config_dir)
    _reject_unsupported(cfg, base_model, config_dir)
    base = _open_source("base", base_model, cfg)
    try:
        sources = _sources(cfg, base, config_dir)
        try:
            out_arch = _output_architecture(cfg, base, sources)
            if cfg.merge_method == "assembly":
                from .assembly import plan_assembly

                return plan_assembly(cfg, config_dir, output_dir, base, sources)
            return _plan_concat(cfg, config_dir, output_dir, base, sources, out_arch)
        finally:
            for s in sources:
                if s.ckpt is not base.ckpt:
                    s.ckpt.close()
    finally:
        base.ckpt.close()


def _copy_tensor(base: _Source, name: str, cfg: MergeConfig, target: dict[str, Any]) -> PlannedTensor:
    info = base.ckpt.info(name)
    tid = classify(base.arch, name)
    dtype = _output_dtype(info.dtype, tid.role if tid else None, base.arch.keep_fp32_roles, cfg.dtype)
    shape = expected_shape(target, name) or info.shape
    return PlannedTensor(name=name, dtype=dtype, shape=shape,
                         recipe=CopyRecipe(source="base", tensor=name, pad=shape != info.shape))


def _slots_of(src: _Source) -> SourceSlots:
    """How many experts per layer one `experts[]` entry gives, with its errors named by key."""
    f, entry, i = src.facts, src.entry, src.index
    if not f.is_moe and not (src.arch.roles.get("mlp_gate") and f.intermediate_size):
        raise PlanError(f"{src.where}: has no MoE layers and no MLP to take an expert from")
    keep = None if entry.keep == "all" else entry.keep
    shared = entry.shared_expert == "routed"
    if shared and not f.n_shared_experts:
        raise PlanError(f"experts.{i}.shared_expert: routed, but {entry.source_model} has no shared expert")
    if shared and src.key == "base":
        raise PlanError(f"experts.{i}.shared_expert: the base keeps its own shared expert; 'routed' is for donors")
    if not f.is_moe:
        if keep not in (None, 1):
            raise PlanError(f"experts.{i}.keep: {keep}, but {entry.source_model} is dense: its MLP is one expert")
        return SourceSlots(src.key, routed=0, dense_mlp=True, shared_as_routed=False)
    if keep is not None and keep > f.n_routed_experts:
        raise PlanError(f"experts.{i}.keep: {keep} is more than the {f.n_routed_experts} routed experts per layer "
                        f"of {entry.source_model}")
    return SourceSlots(src.key, routed=keep or f.n_routed_experts, dense_mlp=False, shared_as_routed=shared)


def _align_mode(cfg: MergeConfig, src: _Source, base: _Source) -> str:
    if src.key == "base":
        return "none"
    same_width = src.facts.hidden_size == base.facts.hidden_size
    if cfg.align.mode == "identity" and not same_width:
        raise PlanError(f"align.mode: identity, but {src.where} has hidden size {src.facts.hidden_size} and the "
                        f"base {base.facts.hidden_size}; use align.mode: fit (or auto)")
    if cfg.align.mode == "fit" or not same_width:
        return "fit"
    return "identity"


def _check_gate_mode(cfg: MergeConfig, src: _Source, slots: SourceSlots) -> None:
    if src.key == "base" and not slots.dense_mlp:
        return  # the base's own experts keep the base's router rows
    if cfg.gate_mode == "transfer" and (slots.dense_mlp or slots.shared_as_routed):
        what = "a dense MLP" if slots.dense_mlp else "a shared expert"
        raise PlanError(f"gate_mode: transfer needs the source's router rows, but {src.where} gives {what}, "
                        f"which no router picks; use gate_mode: random")


def _plan_concat(cfg, config_dir, output_dir, base: _Source, sources: list[_Source], arch: Architecture) -> Plan:
    """Experts side by side: the base's body, the listed sources' experts in `experts[]` order.

    `arch` is the output's architecture: the base's, or the MoE twin of a dense base (whose
    MLPs then become routed experts, as mergekit-moe does).
    """
    bf = base.facts
    converting = arch.name != base.arch.name
    donors = [s for s in sources if s.key != "base"]
    base_entry = next((s for s in sources if s.key == "base"), None)
    selecting = any(s.entry.keep != "all" for s in sources)
    if donors and not bf.is_moe and not converting:  # a dense base with an MoE twin is converted (see above)
        raise PlanError(f"base_model: {cfg.base_model} is dense ({base.arch.name}); an MoE base is needed")
    top_k = cfg.experts_per_token or bf.experts_per_token or 2
    perturbing = base_entry is not None and bool(base_entry.entry.random_experts or base_entry.entry.noise_scale)
    if not donors and not selecting and not converting and not perturbing:  # the base alone: a bit-identical rewrite
        target = _target_dtype_keys(dict(base.ckpt.config), cfg.dtype)
        if cfg.experts_per_token is not None and bf.is_moe:
            if top_k > bf.n_routed_experts:
                raise PlanError(f"experts_per_token: {top_k} is more than the {bf.n_routed_experts} routed experts "
                                f"of {cfg.base_model}")
            set_dim(target, arch, "top_k", top_k)
        tensors = [_copy_tensor(base, n, cfg, target) for n in base.ckpt.names()]
        return _finish(cfg, config_dir, output_dir, method="passthrough", base=base, sources=sources, target=target,
                       tensors=tensors, input_bytes={t.name: base.ckpt.info(t.name).nbytes for t in tensors})

    slots = [_slots_of(s) for s in sources]
    for s, sl in zip(sources, slots):
        _check_gate_mode(cfg, s, sl)
    total = sum(sl.count for sl in slots)
    if top_k > total:
        raise PlanError(f"experts_per_token: {top_k} is more than the {total} experts the output has per layer")
    base_routing = routing_spec(base.ckpt.config)
    n_group, topk_group = routing_groups(base_routing, slots, top_k, base_included=base_entry is not None)

    # the output's expert size is the largest source's; smaller experts are padded with zeros
    def inter(src: _Source, sl: SourceSlots) -> int:
        f = src.facts
        sizes = [f.moe_intermediate_size] if sl.routed else []
        sizes += [f.intermediate_size] if sl.dense_mlp else []
        sizes += [f.moe_intermediate_size * f.n_shared_experts] if sl.shared_as_routed else []
        return max(sizes)

    moe_inter = max([bf.moe_intermediate_size or 0] + [inter(s, sl) for s, sl in zip(sources, slots)])
    target = _target_dtype_keys(dict(base.ckpt.config), cfg.dtype)
    if converting:
        target.update(architectures=[arch.name], model_type=arch.model_type, **arch.from_dense_config)
    set_dim(target, arch, "n_experts", total)
    set_dim(target, arch, "top_k", top_k)
    set_dim(target, arch, "moe_inter", moe_inter)
    if "n_group" in arch.routing_keys:
        target[arch.routing_keys["n_group"]] = n_group
        target[arch.routing_keys["topk_group"]] = topk_group
    vocab = _vocab_plan(cfg, config_dir, base, sources)
    if vocab is not None:
        set_dim(target, arch, "vocab", vocab.padded_size)
    out_routing = routing_spec(target)
    moe_layers = facts(target).moe_layers

    layer_map = {s.key: _source_layers(s, moe_layers, bf.num_layers) if s.key != "base"
                 else {layer: layer for layer in moe_layers} for s in sources}
    transforms, usage = {}, {}
    for s, sl in zip(sources, slots):
        spec = routing_spec(s.ckpt.config)
        transforms[s.key] = SourceTransform(align=_align_mode(cfg, s, base), routing=asdict(spec),
                                            prompts=tuple(s.entry.positive_prompts),
                                            negative_prompts=tuple(s.entry.negative_prompts),
                                            noise_scale=s.entry.noise_scale or None,
                                            random_experts=s.entry.random_experts)
        needs_measure = (sl.routed and s.key != "base" and not spec.norm_topk_prob) or \
            (s.key != "base" and not out_routing.norm_topk_prob)
        if s.entry.keep != "all" or needs_measure:
            if not s.entry.positive_prompts:
                why = f"keep: {s.entry.keep} picks" if s.entry.keep != "all" else "unnormalised routing weights are"
                raise PlanError(f"experts.{s.index}.positive_prompts: {why} measured on the source's prompts; "
                                f"give some")
            usage[s.key] = tuple(sorted(set(layer_map[s.key].values())))
    if any(s.key != "base" for s in sources) and not out_routing.norm_topk_prob:
        if base_entry is None or not base_entry.entry.positive_prompts:
            raise PlanError("experts: the output's routing weights are not normalised, so scale compensation "
                            "measures the base's own routing on its prompts; list the base among experts with "
                            "positive_prompts")
        usage["base"] = tuple(moe_layers)

    def scaled(c: float | None, entry: ExpertSource) -> float | None:  # mergekit's residual_scale, on down
        return c if c is None or entry.residual_scale is None else c * entry.residual_scale

    table = []
    for layer in moe_layers:
        row = []
        for s, sl in zip(sources, slots):
            src_layer = layer_map[s.key][layer]
            spec = RoutingSpec(**transforms[s.key].routing)
            scale = scaled(1.0 if s.key == "base" else compensation(spec, out_routing), s.entry)
            for r in range(sl.routed):
                chosen = s.entry.keep == "all"
                row.append(ExpertSlot(source=s.key, source_layer=src_layer, expert=r if chosen else None,
                                      rank=None if chosen else r, scale=scale))
            if sl.dense_mlp:
                row.append(ExpertSlot(source=s.key, source_layer=src_layer, kind="dense_mlp",
                                      scale=scaled(compensation(None, out_routing), s.entry)))
            if sl.shared_as_routed:
                row.append(ExpertSlot(source=s.key, source_layer=src_layer, kind="shared",
                                      scale=scaled(compensation(None, out_routing), s.entry)))
        table.append(LayerExperts(layer=layer, slots=tuple(row)))
    table += _extra_layer_rows(cfg, base, base_entry, table) if not converting else []

    align = {s.key: tuple(sorted(layer_map[s.key].items())) for s in sources if transforms[s.key].align == "fit"}
    vectors = tuple(s.key for s, sl in zip(sources, slots) if cfg.gate_mode in PROMPT_GATE_MODES
                    and (s.key != "base" or sl.dense_mlp))
    offsets = _calibrated_sources(cfg, sources, arch)
    tensors, input_bytes = _concat_tensors(cfg, base, target, table, arch, vocab, sources)
    return _finish(cfg, config_dir, output_dir, method="concat", base=base, sources=sources, target=target,
                   tensors=tensors, input_bytes=input_bytes, vocab=vocab,
                   layer_map={s.key: layer_map[s.key] for s in sources}, expert_table=tuple(table),
                   transforms=transforms, stages=StagePlan(usage=usage, align=align, prompt_vectors=vectors,
                                                           router_offsets=offsets,
                                                           train_routers=_training_steps(cfg, donors, align),
                                                           train_maps=tuple(align) if cfg.align.train_steps else ()))


def _extra_layer_rows(cfg: MergeConfig, base: _Source, base_entry: _Source | None, table: list[LayerExperts]
                      ) -> list[LayerExperts]:
    """Expert-table rows of the base's extra layers (MTP): each follows the last MoE layer (see LayerExperts),
    so the output's expert count holds in them too, as vLLM and SGLang load MTP modules with the model's
    config."""
    extra = extra_layer_indices(base.arch, base.ckpt.config, base.ckpt.names())
    if not extra or not table:
        return []
    if base_entry is not None and base_entry.entry.keep != "all":
        raise PlanError(f"experts.{base_entry.index}.keep: the base's MTP layer(s) {list(extra)} would need their own "
                        f"expert usage, which no forward pass measures; keep all of the base's experts")
    last = table[-1]
    return [LayerExperts(layer=layer, like=last.layer,
                         slots=tuple(s.model_copy(update={"source_layer": layer})
                                     if s.source == "base" and s.kind == "routed" else s for s in last.slots))
            for layer in extra]


def _vocab_plan(cfg: MergeConfig, config_dir: Path | None, base: _Source, sources: list[_Source]) -> VocabPlan | None:
    """The union vocabulary's plan (None: the base's tokenizer serves)."""
    donors = [s for s in sources if s.key != "base"]
    rows = base.ckpt.info(tensor_name(base.arch, "embed")).shape[0]
    return plan_vocab(cfg, config_dir, {"base": base.model.path, **{s.key: s.model.path for s in donors}},
                      {"base": base.facts.hidden_size, **{s.key: s.facts.hidden_size for s in donors}}, rows)


def _vocab_input_bytes(name: str, shape: tuple[int, ...], base: _Source, sources: list[_Source],
                       vocab: VocabPlan) -> int:
    """What building a union embedding/lm_head holds: the output, the base's tensor, each donor's rows."""
    donor_bytes = 0
    for s in sources:
        if s.key in vocab.donors:
            donor_bytes += max(s.ckpt.info(n).nbytes for n in s.ckpt.names()
                               if (tid := classify(s.arch, n)) is not None and tid.role in ("embed", "lm_head"))
    return base.ckpt.info(name).nbytes + donor_bytes + 2 * 8 * VOCAB_CHUNK_ROWS * shape[-1]


# Rows of a union embedding computed at a time (float64 work copies of this many rows).
VOCAB_CHUNK_ROWS = 4096


def _training_steps(cfg: MergeConfig, donors: list[_Source], fitted: dict) -> int:
    """Steps of training after the first write, checked: router rows need grafted experts, maps need a fit."""
    if cfg.router.train_steps and not donors and cfg.router.train == "grafted":
        raise PlanError("router.train_steps: no grafted experts to train router rows for (router.train: grafted); "
                        "add a donor to experts, or use router.train: all")
    if cfg.align.train_steps and not fitted:
        raise PlanError("align.train_steps: no fitted maps to train (they exist only where a donor's width differs "
                        "from the base's, with align.mode auto or fit)")
    if cfg.align.teacher_data and not cfg.align.train_steps:
        raise PlanError("align.teacher_data: the teacher loss is part of alignment training; set align.train_steps")
    if cfg.align.teacher_data and len(fitted) > 1:
        raise PlanError(f"align.teacher_data: one donor can teach; this merge fits maps for {', '.join(fitted)}")
    return max(cfg.router.train_steps, cfg.align.train_steps)


def _calibrated_sources(cfg: MergeConfig, sources: list[_Source], arch: Architecture) -> tuple[str, ...]:
    """The grafted sources whose selection bias `router.calibrate` offsets (on by default for gate_mode transfer)."""
    want = cfg.router.calibrate if cfg.router.calibrate is not None else cfg.gate_mode == "transfer"
    if not want:
        return ()
    if "router_bias" not in arch.roles:
        if cfg.router.calibrate:
            raise PlanError(f"router.calibrate: the output ({arch.name}) has no selection bias to offset; "
                            f"calibration works on DeepSeek-V3 outputs (e_score_correction_bias)")
        return ()
    grafted = [s for s in sources if s.key != "base"]
    missing = [s for s in grafted if not s.entry.positive_prompts]
    if missing and cfg.router.calibrate:
        raise PlanError(f"experts.{missing[0].index}.positive_prompts: router.calibrate measures where each "
                        f"source's prompts are routed; give some")
    return tuple(s.key for s in grafted if s.entry.positive_prompts)


# Roles with a row per token, rebuilt for a union vocabulary: role -> (part, the model's own embed/head?)
_VOCAB_ROLES = {"embed": ("embed", True), "lm_head": ("head", True), "mtp_embed": ("embed", False),
                "mtp_head": ("head", False)}


def _concat_tensors(cfg: MergeConfig, base: _Source, target: dict[str, Any], table: list[LayerExperts],
                    arch: Architecture, vocab: VocabPlan | None = None,
                    sources: list[_Source] = ()) -> tuple[list[PlannedTensor], dict[str, int]]:
    """Output tensors in the base's order; each MoE layer's router and experts generated where the base has them
    (where a dense base has its MLP, when the output is its MoE twin), the embedding and lm_head from the union
    vocabulary's token map when there is one."""
    moe = {le.layer: le for le in table}
    generated = _GENERATED_CLASSES + (("dense_mlp",) if arch.name != base.arch.name else ())
    tensors: list[PlannedTensor] = []
    input_bytes: dict[str, int] = {}
    done: set[int] = set()
    for name in base.ckpt.names():
        tid = classify(base.arch, name)
        if tid is not None and tid.layer in moe and tid.tensor_class in generated:
            if tid.layer not in done:
                done.add(tid.layer)
                for t in _layer_tensors(cfg, base, target, moe[tid.layer], arch):
                    tensors.append(t)
                    input_bytes[t.name] = 3 * 4 * math.prod(t.shape)  # float32 work copies: source, map, result
            continue
        t = _copy_tensor(base, name, cfg, target)
        if vocab is not None and tid is not None and tid.role in _VOCAB_ROLES:
            part, own = _VOCAB_ROLES[tid.role]
            t = t.model_copy(update={"recipe": VocabRecipe(part=part, tensor=None if own else name)})
            tensors.append(t)
            input_bytes[name] = _vocab_input_bytes(name, t.shape, base, sources, vocab)
            continue
        tensors.append(t)
        input_bytes[name] = base.ckpt.info(name).nbytes + (4 * math.prod(t.shape) if t.recipe.pad else 0)
    return tensors, input_bytes


def _layer_tensors(cfg: MergeConfig, base: _Source, target: dict[str, Any], le: LayerExperts,
                   arch: Architecture) -> list[PlannedTensor]:
    layer = le.layer
    role = "expert_gate" if base.facts.is_moe else "mlp_gate"
    any_expert = tensor_name(base.arch, role, layer, 0)
    expert_code = base.ckpt.info(any_expert).dtype if any_expert in base.ckpt else "BF16"
    out = []
    router = tensor_name(arch, "router", layer)
    router_code = base.ckpt.info(router).dtype if router in base.ckpt else expert_code
    out.append(PlannedTensor(name=router, dtype=_output_dtype(router_code, "router", arch.keep_fp32_roles, cfg.dtype),
                             shape=expected_shape(target, router), recipe=RouterRecipe(layer=layer, part="weight")))
    if "router_bias" in arch.roles:
        bias = tensor_name(arch, "router_bias", layer)
        code = base.ckpt.info(bias).dtype if bias in base.ckpt else "F32"
        out.append(PlannedTensor(name=bias, dtype=_output_dtype(code, "router_bias", arch.keep_fp32_roles, cfg.dtype),
                                 shape=expected_shape(target, bias), recipe=RouterRecipe(layer=layer, part="bias")))
    dtype = _output_dtype(expert_code, "expert_gate", arch.keep_fp32_roles, cfg.dtype)
    for j in range(len(le.slots)):
        for proj, role in _EXPERT_ROLES.items():
            name = tensor_name(arch, role, layer, j)
            out.append(PlannedTensor(name=name, dtype=dtype, shape=expected_shape(target, name),
                                     recipe=ExpertRecipe(layer=layer, slot=j, proj=proj)))
    return out


def source_tensor(plan: Plan, slot: ExpertSlot, proj: str) -> str:
    """The source checkpoint's name of one projection of a slot's expert."""
    arch = ARCHITECTURES[plan.sources[slot.source].architecture]
    return tensor_name(arch, SLOT_ROLES[slot.kind][proj], slot.source_layer, slot.expert)


def source_router(plan: Plan, slot: ExpertSlot, part: str) -> str | None:
    """The source's router tensor (weight or bias) of a slot's layer, or None where the source has none."""
    arch = ARCHITECTURES[plan.sources[slot.source].architecture]
    role = "router" if part == "weight" else "router_bias"
    return tensor_name(arch, role, slot.source_layer) if role in arch.roles else None


def _identity_slot(layer: int, j: int, slot: ExpertSlot) -> bool:
    """The base's own expert j of `layer`, in its own place j."""
    return slot.source == "base" and slot.kind == "routed" and slot.expert == j and slot.source_layer == layer


def simplify(plan: Plan) -> Plan:
    """Turn recipes that only copy into `CopyRecipe`s, so their bytes are copied exactly (and fast).

    An expert slot copies when its source needs no map, no scale and no padding; a router
    copies when every slot is the base's own expert in its own place.
    """
    opened: dict[str, Checkpoint] = {}

    def info(key: str, name: str):
        if key not in opened:
            opened[key] = Checkpoint.open(Path(plan.sources[key].path), check_shapes=False)
        return opened[key].info(name)

    try:
        out = []
        for t in plan.tensors:
            r = t.recipe
            if isinstance(r, ExpertRecipe):
                slot = plan.slot(r.layer, r.slot)
                src = source_tensor(plan, slot, r.proj)
                tr = plan.transforms[slot.source]
                unmapped = tr.align in ("none", "identity") and not tr.noise_scale and not tr.random_experts
                if unmapped and (slot.scale == 1.0 or r.proj != "down") and info(slot.source, src).shape == t.shape:
                    t = t.model_copy(update={"recipe": CopyRecipe(source=slot.source, tensor=src)})
            elif isinstance(r, RouterRecipe) and not plan.stages.train_routers:
                le = plan.layer_experts(r.layer)
                name = source_router(plan, le.slots[0], r.part)
                if all(_identity_slot(r.layer, j, s) for j, s in enumerate(le.slots)) and \
                        name is not None and info("base", name).shape == t.shape:
                    t = t.model_copy(update={"recipe": CopyRecipe(source="base", tensor=name)})
            out.append(t)
    finally:
        for ckpt in opened.values():
            ckpt.close()
    return plan.model_copy(update={"tensors": tuple(out)})


def resolve(plan: Plan, usage: dict[str, dict[int, dict]] | None = None, artefacts: dict[str, str] | None = None) -> Plan:
    """The plan with every open slot filled from the stages' results, ready to write.

    `usage[source][source_layer]` has `order` (expert indices, most used first) and
    `mean_total` (the mean total weight of a token's picked experts).
    """
    usage = usage or {}
    out_routing = routing_spec(plan.target_config)
    table = []
    for le in plan.expert_table:
        row = []
        for slot in le.slots:
            update = {}
            if slot.expert is None and slot.kind == "routed":
                stats = usage.get(slot.source, {}).get(slot.source_layer)
                if stats is None:
                    raise PlanError(f"no expert usage for {slot.source} layer {slot.source_layer}: run the usage stage")
                update["expert"] = stats["order"][slot.rank]
            if slot.scale is None:
                src_spec = RoutingSpec(**plan.transforms[slot.source].routing) if slot.kind == "routed" else None
                src_w = usage.get(slot.source, {}).get(slot.source_layer, {}).get("mean_total")
                out_w = usage.get("base", {}).get(le.layer, {}).get("mean_total")
                update["scale"] = compensation(src_spec, out_routing, source_measured=src_w, output_measured=out_w)
                if update["scale"] is None:
                    raise PlanError(f"no measured routing weight for {slot.source} layer {slot.source_layer}")
            row.append(slot.model_copy(update=update) if update else slot)
        table.append(LayerExperts(layer=le.layer, slots=tuple(row)))
    plan = plan.model_copy(update={"expert_table": tuple(table), "artefacts": dict(artefacts or {})})
    return simplify(plan)
