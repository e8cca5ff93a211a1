"""The union's chat template: the base's conversation format, plus the donor's (Qwen3's) thinking controls.

Rules:

- The base's template renders the conversation. Where the base ships none, its family's format stands in
  (`CHAT_FORMATS`: DeepSeek-V3.1's or Qwen3's ChatML); with no family known there is no template at all,
  never an invented one.
- Thinking for the answer to come is decided, in order: an explicit `enable_thinking` (or V3.1's
  `thinking`, when `enable_thinking` is undefined), true or false; else the latest `/think` or `/no_think`
  in the user's messages (a later message wins, and within one message the later switch; the text stays
  in the message); else undecided: the base's generation prompt stands as it is. (llama.cpp passes
  `enable_thinking` on every request, so there the argument decides and the soft switches do not.)
- A decision is handed to the base's template as `enable_thinking` and `thinking`, so templates that read
  either (Qwen3's, V3.1's) render the prompt themselves. Where the base ignored it, only the generation
  prompt's tail is fixed: thinking on opens a think block (`<think>\\n`) unless one is open; thinking off
  closes the open one, or adds an empty closed one (`<think>\\n\\n</think>\\n\\n`, Qwen3's), unless the
  prompt already ends in `</think>` (V3.1's).
- Everything here keeps to Jinja both transformers and llama.cpp run (`check_jinja_subset`); a template
  whose prompt cannot be steered (a close tag whatever the variables) is refused by `check_union_template`.
"""

from __future__ import annotations

import re

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# DeepSeek-V3.1's format: system prompts joined by blank lines after bos, earlier answers with their
# reasoning (up to the last `</think>`) dropped behind `<｜Assistant｜></think>`, as V3.1 renders history;
# the prompt opens `<think>` when `thinking`, else closes it (V3.1's default).
_DEEPSEEK = (
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for message in messages if message['role'] == 'system' and message['content'] is string -%}"
    "{%- set ns.system = message['content'] if ns.first else ns.system ~ '\\n\\n' ~ message['content'] -%}"
    "{%- set ns.first = false -%}"
    "{%- endfor -%}"
    "{%- if bos_token is defined and bos_token is string -%}{{- bos_token -}}{%- endif -%}"
    "{{- ns.system -}}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['role'] == 'user' -%}{{- '<｜User｜>' ~ content -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<｜Assistant｜></think>' ~ content ~ '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt is defined and add_generation_prompt -%}"
    "{{- '<｜Assistant｜>' ~ ('<think>' if thinking is defined and thinking else '</think>') -}}"
    "{%- endif -%}"
)

# Qwen3's ChatML, tool-free: earlier answers lose their reasoning; `enable_thinking=False` adds an empty
# think block after the prompt, anything else adds nothing (Qwen3 thinks by default).
_CHATML = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['role'] == 'assistant' and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ content ~ '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt is defined and add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

CHAT_FORMATS = {"deepseek": _DEEPSEEK, "chatml": _CHATML}

# `@THINK@` / `@NO_THINK@` / `@OPEN@` / `@CLOSE@` are filled in by `union_chat_template`.
_DECIDE = """\
{%- set zenith = namespace(thinking=none) -%}
{%- if enable_thinking is defined and enable_thinking is not none -%}
{%- set zenith.thinking = true if enable_thinking else false -%}
{%- elif thinking is defined and thinking is not none -%}
{%- set zenith.thinking = true if thinking else false -%}
{%- else -%}
{%- for message in messages if message['role'] == 'user' and message['content'] is string -%}
{%- if '@NO_THINK@' in message['content'] -%}
{%- set zenith.thinking = '@THINK@' in message['content'].split('@NO_THINK@')[-1] -%}
{%- elif '@THINK@' in message['content'] -%}
{%- set zenith.thinking = true -%}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- if zenith.thinking is not none -%}
{%- set enable_thinking = zenith.thinking -%}
{%- set thinking = zenith.thinking -%}
{%- endif -%}
{%- set zenith_base %}"""

_FIX_TAIL = """{% endset -%}
{{- zenith_base -}}
{%- if add_generation_prompt is defined and add_generation_prompt and zenith.thinking is not none -%}
{%- set zenith_tail = zenith_base.rstrip() -%}
{%- if zenith_tail.endswith('@CLOSE@') -%}
{%- elif zenith.thinking -%}
{%- if not zenith_tail.endswith('@OPEN@') -%}{{- '@OPEN@\\n' -}}{%- endif -%}
{%- elif zenith_base.endswith('@OPEN@\\n') -%}{{- '\\n@CLOSE@\\n\\n' -}}
{%- elif zenith_tail.endswith('@OPEN@') -%}{{- '\\n\\n@CLOSE@\\n\\n' -}}
{%- else -%}{{- '@OPEN@\\n\\n@CLOSE@\\n\\n' -}}
{%- endif -%}
{%- endif -%}"""


def union_chat_template(base_template: str | None, *, chat_format: str | None = None, think: str = "/think",
                        no_think: str = "/no_think", open_tag: str = "<think>",
                        close_tag: str = "</think>") -> str | None:
    """The union's chat template: the base's (or, with none, its family's `chat_format`) wrapped with
    `enable_thinking` and the `think` / `no_think` switches (see the module's rules).

    None where the base has no template and no family is named: no template rather than an invented one.
    Markers with quotes or backslashes are refused (they are spliced into Jinja string literals).
    """
    for word in (think, no_think, open_tag, close_tag):
        if not word or "'" in word or '"' in word or "\\" in word:
            raise ValueError(f"thinking marker {word!r}: empty, quotes and backslashes are not supported")
    if base_template is None:
        if chat_format is None:
            return None
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat format {chat_format!r}: not one of {sorted(CHAT_FORMATS)}")
        base_template = CHAT_FORMATS[chat_format].replace("</think>", "@CLOSE@").replace("<think>", "@OPEN@")
        base_template = base_template.replace("@OPEN@", open_tag).replace("@CLOSE@", close_tag)
    # both engines drop one trailing newline of a template; the base's would otherwise land in zenith_base
    base_template = base_template.removesuffix("\n")
    wrapper = (_DECIDE + "@BASE@" + _FIX_TAIL).replace("@NO_THINK@", no_think).replace("@THINK@", think)
    return wrapper.replace("@OPEN@", open_tag).replace("@CLOSE@", close_tag).replace("@BASE@", base_template)


# What llama.cpp's Jinja engine (common/jinja, PR #18462, in place of the vendored minja) and
# transformers' jinja2 sandbox both run, read from ggml-org/llama.cpp common/jinja: value.cpp @488b598b
# (builtins per type), runtime.cpp @6897f5df (statements, operators, loop object), parser.cpp @c94fdbfa
# (statements parsed), lexer.h @5c5f166e and lexer.cpp @0f3c5996 (operators, string escapes).
_METHODS = {"startswith", "endswith", "split", "strip", "lstrip", "rstrip", "replace", "lower", "upper",
            "get", "keys", "values", "items"}
_FILTERS = {"abs", "capitalize", "default", "dictsort", "first", "float", "int", "items", "join", "last",
            "length", "list", "lower", "map", "reject", "rejectattr", "replace", "reverse", "safe", "select",
            "selectattr", "sort", "string", "title", "tojson", "trim", "upper"}
_TESTS = {"boolean", "callable", "odd", "even", "false", "true", "divisibleby", "string", "integer", "float",
          "number", "iterable", "sequence", "mapping", "lower", "upper", "none", "defined", "undefined", "eq",
          "equalto", "ge", "gt", "greaterthan", "lt", "lessthan", "ne", "in", "test"}
_GLOBALS = {"raise_exception", "namespace", "range", "strftime_now"}
_LOOP = {"index", "index0", "revindex", "revindex0", "first", "last", "length", "previtem", "nextitem"}
_ESCAPES = set("ntrbfv\\'\"")
_STATEMENTS = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from-import",
               nodes.Extends: "extends", nodes.Block: "block", nodes.With: "with", nodes.ExprStmt: "do",
               nodes.ScopedEvalContextModifier: "autoescape", nodes.EvalContextModifier: "autoescape"}


def check_jinja_subset(template: str) -> list[str]:
    """Constructs in `template` that llama.cpp's engine (`llama-cli --jinja`, `llama-server`) lacks or runs
    differently from jinja2, one readable line each; empty when the template runs in both.

    Allowed, and nothing else: method calls `.startswith .endswith .split(sep) .strip .lstrip .rstrip
    .replace(old, new) .lower .upper` on strings and `.get .keys .values .items` on dicts (llama.cpp also
    has rsplit/title/capitalize, kept out of this project's set, and list append/pop/sort/reverse, which
    transformers' immutable sandbox refuses); the filters, tests, globals and `loop.*` attributes in the
    sets above. Refused besides: `.split()` without a separator (llama.cpp splits on ' ' only),
    `replace` with a count, tuple arguments to startswith/endswith, `//` and `**`, chained comparisons
    (llama.cpp folds them left to right), `**kwargs`, recursive loops,
    `{% set x | filter %}` blocks, include/import/extends/block/with/do/autoescape/raw, and string escapes
    other than \\n \\t \\r \\b \\f \\v \\\\ \\' \\". Block set, namespace, macros, break/continue and
    `for ... if` are supported by both.
    """
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    out: list[str] = []
    for lineno, kind, value in env.lex(template):
        if kind == "raw_begin":
            out.append(f"line {lineno}: {{% raw %}} blocks")
        elif kind == "string":
            bad = {m.group(1) for m in re.finditer(r"\\(.)", value, re.S)} - _ESCAPES
            out += [f"line {lineno}: string escape \\{c}" for c in sorted(bad)]
    ast = env.parse(template)
    macros = {m.name for m in ast.find_all(nodes.Macro)}
    for node in ast.find_all(nodes.Node):
        at = f"line {node.lineno}: "
        if isinstance(node, tuple(_STATEMENTS)):
            out.append(at + f"{{% {_STATEMENTS[type(node)]} %}}")
        elif isinstance(node, nodes.For) and node.recursive:
            out.append(at + "recursive for loops")
        elif isinstance(node, nodes.AssignBlock) and node.filter is not None:
            out.append(at + "filtered {% set %} blocks")
        elif isinstance(node, (nodes.FloorDiv, nodes.Pow)):
            out.append(at + f"operator {node.operator}")
        elif isinstance(node, nodes.Compare) and len(node.ops) > 1:
            out.append(at + "chained comparisons")
        elif isinstance(node, nodes.Test) and node.name not in _TESTS:
            out.append(at + f"test 'is {node.name}'")
        elif isinstance(node, nodes.Filter) and node.name not in _FILTERS:
            out.append(at + f"filter '|{node.name}'")
        elif isinstance(node, nodes.Filter) and node.name == "map" and not any(k.key == "attribute"
                                                                                for k in node.kwargs):
            out.append(at + "filter '|map' without attribute=")
        elif isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name) and node.node.name == "loop" \
                and node.attr not in _LOOP:
            out.append(at + f"loop.{node.attr}")
        elif isinstance(node, nodes.Call):
            out += [at + v for v in _call_violations(node, macros)]
    return out


def _call_violations(node: nodes.Call, macros: set[str]) -> list[str]:
    out = ["**kwargs in a call"] if node.dyn_kwargs is not None else []
    if isinstance(node.node, nodes.Name):
        if node.node.name not in _GLOBALS | macros:
            out.append(f"function {node.node.name}()")
    elif not isinstance(node.node, nodes.Getattr):
        out.append("call of a computed callee")
    elif node.node.attr not in _METHODS:
        out.append(f"method .{node.node.attr}()")
    elif node.node.attr == "split" and not node.args:
        out.append(".split() without a separator")
    elif node.node.attr == "replace" and len(node.args) > 2:
        out.append(".replace() with a count")
    elif node.node.attr in ("startswith", "endswith") and any(isinstance(a, nodes.Tuple) for a in node.args):
        out.append(f".{node.node.attr}() with a tuple")
    return out


def _render(template: str, messages: list[dict], **variables) -> str:
    """`template` rendered as transformers renders chat templates."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: "")
    return env.from_string(template).render(messages=messages, **variables)


def check_union_template(template: str, *, bos_token: str | None, eos_token: str | None, open_tag: str,
                         close_tag: str) -> None:
    """Render probe conversations (system prompt, two turns) with thinking on, off and undecided, and raise
    ValueError with a one-line reason where a generation prompt is malformed: `close_tag` then `open_tag`,
    two open or two close tags, or a tail that does not end as decided (on: `open_tag`, off: `close_tag`).

    Catches base templates the wrapper cannot steer, e.g. one whose prompt closes the think block whatever
    `enable_thinking` / `thinking` say; the caller names the base's tokenizer_config.json.
    """
    last = "zenith probe question two"
    chat = [{"role": "system", "content": "zenith probe system"},
            {"role": "user", "content": "zenith probe question one"},
            {"role": "assistant", "content": "zenith probe answer one"},
            {"role": "user", "content": last}]
    for mode, variables in (("on", {"enable_thinking": True}), ("off", {"enable_thinking": False}),
                            ("undecided", {})):
        try:
            text = _render(template, chat, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=True,
                           **variables)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"thinking {mode}: the chat template fails to render: "
                             f"{' '.join(str(e).split())}") from e
        if last not in text:
            raise ValueError(f"thinking {mode}: the rendered chat lacks the last user message")
        tail = text.split(last)[-1]
        squeezed = "".join(tail.split())
        reason = None
        if close_tag + open_tag in squeezed:
            reason = f"the generation prompt has {close_tag!r} followed by {open_tag!r}"
        elif tail.count(open_tag) > 1 or tail.count(close_tag) > 1:
            reason = f"the generation prompt has two {open_tag!r} or two {close_tag!r}"
        elif mode == "on" and not tail.rstrip().endswith(open_tag):
            reason = f"the generation prompt {tail!r} does not end in {open_tag!r}"
        elif mode == "off" and not tail.rstrip().endswith(close_tag):
            reason = f"the generation prompt {tail!r} does not end in {close_tag!r}"
        if reason is not None:
            raise ValueError(f"thinking {mode}: {reason} (a template the thinking controls cannot steer)")
