"""The union's chat template: the base's chats, plus Qwen3's thinking switches.

The base's template renders the conversation unchanged. Around it, the thinking mode of
the answer to come is decided as Qwen3 decides it:

- `enable_thinking=False` (Qwen3's hard switch) turns thinking off;
- otherwise the last `/think` or `/no_think` in the user's messages (Qwen3's soft switches;
  the text stays in the message, as Qwen3 keeps it) turns it on or off;
- with neither, the base's own generation prompt stands as it is.

Thinking off closes an empty think block after the generation prompt (`<think>\\n\\n</think>\\n\\n`,
what Qwen3 emits), or closes the one the base's prompt opened (R1's prompt ends in `<think>\\n`),
unless the base's template closed one itself (Qwen3's does, given `enable_thinking=False`);
thinking on opens one where the base's prompt does not.
"""

from __future__ import annotations

# The switch words are a template parameter, not text of the messages: `{think}` / `{no_think}`,
# `{open}` / `{close}` are filled in by `union_chat_template`. Jinja is kept to what transformers'
# sandbox allows (string methods, namespaces, block set).
_WRAPPER = """\
{%- set zenith = namespace(thinking=none) -%}
{%- if enable_thinking is defined and enable_thinking is false -%}
{%- set zenith.thinking = false -%}
{%- else -%}
{%- for message in messages if message['role'] == 'user' and message['content'] is string -%}
{%- set on = message['content'].rfind('@THINK@') -%}
{%- set off = message['content'].rfind('@NO_THINK@') -%}
{%- if on > off -%}{%- set zenith.thinking = true -%}{%- elif off > on -%}{%- set zenith.thinking = false -%}{%- endif -%}
{%- endfor -%}
{%- if zenith.thinking is none and enable_thinking is defined and enable_thinking is true -%}
{%- set zenith.thinking = true -%}
{%- endif -%}
{%- endif -%}
{%- set zenith_base -%}@BASE@{%- endset -%}
{{- zenith_base -}}
{%- if add_generation_prompt is defined and add_generation_prompt -%}
{%- set opened = zenith_base.rstrip().endswith('@OPEN@') -%}
{%- set closed = zenith_base.rstrip().endswith('@CLOSE@') -%}
{%- if zenith.thinking is false and not closed -%}
{{- ('\\n' if opened else '@OPEN@\\n\\n') ~ '@CLOSE@\\n\\n' -}}
{%- elif zenith.thinking is true and not opened -%}
{{- '@OPEN@\\n' -}}
{%- endif -%}
{%- endif -%}"""


def union_chat_template(base_template: str | None, *, think: str = "/think", no_think: str = "/no_think",
                        open_tag: str = "<think>", close_tag: str = "</think>") -> str:
    """The base's chat template wrapped with `enable_thinking` and the `/think` / `/no_think` switches.

    With no base template, a plain role-tagged one stands in (transformers has no default).
    """
    if base_template is None:
        base_template = ("{%- for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}"
                         "{%- endfor %}{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}")
    for word in (think, no_think, open_tag, close_tag):
        if "'" in word or "\\" in word:
            raise ValueError(f"thinking marker {word!r}: quotes and backslashes are not supported")
    return (_WRAPPER.replace("@BASE@", base_template).replace("@NO_THINK@", no_think).replace("@THINK@", think)
            .replace("@OPEN@", open_tag).replace("@CLOSE@", close_tag))
