"""The union's tokenizer files besides tokenizer.json: tokenizer_config.json, special_tokens_map.json,
chat_template.jinja and generation_config.json, from the base's, extended with what the donors bring.

- special tokens the donors add keep their special flag (listed with the base's extra specials);
- the chat template is the base's, with Qwen3's thinking switches (see `chat_template`);
- generation stops at either source's end-of-turn token: `eos_token_id` lists the base's ids
  and each donor's, as union ids.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .chat_template import union_chat_template
from .tokenizer_json import TokenizerFiles, TokenizerModel
from .union import UnionVocab

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def union_file_names(base_folder: str | Path) -> list[str]:
    """The tokenizer files a union output has: tokenizer.json, tokenizer_config.json, generation_config.json,
    and special_tokens_map.json / chat_template.jinja where the base has them."""
    base_folder = Path(base_folder)
    names = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    names += [n for n in ("special_tokens_map.json", "chat_template.jinja") if (base_folder / n).is_file()]
    return sorted(names)


def union_ids(vocab: UnionVocab, key: str) -> dict[int, int]:
    """A source's token ids -> union ids."""
    return {t.sources[key]: uid for uid, t in vocab.tokens.items() if key in t.sources}


def _eos_ids(files: TokenizerFiles, model: TokenizerModel) -> list[int]:
    """A source's end-of-turn ids: its generation config's eos ids, then its tokenizer's eos token."""
    ids: list[int] = []
    gen = (files.generation_config or {}).get("eos_token_id")
    ids += gen if isinstance(gen, list) else [gen] if isinstance(gen, int) else []
    content = files.token_content("eos_token")
    if content is not None:
        ids += [t.id for t in model.tokens.values() if t.added and t.spelling == content]
    return list(dict.fromkeys(ids))


def union_eos_ids(vocab: UnionVocab, files: dict[str, TokenizerFiles], models: dict[str, TokenizerModel]) -> list[int]:
    """Union ids that end a turn: the base's first, then each joining donor's."""
    out: list[int] = []
    for key in ("base", *vocab.donors):
        to_union = union_ids(vocab, key)
        out += [to_union[i] for i in _eos_ids(files[key], models[key]) if i in to_union]
    return list(dict.fromkeys(out))


def _new_specials(vocab: UnionVocab) -> list[str]:
    return [t.spelling for t in vocab.appended() if t.added and t.special]


def union_tokenizer_config(vocab: UnionVocab, base: TokenizerFiles, chat_format: str | None = None
                           ) -> tuple[dict[str, Any], str | None]:
    """tokenizer_config.json of the union, and chat_template.jinja's text where the base keeps its template there.

    The file reads in transformers 4.x as in 5.x: transformers 5 writes `extra_special_tokens` as a
    list, which 4.x cannot read (it wants a dict of named tokens), so a list moves to
    `additional_special_tokens`, the key both read. `chat_format`: the base family's conversation
    format, used where the base ships no template.
    """
    cfg = copy.deepcopy(base.tokenizer_config)
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        del cfg["extra_special_tokens"]
        cfg["additional_special_tokens"] = _with_specials(cfg.get("additional_special_tokens"), extra)
    specials = _new_specials(vocab)
    if specials:
        cfg["additional_special_tokens"] = _with_specials(cfg.get("additional_special_tokens"), specials)
    if isinstance(cfg.get("added_tokens_decoder"), dict):
        for t in vocab.appended():
            if t.added:
                cfg["added_tokens_decoder"][str(t.id)] = {
                    "content": t.spelling, "lstrip": False, "normalized": False, "rstrip": False,
                    "single_word": False, "special": t.special}
    template = base.chat_template
    if vocab.find(THINK_OPEN) is not None and vocab.find(THINK_CLOSE) is not None:
        template = union_chat_template(template, chat_format=chat_format, open_tag=THINK_OPEN,
                                       close_tag=THINK_CLOSE)
    if base.chat_template_file is not None:
        cfg.pop("chat_template", None)
        return cfg, template
    if template is not None:
        cfg["chat_template"] = template
    return cfg, None


def _with_specials(listed: list | None, more: list) -> list:
    """A special-token list (strings or AddedToken dicts) with `more` appended where not yet listed."""
    out = list(listed or [])
    present = {s if isinstance(s, str) else s.get("content") for s in out}
    for s in more:
        content = s if isinstance(s, str) else s.get("content")
        if content not in present:
            out.append(s)
            present.add(content)
    return out


def union_special_tokens_map(vocab: UnionVocab, base: TokenizerFiles) -> dict[str, Any] | None:
    """special_tokens_map.json of the union (None where the base has none)."""
    if base.special_tokens_map is None:
        return None
    out = copy.deepcopy(base.special_tokens_map)
    specials = _new_specials(vocab)
    if specials:
        out["additional_special_tokens"] = _with_specials(out.get("additional_special_tokens"), specials)
    return out


def union_generation_config(vocab: UnionVocab, files: dict[str, TokenizerFiles],
                            models: dict[str, TokenizerModel]) -> dict[str, Any]:
    """generation_config.json of the union: the base's, stopping at every source's end-of-turn token."""
    gen = copy.deepcopy(files["base"].generation_config or {"_from_model_config": True})
    eos = union_eos_ids(vocab, files, models)
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return gen


def dumps(data: dict[str, Any]) -> str:
    """JSON as the Hugging Face files have it (indented, non-ASCII kept)."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
