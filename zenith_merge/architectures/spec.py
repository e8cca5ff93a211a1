"""The shape of an architecture description: what a table in this package must say.

Every architecture fact the rest of zenith-merge needs (config keys, tensor-name
patterns, expected tensor shapes, which layers are MoE) is data of this form, so
adding an architecture means adding a table, not an `if arch == ...` branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# How to tell which decoder layers hold an MoE block.
#   first_k_dense: layers >= `first_k_dense_replace` with (layer % moe_layer_freq == 0) are MoE (DeepSeek-V3).
#   sparse_step:   layers not in `mlp_only_layers` with (layer + 1) % decoder_sparse_step == 0 (Qwen3-MoE).
#   all:           every layer is MoE (Mixtral).
#   none:          a dense model; its MLP is one expert (mergekit-moe's case).
MoeLayerRule = Literal["first_k_dense", "sparse_step", "all", "none"]

# Tensor classes: the groups that same-family assembly gives one lambda each.
TensorClass = Literal[
    "embeddings", "lm_head", "norms", "attention", "router", "routed_experts", "shared_experts", "dense_mlp", "mtp",
    "other"
]


@dataclass(frozen=True)
class TensorRole:
    """One kind of tensor: its name pattern, its class, and its shape in symbolic dimensions.

    `pattern` uses `{layer}` and `{expert}` placeholders. `shape` names dimensions from
    `Architecture.dims` (or literal ints); None means "not checked".

    `expert_axis`: the role is one tensor holding every routed expert of its layer, stacked along this axis
    (GPT-OSS's `mlp.experts.gate_up_proj`, experts x hidden x 2 inter), not one tensor per `{expert}`. Such a
    tensor interpolates like any other (same-family assembly), but no expert can be taken out of it by name:
    selecting, grafting or concatenating experts needs the per-expert roles (`expert_gate`, ...).
    """

    pattern: str
    tensor_class: TensorClass
    shape: tuple[str | int, ...] | None = None
    expert_axis: int | None = None


@dataclass(frozen=True)
class ExtraLayers:
    """Decoder layers a checkpoint carries past `num_hidden_layers`, which transformers' model does not run:
    DeepSeek-V3's multi-token-prediction (MTP) modules. Each is a decoder layer of the model's own kind
    (attention, norms, an MoE block) at index num_hidden_layers + i, plus tensors of its own (`roles`, also
    in `Architecture.roles` so that names classify)."""

    kind: str  # "mtp": its class in assembly.weights and its name in the plan
    count_key: str  # the config key that says how many (num_nextn_predict_layers)
    roles: tuple[str, ...]  # the extra layer's own roles, beyond a decoder layer's


@dataclass(frozen=True)
class Architecture:
    """Everything zenith-merge knows about one `architectures[0]` value of a Hugging Face config."""

    name: str
    model_type: str
    moe_layer_rule: MoeLayerRule
    # symbolic dimension -> alternatives, first that resolves wins: a config key (aliases across
    # library versions) or a formula over other dimensions ("heads * head_dim"; + - * // and brackets)
    dims: dict[str, tuple[str, ...]]
    # role -> tensor description; roles whose pattern has `{expert}` repeat per expert, roles with an
    # `expert_axis` hold every expert of their layer (fused)
    roles: dict[str, TensorRole]
    # Defaults for config keys that a config may omit (transformers' class defaults).
    defaults: dict[str, object] = field(default_factory=dict)
    # Roles whose tensors stay float32 whatever the output dtype (transformers keeps them so).
    keep_fp32_roles: tuple[str, ...] = ()
    # Scoring function of the router: how a router logit becomes an expert weight.
    scoring: Literal["sigmoid", "softmax", "none"] = "softmax"
    # Routing settings that are not dimensions: logical name -> config key. Names:
    #   norm_topk_prob (bool), scaling (float multiplier of the top-k weights),
    #   n_group / topk_group (DeepSeek's group-limited routing), topk_method (DeepSeek-V2's:
    #   "greedy" ignores the groups). A missing name means "not part of this architecture"
    #   (softmax models have no scaling and no groups).
    routing_keys: dict[str, str] = field(default_factory=dict)
    # How group-limited routing scores a group: the sum of its two best (selection) scores (DeepSeek-V3, GLM),
    # or its best score (DeepSeek-V2's group_limited_greedy).
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    # Module paths for calibration hooks: the decoder layer, and its MLP/MoE block whose
    # input is the normalised MoE input.
    layer_module: str = "model.layers.{layer}"
    mlp_module: str = "model.layers.{layer}.mlp"
    # Config keys that fix the attention layout; sources assembled tensor by tensor must agree on them.
    attention_layout_keys: tuple[str, ...] = ()
    # mergekit-moe output names (MERGEKIT_MOE_OUTPUTS) an MoE base of this family answers to besides its own
    # table's: `architecture: deepseek` with a DeepSeek-V3 base keeps the base, as before mergekit's names came.
    mergekit_moe_names: tuple[str, ...] = ()
    # Config values an MoE architecture takes when it is built from a dense config.
    from_dense_config: dict[str, object] = field(default_factory=dict)
    # Roles an MoE architecture has that a dense source may lack, written as zeros when it does
    # (Qwen2-MoE's attention biases from a Llama base, as mergekit-moe writes them).
    zeros_from_dense: tuple[str, ...] = ()
    # A shared expert beside the routed ones, built from a `shared_experts[]` entry when converting from dense:
    # "gated" (Qwen2-MoE: sigmoid(shared_expert_gate . x) scales it), "ungated" (DeepSeek: always on; without a
    # `shared_experts` entry it is written as zeros, which adds nothing), or None (the architecture has none).
    shared_expert: Literal["gated", "ungated"] | None = None
    # How a dense source's attention is written when this architecture is built from it: None, the same tensors
    # under this table's names; "mla", DeepSeek's latent attention computing the same (maths/mla.py).
    dense_attention: Literal["mla"] | None = None
    # Roles that read the very same input tensor within a layer (and expert), as the modelling code
    # calls them: RegMean keeps one input statistic for each such group instead of one per weight.
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    # A plain Llama-family decoder (RMSNorm, RoPE, GQA, SiLU MLP or a softmax-routed MoE block; q/k norms where
    # the roles have them): prompt states can be computed by forward/dense.py, without transformers.
    plain_forward: bool = False
    # The family's conversation format (a key of vocab.chat_template.CHAT_FORMATS), used for a union
    # output whose base ships no chat template; None: no template rather than an invented one.
    chat_format: str | None = None
    # Layers past num_hidden_layers (DeepSeek-V3's MTP modules); None: the architecture has none.
    extra_layers: ExtraLayers | None = None

