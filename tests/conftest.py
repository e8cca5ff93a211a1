"""Shared fixtures: tiny real checkpoints (transformers classes, a trained BPE tokenizer), saved sharded.

These are random-weight models for plumbing tests that must run in seconds; the trained
demo models (zenith_merge.demo) serve the end-to-end tests marked `demo`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Nothing is downloaded in tests: the Hub client (transformers, bitsandbytes' kernels, mergekit) stays offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = ["def add(a, b):\n    return a + b\n", "What is 3 + 4? It is 7.", "class Stack:\n    pass\n"] * 20


def save_tokenizer(path: Path, vocab_size: int = 300, specials: tuple[str, ...] = (), text: list[str] = TEXT) -> None:
    """A byte-level BPE tokenizer with bos/eos (and `specials`), loadable by AutoTokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>", *specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", additional_special_tokens=list(specials))
    fast.save_pretrained(path)


def make_tiny_deepseek(path: Path, *, seed: int = 0, shard: str = "40KB", dtype=torch.bfloat16, **overrides) -> Path:
    """A tiny DeepseekV3ForCausalLM (MLA, group routing, shared expert, dense first layer), sharded."""
    torch.manual_seed(seed)
    values = dict(
        vocab_size=320, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=2, max_position_embeddings=128)
    config = transformers.DeepseekV3Config(**{**values, **overrides})
    model = transformers.DeepseekV3ForCausalLM(config)
    with torch.no_grad():  # transformers initialises the router to zeros; give it something to route with
        for layer in model.model.layers[1:]:
            layer.mlp.gate.weight.normal_(0, 0.5)
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    model.to(dtype).save_pretrained(path, max_shard_size=shard)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_deepseek(tmp_path_factory) -> Path:
    """A sharded tiny DeepSeek-V3 folder with tokenizer and generation config (read-only: don't modify it)."""
    return make_tiny_deepseek(tmp_path_factory.mktemp("tiny-deepseek"))


def write_config(tmp_path: Path, **data) -> Path:
    """A YAML merge config in tmp_path."""
    import yaml

    p = tmp_path / "merge.yml"
    p.write_text(yaml.safe_dump(data))
    return p


def read_index(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def make_tiny_qwen3_moe(path: Path, *, seed: int = 0, hidden: int = 24, layers: int = 2, experts: int = 4,
                        moe_inter: int = 12, shard: str = "20KB", dtype=torch.bfloat16, **overrides) -> Path:
    """A tiny Qwen3MoeForCausalLM (GQA, softmax routing, no shared expert) of another width, sharded."""
    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(
        vocab_size=320, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=moe_inter,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=experts,
        num_experts_per_tok=2, norm_topk_prob=True, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        max_position_embeddings=128, **overrides)
    config.architectures = ["Qwen3MoeForCausalLM"]
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    model.to(dtype).save_pretrained(path, max_shard_size=shard)
    save_tokenizer(path)
    return path


def make_tiny_dense(path: Path, *, seed: int = 0, hidden: int = 32, inter: int = 40, layers: int = 2,
                    cls: str = "Qwen3ForCausalLM", dtype=torch.bfloat16, **config_values) -> Path:
    """A tiny dense decoder (Qwen3 by default): its MLP becomes one expert. `config_values` override the config's
    (num_key_value_heads, rope_parameters, ...)."""
    torch.manual_seed(seed)
    config_cls = getattr(transformers, cls.replace("ForCausalLM", "Config"))
    values = dict(vocab_size=320, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, bos_token_id=0, eos_token_id=1,
                  pad_token_id=2, max_position_embeddings=128)
    config = config_cls(**{**values, **config_values})
    config.architectures = [cls]
    getattr(transformers, cls)(config).to(dtype).save_pretrained(path, max_shard_size="20KB")
    save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen_moe(tmp_path_factory) -> Path:
    """A sharded tiny Qwen3-MoE folder (hidden 24: another width than tiny_deepseek's 32)."""
    return make_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny-qwen-moe"))


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded output folder, by name."""
    from safetensors import safe_open

    out = {}
    for name, file in read_index(folder)["weight_map"].items():
        with safe_open(folder / file, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def add_mtp_layer(folder: Path, *, seed: int = 1) -> Path:
    """Give a tiny DeepSeek-V3 folder the release's multi-token-prediction layer, as DeepSeek ships it: layer
    `num_hidden_layers` holds a copy of the last decoder layer's tensors (perturbed, seeded) plus the MTP's own
    embed_tokens, enorm, hnorm, eh_proj, shared_head.norm and shared_head.head, in a shard of its own, and
    config.json says num_nextn_predict_layers: 1."""
    from safetensors.torch import save_file

    config = json.loads((folder / "config.json").read_text())
    depth, hidden, vocab = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    tensors = tensors_of(folder)
    gen = torch.Generator().manual_seed(seed)
    last, mtp = f"model.layers.{depth - 1}.", f"model.layers.{depth}."
    dtype = tensors["model.embed_tokens.weight"].dtype
    extra = {mtp + name.removeprefix(last): (t.float() + 0.01 * torch.randn(t.shape, generator=gen)).to(t.dtype)
             for name, t in tensors.items() if name.startswith(last)}
    extra.update({
        mtp + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
        mtp + "enorm.weight": torch.ones(hidden, dtype=dtype),
        mtp + "hnorm.weight": torch.ones(hidden, dtype=dtype),
        mtp + "eh_proj.weight": (0.02 * torch.randn(hidden, 2 * hidden, generator=gen)).to(dtype),
        mtp + "shared_head.norm.weight": torch.ones(hidden, dtype=dtype),
        mtp + "shared_head.head.weight": (0.02 * torch.randn(vocab, hidden, generator=gen)).to(dtype),
    })
    shard = "model-mtp.safetensors"
    save_file({k: v.contiguous() for k, v in extra.items()}, str(folder / shard), metadata={"format": "pt"})
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {
        "metadata": {}, "weight_map": {n: "model.safetensors" for n in tensors}}
    index["weight_map"].update({k: shard for k in extra})
    index_path.write_text(json.dumps(index, indent=2))
    config["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def stored_bytes(folder: Path) -> dict[str, bytes]:
    """Every tensor of a folder as stored: name -> raw bytes (FP8 weights and their scales as they are)."""
    from safetensors import safe_open

    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return out
