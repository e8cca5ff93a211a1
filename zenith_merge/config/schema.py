"""The merge config: mergekit-moe's YAML keys, unchanged, plus zenith-merge's own.

A config is a frozen pydantic model. Unknown keys and bad values are refused with
the key's path and the offending value (`experts.1.keep: must be >= 1, got 0`).
Model references are `demo://<name>` (an embedded demo model, built on first use)
or a local folder; a relative folder is resolved against the config file's folder.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from .mergekit_yaml import MERGEKIT_METHODS, MethodName

DEMO_SCHEME = "demo://"
# The embedded demo models a config may name as demo://<name> (zenith_merge.demo builds them): three trained
# MoE models, and the two Zen children in block FP8 (as DeepSeek-V3 and R1 ship), cast from the trained ones.
DEMO_NAMES = ("zen-tiny", "zen-r1-tiny", "qwen3-moe-tiny")
FP8_DEMO_NAMES = ("zen-tiny-fp8", "zen-r1-tiny-fp8")
ALL_DEMO_NAMES = DEMO_NAMES + FP8_DEMO_NAMES
DEMO_PARENT = "zen-parent"  # the Zen children's parent: the base of a task-vector merge of the two
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_byte_size(value: Any) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "4GiB" (decimal and binary units, as in mergekit)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a byte size such as 5GB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(value), flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"expected a byte size such as 5GB, 500MB or 4GiB, got {value!r}")
        size = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()]
        size = int(size) if size < 2**62 else 2**62  # refused below, not an OverflowError from int(inf)
    if size >= 2**62:
        raise ValueError(f"{value!r} is not a plausible byte size")
    if size <= 0:
        raise ValueError(f"must be a positive byte size, got {value!r}")
    return size


ByteSize = Annotated[int, BeforeValidator(parse_byte_size)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_model_ref(value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a model reference must be a local folder or demo://<name>")
    if value.startswith(DEMO_SCHEME):
        name = value[len(DEMO_SCHEME):]
        if name not in (*ALL_DEMO_NAMES, DEMO_PARENT):
            raise ValueError(f"unknown demo model {name!r}; demo models: {', '.join(ALL_DEMO_NAMES)} "
                             f"(and {DEMO_PARENT}, the Zen children's parent)")
    elif "://" in value:
        raise ValueError(f"{value!r}: only local folders and demo://<name> are supported (nothing is downloaded)")
    return value


ModelRef = Annotated[str, BeforeValidator(_check_model_ref)]


class SharedExpertSource(_Strict):
    """mergekit-moe's `Expert`: a model with the prompts that describe what it is good at.

    As a `shared_experts[]` entry, its MLP becomes an always-on expert.
    """

    source_model: ModelRef
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)
    noise_scale: float | None = None
    residual_scale: float | None = None
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="a merge method's parameters for this model (mergekit-yaml's "
                                          "models[].parameters: weight, density, ...; numbers, gradients or "
                                          "{filter, value} lists)")


class ExpertSource(SharedExpertSource):
    """One `experts[]` entry: a model whose experts (or MLP, for a dense model) join the output."""

    keep: int | Literal["all"] = Field("all", description="experts kept per layer from this source, most used first")
    shared_expert: Literal["drop", "routed"] = Field(
        "drop", description="a donor's shared expert: dropped, or grafted as one more routed expert")
    random_experts: bool = Field(False, description="a control: this source's experts replaced by seeded random "
                                                    "weights of the same Frobenius norm, tensor by tensor")
    layers: dict[int, int] = Field(
        default_factory=dict, description="output MoE layer -> this source's layer its experts come from; "
                                          "layers not listed take the source layer at the same relative depth")

    @field_validator("keep")
    @classmethod
    def _keep_positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be >= 1 or 'all', got {v}")
        return v


class TokenSetting(_Strict):
    """`tokenizer.tokens.<token>`: which source's embedding the token takes, and whether that is forced.

    As in mergekit: `source` decides the row of a token that not every vocabulary has; with
    `force: true` it decides even for a token they share (which is otherwise SLERPed).
    """

    source: ModelRef | Literal["base"] | None = None
    force: bool = False


class TokenizerSettings(_Strict):
    """`tokenizer:` (mergekit's `source`/`tokens`, plus the SLERP factor for shared tokens)."""

    source: Literal["union", "base"] | ModelRef = "union"
    tokens: dict[str, TokenSetting] = Field(default_factory=dict)
    pad_to_multiple_of: int = Field(64, ge=1)
    slerp_t: float = Field(0.5, ge=0.0, le=1.0, description="0 keeps the base's row, 1 takes the donor's")
    donor_merges: bool = Field(
        False, description="also add the donors' BPE merges after the base's (opt-in): donor subwords are then "
                           "produced by encoding, and base text no longer always tokenizes as the base does")
    protect: list[str] = Field(
        default_factory=list,
        description="with donor_merges: text that must tokenize exactly as the base tokenizes it (files relative "
                    "to the config, or demo:code / demo:maths); donor merges that change it are left out. "
                    "Default: the base's positive prompts")

    @model_validator(mode="after")
    def _protect_needs_donor_merges(self) -> TokenizerSettings:
        if self.protect and not self.donor_merges:
            raise ValueError("protect: guards text against donor merges, which are off; the union already "
                             "tokenizes every text as the base does (set donor_merges: true, or drop protect)")
        return self

    @field_validator("tokens")
    @classmethod
    def _force_needs_source(cls, v: dict[str, TokenSetting]) -> dict[str, TokenSetting]:
        for token, setting in v.items():
            if setting.force and setting.source is None:
                raise ValueError(f"{token!r}: force: true needs a source (base or one of the experts' models)")
        return v


TENSOR_CLASSES = ("embeddings", "lm_head", "norms", "attention", "router", "routed_experts", "shared_experts",
                  "dense_mlp", "mtp", "other")


class AlignSettings(_Strict):
    """`align:` how donor experts are mapped into the base's hidden space (DESIGN.md "Heterogeneous grafting")."""

    mode: Literal["auto", "identity", "fit"] = Field(
        "auto", description="auto: identity where widths agree, a ridge fit on calibration text where they differ")
    ridge: float = Field(1e-2, gt=0, description="ridge strength, relative to the mean input variance")
    calibration: list[str] = Field(
        default_factory=list,
        description="calibration text: text files (relative to the config) or demo:code / demo:maths; "
                    "default: the experts' prompts")
    max_tokens: int = Field(20_000, ge=1, description="calibration tokens per model, at most")
    max_memory: ByteSize | None = Field(
        None, description="bytes the fit's float64 statistics may hold (8 (d_base + d_donor)^2 per layer pair); "
                          "beyond it the pairs are fitted in groups, one pass over the calibration text each, and "
                          "each group's maps are written before the next starts. None: all pairs in one pass")
    train_steps: int = Field(0, ge=0, description="after the first write, train the fitted maps A and B together "
                                                  "with the router rows (router.train) for this many steps, then "
                                                  "fold them into the donor's expert weights (0: none)")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate of the maps")
    teacher_data: list[str] = Field(
        default_factory=list, description="donor-domain text (files or demo:code / demo:maths) on which the merge "
                                          "also learns the donor's next-token distribution (soft cross-entropy "
                                          "through the union vocabulary); empty: no teacher")
    teacher_weight: float = Field(1.0, ge=0.0, description="weight of the teacher loss against next-token loss")


REGMEAN_CLASSES = ("attention", "lm_head", "routed_experts", "shared_experts", "dense_mlp")


class RegMeanSettings(_Strict):
    """`assembly.regmean:` linear weights merged by RegMean (Jin et al., arXiv 2212.09849) instead of averaged.

    For a linear weight W_i (out x in) of parent i, with G_i = the mean of x x^T over the inputs x
    the layer sees when parent i reads its own domain's text, the merged weight minimises
    sum_i w_i E_i ||x W^T - x W_i^T||^2: W^T = (sum_i w_i G_i)^-1 sum_i w_i G_i W_i^T, so each
    parent keeps its outputs on its own inputs. `w_i` are the tensor class's assembly weights.
    """

    data: list[list[str]] = Field(description="per experts[] entry, that parent's own domain text: files "
                                              "(relative to the config) or demo:code / demo:maths")
    classes: list[str] = Field(list(REGMEAN_CLASSES), description="tensor classes whose 2-D linear weights are "
                                                                  "merged by RegMean (the rest are interpolated)")
    off_diagonal: float = Field(1.0, ge=0.0, le=1.0, description="scale of each Gram matrix's off-diagonal entries "
                                                                 "(RegMean's alpha; 0: a per-input-feature weighted mean)")
    ridge: float = Field(1e-4, ge=0.0, description="added to the summed Gram's diagonal, relative to its mean")
    max_tokens: int = Field(32768, ge=16, description="calibration tokens per parent")
    max_memory: ByteSize | None = Field(
        None, description="bytes one parent's float64 statistics may hold (8 in^2 per distinct input); beyond it "
                          "they are computed in groups, one pass over the text each, and each group's matrices "
                          "are written before the next starts. None: all in one pass")

    @field_validator("classes")
    @classmethod
    def _regmean_classes(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(REGMEAN_CLASSES))
        if unknown:
            raise ValueError(f"unknown or non-linear tensor classes {unknown}; RegMean merges {', '.join(REGMEAN_CLASSES)}")
        return v


class AssemblySettings(_Strict):
    """`assembly:` tensor-by-tensor interpolation of same-family parents (Assembly of Experts).

    W = sum_i weights[class][i] * W_i over the `experts[]` entries, where `class` is the
    tensor's class (missing classes use `default`). A tensor is interpolated only where some
    parent differs from the base by more than `threshold` in normalised Frobenius norm
    (||W_i - W_base|| / ||W_base||); elsewhere the base's tensor is kept. With `regmean`, the
    linear weights of its classes are merged by RegMean with the same class weights.
    """

    weights: dict[str, list[float]]
    threshold: float = Field(0.0, ge=0.0)
    regmean: RegMeanSettings | None = None

    @field_validator("weights")
    @classmethod
    def _known_classes(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        for key, ws in v.items():
            if key != "default" and key not in TENSOR_CLASSES:
                raise ValueError(f"unknown tensor class {key!r}; classes: default, {', '.join(TENSOR_CLASSES)}")
            if any(w < 0 for w in ws) or not ws or sum(ws) <= 0:
                raise ValueError(f"{key}: weights must be >= 0 with a positive sum, got {ws}")
        return v


class RouterSettings(_Strict):
    """`router:` what happens to the output's router rows after the gate mode made them."""

    calibrate: bool | None = Field(
        None, description="offset each grafted source's selection bias so its prompts reach its experts (needs a "
                          "selection bias: DeepSeek's e_score_correction_bias). None: on for gate_mode transfer")
    target_share: float = Field(0.5, gt=0.0, lt=1.0, description="share of top-k picks a source's prompts should "
                                                                 "send to its experts when no other source has prompts")
    train_steps: int = Field(0, ge=0, description="router-only training steps after the merge is written (0: none)")
    train: Literal["grafted", "all"] = Field(
        "grafted", description="which router rows train: the grafted sources' (the base's routing kept) or all")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate of router training")
    batch_size: int = Field(4, ge=1, description="sequences per training step")
    seq_len: int = Field(128, ge=8, description="tokens per training sequence")
    bias_update: float = Field(1e-3, ge=0.0, description="DeepSeek's auxiliary-loss-free step: each expert's "
                                                         "selection bias moves by this against its load imbalance")
    data: list[str] = Field(default_factory=list, description="training text: files (relative to the config) or "
                                                              "demo:code / demo:maths; default: align.calibration "
                                                              "and every expert's prompts")


class SearchSettings(_Strict):
    """`search:` how `zenith-merge search` looks for assembly weights (two parents, one lambda per class).

    A candidate gives each searched tensor class the weights [1 - lambda, lambda] over the two
    `experts[]` entries. It is scored by bits per byte on `keep` text (where the first entry is
    good and must stay so) and `gain` text (where the second is better): the best candidate
    closes the most of the `gain` gap while losing at most `max_loss` on `keep`.
    """

    keep: list[str] = Field(default_factory=list, description="text the merge must stay good at (the first "
                                                              "entry's domain): files or demo:code / demo:maths")
    gain: list[str] = Field(default_factory=list, description="text the merge should get better at (the second "
                                                              "entry's domain): files or demo:code / demo:maths")
    max_loss: float = Field(0.03, ge=0.0, description="relative bits-per-byte loss allowed on `keep` (0.03: 3%)")
    classes: list[str] | None = Field(None, description="tensor classes searched, each with its own lambda; "
                                                        "default: every class the base has")
    grid: list[float] = Field([round(0.05 * i, 2) for i in range(21)],
                              description="the uniform sweep: every searched class at each of these lambdas")
    generations: int = Field(6, ge=0, description="evolutionary refinement rounds after the sweep")
    population: int = Field(6, ge=1, description="candidates kept and children bred per round")
    sigma: float = Field(0.08, gt=0.0, description="standard deviation of a child's per-class mutation")
    max_chars: int = Field(40_000, ge=100, description="characters of each text scored per candidate")
    parameters: dict[str, list[float | bool]] = Field(
        default_factory=dict, description="a merge method's search (ties, dare_ties, slerp, ...): parameters "
                                          "(top-level `density`, or one model's `models.1.weight`) and the values "
                                          "each may take; every combination is scored (grid, generations and "
                                          "classes are assembly's)")

    @field_validator("grid")
    @classmethod
    def _lambdas(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= x <= 1.0 for x in v):
            raise ValueError(f"lambdas must lie in [0, 1], at least one, got {v}")
        return v

    @field_validator("classes")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        for key in v or ():
            if key not in TENSOR_CLASSES:
                raise ValueError(f"unknown tensor class {key!r}; classes: {', '.join(TENSOR_CLASSES)}")
        return v


GateMode = Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random", "transfer"]
# Gate modes whose router rows start from each source's prompts (stages/prompt_vectors.py).
PROMPT_GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")
OutputDtype = Literal["float32", "float16", "bfloat16"]


class MethodVocab(_Strict):
    """A merge method's vocabulary as mergekit's `tokenizer_source: base` makes it: the embedding and head rows
    of the base tokenizer's tokens (ids below vocab_size; the checkpoint's padding rows dropped), each model's
    rows taken before the method runs, then padded to a multiple with each model's mean row."""

    pad_to_multiple_of: int | None = Field(None, ge=1, description="pad the rows to a multiple of this "
                                                                    "(mergekit's tokenizer.pad_to_multiple_of)")


class MergeConfig(_Strict):
    """The whole merge config; see merge/config.yml for the flagship example."""

    # mergekit-moe keys
    base_model: ModelRef
    architecture: str | None = Field(None, description="output architecture (a class name, model_type or mergekit-moe's "
                                                      "name); default: the base's, or mergekit-moe's choice for dense "
                                                      "sources")
    gate_mode: GateMode = "hidden"
    dtype: OutputDtype | None = Field(None, description="output dtype of floating weights; default: as stored")
    out_dtype: OutputDtype | None = Field(None, description="the output dtype under mergekit-yaml's name; the same "
                                                            "as dtype (give one, or both equal)")
    experts_per_token: int | None = Field(None, ge=1, description="top-k of the output; default: the base's")
    experts: list[ExpertSource] = Field(default_factory=list)
    shared_experts: list[SharedExpertSource] | None = None
    tokenizer: TokenizerSettings | None = None
    # zenith-merge keys
    gate_source: Literal["moe_input", "residual"] = Field(
        "moe_input", description="the state prompt-based router rows are read from: the MoE block's normalised "
                                 "input (the router's own input), or the residual stream before the layer "
                                 "(mergekit-moe's rows bit for bit, computed in bfloat16 as it computes them)")
    merge_method: Literal["concat", "assembly"] | MethodName = Field(
        "concat", description="concat: experts side by side (grafted where needed); assembly: interpolate tensors; "
                              "a mergekit-yaml method (linear, ties, ...): that method, tensor by tensor")
    config_format: Literal["zenith", "mergekit-yaml"] = Field(
        "zenith", description="the form the config was written in (mergekit-yaml: errors name its keys, models.N)")
    method_base: bool = Field(True, description="a merge method's base is base_model (mergekit-yaml's base_model); "
                                                "false: base_model only fixes the output's layout (no base given)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="a merge method's parameters for every "
                                                                         "model (mergekit-yaml's top-level parameters)")
    expert_scope: Literal["layer", "expert"] = Field(
        "layer", description="what a merge method's statistics (TIES's top-k, SLERP's norms, Model Stock's angle, "
                             "DARE's rescaling) range over for routed experts: all of a layer's experts as "
                             "transformers 5 fuses them (layer, the default: mergekit 0.1.5's results, byte for "
                             "byte), or each expert's own tensor (expert: one expert in memory at a time)")
    merge_dtype: OutputDtype | None = Field(None, description="the dtype a merge method computes in (mergekit-yaml's "
                                                              "dtype); default: the sources' stored dtype")
    method_vocab: MethodVocab | None = Field(None, description="a merge method's embedding and head rows are the "
                                                               "base tokenizer's tokens, as mergekit's "
                                                               "tokenizer_source: base makes them")
    align: AlignSettings = Field(default_factory=AlignSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    assembly: AssemblySettings | None = None
    search: SearchSettings | None = Field(None, description="zenith-merge search: per-class assembly weights")
    output_dir: str = "./merged_model"
    max_shard_size: ByteSize = Field(5 * 10**9, description="largest output shard in bytes (5GB, 500MB, 4GiB, ...)")
    load_in_8bit: bool = Field(False, description="calibration forward passes in bitsandbytes 8-bit")
    calibration_dtype: Literal["stored", "float32", "bfloat16", "float16"] = Field(
        "stored", description="dtype of the stages' forward passes; stored: the checkpoint's own (the plain "
                              "layer-by-layer pass on CPU, which holds one layer, computes it in float32)")
    calibration_max_memory: ByteSize | None = Field(
        None, description="CPU bytes the stages' forward passes may hold for weights; the rest is read from "
                          "disk layer by layer (accelerate offload). None: the whole model in memory")
    fp8_output: bool = Field(False, description="write the merge as block FP8, as DeepSeek-V3 ships: attention, "
                                                "MLP and expert projections float8_e4m3fn with a float32 "
                                                "weight_scale_inv per 128x128 block; the rest as planned")
    routing_report: bool = Field(True, description="after writing, run the merged model on each source's prompts "
                                                   "and the calibration text and save how its routers split "
                                                   "the top-k picks between the sources (.zenith/routing.json, .png)")
    workers: int = Field(1, ge=1, description="shards written in parallel")
    backend: Literal["local", "ray"] = "local"
    allow_pickle: bool = Field(False, description="read .bin pickles (weights_only) when a source has no safetensors")
    allow_nonfinite: bool = Field(False, description="write tensors holding NaN or Inf values (counted as every "
                                                     "tensor is written); by default such a tensor stops the "
                                                     "merge, naming it and the count")
    seed: int = 0

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from ..architectures import check_architecture_name

        return check_architecture_name(v)

    @model_validator(mode="after")
    def _assembly_weights_match_experts(self) -> MergeConfig:
        if self.merge_method == "assembly":
            if self.assembly is None:
                raise ValueError("assembly: merge_method assembly needs assembly.weights (per tensor class, one "
                                 "weight per experts[] entry), e.g. {default: [1, 0], routed_experts: [0, 1]}")
            if "default" not in self.assembly.weights:
                raise ValueError("assembly.weights.default: required (the weights of every class not listed)")
            for key, ws in self.assembly.weights.items():
                if len(ws) != len(self.experts):
                    raise ValueError(f"assembly.weights.{key}: {len(ws)} weights for {len(self.experts)} experts[] "
                                     f"entries; give one weight per entry")
            regmean = self.assembly.regmean
            if regmean is not None and len(regmean.data) != len(self.experts):
                raise ValueError(f"assembly.regmean.data: {len(regmean.data)} text lists for {len(self.experts)} "
                                 f"experts[] entries (one per entry: that parent's own domain)")
        elif self.assembly is not None:
            raise ValueError("assembly: only used with merge_method: assembly")
        return self

    @model_validator(mode="after")
    def _method_keys_with_methods(self) -> MergeConfig:
        if self.merge_method in MERGEKIT_METHODS:
            return self
        given = [k for k in ("parameters", "merge_dtype", "method_vocab") if getattr(self, k)]
        given += ["expert_scope"] if "expert_scope" in self.model_fields_set else []
        given += [f"experts.{i}.parameters" for i, e in enumerate(self.experts) if e.parameters]
        if given or not self.method_base:
            raise ValueError(f"{(given or ['method_base'])[0]}: only used with a merge method "
                             f"({', '.join(MERGEKIT_METHODS)}), not merge_method {self.merge_method}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _out_dtype_is_dtype(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("out_dtype") is not None:
            if data.get("dtype") is not None and data["dtype"] != data["out_dtype"]:
                raise ValueError(f"dtype {data['dtype']!r} and out_dtype {data['out_dtype']!r} differ: zenith-merge "
                                 f"computes in float32 and writes one dtype; give one of them")
            data = {**data, "dtype": data["out_dtype"]}
        return data

    @model_validator(mode="before")
    @classmethod
    def _tokenizer_source_is_tokenizer_source(cls, data: Any) -> Any:
        """mergekit's `tokenizer_source: X` (a mergekit-yaml habit in mergekit-moe configs, which mergekit-moe
        ignores) is `tokenizer: {source: X}` here: base keeps the base's tokenizer, union builds the union."""
        if isinstance(data, dict) and "tokenizer_source" in data:
            if data.get("tokenizer") is not None:
                raise ValueError("tokenizer_source and tokenizer: give one (tokenizer_source: X is tokenizer: "
                                 "{source: X})")
            source = data["tokenizer_source"]
            data = {k: v for k, v in data.items() if k != "tokenizer_source"}
            if source is not None:
                data["tokenizer"] = {"source": source}
        return data

    @model_validator(mode="after")
    def _gate_source_needs_hidden_states(self) -> MergeConfig:
        if self.gate_source != "moe_input" and self.gate_mode not in ("hidden", "hidden_avg", "hidden_last"):
            raise ValueError(f"gate_source: {self.gate_source} chooses the hidden state of gate_mode hidden, "
                             f"hidden_avg or hidden_last; gate_mode {self.gate_mode} reads none")
        return self

    @model_validator(mode="after")
    def _prompts_for_prompt_based_gates(self) -> MergeConfig:
        # concat's router rows read the prompts; an assembly's routing report shows where they are routed
        if self.gate_mode in PROMPT_GATE_MODES and (self.merge_method == "concat" or (
                self.merge_method == "assembly" and self.routing_report)):
            for i, expert in enumerate(self.experts):
                if not expert.positive_prompts:
                    raise ValueError(
                        f"experts.{i}.positive_prompts: gate_mode {self.gate_mode!r} computes router rows from "
                        f"each expert's prompts; give some, or use gate_mode: random"
                    )
        return self
