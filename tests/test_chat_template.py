"""The union's chat template, rendered through transformers: the family formats where the base has no
template (DeepSeek-V3.1's, Qwen3's ChatML), R1-, V3.1- and Qwen3-style base templates wrapped, thinking by
`enable_thinking` / `thinking` and by the `/think` / `/no_think` switches (latest wins; an explicit
argument overrides them either way), all against prompts written out here; the Jinja subset check; the
probe check."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from zenith_merge.vocab.chat_template import (
    CHAT_FORMATS,
    check_jinja_subset,
    check_union_template,
    union_chat_template,
)

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def _tokenizer(template: str, bos: str | None, eos: str) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                  bos_token=bos, eos_token=eos)
    tok.chat_template = template
    return tok


def _chat(first: str = "What is 2 + 3?", last: str = "And 3 + 4?") -> list[dict]:
    return [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": first},
            {"role": "assistant", "content": "<think>2 plus 3</think>5"},
            {"role": "user", "content": last}]


def _render(template: str, chat: list[dict], bos: str | None = BOS, eos: str = EOS, **kwargs) -> str:
    return _tokenizer(template, bos, eos).apply_chat_template(chat, tokenize=False, add_generation_prompt=True,
                                                              **kwargs)


# ------------------------------------------------------------------ family formats, no base template

DEEPSEEK_CASES = [
    ("enable_thinking on", _chat(), {"enable_thinking": True},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is 2 + 3?<｜Assistant｜></think>5<｜end▁of▁sentence｜>"
     "<｜User｜>And 3 + 4?<｜Assistant｜><think>"),
    ("enable_thinking off", _chat(), {"enable_thinking": False},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is 2 + 3?<｜Assistant｜></think>5<｜end▁of▁sentence｜>"
     "<｜User｜>And 3 + 4?<｜Assistant｜></think>"),
    ("V3.1's thinking", _chat(), {"thinking": True},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is 2 + 3?<｜Assistant｜></think>5<｜end▁of▁sentence｜>"
     "<｜User｜>And 3 + 4?<｜Assistant｜><think>"),
    ("undecided: V3.1's default, not thinking", _chat(), {},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is 2 + 3?<｜Assistant｜></think>5<｜end▁of▁sentence｜>"
     "<｜User｜>And 3 + 4?<｜Assistant｜></think>"),
    ("/think in the last message", _chat(last="And 3 + 4? /think"), {},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is 2 + 3?<｜Assistant｜></think>5<｜end▁of▁sentence｜>"
     "<｜User｜>And 3 + 4? /think<｜Assistant｜><think>"),
    ("an earlier /think still holds", _chat(first="/think What is 2 + 3?"), {},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>/think What is 2 + 3?<｜Assistant｜></think>5<｜end▁of▁sentence｜>"
     "<｜User｜>And 3 + 4?<｜Assistant｜><think>"),
    ("a later message's switch wins", _chat(first="/think What is 2 + 3?", last="And 3 + 4? /no_think"), {},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>/think What is 2 + 3?<｜Assistant｜></think>5<｜end▁of▁sentence｜>"
     "<｜User｜>And 3 + 4? /no_think<｜Assistant｜></think>"),
    ("within a message the later switch wins", _chat(last="/no_think, no wait, /think: 3 + 4?"), {},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is 2 + 3?<｜Assistant｜></think>5<｜end▁of▁sentence｜>"
     "<｜User｜>/no_think, no wait, /think: 3 + 4?<｜Assistant｜><think>"),
    ("enable_thinking overrides a switch", _chat(last="And 3 + 4? /think"), {"enable_thinking": False},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is 2 + 3?<｜Assistant｜></think>5<｜end▁of▁sentence｜>"
     "<｜User｜>And 3 + 4? /think<｜Assistant｜></think>"),
]


@pytest.mark.parametrize("name,chat,kwargs,expected", DEEPSEEK_CASES, ids=[c[0] for c in DEEPSEEK_CASES])
def test_deepseek_family_format(name, chat, kwargs, expected):
    template = union_chat_template(None, chat_format="deepseek")
    assert _render(template, chat, **kwargs) == expected


def test_deepseek_family_joins_system_prompts_and_keeps_only_the_answer_after_the_last_close_tag():
    chat = [{"role": "system", "content": "One."}, {"role": "system", "content": "Two."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>a</think>b</think>Hello"},
            {"role": "user", "content": [{"type": "text", "text": "typed"}]}]  # non-string content: no crash
    assert _render(union_chat_template(None, chat_format="deepseek"), chat, enable_thinking=True) == (
        "<｜begin▁of▁sentence｜>One.\n\nTwo.<｜User｜>Hi<｜Assistant｜></think>Hello<｜end▁of▁sentence｜>"
        "<｜User｜><｜Assistant｜><think>")


CHATML_CASES = [
    ("enable_thinking on", _chat(), {"enable_thinking": True},
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
     "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nAnd 3 + 4?<|im_end|>\n<|im_start|>assistant\n<think>\n"),
    ("enable_thinking off", _chat(), {"enable_thinking": False},
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
     "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nAnd 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
     "<think>\n\n</think>\n\n"),
    ("undecided: Qwen3's default adds nothing", _chat(), {},
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
     "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nAnd 3 + 4?<|im_end|>\n<|im_start|>assistant\n"),
    ("/no_think in the last message", _chat(last="And 3 + 4? /no_think"), {},
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
     "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nAnd 3 + 4? /no_think<|im_end|>\n"
     "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    ("a later message's switch wins", _chat(first="What is 2 + 3? /no_think", last="/think And 3 + 4?"), {},
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3? /no_think<|im_end|>\n"
     "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\n/think And 3 + 4?<|im_end|>\n"
     "<|im_start|>assistant\n<think>\n"),
    ("within a message the later switch wins", _chat(last="/think, no wait, /no_think: 3 + 4?"), {},
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
     "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\n/think, no wait, /no_think: 3 + 4?<|im_end|>\n"
     "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    ("enable_thinking=True overrides a switch", _chat(last="And 3 + 4? /no_think"), {"enable_thinking": True},
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
     "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nAnd 3 + 4? /no_think<|im_end|>\n"
     "<|im_start|>assistant\n<think>\n"),
    ("enable_thinking=False overrides a switch", _chat(last="And 3 + 4? /think"), {"enable_thinking": False},
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
     "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nAnd 3 + 4? /think<|im_end|>\n"
     "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
]


@pytest.mark.parametrize("name,chat,kwargs,expected", CHATML_CASES, ids=[c[0] for c in CHATML_CASES])
def test_chatml_family_format(name, chat, kwargs, expected):
    template = union_chat_template(None, chat_format="chatml")
    assert _render(template, chat, bos=None, eos="<|im_end|>", **kwargs) == expected


def test_no_base_template_and_no_family_gives_no_template():
    assert union_chat_template(None, chat_format=None) is None
    with pytest.raises(ValueError, match="chat format"):
        union_chat_template(None, chat_format="llama")
    with pytest.raises(ValueError, match="quotes"):
        union_chat_template(None, chat_format="chatml", think="/th'ink")


# ------------------------------------------------------------------ base templates wrapped

R1_STYLE = (  # R1: the prompt opens the think block itself, whatever the variables
    "{{ bos_token }}{% for m in messages if m['role'] == 'system' %}{{ m['content'] }}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'].split('</think>')[-1] + eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
V31_STYLE = (  # V3.1: `thinking` picks the prompt's tag
    "{% if thinking is not defined %}{% set thinking = false %}{% endif %}{{ bos_token }}"
    "{% for m in messages if m['role'] == 'system' %}{{ m['content'] }}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜></think>' + m['content'].split('</think>')[-1] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' + ('<think>' if thinking else '</think>') }}{% endif %}")
QWEN3_STYLE = (  # Qwen3: `enable_thinking=False` adds an empty think block, nothing otherwise
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' %}{% set c = c.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}")

WRAP_CASES = [
    ("R1 on", R1_STYLE, _chat(), {"enable_thinking": True},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is 2 + 3?<｜Assistant｜>5<｜end▁of▁sentence｜>"
     "<｜User｜>And 3 + 4?<｜Assistant｜><think>\n"),
    ("R1 off closes the opened block", R1_STYLE, _chat(), {"enable_thinking": False},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is 2 + 3?<｜Assistant｜>5<｜end▁of▁sentence｜>"
     "<｜User｜>And 3 + 4?<｜Assistant｜><think>\n\n</think>\n\n"),
    ("R1 /no_think", R1_STYLE, _chat(last="And 3 + 4? /no_think"), {},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is 2 + 3?<｜Assistant｜>5<｜end▁of▁sentence｜>"
     "<｜User｜>And 3 + 4? /no_think<｜Assistant｜><think>\n\n</think>\n\n"),
    ("R1 undecided: its own prompt", R1_STYLE, _chat(), {},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is 2 + 3?<｜Assistant｜>5<｜end▁of▁sentence｜>"
     "<｜User｜>And 3 + 4?<｜Assistant｜><think>\n"),
    ("V3.1 on", V31_STYLE, _chat(), {"enable_thinking": True},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is 2 + 3?<｜Assistant｜></think>5<｜end▁of▁sentence｜>"
     "<｜User｜>And 3 + 4?<｜Assistant｜><think>"),
    ("V3.1 off", V31_STYLE, _chat(), {"enable_thinking": False},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>What is 2 + 3?<｜Assistant｜></think>5<｜end▁of▁sentence｜>"
     "<｜User｜>And 3 + 4?<｜Assistant｜></think>"),
    ("V3.1 /think", V31_STYLE, _chat(first="/no_think 2 + 3?", last="/think 3 + 4?"), {},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>/no_think 2 + 3?<｜Assistant｜></think>5<｜end▁of▁sentence｜>"
     "<｜User｜>/think 3 + 4?<｜Assistant｜><think>"),
    ("V3.1 /no_think", V31_STYLE, _chat(first="/think 2 + 3?", last="/no_think 3 + 4?"), {},
     "<｜begin▁of▁sentence｜>You are terse.<｜User｜>/think 2 + 3?<｜Assistant｜></think>5<｜end▁of▁sentence｜>"
     "<｜User｜>/no_think 3 + 4?<｜Assistant｜></think>"),
    ("Qwen3 on", QWEN3_STYLE, _chat(), {"enable_thinking": True},
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
     "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nAnd 3 + 4?<|im_end|>\n<|im_start|>assistant\n<think>\n"),
    ("Qwen3 off: its own empty block, once", QWEN3_STYLE, _chat(), {"enable_thinking": False},
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
     "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nAnd 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
     "<think>\n\n</think>\n\n"),
    ("Qwen3 /no_think", QWEN3_STYLE, _chat(last="3 + 4? /no_think"), {},
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
     "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\n3 + 4? /no_think<|im_end|>\n<|im_start|>assistant\n"
     "<think>\n\n</think>\n\n"),
    ("Qwen3 undecided", QWEN3_STYLE, _chat(), {},
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
     "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nAnd 3 + 4?<|im_end|>\n<|im_start|>assistant\n"),
]


@pytest.mark.parametrize("name,base,chat,kwargs,expected", WRAP_CASES, ids=[c[0] for c in WRAP_CASES])
def test_wrapped_base_templates(name, base, chat, kwargs, expected):
    rendered = _render(union_chat_template(base), chat, **kwargs)
    assert rendered == expected
    assert "</think><think>" not in rendered


@pytest.mark.parametrize("base", [R1_STYLE, V31_STYLE, QWEN3_STYLE])
def test_wrapping_leaves_the_conversation_as_the_base_renders_it(base):
    chat = _chat()
    for gen in (True, False):
        tok = _tokenizer(base, BOS, EOS)
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen,
                                       chat_template=union_chat_template(base)) == \
            tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)


# ------------------------------------------------------------------ the Jinja subset llama.cpp runs

def _produced() -> list[str]:
    return [*CHAT_FORMATS.values(), union_chat_template(None, chat_format="deepseek"),
            union_chat_template(None, chat_format="chatml"),
            *(union_chat_template(b) for b in (R1_STYLE, V31_STYLE, QWEN3_STYLE))]


def test_every_template_the_module_produces_keeps_to_the_subset():
    for template in _produced():
        assert check_jinja_subset(template) == []


@pytest.mark.parametrize("snippet,violation", [
    ("{{ m['content'].rfind('/think') }}", "method .rfind()"),
    ("{{ m['content'].find('/think') }}", "method .find()"),
    ("{{ m['content'].index('/think') }}", "method .index()"),
    ("{% raw %}{{ x }}{% endraw %}", "{% raw %}"),
    ("{{ n // 2 }}", "operator //"),
    ("{{ messages|count }}", "filter '|count'"),
    ("{{ m.split() }}", ".split() without a separator"),
    ("{% for m in messages %}{{ loop.cycle('a', 'b') }}{% endfor %}", "loop.cycle"),
    ("{{ 'caf\\u00e9' }}", "string escape \\u"),
])
def test_the_subset_check_refuses_what_llama_cpp_lacks(snippet, violation):
    found = check_jinja_subset(snippet)
    assert any(violation in v for v in found), found


# ------------------------------------------------------------------ probing the generation prompt

def _probe(template: str) -> None:
    check_union_template(template, bos_token=BOS, eos_token=EOS, open_tag="<think>", close_tag="</think>")


def test_the_probe_passes_the_good_templates():
    for template in _produced()[2:]:  # the unwrapped family formats do not read enable_thinking themselves
        _probe(template)


def test_the_probe_refuses_a_base_that_always_closes_the_think_block():
    always_closed = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<｜Assistant｜></think>' }}{% endif %}")
    with pytest.raises(ValueError, match="thinking on: .*does not end in '<think>'"):
        _probe(union_chat_template(always_closed))


def test_the_probe_refuses_a_close_tag_followed_by_an_open_tag():
    broken = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<｜Assistant｜></think><think>' }}{% endif %}")
    with pytest.raises(ValueError, match="'</think>' followed by '<think>'"):
        _probe(broken)
