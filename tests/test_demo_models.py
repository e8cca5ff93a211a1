"""The embedded demo models: deterministic corpora, tokenizers and builds; standard folders; trained for real.

Tests marked `demo` use the cached demo models (`ensure_all`, built on first use in a few
minutes); the rest build scaled-down models into tmp_path in seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from zenith_merge.demo import (
    DEMO_NAMES,
    PARENT_NAME,
    bits_per_byte,
    build_model,
    cache_root,
    calibration_text,
    corpus,
    demo_path,
    ensure_all,
    ensure_demo,
    heldout_text,
)
from zenith_merge.demo.build import deterministic_torch
from zenith_merge.demo.tokenizers import QWEN_TOKENIZER, ZEN_TOKENIZER, build_tokenizer
from zenith_merge.errors import ZenithError


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.suffix == ".safetensors" or p.name == "tokenizer.json"}


# ------------------------------------------------------------------ corpora


def test_corpora_are_deterministic_and_splits_disjoint():
    assert corpus("code", "train", 5_000) == corpus("code", "train", 5_000)
    held = heldout_text("maths")
    assert 20_000 <= len(held.encode()) <= 40_000 and 20_000 <= len(heldout_text("code").encode()) <= 40_000
    questions = {line for line in held.splitlines() if line.startswith("Question:")}
    train_q = {line for line in corpus("maths", "train", 300_000).splitlines() if line.startswith("Question:")}
    assert questions and not questions & train_q
    assert held != calibration_text("maths")
    held_code = set(heldout_text("code").split("\n\n\n\n"))
    assert not held_code & set(corpus("code", "train", 300_000).split("\n\n\n\n"))


def test_maths_styles():
    plain = corpus("maths", "train", 2_000)
    assert plain.startswith("Question: ") and "<think>\n" in plain and "</think>\nThe answer is" in plain
    qwen = corpus("maths", "train", 20_000, style="qwen_chat")
    turns = qwen.split("<|im_start|>user\n")[1:]
    assert all(t.count("<|im_end|>") == 2 and "<|im_start|>assistant\n<think>\n" in t for t in turns)
    no_think = [t for t in turns if " /no_think<|im_end|>" in t]
    assert no_think and all("<think>\n\n</think>\n\n" in t for t in no_think)
    assert any(" /think<|im_end|>" in t for t in turns)
    r1 = corpus("maths", "train", 2_000, style="r1_chat")
    assert r1.startswith("<｜begin▁of▁sentence｜><｜User｜>") and "<｜Assistant｜><think>\n" in r1


def test_code_corpus_is_valid_python():
    import ast

    for module in corpus("code", "heldout", 20_000).split("\n\n\n\n"):
        if module.strip():
            ast.parse(module)


# --------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {name: build_tokenizer(name, root / name) for name in ("zen", "qwen")}


@pytest.mark.parametrize("recipe", [ZEN_TOKENIZER, QWEN_TOKENIZER], ids=["zen", "qwen"])
def test_tokenizer_loads_with_single_token_specials(tokenizers_dir, recipe):
    folder = tokenizers_dir[recipe.name]
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in folder.iterdir()}
    tok = AutoTokenizer.from_pretrained(folder)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast) and len(tok) == recipe.vocab_size
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    for t in recipe.specials + recipe.added:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t, t
        assert added[t].special == (t in recipe.specials), t
    assert tok.eos_token == recipe.eos and tok.pad_token == recipe.pad and tok.bos_token == recipe.bos
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == recipe.chat_template
    text = "def f(x):\n    return x + 12\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizers_differ_and_zen_adds_bos(tokenizers_dir):
    zen, qwen = (AutoTokenizer.from_pretrained(tokenizers_dir[n]) for n in ("zen", "qwen"))
    assert zen("x = 1")["input_ids"][0] == zen.bos_token_id and qwen.bos_token_id is None
    assert zen.get_vocab() != qwen.get_vocab()
    assert len(zen(" 12345", add_special_tokens=False)["input_ids"]) < len(qwen(" 12345", add_special_tokens=False)["input_ids"])


def test_chat_templates(tokenizers_dir):
    zen, qwen = (AutoTokenizer.from_pretrained(tokenizers_dir[n]) for n in ("zen", "qwen"))
    chat = [{"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "<think>\n2 + 2 = 4\n</think>\n\nThe answer is 4."},
            {"role": "user", "content": "And 3 + 3?"}]
    z = zen.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert z == ("<｜begin▁of▁sentence｜><｜User｜>What is 2 + 2?<｜Assistant｜>The answer is 4.<｜end▁of▁sentence｜>"
                 "<｜User｜>And 3 + 3?<｜Assistant｜><think>\n")
    q = qwen.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert q == ("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\nThe answer is 4.<|im_end|>\n"
                 "<|im_start|>user\nAnd 3 + 3?<|im_end|>\n<|im_start|>assistant\n")
    off = qwen.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off == q + "<think>\n\n</think>\n\n"


# ------------------------------------------------------- builds and caching


@pytest.mark.parametrize("name", ["zen-tiny", "qwen3-moe-tiny"])
def test_build_is_deterministic(tmp_path, name):
    a = build_model(name, tmp_path / "a", steps_scale=0.02, progress=False)
    b = build_model(name, tmp_path / "b", steps_scale=0.02, progress=False)
    da, db = _digests(a), _digests(b)
    assert da == db and len([n for n in da if n.endswith(".safetensors")]) >= 2
    meta = json.loads((a / "zenith_demo.json").read_text())
    assert meta["name"] == name and meta["steps"] >= 1 and meta["saved_dtype"] == "bfloat16"


def test_deterministic_torch_restores_global_state():
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    state = torch.get_rng_state()
    with deterministic_torch(1):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        torch.manual_seed(123)
    assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == det
    assert torch.equal(torch.get_rng_state(), state)


def test_unknown_demo_name_lists_valid_names():
    with pytest.raises(ZenithError, match="zen-tiny.*zen-r1-tiny.*qwen3-moe-tiny"):
        ensure_demo("llama-tiny")
    with pytest.raises(ZenithError):
        build_model("llama-tiny", Path("unused"))


def test_build_once_and_atomically(monkeypatch, tmp_path):
    """Two concurrent callers build a target once; leftovers of a killed build are cleared, never reused."""
    import threading

    from zenith_merge.demo import cache, tokenizers

    monkeypatch.setenv("ZENITH_CACHE", str(tmp_path))
    root = cache.demo_dir()
    (root / ".tokenizer-zen.tmp-999999").mkdir(parents=True)  # a build killed half-way
    (root / "tokenizer-zen").mkdir()  # an unfinished folder: no tokenizer.json
    calls = []
    real = tokenizers.build_tokenizer
    monkeypatch.setattr(tokenizers, "build_tokenizer", lambda name, folder: calls.append(name) or real(name, folder))
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache._ensure("tokenizer-zen", False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["zen"] and results == [root / "tokenizer-zen"] * 2
    assert (root / "tokenizer-zen" / "tokenizer.json").is_file() and not list(root.glob(".tokenizer-zen.tmp-*"))


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("ZENITH_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    path = demo_path("zen-tiny")
    assert path.parent.parent == tmp_path and path.parent.name.startswith("demo-") and path.name == "zen-tiny"
    monkeypatch.delenv("ZENITH_CACHE")
    assert cache_root() == Path.home() / ".cache" / "zenith-merge"


# ------------------------------------------------------------ bits per byte


def test_bits_per_byte_counts_every_token_once(tokenizers_dir):
    """A model with all-zero logits predicts uniformly: exactly log2(V) bits per token of the text."""
    tok = AutoTokenizer.from_pretrained(tokenizers_dir["zen"])
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, bos_token_id=tok.bos_token_id)
    model = transformers.LlamaForCausalLM(config)
    torch.nn.init.zeros_(model.lm_head.weight)
    text = heldout_text("code")[:3000]
    n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
    expected = n_tokens * math.log2(len(tok)) / len(text.encode())
    for max_len in (16, 100, 256):
        assert bits_per_byte(model, tok, text, max_len=max_len) == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------ the real demo models


@pytest.fixture(scope="session")
def demo_models() -> dict[str, Path]:
    folders = ensure_all()
    folders[PARENT_NAME] = ensure_demo(PARENT_NAME)
    return folders


@pytest.fixture(scope="session")
def demo_bpb(demo_models) -> dict[str, dict[str, float]]:
    """Held-out bits per byte of every demo model (and the parent) on both domains."""
    texts = {d: heldout_text(d) for d in ("code", "maths")}
    out = {}
    for name, folder in demo_models.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder)
        out[name] = {d: bits_per_byte(model, tok, t) for d, t in texts.items()}
    return out


@pytest.mark.demo
@pytest.mark.parametrize("name", DEMO_NAMES)
def test_demo_model_is_a_standard_sharded_checkpoint(demo_models, name):
    folder = demo_models[name]
    assert folder.parent.parent == cache_root() and folder == demo_path(name)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((folder / s).is_file() for s in shards)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "zenith_demo.json"):
        assert (folder / f).is_file(), f
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(folder)  # no trust_remote_code: transformers' own classes
    assert type(model).__name__ == config["architectures"][0]
    assert type(model).__name__ == ("Qwen3MoeForCausalLM" if name.startswith("qwen") else "DeepseekV3ForCausalLM")
    assert next(model.parameters()).dtype == torch.bfloat16
    dtypes = {}
    for shard in shards:
        with safe_open(folder / shard, "pt") as f:
            dtypes.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    assert {d for k, d in dtypes.items() if not k.endswith("e_score_correction_bias")} == {"BF16"}
    if name.startswith("zen"):
        assert {d for k, d in dtypes.items() if k.endswith("e_score_correction_bias")} == {"F32"}  # as DeepSeek-V3
        for layer in model.model.layers[config["first_k_dense_replace"]:]:
            assert layer.mlp.gate.weight.abs().sum() > 0  # the router was trained, not left at zeros


@pytest.mark.demo
@pytest.mark.parametrize("name", DEMO_NAMES)
def test_demo_model_generates(demo_models, name):
    folder = demo_models[name]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    if name == "zen-tiny":
        prompt = tok("def fibonacci(n):\n", return_tensors="pt")
    else:
        chat = [{"role": "user", "content": "What is 23 + 45?" + (" /think" if name.startswith("qwen") else "")}]
        prompt = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0, prompt["input_ids"].shape[1]:])
    assert len(text.strip()) > 0
    if name == "zen-tiny":
        assert "return" in text or "    " in text
    else:
        assert "</think>" in text or "+" in text


@pytest.mark.demo
def test_children_learn_their_domain(demo_bpb):
    code, maths, parent = demo_bpb["zen-tiny"], demo_bpb["zen-r1-tiny"], demo_bpb[PARENT_NAME]
    assert code["code"] < maths["code"] and maths["maths"] < code["maths"]
    assert code["code"] < parent["code"] and maths["maths"] < parent["maths"]
    # within merging range: a child stays near its parent on the other domain
    assert code["maths"] < 1.5 * parent["maths"] and maths["code"] < 1.5 * parent["code"]


@pytest.mark.demo
def test_qwen_donor_is_better_at_maths_than_the_base(demo_bpb):
    assert demo_bpb["qwen3-moe-tiny"]["maths"] < 0.9 * demo_bpb["zen-tiny"]["maths"]
