"""The union vocabulary: the base's tokenizer, extended with the donors' tokens it lacks.

The union's encoder is the base's: the same normaliser, pre-tokenizer and BPE merges. So on
any text that contains none of the donors' added-token strings, the union gives exactly the
base's ids (the invariant the tests check on real DeepSeek and Qwen3 text).

Base ids never change. Each donor token whose bytes no base token stands for is appended
(donors in `experts[]` order, each in its own id order). Donor subwords join the BPE model's
vocabulary, so the model can emit them and they decode, but no merge produces them; donor
specials and added tokens (`<|im_start|>`, `<tool_call>`) become added tokens, matched in the
raw text before BPE runs, as in the donor. (mergekit's union adds donor subwords as added
tokens, which re-splits base text: "hello there" became `hell`, `o`, `there`.)

`donor_merges=True` (opt-in) also appends the donors' merges that produce their subwords,
ranked after all of the base's. They fire wherever the base leaves two pieces side by side
that a donor joins: on Python source 9.9% of DeepSeek's tokens change under Qwen3's merges.
`protect` text then guards what it is given: donor merges that change how it tokenizes are
left out.

Two kinds of donor subword would be reached without a merge, and are not appended (their
text still encodes through the base's tokens), so the invariant holds for every base: any
subword where the base's BPE model has `ignore_merges` (Llama 3 style: a pre-token found whole
in the vocabulary skips BPE), and single characters where the base is not byte-level (BPE
starts from characters, and the base would have spelt a missing one with byte fallback).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .tokenizer_json import TokenizerModel


@dataclass(frozen=True)
class UnionToken:
    """One union token: its id, spelling in the union's vocabulary, surface, and id in each source that has it."""

    id: int
    spelling: str
    surface: bytes
    added: bool
    special: bool
    sources: dict[str, int]

    @property
    def text(self) -> str:
        """The token as readable text (bytes that are not UTF-8 shown as escapes)."""
        return self.surface.decode("utf-8", errors="backslashreplace")


@dataclass
class UnionVocab:
    """The union's tokens by id, and what became of each donor's tokens."""

    tokens: dict[int, UnionToken]
    base_size: int
    padded_size: int
    donors: tuple[str, ...]  # donors whose vocabulary joined (others share the base's)
    unrepresentable: dict[str, list[int]] = field(default_factory=dict)  # donor -> ids the base cannot spell
    subwords_left_out: dict[str, int] = field(default_factory=dict)  # donor -> subwords not appended (ignore_merges)
    _by_text: dict[bytes, UnionToken] | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        """Tokens of the union tokenizer (ids 0 .. size-1); the embedding has `padded_size` rows."""
        return max(self.tokens) + 1

    def appended(self) -> list[UnionToken]:
        """The donor tokens added after the base's ids, in id order."""
        return [self.tokens[i] for i in range(self.base_size, self.size) if i in self.tokens]

    def find(self, text: str) -> UnionToken | None:
        """The union token whose surface is `text` (an added token first, then the lowest id), or None."""
        if self._by_text is None:
            self._by_text = {}
            for t in sorted(self.tokens.values(), key=lambda t: (not t.added, t.id), reverse=True):
                self._by_text[t.surface] = t
        return self._by_text.get(text.encode())

    def plain_text_added(self) -> list[UnionToken]:
        """Appended added tokens: donor strings (`<|im_start|>`) that are ordinary text to the base, split
        into pieces there. Text containing them tokenizes differently from the base: the one exception to
        the union's exactness."""
        return [t for t in self.appended() if t.added]


def same_vocabulary(a: TokenizerModel, b: TokenizerModel) -> bool:
    """True when two tokenizers have the same tokens under the same ids (children of one parent usually do)."""
    return a.tokens == b.tokens


def union_vocabulary(base: TokenizerModel, donors: dict[str, TokenizerModel], *,
                     pad_to_multiple_of: int = 64) -> UnionVocab:
    """The union of the base's and the donors' tokens; donors sharing the base's vocabulary add nothing."""
    tokens = {i: UnionToken(i, t.spelling, t.surface, t.added, t.special, {"base": i}) for i, t in base.tokens.items()}
    by_surface: dict[tuple[bytes, bool], int] = {}
    for i, t in sorted(tokens.items(), reverse=True):  # the lowest id wins a shared surface
        by_surface[t.surface, t.added] = i
    joining = tuple(k for k, d in donors.items() if not same_vocabulary(base, d))
    unrepresentable: dict[str, list[int]] = {}
    left_out: dict[str, int] = {}
    next_id = base.size
    for key in joining:
        donor = donors[key]
        for did, t in sorted(donor.tokens.items()):
            uid = by_surface.get((t.surface, t.added), by_surface.get((t.surface, not t.added)))
            if uid is not None:
                if key not in tokens[uid].sources:
                    tokens[uid].sources[key] = did
                continue
            spelling = t.spelling if t.added else base.spell(t.surface)
            if spelling is None:
                unrepresentable.setdefault(key, []).append(did)
                continue
            if not t.added and not base.can_append(spelling):
                left_out[key] = left_out.get(key, 0) + 1
                continue
            tokens[next_id] = UnionToken(next_id, spelling, t.surface, t.added, t.special, {key: did})
            by_surface[t.surface, t.added] = next_id
            next_id += 1
    size = max(tokens) + 1
    padded = math.ceil(size / pad_to_multiple_of) * pad_to_multiple_of
    return UnionVocab(tokens, base.size, padded, joining, unrepresentable, left_out)


@dataclass
class UnionTokenizer:
    """The union's tokenizer.json, and what building it did."""

    data: dict[str, Any]
    merges_added: int
    merges_dropped: list[str]  # spellings of donor tokens whose merge changed protected text


def _added_entry(donor: TokenizerModel, did: int, uid: int) -> dict[str, Any]:
    entry = next(a for a in donor.added if a["id"] == did)
    return {"id": uid, "content": entry["content"], "single_word": bool(entry.get("single_word")),
            "lstrip": bool(entry.get("lstrip")), "rstrip": bool(entry.get("rstrip")),
            "normalized": bool(entry.get("normalized")), "special": bool(entry.get("special"))}


def _donor_merges(base: TokenizerModel, donors: dict[str, TokenizerModel], vocab: UnionVocab,
                  union_spellings: dict[str, int]) -> dict[str, tuple[str, str]]:
    """For each appended model token, the donor merge that produces it, spelt in the base's vocabulary.

    Donors in order, each merge in its rank order; a merge is kept when its result is an
    appended token not yet produced and both its parts are union tokens.
    """
    wanted = {t.spelling for t in vocab.appended() if not t.added}
    merges: dict[str, tuple[str, str]] = {}
    for key in vocab.donors:
        donor = donors[key]
        for a, b in donor.merges:
            pa, pb = base.spell(donor.surface(a)), base.spell(donor.surface(b))
            if pa is None or pb is None or pa not in union_spellings or pb not in union_spellings:
                continue
            target = pa + pb
            if target in wanted and target not in merges:
                merges[target] = (pa, pb)
    return merges


def union_tokenizer(base: TokenizerModel, donors: dict[str, TokenizerModel], vocab: UnionVocab,
                    protect: list[str] = (), *, donor_merges: bool = False) -> UnionTokenizer:
    """The union's tokenizer.json: the base's, with the appended tokens and added tokens.

    By default no merge is added, so the union encodes as the base does. `donor_merges`: also
    the donors' merges that produce their subwords, ranked after the base's; `protect` then
    names texts that must still tokenize exactly as the base tokenizes them, and donor merges
    that change them are left out, repeatedly, until none does.
    """
    from tokenizers import Tokenizer

    # A shallow copy with fresh containers where the union writes: a deep copy of a 129K-token file costs seconds.
    data = dict(base.data)
    model = data["model"] = dict(base.data["model"])
    model["vocab"] = dict(model.get("vocab") or {})
    data["added_tokens"] = [dict(a) for a in base.data.get("added_tokens") or []]
    for t in vocab.appended():
        if t.added:
            key, did = next(iter(t.sources.items()))
            data["added_tokens"].append(_added_entry(donors[key], did, t.id))
    # Every token goes into the model's vocabulary under its id: the tokenizers library gives an added
    # token that the vocabulary lacks the next id after the vocabulary's size, whatever its entry says,
    # which would move the base's added tokens once donor tokens follow them. An added token's entry is
    # its content; merges never produce it (added tokens are cut out of the text before BPE runs).
    for t in sorted(vocab.tokens.values(), key=lambda t: t.id):
        if t.spelling not in model["vocab"]:
            model["vocab"][t.spelling] = t.id
    if not donor_merges:
        return UnionTokenizer(data, 0, [])
    merges = _donor_merges(base, donors, vocab, model["vocab"])

    def with_merges(merges: dict[str, tuple[str, str]]) -> dict[str, Any]:
        pairs = [*base.merges, *merges.values()]
        model["merges"] = [f"{a} {b}" for a, b in pairs] if base.merges_as_strings else [list(p) for p in pairs]
        return data

    dropped: list[str] = []
    texts = [t for t in protect if t]
    if texts:
        base_tok = Tokenizer.from_str(json.dumps(base.data))
        want = [e.ids for e in base_tok.encode_batch(texts, add_special_tokens=False)]
        spelling_of = {t.id: t.spelling for t in vocab.appended() if not t.added}
        while True:
            union_tok = Tokenizer.from_str(json.dumps(with_merges(merges)))
            got = [e.ids for e in union_tok.encode_batch(texts, add_special_tokens=False)]
            firing = {spelling_of[i] for ids, ref in zip(got, want) if ids != ref for i in ids
                      if i in spelling_of and spelling_of[i] in merges}
            if not firing:
                break
            for s in sorted(firing):
                del merges[s]
                dropped.append(s)
    return UnionTokenizer(with_merges(merges), len(merges), dropped)
