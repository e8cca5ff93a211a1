"""Planning the union vocabulary (`tokenizer.source: union`): its size, its sources, its token rules.

The plan reads the sources' tokenizer.json files (no weights) to fix the union's size, and
so the shape of the embedding and lm_head, before anything heavy runs. The tokenizer
stage builds the files and the token map from this.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import MergeConfig
from ..errors import PlanError
from ..vocab.tokenizer_json import TokenizerError, TokenizerModel
from ..vocab.union import UnionVocab, union_vocabulary
from .sources import resolve_model


class TokenRule(BaseModel):
    """A `tokenizer.tokens` entry resolved: the source key whose row the token takes, and whether forced."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str
    force: bool


class VocabPlan(BaseModel):
    """The union vocabulary as planned: who joins, how big it is, how donor rows reach the base's space."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: dict[str, str] = Field(description="source key -> sha256 of its tokenizer.json (base and donors)")
    donors: tuple[str, ...] = Field(description="donors whose tokens join, in experts[] order")
    size: int = Field(description="tokens of the union tokenizer")
    padded_size: int = Field(description="rows of the embedding and lm_head")
    appended: int = Field(description="donor tokens appended after the base's ids")
    maps: dict[str, Literal["identity", "fit"]] = Field(description="donor -> how its rows reach the base's space")
    slerp_t: float
    tokens: dict[str, TokenRule] = Field(default_factory=dict)
    donor_merges: bool = Field(False, description="the donors' merges join the base's (opt-in)")
    protect: tuple[str, ...] = Field((), description="tokenizer.protect: files or demo:<domain> kept exact")
    protect_prompts: tuple[str, ...] = Field((), description="with donor merges, without tokenizer.protect: "
                                                             "the base's prompts")
    plain_text_added: tuple[str, ...] = Field(
        (), description="donor added tokens that are ordinary text to the base: text containing them tokenizes "
                        "differently from the base")
    subwords_left_out: dict[str, int] = Field(
        default_factory=dict, description="donor -> subwords not appended (the base's BPE would reach them "
                                          "without a merge: ignore_merges, or single characters)")
    ridge: float = 1e-2


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_tokenizers(folders: dict[str, Path]) -> dict[str, TokenizerModel]:
    """Each source's parsed tokenizer.json, by source key."""
    return {key: TokenizerModel.load(folder) for key, folder in folders.items()}


def plan_vocab(cfg: MergeConfig, config_dir: Path | None, folders: dict[str, Path], widths: dict[str, int],
               base_rows: int) -> VocabPlan | None:
    """The union's plan, or None when the base's tokenizer serves (asked for, or no donor's vocabulary differs).

    `folders`: source key -> model folder ("base" first, then donors in experts[] order);
    `widths`: source key -> hidden size; `base_rows`: rows of the base's embedding.
    """
    tok = cfg.tokenizer
    if tok is None or tok.source == "base":
        return None
    if tok.source != "union":
        if resolve_model(tok.source, config_dir, build_demo=False).path != folders["base"]:
            raise PlanError("tokenizer.source: a tokenizer from another model is not supported; use base or union")
        return None
    try:
        models = load_tokenizers(folders)
        vocab = union_vocabulary(models["base"], {k: m for k, m in models.items() if k != "base"},
                                 pad_to_multiple_of=tok.pad_to_multiple_of)
    except TokenizerError as err:
        raise PlanError(f"tokenizer.source: union: {err}") from None
    rules = resolve_token_rules(cfg, config_dir, folders, vocab)
    if not vocab.donors:
        return None
    maps = {}
    for key in vocab.donors:
        same = widths[key] == widths["base"]
        if cfg.align.mode == "identity" and not same:
            raise PlanError(f"align.mode: identity, but {key}'s hidden size {widths[key]} differs from the base's "
                            f"{widths['base']}; the union's donor rows need a fitted map (align.mode: fit or auto)")
        maps[key] = "identity" if same and cfg.align.mode != "fit" else "fit"
    prompts = () if tok.protect or not tok.donor_merges else tuple(p for e in cfg.experts for p in e.positive_prompts
                                           if resolve_model(e.source_model, config_dir, build_demo=False).path
                                           == folders["base"])
    padded = max(vocab.padded_size, base_rows)
    return VocabPlan(sources={k: _sha(f / "tokenizer.json") for k, f in folders.items()}, donors=vocab.donors,
                     size=vocab.size, padded_size=padded, appended=len(vocab.appended()), maps=maps,
                     slerp_t=tok.slerp_t, tokens=rules, donor_merges=tok.donor_merges, protect=tuple(tok.protect),
                     protect_prompts=prompts, plain_text_added=tuple(t.spelling for t in vocab.plain_text_added()),
                     subwords_left_out=vocab.subwords_left_out, ridge=cfg.align.ridge)


def resolve_token_rules(cfg: MergeConfig, config_dir: Path | None, folders: dict[str, Path],
                        vocab: UnionVocab) -> dict[str, TokenRule]:
    """`tokenizer.tokens` with each source named by its key, checked against the union; errors name the token."""
    keys = {path: key for key, path in folders.items()}
    rules = {}
    for token, setting in cfg.tokenizer.tokens.items():
        where = f"tokenizer.tokens.{token!r}"
        found = vocab.find(token)
        if found is None:
            raise PlanError(f"{where}: {token!r} is no token of the base's tokenizer nor of any expert's (in "
                            f"Qwen3, /think and /no_think are plain text that the chat template reads, not tokens)")
        if setting.source is None:
            continue
        if setting.source == "base":
            key = "base"
        else:
            path = resolve_model(setting.source, config_dir, build_demo=False).path
            if path not in keys:
                raise PlanError(f"{where}.source: {setting.source} is not base_model or one of the experts' models")
            key = keys[path]
        if key != "base" and key not in vocab.donors:
            raise PlanError(f"{where}.source: {setting.source} shares the base's vocabulary; its tokens take the "
                            f"base's rows (use source: base)")
        if key not in found.sources:
            raise PlanError(f"{where}.source: {setting.source} has no token {token!r} (it is in "
                            f"{', '.join(sorted(found.sources))})")
        rules[token] = TokenRule(source=key, force=setting.force)
    return rules
