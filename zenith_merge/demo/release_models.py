"""Tiny random-weight DeepSeek-V3 and Qwen3-MoE models on the real release tokenizers.

The architectures are the releases' (MLA, sigmoid group routing with a shared expert and a
dense first layer; GQA with softmax routing), shrunk to a few layers of width 48-64 but with
the release vocabularies (129,280 and 151,936 rows), so vocabulary work (unions, row
transplants, tokenizer-aware merges) meets the real tokenizers. Weights are random, seeded and
built on one thread, so the same code and library versions give the same bytes; they are
saved in bfloat16 over several safetensors shards, with the release tokenizer files beside them.

    from zenith_merge.demo.release_models import release_tiny_model
    folder = release_tiny_model("deepseek-v3-tiny")   # built on first use (seconds), then cached
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import ZenithError
from .release_tokenizers import TOKENIZER_FILES, ensure_built, fingerprint, release_tokenizer

SEED = 0
MAX_SHARD_SIZE = "20MB"  # both models are ~30 MB in bfloat16: embeddings and head land in different shards

# name -> (transformers class, release tokenizer, config values)
RELEASE_MODELS: dict[str, tuple[str, str, dict]] = {
    "deepseek-v3-tiny": ("DeepseekV3ForCausalLM", "deepseek-v3", dict(
        vocab_size=129280, bos_token_id=0, eos_token_id=1, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_attention_heads=4, num_key_value_heads=4,
        routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
        tie_word_embeddings=False, max_position_embeddings=4096)),
    "qwen3-moe-release-tiny": ("Qwen3MoeForCausalLM", "qwen3", dict(
        vocab_size=151936, bos_token_id=151643, eos_token_id=151645, hidden_size=48, intermediate_size=96,
        moe_intermediate_size=24, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        decoder_sparse_step=1, mlp_only_layers=[])),
}
MODEL_FILES = ("config.json", "model.safetensors.index.json", *TOKENIZER_FILES)


def _check_name(name: str) -> None:
    if name not in RELEASE_MODELS:
        raise ZenithError(f"unknown release tiny model {name!r}; release tiny models: {', '.join(RELEASE_MODELS)}")


def write_release_tiny_model(name: str, folder: str | Path, *, tokenizer_dir: str | Path | None = None) -> Path:
    """Build release tiny model `name` into `folder` (uncached) and return it.

    Weights are drawn from a fixed seed on one torch thread (the caller's RNG state and thread
    count are restored). transformers initialises the routers to zeros, which routes every token
    alike; they are drawn from N(0, 0.5) instead, and DeepSeek's expert-score correction bias from
    U(-0.1, 0.1), so that routing depends on the input. The release tokenizer's files are copied
    in from `tokenizer_dir`, or from the cached release tokenizer when it is None.
    """
    import torch
    import transformers

    _check_name(name)
    cls_name, tokenizer, values = RELEASE_MODELS[name]
    cls = getattr(transformers, cls_name)
    config = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(**values)
    config.architectures = [cls_name]
    folder = Path(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = cls(config)
            with torch.no_grad():
                for layer in model.model.layers:
                    gate = getattr(layer.mlp, "gate", None)
                    if gate is None or not hasattr(gate, "weight"):  # a dense layer (DeepSeek's first)
                        continue
                    gate.weight.normal_(0, 0.5)
                    if hasattr(gate, "e_score_correction_bias"):
                        gate.e_score_correction_bias.uniform_(-0.1, 0.1)
        model.to(torch.bfloat16).save_pretrained(folder, max_shard_size=MAX_SHARD_SIZE)
    finally:
        torch.set_num_threads(threads)
    source = Path(tokenizer_dir) if tokenizer_dir is not None else release_tokenizer(tokenizer)
    for file in TOKENIZER_FILES:  # the release generation_config.json replaces the one derived from config
        shutil.copyfile(source / file, folder / file)
    return folder


def release_tiny_model(name: str) -> Path:
    """The folder of release tiny model `name` ("deepseek-v3-tiny" or "qwen3-moe-release-tiny"), built on first use.

    It lives in `cache_root()/release-<key>/<name>`, the key hashing this module's and
    release_tokenizers' code and the versions of the tokenizer packages, torch and transformers.
    """
    from .cache import cache_root

    _check_name(name)
    tokenizer_dir = release_tokenizer(RELEASE_MODELS[name][1])
    key = fingerprint(("release_tokenizers", "release_models"), ("torch", "transformers", "safetensors"))
    return ensure_built(cache_root() / f"release-{key}", name,
                        lambda tmp: write_release_tiny_model(name, tmp, tokenizer_dir=tokenizer_dir), MODEL_FILES)
