"""The plan's data: recipes (how each output tensor is made), the expert table, stage plans and the Plan
itself, serialised as .zenith/plan.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..architectures import (
    ARCHITECTURES,
    Architecture,
    classify,
)
from ..errors import PlanError
from ..io.manifest import write_text_atomic
from ..io.writer import ShardSpec, TensorSpec
from .vocab import VocabPlan

PLAN_FORMAT_VERSION = 1
PLAN_FILE = ".zenith/plan.json"
WRITING_KEYS = frozenset({"workers", "backend"})  # config keys that change how the output is written, not its bytes
# `Plan.side_files` value of files the tokenizer stage writes (the union tokenizer), not copied from a source.
UNION_SIDE_FILES = "union"


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


class ZerosRecipe(_Frozen):
    """A tensor of zeros: what the output architecture needs and a dense base lacks (Qwen2-MoE's attention biases
    from a Llama base, as mergekit-moe writes them)."""

    kind: Literal["zeros"] = "zeros"


class MlaRecipe(_Frozen):
    """One weight of a dense base layer's attention written as DeepSeek's MLA computing the same (maths/mla.py):
    q_proj from its q projection, kv_a_proj (latent and shared rotary key) from its k projection, kv_b_proj from
    its v projection; kv_a_norm and the latent's scale from the layer's input_layernorm weight."""

    kind: Literal["mla"] = "mla"
    layer: int
    part: Literal["q_proj", "kv_a_proj", "kv_b_proj", "kv_a_norm"]


class RouterRecipe(_Frozen):
    """The router of output `layer` (its weight rows or its score-correction bias), one row per slot."""

    kind: Literal["router"] = "router"
    layer: int
    part: Literal["weight", "bias", "shared"]  # shared: the shared expert's gate row (Qwen2-MoE)


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


class MethodRecipe(_Frozen):
    """A merge method (maths/methods.py) over same-named tensors of same-family models, with the parameters
    resolved for this tensor: `inputs[i]` are input i's (in `sources` order, mergekit's input order), `shared`
    the method's own; `base` the index of the method's base among the inputs. The inputs are read (block FP8
    dequantised) and cast to `merge_dtype` before the maths, as mergekit casts them to its `dtype`."""

    kind: Literal["method"] = "method"
    tensor: str
    tensor_class: str
    method: str
    sources: tuple[str, ...]
    base: int | None
    inputs: tuple[dict[str, Any], ...]
    shared: dict[str, Any]
    merge_dtype: str = Field(description="safetensors code of the dtype the maths runs in")
    seed: int | None = Field(None, description="random methods: the seed of this tensor's generator")
    fused: tuple[str, ...] = Field(
        (), description="expert_scope layer: the roles whose tensors the method sees as one for the whole layer, "
                        "as transformers 5 fuses them (each expert's tensors of these roles concatenated along "
                        "rows, the experts stacked: plan/methods.py fused_names); this tensor is rows `row`.. of "
                        "expert `expert` of layer `layer` of the result")
    layer: int | None = None
    expert: int | None = None
    row: int = 0
    expert_axis: int | None = Field(None, description="a fused expert tensor (GPT-OSS) merged expert by expert: "
                                                      "the method runs on each slice along this axis")
    vocab_rows: int | None = Field(None, description="method_vocab: each input's first rows (the tokenizer's "
                                                     "tokens), then padded to `vocab_out` with its mean row")
    vocab_out: int | None = None


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


Recipe = Annotated[CopyRecipe | ExpertRecipe | RouterRecipe | AssembleRecipe | MethodRecipe | VocabRecipe | Fp8ScaleRecipe
                   | ZerosRecipe | MlaRecipe,
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
    shared: ExpertSlot | None = Field(None, description="the shared expert built from shared_experts.0 (its slot "
                                                        "index in recipes is len(slots))")
    shared_gate: Literal["gated", "ungated"] | None = Field(
        None, description="gated: its gate row from the gate mode (Qwen2-MoE); ungated: always on (DeepSeek)")

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
    method: Literal["passthrough", "concat", "assembly", "method"]
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
    def method_name(self) -> str:
        """The method as the user named it: a merge method's own name (ties, slerp, ...), else `method`."""
        return str(self.config.get("merge_method")) if self.method == "method" else self.method

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
        """The expert table's entry for output `layer`, `slot`; slot len(slots) is the layer's shared expert."""
        le = self.layer_experts(layer)
        return le.slots[slot] if slot < len(le.slots) else le.shared

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
        """sha256 of everything that determines the output bytes (not where, nor by how many workers or which
        backend, they are written: a merge started on Ray may be resumed locally)."""
        payload = self.model_dump(mode="json", exclude={"output_dir", "estimates"})
        payload["config"] = {k: v for k, v in payload["config"].items() if k not in WRITING_KEYS}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def shard_specs(self) -> list[ShardSpec]:
        """The shard layout in the writer's terms."""
        by_name = {t.name: t.spec for t in self.tensors}
        return [ShardSpec(s.filename, tuple(by_name[n] for n in s.tensors)) for s in self.shards]

    def save(self, out_dir: Path) -> Path:
        """Write the plan to `<out>/.zenith/plan.json` atomically."""
        path = out_dir / PLAN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, self.model_dump_json(indent=1))
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
EXPERT_ROLES = {"gate": "expert_gate", "up": "expert_up", "down": "expert_down"}
DENSE_ROLES = {"gate": "mlp_gate", "up": "mlp_up", "down": "mlp_down"}
SHARED_ROLES = {"gate": "shared_gate", "up": "shared_up", "down": "shared_down"}
SLOT_ROLES = {"routed": EXPERT_ROLES, "dense_mlp": DENSE_ROLES, "shared": SHARED_ROLES}
