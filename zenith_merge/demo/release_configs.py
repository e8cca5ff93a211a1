"""The release config.json values of DeepSeek-V3 and Qwen3-MoE (public facts, as the hub's files have them), the
small fixtures' overrides, and the release's shard sizes.
"""

from __future__ import annotations

import copy
from typing import Any

FAMILIES = ("deepseek-v3", "qwen3-moe")
BLOCK = 128  # the release's FP8 weight_block_size, both dimensions
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# deepseek-ai/DeepSeek-V3 config.json, as released (values are public facts)
DEEPSEEK_V3_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


# Qwen/Qwen3-30B-A3B config.json, as released
QWEN3_30B_A3B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


# Qwen/Qwen3-235B-A22B config.json: the 30B's keys, other widths
QWEN3_235B_A22B_CONFIG: dict[str, Any] = {
    **QWEN3_30B_A3B_CONFIG, "hidden_size": 4096, "intermediate_size": 12288, "max_window_layers": 94,
    "moe_intermediate_size": 1536, "num_attention_heads": 64, "num_hidden_layers": 94,
}


# The block-FP8 quantization_config of DeepSeek-V3 (and of Qwen3's -FP8 releases)
FP8_QUANTIZATION_CONFIG = copy.deepcopy(DEEPSEEK_V3_CONFIG["quantization_config"])
RELEASE_CONFIGS = {"deepseek-v3": DEEPSEEK_V3_CONFIG, "qwen3-moe": QWEN3_30B_A3B_CONFIG}
RELEASE_TOKENIZERS_OF = {"deepseek-v3": "deepseek-v3", "qwen3-moe": "qwen3"}
# Largest shard written by default: DeepSeek-V3's run to ~5.2 GB (163 of them), Qwen3-30B-A3B's to ~4 GB
DEFAULT_SHARD_BYTES = {"deepseek-v3": 5 * 2**30, "qwen3-moe": 4 * 10**9}
# Small widths for tests: the release vocabularies (the tokenizers' ids must fit), everything else shrunk
SMALL_DEEPSEEK_V3: dict[str, Any] = {
    "num_hidden_layers": 2, "first_k_dense_replace": 1, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "n_group": 4, "topk_group": 2, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
    "q_lora_rank": 96, "kv_lora_rank": 64, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32,
    "num_attention_heads": 4, "num_key_value_heads": 4,
}


SMALL_QWEN3_MOE: dict[str, Any] = {
    "num_hidden_layers": 2, "max_window_layers": 2, "num_experts": 8, "num_experts_per_tok": 2,
    "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64,
}


SMALL_SHARD_BYTES = 48 * 2**20
# name -> write_release_checkpoint arguments of the cached fixtures (release_fixture)
RELEASE_FIXTURES: dict[str, dict[str, Any]] = {
    # two children of one parent, as DeepSeek-V3 and R1 are: 2 layers (the first dense) + 1 MTP layer
    "deepseek-v3-fp8-small": dict(family="deepseek-v3", overrides=SMALL_DEEPSEEK_V3, fp8=True, parent_seed=0,
                                  child_seed=1),
    "deepseek-v3-r1-fp8-small": dict(family="deepseek-v3", overrides=SMALL_DEEPSEEK_V3, fp8=True, parent_seed=0,
                                     child_seed=2),
    # deepseek-v3-fp8-small dequantised: what fp8_cast_bf16.py makes of it, byte for byte
    "deepseek-v3-bf16-small": dict(family="deepseek-v3", overrides=SMALL_DEEPSEEK_V3, fp8=False, parent_seed=0,
                                   child_seed=1),
    "qwen3-moe-small": dict(family="qwen3-moe", overrides=SMALL_QWEN3_MOE, fp8=False, seed=0),
    # two FP8 children of one parent, as Qwen3-30B-A3B-Instruct-2507-FP8 and -Thinking-2507-FP8 are
    "qwen3-moe-instruct-fp8-small": dict(family="qwen3-moe", overrides=SMALL_QWEN3_MOE, fp8=True, parent_seed=0,
                                         child_seed=1),
    "qwen3-moe-thinking-fp8-small": dict(family="qwen3-moe", overrides=SMALL_QWEN3_MOE, fp8=True, parent_seed=0,
                                         child_seed=2),
}
