"""Architecture tables: tensor names, config keys and shapes, as data.

Patterns follow the Hugging Face checkpoint layout on disk (per-expert tensors,
`model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight`), which is what
transformers writes with `save_pretrained` and what vLLM and SGLang load. GPT-OSS is
the exception: its checkpoints hold each layer's experts in one tensor per projection
(roles with an `expert_axis`).
"""

from __future__ import annotations

from .spec import Architecture, ExtraLayers, TensorRole

L = "model.layers.{layer}."

_COMMON_ROLES = {
    "embed": TensorRole("model.embed_tokens.weight", "embeddings", ("vocab", "hidden")),
    "final_norm": TensorRole("model.norm.weight", "norms", ("hidden",)),
    "lm_head": TensorRole("lm_head.weight", "lm_head", ("vocab", "hidden")),
    "input_norm": TensorRole(L + "input_layernorm.weight", "norms", ("hidden",)),
    "post_attention_norm": TensorRole(L + "post_attention_layernorm.weight", "norms", ("hidden",)),
}

def _swiglu_roles(prefix: str, module: str, tensor_class: str, inter: str) -> dict[str, TensorRole]:
    """The gate, up and down projections of one SiLU-gated MLP at `module` (roles `<prefix>_gate`, ...)."""
    return {f"{prefix}_{p}": TensorRole(L + f"{module}.{p}_proj.weight", tensor_class,
                                        (inter, "hidden") if p != "down" else ("hidden", inter))
            for p in ("gate", "up", "down")}


_DENSE_MLP_ROLES = _swiglu_roles("mlp", "mlp", "dense_mlp", "inter")
_ROUTED_EXPERT_ROLES = _swiglu_roles("expert", "mlp.experts.{expert}", "routed_experts", "moe_inter")

_GQA_ATTENTION_ROLES = {
    "q_proj": TensorRole(L + "self_attn.q_proj.weight", "attention", ("q_out", "hidden")),
    "k_proj": TensorRole(L + "self_attn.k_proj.weight", "attention", ("kv_out", "hidden")),
    "v_proj": TensorRole(L + "self_attn.v_proj.weight", "attention", ("kv_out", "hidden")),
    "o_proj": TensorRole(L + "self_attn.o_proj.weight", "attention", ("hidden", "q_out")),
    "q_bias": TensorRole(L + "self_attn.q_proj.bias", "attention", ("q_out",)),
    "k_bias": TensorRole(L + "self_attn.k_proj.bias", "attention", ("kv_out",)),
    "v_bias": TensorRole(L + "self_attn.v_proj.bias", "attention", ("kv_out",)),
}

# Weights fed one tensor by transformers' modelling code: an MLP's gate and up projections read
# its input; GQA's q, k and v projections read the normalised hidden state.
_MLP_SHARED_INPUTS = (("mlp_gate", "mlp_up"),)
_EXPERT_SHARED_INPUTS = (("expert_gate", "expert_up"),)
_GQA_SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"),)

_QK_NORM_ROLES = {
    "q_norm": TensorRole(L + "self_attn.q_norm.weight", "norms", ("head_dim",)),
    "k_norm": TensorRole(L + "self_attn.k_norm.weight", "norms", ("head_dim",)),
}

_GQA_DIMS = {
    "hidden": ("hidden_size",),
    "vocab": ("vocab_size",),
    "layers": ("num_hidden_layers",),
    "inter": ("intermediate_size",),
    "heads": ("num_attention_heads",),
    "kv_heads": ("num_key_value_heads", "num_attention_heads"),
    "head_dim": ("head_dim", "hidden // heads"),
    "q_out": ("heads * head_dim",),
    "kv_out": ("kv_heads * head_dim",),
}

_GQA_LAYOUT_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling")

# Multi-head latent attention (DeepSeek-V2 and V3): q through a low-rank q_a/q_b pair (or one q_proj without a
# q LoRA), keys and values from one compressed latent (kv_a_proj_with_mqa: the latent and the shared rotary key).
_MLA_DIMS = {
    "heads": ("num_attention_heads",),
    "q_lora_rank": ("q_lora_rank",),
    "kv_lora_rank": ("kv_lora_rank",),
    "qk_rope_head_dim": ("qk_rope_head_dim",),
    "qk_nope_head_dim": ("qk_nope_head_dim",),
    "v_head_dim": ("v_head_dim",),
    "q_b_out": ("heads * (qk_nope_head_dim + qk_rope_head_dim)",),
    "kv_a_out": ("kv_lora_rank + qk_rope_head_dim",),
    "kv_b_out": ("heads * (qk_nope_head_dim + v_head_dim)",),
    "o_in": ("heads * v_head_dim",),
}

_MLA_ROLES = {
    "q_a_proj": TensorRole(L + "self_attn.q_a_proj.weight", "attention", ("q_lora_rank", "hidden")),
    "q_a_norm": TensorRole(L + "self_attn.q_a_layernorm.weight", "norms", ("q_lora_rank",)),
    "q_b_proj": TensorRole(L + "self_attn.q_b_proj.weight", "attention", ("q_b_out", "q_lora_rank")),
    "q_proj": TensorRole(L + "self_attn.q_proj.weight", "attention", ("q_b_out", "hidden")),
    "kv_a_proj": TensorRole(L + "self_attn.kv_a_proj_with_mqa.weight", "attention", ("kv_a_out", "hidden")),
    "kv_a_norm": TensorRole(L + "self_attn.kv_a_layernorm.weight", "norms", ("kv_lora_rank",)),
    "kv_b_proj": TensorRole(L + "self_attn.kv_b_proj.weight", "attention", ("kv_b_out", "kv_lora_rank")),
    "o_proj": TensorRole(L + "self_attn.o_proj.weight", "attention", ("hidden", "o_in")),
}

_MLA_LAYOUT_KEYS = ("num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                    "v_head_dim", "rope_theta", "rope_scaling")

# DeepSeek's shared experts: one MLP of moe_intermediate_size * n_shared_experts beside the routed ones, ungated.
_SHARED_EXPERTS_ROLES = _swiglu_roles("shared", "mlp.shared_experts", "shared_experts", "shared_inter")

# Sigmoid routing with a selection-only bias (DeepSeek-V3's auxiliary-loss-free balancing; GLM-4.5 has it too).
_SIGMOID_ROUTER_ROLES = {
    "router": TensorRole(L + "mlp.gate.weight", "router", ("n_experts", "hidden")),
    "router_bias": TensorRole(L + "mlp.gate.e_score_correction_bias", "router", ("n_experts",)),
}
_SIGMOID_ROUTING_KEYS = {"norm_topk_prob": "norm_topk_prob", "scaling": "routed_scaling_factor",
                         "n_group": "n_group", "topk_group": "topk_group"}

# The release's multi-token-prediction module (DeepSeek-V3; GLM-4.5 and 4.6 ship the same layout):
# model.layers.<num_hidden_layers + i> is a full MoE decoder layer plus its own embedding, the two norms of its
# inputs, the projection of their concatenation (eh_proj: [enorm(embed(t_{i+1})); hnorm(h_i)] -> hidden) and its
# own head. The FP8 release keeps eh_proj in BF16 (vLLM and SGLang build it as a plain Linear), while its decoder
# layer's projections are FP8; an fp8_output keeps eh_proj as the base stores it.
_MTP_ROLES = {
    "mtp_embed": TensorRole(L + "embed_tokens.weight", "embeddings", ("vocab", "hidden")),
    "mtp_enorm": TensorRole(L + "enorm.weight", "norms", ("hidden",)),
    "mtp_hnorm": TensorRole(L + "hnorm.weight", "norms", ("hidden",)),
    "mtp_eh_proj": TensorRole(L + "eh_proj.weight", "mtp", ("hidden", "eh_in")),
    "mtp_head_norm": TensorRole(L + "shared_head.norm.weight", "norms", ("hidden",)),
    "mtp_head": TensorRole(L + "shared_head.head.weight", "lm_head", ("vocab", "hidden")),
}
_MTP_LAYERS = ExtraLayers(kind="mtp", count_key="num_nextn_predict_layers", roles=tuple(_MTP_ROLES))

# The MoE dimensions of the families with DeepSeek's shared experts and MTP layers (DeepSeek-V3, GLM-4.5), and
# the defaults of their sigmoid group routing (transformers' config classes).
_SHARED_EXPERT_MOE_DIMS = {
    "moe_inter": ("moe_intermediate_size",),
    "n_experts": ("n_routed_experts", "num_local_experts"),
    "top_k": ("num_experts_per_tok",),
    "n_shared": ("n_shared_experts",),
    "shared_inter": ("moe_inter * n_shared",),
    "eh_in": ("hidden * 2",),
}
_SIGMOID_MOE_DEFAULTS = {"moe_layer_freq": 1, "tie_word_embeddings": False, "norm_topk_prob": True,
                         "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1}

DEEPSEEK_V3 = Architecture(
    name="DeepseekV3ForCausalLM",
    mergekit_moe_names=("DeepSeek MoE",),
    chat_format="deepseek",
    model_type="deepseek_v3",
    moe_layer_rule="first_k_dense",
    scoring="sigmoid",
    keep_fp32_roles=("router_bias",),
    dims={
        "hidden": ("hidden_size",),
        "vocab": ("vocab_size",),
        "layers": ("num_hidden_layers",),
        "inter": ("intermediate_size",),
        **_SHARED_EXPERT_MOE_DIMS,
        **_MLA_DIMS,
    },
    defaults={**_SIGMOID_MOE_DEFAULTS, "first_k_dense_replace": 0, "n_shared_experts": 0},
    routing_keys=_SIGMOID_ROUTING_KEYS,
    attention_layout_keys=(*_MLA_LAYOUT_KEYS, "rope_interleave"),
    # MLA: q_a_proj (or q_proj without a q LoRA) and kv_a_proj_with_mqa both read the normalised hidden state
    shared_inputs=(*_MLP_SHARED_INPUTS, *_EXPERT_SHARED_INPUTS, ("shared_gate", "shared_up"),
                   ("q_a_proj", "q_proj", "kv_a_proj")),
    extra_layers=_MTP_LAYERS,
    # mergekit-moe's `deepseek` from Llama/Mistral models: every layer MoE, the attention as MLA computing the
    # same (maths/mla.py), sigmoid top-k renormalised (k = 1: not, as DeepSeek-MoE v1 weighs a lone expert by its
    # score), one ungated shared expert
    dense_attention="mla",
    shared_expert="ungated",
    from_dense_config={"first_k_dense_replace": 0, "moe_layer_freq": 1, "n_group": 1, "topk_group": 1,
                       "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
                       "routed_scaling_factor": 1.0, "n_shared_experts": 1, "num_nextn_predict_layers": 0},
    roles={
        **_MTP_ROLES,
        **_COMMON_ROLES,
        **_DENSE_MLP_ROLES,
        **_ROUTED_EXPERT_ROLES,
        **_SIGMOID_ROUTER_ROLES,
        **_SHARED_EXPERTS_ROLES,
        **_MLA_ROLES,
    },
)

QWEN3_MOE = Architecture(
    plain_forward=True,
    name="Qwen3MoeForCausalLM",
    chat_format="chatml",
    model_type="qwen3_moe",
    moe_layer_rule="sparse_step",
    scoring="softmax",
    dims={
        **_GQA_DIMS,
        "moe_inter": ("moe_intermediate_size",),
        "n_experts": ("num_experts", "num_local_experts"),
        "top_k": ("num_experts_per_tok",),
    },
    defaults={"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": False, "tie_word_embeddings": False},
    routing_keys={"norm_topk_prob": "norm_topk_prob"},
    attention_layout_keys=_GQA_LAYOUT_KEYS,
    shared_inputs=(*_MLP_SHARED_INPUTS, *_EXPERT_SHARED_INPUTS, *_GQA_SHARED_INPUTS),
    # as mergekit-moe builds a Qwen3-MoE from Qwen3 models: every layer MoE, normalised top-k
    from_dense_config={"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    roles={
        **_COMMON_ROLES,
        **_DENSE_MLP_ROLES,
        **_ROUTED_EXPERT_ROLES,
        **_GQA_ATTENTION_ROLES,
        **_QK_NORM_ROLES,
        "router": TensorRole(L + "mlp.gate.weight", "router", ("n_experts", "hidden")),
    },
)


# Mixtral: every layer MoE, softmax top-k renormalised; experts w1 (gate), w3 (up), w2 (down) under
# block_sparse_moe, as transformers saves them (its model fuses them on load; the module is still `mlp`).
MIXTRAL = Architecture(
    plain_forward=True,
    name="MixtralForCausalLM",
    chat_format=None,
    model_type="mixtral",
    moe_layer_rule="all",
    scoring="softmax",
    dims={
        **_GQA_DIMS,
        "moe_inter": ("intermediate_size",),
        "n_experts": ("num_local_experts",),
        "top_k": ("num_experts_per_tok",),
    },
    # Mixtral always renormalises its top-k weights (softmax over the k picked logits); configs have no key for it
    defaults={"tie_word_embeddings": False, "norm_topk_prob": True},
    routing_keys={"norm_topk_prob": "norm_topk_prob"},
    attention_layout_keys=_GQA_LAYOUT_KEYS,
    shared_inputs=(*_EXPERT_SHARED_INPUTS, *_GQA_SHARED_INPUTS),
    # as mergekit-moe builds a Mixtral from Llama or Mistral models: no sliding window
    from_dense_config={"sliding_window": None},
    roles={
        **_COMMON_ROLES,
        **{k: v for k, v in _GQA_ATTENTION_ROLES.items() if not k.endswith("_bias")},
        "router": TensorRole(L + "block_sparse_moe.gate.weight", "router", ("n_experts", "hidden")),
        "expert_gate": TensorRole(L + "block_sparse_moe.experts.{expert}.w1.weight", "routed_experts",
                                  ("moe_inter", "hidden")),
        "expert_up": TensorRole(L + "block_sparse_moe.experts.{expert}.w3.weight", "routed_experts",
                                ("moe_inter", "hidden")),
        "expert_down": TensorRole(L + "block_sparse_moe.experts.{expert}.w2.weight", "routed_experts",
                                  ("hidden", "moe_inter")),
    },
)

# Qwen2-MoE: GQA with q/k/v biases, softmax top-k, and one shared expert gated by sigmoid(shared_expert_gate . x).
QWEN2_MOE = Architecture(
    plain_forward=True,
    name="Qwen2MoeForCausalLM",
    chat_format="chatml",
    model_type="qwen2_moe",
    moe_layer_rule="sparse_step",
    scoring="softmax",
    dims={
        **_GQA_DIMS,
        "moe_inter": ("moe_intermediate_size",),
        "n_experts": ("num_experts",),
        "top_k": ("num_experts_per_tok",),
        "shared_inter": ("shared_expert_intermediate_size",),
    },
    defaults={"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": False, "tie_word_embeddings": False},
    routing_keys={"norm_topk_prob": "norm_topk_prob"},
    attention_layout_keys=_GQA_LAYOUT_KEYS,
    shared_inputs=(*_MLP_SHARED_INPUTS, *_EXPERT_SHARED_INPUTS, ("shared_gate", "shared_up", "shared_router"),
                   *_GQA_SHARED_INPUTS),
    # as mergekit-moe builds a Qwen2-MoE from Qwen2, Llama or Mistral models
    from_dense_config={"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                       "use_sliding_window": False, "sliding_window": None, "qkv_bias": True},
    zeros_from_dense=("q_bias", "k_bias", "v_bias"),
    shared_expert="gated",
    roles={
        **_COMMON_ROLES,
        **_DENSE_MLP_ROLES,
        **_ROUTED_EXPERT_ROLES,
        **_GQA_ATTENTION_ROLES,
        "router": TensorRole(L + "mlp.gate.weight", "router", ("n_experts", "hidden")),
        **_swiglu_roles("shared", "mlp.shared_expert", "shared_experts", "shared_inter"),
        "shared_router": TensorRole(L + "mlp.shared_expert_gate.weight", "shared_experts", (1, "hidden")),
    },
)


# DeepSeek-V2 and V2.5 (V2-Lite too): MLA as in V3, softmax scores, top-k greedy or within the best `topk_group` of
# `n_group` groups (`topk_method: group_limited_greedy`, a group scored by its best expert), weights times
# routed_scaling_factor and never renormalised (transformers 5 reads no norm_topk_prob; the releases say false),
# ungated shared experts, dense first layers. `attention_bias` and `mlp_bias` add the biases below.
DEEPSEEK_V2 = Architecture(
    name="DeepseekV2ForCausalLM",
    mergekit_moe_names=("DeepSeek MoE",),
    chat_format="deepseek",
    model_type="deepseek_v2",
    moe_layer_rule="first_k_dense",
    scoring="softmax",
    dims={
        "hidden": ("hidden_size",),
        "vocab": ("vocab_size",),
        "layers": ("num_hidden_layers",),
        "inter": ("intermediate_size",),
        "moe_inter": ("moe_intermediate_size",),
        "n_experts": ("n_routed_experts",),
        "top_k": ("num_experts_per_tok",),
        "n_shared": ("n_shared_experts",),
        **_MLA_DIMS,
        "shared_inter": ("moe_inter * n_shared",),
    },
    # transformers' DeepseekV2Config defaults
    defaults={"first_k_dense_replace": 0, "moe_layer_freq": 1, "n_shared_experts": 2, "tie_word_embeddings": False,
              "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "topk_method": "greedy"},
    routing_keys={"scaling": "routed_scaling_factor", "n_group": "n_group", "topk_group": "topk_group",
                  "topk_method": "topk_method"},
    group_score="max",
    attention_layout_keys=(*_MLA_LAYOUT_KEYS, "rope_parameters", "attention_bias"),
    shared_inputs=(*_MLP_SHARED_INPUTS, *_EXPERT_SHARED_INPUTS, ("shared_gate", "shared_up"),
                   ("q_a_proj", "q_proj", "kv_a_proj")),
    roles={
        **_COMMON_ROLES,
        **_DENSE_MLP_ROLES,
        **_ROUTED_EXPERT_ROLES,
        "router": TensorRole(L + "mlp.gate.weight", "router", ("n_experts", "hidden")),
        **_SHARED_EXPERTS_ROLES,
        **_MLA_ROLES,
        "q_a_bias": TensorRole(L + "self_attn.q_a_proj.bias", "attention", ("q_lora_rank",)),
        "kv_a_bias": TensorRole(L + "self_attn.kv_a_proj_with_mqa.bias", "attention", ("kv_a_out",)),
        "o_bias": TensorRole(L + "self_attn.o_proj.bias", "attention", ("hidden",)),
        "mlp_gate_bias": TensorRole(L + "mlp.gate_proj.bias", "dense_mlp", ("inter",)),
        "mlp_up_bias": TensorRole(L + "mlp.up_proj.bias", "dense_mlp", ("inter",)),
        "mlp_down_bias": TensorRole(L + "mlp.down_proj.bias", "dense_mlp", ("hidden",)),
        "shared_gate_bias": TensorRole(L + "mlp.shared_experts.gate_proj.bias", "shared_experts", ("shared_inter",)),
        "shared_up_bias": TensorRole(L + "mlp.shared_experts.up_proj.bias", "shared_experts", ("shared_inter",)),
        "shared_down_bias": TensorRole(L + "mlp.shared_experts.down_proj.bias", "shared_experts", ("hidden",)),
    },
)

# GLM-4.5 / 4.6 (and 4.5-Air): GQA with q/k/v biases (attention_bias), q/k norms where use_qk_norm, partial rotary
# (rope_parameters.partial_rotary_factor), DeepSeek-V3's router (sigmoid, selection bias, groups), one ungated
# shared expert, `first_k_dense_replace` dense layers, and the release's MTP layer(s) laid out as DeepSeek-V3's
# (GLM-4.5: model.layers.92, num_nextn_predict_layers 1; transformers drops them on load, vLLM and SGLang run them).
GLM4_MOE = Architecture(
    name="Glm4MoeForCausalLM",
    chat_format=None,
    model_type="glm4_moe",
    moe_layer_rule="first_k_dense",
    scoring="sigmoid",
    keep_fp32_roles=("router_bias",),
    dims={
        **_GQA_DIMS,
        **_SHARED_EXPERT_MOE_DIMS,
    },
    # transformers' Glm4MoeConfig defaults
    defaults={**_SIGMOID_MOE_DEFAULTS, "first_k_dense_replace": 1, "n_shared_experts": 1},
    routing_keys=_SIGMOID_ROUTING_KEYS,
    attention_layout_keys=(*_GQA_LAYOUT_KEYS, "rope_parameters", "partial_rotary_factor", "use_qk_norm",
                           "attention_bias"),
    shared_inputs=(*_MLP_SHARED_INPUTS, *_EXPERT_SHARED_INPUTS, ("shared_gate", "shared_up"), *_GQA_SHARED_INPUTS),
    extra_layers=_MTP_LAYERS,
    roles={
        **_MTP_ROLES,
        **_COMMON_ROLES,
        **_DENSE_MLP_ROLES,
        **_ROUTED_EXPERT_ROLES,
        **_SIGMOID_ROUTER_ROLES,
        **_SHARED_EXPERTS_ROLES,
        **_GQA_ATTENTION_ROLES,
        **_QK_NORM_ROLES,
    },
)

# GPT-OSS: GQA with biases on q/k/v/o and a learned attention sink per head, sliding and full attention layers
# alternating (`layer_types`), every layer MoE. The router has a bias (logits = W x + b; softmax over the top-k
# logits, so the picked weights sum to 1). The experts are fused: one tensor per projection holds every expert of
# the layer (axis 0), gate and up interleaved along the last axis of gate_up_proj (gate = [..., ::2]), each
# stored transposed (hidden x 2 inter, inter x hidden), with a bias per expert. The releases store gate_up_proj
# and down_proj as MXFP4 (`*_blocks` / `*_scales`); the reader dequantises them to these BF16 tensors.
GPT_OSS = Architecture(
    name="GptOssForCausalLM",
    chat_format=None,
    model_type="gpt_oss",
    moe_layer_rule="all",
    scoring="softmax",
    dims={
        **_GQA_DIMS,
        "moe_inter": ("intermediate_size",),
        "n_experts": ("num_local_experts",),
        "top_k": ("num_experts_per_tok",),
        "gate_up_out": ("moe_inter * 2",),
    },
    defaults={"tie_word_embeddings": False, "norm_topk_prob": True},
    routing_keys={"norm_topk_prob": "norm_topk_prob"},
    attention_layout_keys=(*_GQA_LAYOUT_KEYS, "rope_parameters", "sliding_window", "layer_types"),
    shared_inputs=_GQA_SHARED_INPUTS,
    roles={
        **_COMMON_ROLES,
        **_GQA_ATTENTION_ROLES,
        "o_bias": TensorRole(L + "self_attn.o_proj.bias", "attention", ("hidden",)),
        "attn_sinks": TensorRole(L + "self_attn.sinks", "attention", ("heads",)),
        "router": TensorRole(L + "mlp.router.weight", "router", ("n_experts", "hidden")),
        "router_logit_bias": TensorRole(L + "mlp.router.bias", "router", ("n_experts",)),
        "experts_gate_up": TensorRole(L + "mlp.experts.gate_up_proj", "routed_experts",
                                      ("n_experts", "hidden", "gate_up_out"), expert_axis=0),
        "experts_gate_up_bias": TensorRole(L + "mlp.experts.gate_up_proj_bias", "routed_experts",
                                           ("n_experts", "gate_up_out"), expert_axis=0),
        "experts_down": TensorRole(L + "mlp.experts.down_proj", "routed_experts", ("n_experts", "moe_inter", "hidden"),
                                   expert_axis=0),
        "experts_down_bias": TensorRole(L + "mlp.experts.down_proj_bias", "routed_experts", ("n_experts", "hidden"),
                                        expert_axis=0),
    },
)


def _dense(name: str, model_type: str, qk_norm: bool, chat_format: str | None = None) -> Architecture:
    return Architecture(
        name=name,
        chat_format=chat_format,
        model_type=model_type,
        moe_layer_rule="none",
        scoring="none",
        dims=dict(_GQA_DIMS),
        defaults={"tie_word_embeddings": False},
        attention_layout_keys=_GQA_LAYOUT_KEYS,
        shared_inputs=(*_MLP_SHARED_INPUTS, *_GQA_SHARED_INPUTS),
        roles={**_COMMON_ROLES, **_DENSE_MLP_ROLES, **_GQA_ATTENTION_ROLES, **(_QK_NORM_ROLES if qk_norm else {})},
        plain_forward=True,
    )


# The MoE architectures each dense family becomes are mergekit-moe's choice (MERGEKIT_MOE_OUTPUTS below).
QWEN3 = _dense("Qwen3ForCausalLM", "qwen3", qk_norm=True, chat_format="chatml")
QWEN2 = _dense("Qwen2ForCausalLM", "qwen2", qk_norm=False, chat_format="chatml")
LLAMA = _dense("LlamaForCausalLM", "llama", qk_norm=False)
MISTRAL = _dense("MistralForCausalLM", "mistral", qk_norm=False)

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (DEEPSEEK_V3, QWEN3_MOE, MIXTRAL, QWEN2_MOE, DEEPSEEK_V2,
                                                              GLM4_MOE, GPT_OSS, QWEN3, QWEN2, LLAMA, MISTRAL)}

# mergekit-moe's output architectures (its `architecture:` values match their names by prefix, ignoring case):
# name -> (the table written, the `model_type`s of the dense sources it takes, how many shared experts)
# "DeepSeek MoE" is mergekit's remote-code DeepSeek-MoE v1 (Llama attention, softmax top-k, an ungated shared
# expert); written here without remote code as DeepseekV3ForCausalLM: MLA holding the Llama attention (exact in
# transformers, see maths/mla.py), sigmoid top-k, the ungated shared expert (zeros when there is none).
MERGEKIT_MOE_OUTPUTS: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]] = {
    "Mixtral": ("MixtralForCausalLM", ("llama", "mistral"), (0,)),
    "DeepSeek MoE": ("DeepseekV3ForCausalLM", ("llama", "mistral"), (0, 1)),
    "Qwen MoE": ("Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), (1,)),
    "Qwen3 MoE": ("Qwen3MoeForCausalLM", ("qwen3",), (0,)),
}
