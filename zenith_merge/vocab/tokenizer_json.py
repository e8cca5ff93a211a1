"""A BPE `tokenizer.json` as the union needs it: tokens by id, their surface bytes, and the merges.

Two tokenizers agree on a token when the token stands for the same bytes of text. How a
vocabulary spells those bytes depends on the tokenizer's kind:

- byte-level (GPT-2, Qwen, DeepSeek, Llama 3): every byte is one printable character, e.g.
  a space is `Ġ` and a newline `Ċ` (the GPT-2 table: printable Latin-1 bytes stand for
  themselves, the other 68 bytes for the characters U+0100 onwards, in byte order);
- metaspace (sentencepiece style: Llama 2, Mistral, Gemma): UTF-8 text with spaces as `▁`,
  and with byte fallback, `<0xNN>` tokens for single bytes.

Added tokens (`added_tokens`: specials, `<think>`, ...) are matched in the raw text before
the model runs, so their surface is their content's UTF-8 in either kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from ..errors import ZenithError
from ..io.json_files import read_json_file

TokenizerKind = Literal["byte_level", "metaspace"]
METASPACE = "\u2581"  # ▁


class TokenizerError(ZenithError):
    """A tokenizer cannot take part in a union; the message names the file and what is wrong."""


@cache
def _byte_chars() -> tuple[str, ...]:
    """The byte-level alphabet: byte b is spelt `_byte_chars()[b]`."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


@cache
def _char_bytes() -> dict[str, int]:
    return {c: b for b, c in enumerate(_byte_chars())}


@dataclass(frozen=True)
class Token:
    """One token of a tokenizer: its id, how the tokenizer spells it, and the bytes it stands for."""

    id: int
    spelling: str  # model vocab: the vocabulary string; added token: its content
    surface: bytes
    added: bool = False
    special: bool = False


def _components(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A normalizer/pre-tokenizer/decoder node and, for a Sequence, its members."""
    if not node:
        return []
    inner = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []
    return [node, *[c for n in inner for c in _components(n)]]


def _kind(data: dict[str, Any], path: Path) -> TokenizerKind:
    parts = [c for key in ("pre_tokenizer", "decoder", "normalizer") for c in _components(data.get(key))]
    types = {c.get("type") for c in parts}
    if "ByteLevel" in types:
        return "byte_level"
    replaces_space = any(c.get("type") == "Replace" and METASPACE in json.dumps(c, ensure_ascii=False)
                         for c in parts)
    if "Metaspace" in types or replaces_space:
        return "metaspace"
    raise TokenizerError(
        f"{path}: a BPE tokenizer without byte-level or metaspace (sentencepiece-style) pre-tokenization "
        f"(found {sorted(t for t in types if t) or 'none'}); the union supports those two kinds")


class TokenizerModel:
    """A parsed BPE `tokenizer.json`: ids, spellings, surfaces, merges and added tokens."""

    def __init__(self, data: dict[str, Any], path: Path):
        self.path = path
        self.data = data
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"{path}: tokenizer model type {model.get('type')!r} is not supported; the union "
                                 f"works on BPE tokenizers (byte-level or metaspace)")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise TokenizerError(f"{path}: BPE with {key} {model[key]!r} (word-piece style) is not supported")
        self.kind: TokenizerKind = _kind(data, path)
        self.byte_fallback = bool(model.get("byte_fallback"))
        self.ignore_merges = bool(model.get("ignore_merges"))  # whole pre-tokens found in the vocab skip BPE
        self.vocab: dict[str, int] = dict(model.get("vocab") or {})
        raw = model.get("merges") or []
        self.merges_as_strings = bool(raw) and isinstance(raw[0], str)
        self.merges: list[tuple[str, str]] = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in raw]
        self.added: list[dict[str, Any]] = list(data.get("added_tokens") or [])
        self.tokens: dict[int, Token] = {}
        for spelling, i in self.vocab.items():
            self.tokens[i] = Token(i, spelling, self.surface(spelling))
        for a in self.added:  # an added token overrides a vocab entry of the same id (specials usually are both)
            self.tokens[a["id"]] = Token(a["id"], a["content"], a["content"].encode(), added=True,
                                         special=bool(a.get("special")))

    @classmethod
    def load(cls, folder: str | Path) -> TokenizerModel:
        """Read `<folder>/tokenizer.json`, with errors naming the file."""
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: missing; the union reads a fast tokenizer's tokenizer.json (save the "
                                 f"tokenizer with transformers' fast tokenizer to produce one)")
        return cls(read_json_file(path, error=TokenizerError), path)

    @property
    def size(self) -> int:
        """One more than the largest id: where appended ids start."""
        return max(self.tokens) + 1 if self.tokens else 0

    def surface(self, spelling: str) -> bytes:
        """The bytes a model-vocabulary spelling stands for."""
        if self.kind == "byte_level":
            table = _char_bytes()
            try:
                return bytes(table[c] for c in spelling)
            except KeyError:  # a character outside the byte alphabet (a malformed vocab): keep it as text
                return spelling.encode()
        if self.byte_fallback and len(spelling) == 6 and spelling.startswith("<0x") and spelling.endswith(">"):
            return bytes([int(spelling[3:5], 16)])
        return spelling.replace(METASPACE, " ").encode()

    def spell(self, surface: bytes) -> str | None:
        """How this tokenizer's model vocabulary would spell `surface`; None if it cannot."""
        if self.kind == "byte_level":
            chars = _byte_chars()
            return "".join(chars[b] for b in surface)
        try:
            return surface.decode("utf-8").replace(" ", METASPACE)
        except UnicodeDecodeError:
            if self.byte_fallback and len(surface) == 1:
                return f"<0x{surface[0]:02X}>"
            return None

    def can_append(self, spelling: str) -> bool:
        """Whether a token spelt so can join this model's vocabulary without changing how any text encodes:
        not under `ignore_merges` (whole pre-tokens are looked up), and not a single character in a
        non-byte-level vocabulary (BPE starts from characters, so it would replace byte fallback)."""
        if self.ignore_merges:
            return False
        return self.kind == "byte_level" or len(spelling) > 1

    def special_ids(self) -> list[int]:
        """Ids of the added tokens flagged special."""
        return sorted(t.id for t in self.tokens.values() if t.special)


@dataclass
class TokenizerFiles:
    """The other tokenizer files of a model folder that a union output rewrites (each may be absent)."""

    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    special_tokens_map: dict[str, Any] | None = None
    generation_config: dict[str, Any] | None = None
    chat_template_file: str | None = None  # chat_template.jinja, where the tokenizer keeps it there

    @classmethod
    def load(cls, folder: str | Path) -> TokenizerFiles:
        """Read what exists of tokenizer_config.json, special_tokens_map.json, generation_config.json, chat_template.jinja."""
        folder = Path(folder)

        def read(name: str) -> dict[str, Any] | None:
            p = folder / name
            if not p.is_file():
                return None
            try:
                return json.loads(p.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise TokenizerError(f"{p}: cannot read ({err})") from None

        jinja = folder / "chat_template.jinja"
        return cls(tokenizer_config=read("tokenizer_config.json") or {},
                   special_tokens_map=read("special_tokens_map.json"),
                   generation_config=read("generation_config.json"),
                   chat_template_file=jinja.read_text(encoding="utf-8") if jinja.is_file() else None)

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's chat template (the .jinja file wins, as transformers reads it)."""
        if self.chat_template_file is not None:
            return self.chat_template_file
        t = self.tokenizer_config.get("chat_template")
        if isinstance(t, list):  # named templates: the default one
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        return t

    def token_content(self, key: str) -> str | None:
        """The content of a named special token (`eos_token`, ...) as tokenizer_config or the map gives it."""
        for source in (self.tokenizer_config, self.special_tokens_map or {}):
            value = source.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
        return None
