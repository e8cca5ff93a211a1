"""The tokenizer stage: the union tokenizer's files, the token map, and the maps that bring donor rows
into the base's space.

Writes into `<output>/.zenith/`:

- `tokenizer/`: the union's tokenizer.json, tokenizer_config.json (chat template with the
  thinking switches), special_tokens_map.json, generation_config.json (copied to the output);
- `token_map.json` + `token_map.safetensors` (format: `vocab.token_map`): for every union id,
  its id in each source and how its embedding and lm_head rows are made (base | slerp:<donor> |
  <donor>); rows past the union's tokens are padding (the base's own padding rows where it has
  them, else zero);
- `vocab_maps.safetensors`: per donor, `embed.<donor>` and `head.<donor>` (d_base, d_donor),
  ridge fits over the tokens both vocabularies share (their rows are paired samples of the
  two spaces), absent where the widths agree and the map is the identity.

The writer builds the embedding and lm_head from these (see `union_rows`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..architectures import ARCHITECTURES, tensor_name
from ..errors import OutputError
from ..io.manifest import file_sha256
from ..io.reader import Checkpoint
from ..maths.ridge import RidgeAccumulator
from ..vocab.chat_template import check_union_template
from ..vocab.output_files import (
    THINK_CLOSE,
    THINK_OPEN,
    dumps,
    union_generation_config,
    union_special_tokens_map,
    union_tokenizer_config,
)
from ..vocab.rows import NormStats, match_norms, slerp
from ..vocab.token_map import (
    FORMAT_VERSION,
    TOKEN_ARRAYS,
    TOKEN_MAP,
    TokenMap,
    row_rule_names,
    token_map_header,
)
from ..vocab.tokenizer_json import TokenizerError, TokenizerFiles, TokenizerModel
from ..vocab.union import UnionToken, UnionVocab, union_tokenizer, union_vocabulary

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
VOCAB_MAPS = "vocab_maps.safetensors"
# Rows handled at a time when fitting maps and building the union's rows (float64 work copies).
CHUNK_ROWS = 4096
# Mapped donor rows sampled to measure their norm distribution (evenly spaced, deterministic).
NORM_SAMPLE = 16384


def _row_rule(token: UnionToken, donors: tuple[str, ...], forced: dict[int, str], chosen: dict[int, str]) -> str:
    """How a union token's rows are made: base (copied), slerp:<donor>, or <donor> (transferred)."""
    if token.id in forced:
        return forced[token.id]
    holders = [d for d in donors if d in token.sources]
    if "base" in token.sources:
        return f"slerp:{holders[0]}" if holders else "base"
    return chosen.get(token.id, holders[0])


def token_rules(vocab: UnionVocab, rules: dict[str, Any]) -> dict[int, str]:
    """union id -> row rule, from the union and the plan's resolved `tokenizer.tokens` (token -> {source, force})."""
    forced, chosen = {}, {}
    for text, rule in rules.items():
        tok = vocab.find(text)
        if tok is None:
            continue
        source = rule["source"] if isinstance(rule, dict) else rule.source
        force = rule["force"] if isinstance(rule, dict) else rule.force
        (forced if force else chosen)[tok.id] = source
    return {uid: _row_rule(t, vocab.donors, forced, chosen) for uid, t in vocab.tokens.items()}


def _token_map(vocab: UnionVocab, rules: dict[int, str], header: dict[str, Any]) -> TokenMap:
    """The token map's arrays (each source's id per union id, the row rule's code) and its header."""
    sources = ["base", *vocab.donors]
    ids = {k: [-1] * vocab.size for k in sources}  # filled as lists: one tensor write per token is slow
    for uid, t in vocab.tokens.items():
        for key, sid in t.sources.items():
            ids[key][uid] = sid
    ids = {k: torch.tensor(v, dtype=torch.int32) for k, v in ids.items()}
    names = row_rule_names(vocab.donors)
    code = {name: i for i, name in enumerate(names)}
    rows = [0] * vocab.size
    for uid, rule in rules.items():
        rows[uid] = code[rule]
    row = torch.tensor(rows, dtype=torch.int16)
    counts = {name: int((row == i).sum()) for i, name in enumerate(names)}
    appended = vocab.appended()
    header = {**header, "format_version": FORMAT_VERSION, "size": vocab.size, "base_size": vocab.base_size,
              "donors": list(vocab.donors), "row_rules": names, "rows": {k: v for k, v in counts.items() if v},
              "appended": len(appended), "appended_added": [t.text for t in appended if t.added],
              "appended_specials": [t.text for t in appended if t.special],
              "appended_examples": [t.text for t in appended if not t.added][:16],
              "unrepresentable": {k: len(v) for k, v in vocab.unrepresentable.items()},
              "subwords_left_out": vocab.subwords_left_out}
    return TokenMap(header, ids, row)


def rows_tensor(ckpt: Checkpoint, arch_name: str, part: str) -> str:
    """The name of a source's embedding (`embed`) or output rows (`head`: lm_head, or the embedding when tied)."""
    arch = ARCHITECTURES[arch_name]
    embed = tensor_name(arch, "embed")
    if part == "head":
        head = tensor_name(arch, "lm_head")
        if head in ckpt:
            return head
    return embed


def _fit_map(base_rows: torch.Tensor, donor_rows: torch.Tensor, pairs: list[tuple[int, int]], ridge: float
             ) -> tuple[torch.Tensor, float]:
    """M (d_base, d_donor) with base_row ~ M donor_row over the shared tokens' (base id, donor id) pairs; its R^2."""
    acc = RidgeAccumulator(donor_rows.shape[1], base_rows.shape[1])
    for start in range(0, len(pairs), CHUNK_ROWS):
        chunk = pairs[start:start + CHUNK_ROWS]
        acc.add(donor_rows[[d for _, d in chunk]].double(), base_rows[[b for b, _ in chunk]].double())
    fit = acc.fit(ridge)
    return fit.W.float(), fit.r2


def _mapped(rows: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
    rows = rows.double()
    return rows if M is None else rows @ M.double().T


def _row_norms(rows: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Norms of the rows `ids`, a chunk at a time (a whole embedding in float64 would be several GB)."""
    return torch.cat([rows[ids[i:i + CHUNK_ROWS]].double().norm(dim=-1) for i in range(0, len(ids), CHUNK_ROWS)])


def _sample(ids: list[int]) -> list[int]:
    step = max(1, len(ids) // NORM_SAMPLE)
    return ids[::step][:NORM_SAMPLE]


def build_union(plan, protect: list[str], zdir: Path, *, key: str) -> dict[str, str]:
    """Build (or reuse, when built for plan `key`) the union tokenizer, token map and row maps; their sha256s."""
    vp = plan.vocab
    zdir = Path(zdir)
    header = token_map_header(zdir)
    if header is not None and header.get("plan_key") == key and (zdir / TOKEN_ARRAYS).is_file():
        return _artefacts(zdir)
    folders = {k: Path(plan.sources[k].path) for k in vp.sources}
    models = {k: TokenizerModel.load(f) for k, f in folders.items()}
    donors = {k: m for k, m in models.items() if k != "base"}
    vocab = union_vocabulary(models["base"], donors, pad_to_multiple_of=plan.config["tokenizer"]["pad_to_multiple_of"])
    if vocab.size != vp.size or vocab.donors != vp.donors:
        raise OutputError(f"the sources' tokenizers changed since the plan was made (union of {vocab.size} tokens, "
                          f"planned {vp.size}); plan again")
    built = union_tokenizer(models["base"], donors, vocab, protect, donor_merges=vp.donor_merges)
    files = {k: TokenizerFiles.load(f) for k, f in folders.items()}
    rules = token_rules(vocab, {t: r.model_dump() for t, r in vp.tokens.items()})

    maps, meta = _fit_maps(plan, vocab, rules)
    tdir = zdir / TOKENIZER_DIR
    tdir.mkdir(parents=True, exist_ok=True)
    chat_format = ARCHITECTURES[plan.sources["base"].architecture].chat_format
    tok_cfg, jinja = union_tokenizer_config(vocab, files["base"], chat_format)
    template = jinja if jinja is not None else tok_cfg.get("chat_template")
    if isinstance(template, str) and template != files["base"].chat_template:
        try:
            check_union_template(template, bos_token=files["base"].token_content("bos_token"),
                                 eos_token=files["base"].token_content("eos_token"), open_tag=THINK_OPEN,
                                 close_tag=THINK_CLOSE)
        except ValueError as err:
            raise TokenizerError(f"{folders['base'] / 'tokenizer_config.json'}: its chat template cannot take the "
                                 f"donors' thinking switches: {err}") from None
    out_files = {"tokenizer.json": dumps(built.data), "tokenizer_config.json": dumps(tok_cfg),
                 "generation_config.json": dumps(union_generation_config(vocab, files, models))}
    stm = union_special_tokens_map(vocab, files["base"])
    if stm is not None:
        out_files["special_tokens_map.json"] = dumps(stm)
    if jinja is not None:
        out_files["chat_template.jinja"] = jinja
    for name, text in out_files.items():
        tmp = tdir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(tdir / name)
    tensors_tmp = zdir / f".{VOCAB_MAPS}.tmp"
    save_file({k: v.contiguous() for k, v in maps.items()} or {"none": torch.zeros(0)}, str(tensors_tmp))
    tensors_tmp.replace(zdir / VOCAB_MAPS)

    token_map = _token_map(vocab, rules, {
        "plan_key": key, "padded_size": vp.padded_size, "slerp_t": vp.slerp_t, "donor_merges": vp.donor_merges,
        "merges_added": built.merges_added, "merges_dropped": built.merges_dropped, **meta})
    token_map.save(zdir)
    log.info("union tokenizer: %d tokens (%d appended, %d donor merges, %d left out to keep protected text exact)",
             vocab.size, len(vocab.appended()), built.merges_added, len(built.merges_dropped))
    return _artefacts(zdir)


def _artefacts(zdir: Path) -> dict[str, str]:
    return {name: file_sha256(zdir / name) for name in (TOKEN_MAP, TOKEN_ARRAYS, VOCAB_MAPS)}


def _fit_maps(plan, vocab: UnionVocab, rules: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per donor and part: the map into the base's space (fitted or identity), its R^2, and the norm statistics
    (the base's rows, the donor's mapped rows) that transferred rows are matched with."""
    vp = plan.vocab
    parts = ["embed"]
    base_src = plan.sources["base"]
    base_ckpt = Checkpoint.open(Path(base_src.path), check_shapes=False)
    maps, fits, norms = {}, {}, {}
    try:
        if tensor_name(ARCHITECTURES[base_src.architecture], "lm_head") in base_ckpt:
            parts.append("head")
        for part in parts:
            base_rows = base_ckpt.read(rows_tensor(base_ckpt, base_src.architecture, part))
            base_ids = [uid for uid in vocab.tokens if uid < base_rows.shape[0] and "base" in vocab.tokens[uid].sources]
            norms[part] = {"base": asdict(NormStats.of(_row_norms(base_rows, base_ids)))}
            for key in vocab.donors:
                src = plan.sources[key]
                with Checkpoint.open(Path(src.path), check_shapes=False) as ckpt:
                    donor_rows = ckpt.read(rows_tensor(ckpt, src.architecture, part))
                pairs = [(t.sources["base"], t.sources[key]) for t in vocab.tokens.values()
                         if "base" in t.sources and key in t.sources]
                M, r2 = None, None
                if vp.maps[key] == "fit":
                    if len(pairs) < 2:
                        raise OutputError(f"{src.ref}: shares {len(pairs)} tokens with the base; too few to fit "
                                          f"the map of its {part} rows into the base's space")
                    M, r2 = _fit_map(base_rows, donor_rows, pairs, vp.ridge)
                    maps[f"{part}.{key}"] = M
                used = _sample(sorted({t.sources[key] for t in vocab.tokens.values() if key in t.sources}))
                norms[part][key] = asdict(NormStats.of(_mapped(donor_rows[used], M).norm(dim=-1)))
                fits.setdefault(key, {})[part] = {"mode": vp.maps[key], "r2": r2, "shared_tokens": len(pairs)}
    finally:
        base_ckpt.close()
    return maps, {"maps": fits, "norms": norms}


def load_token_map(zdir: Path) -> TokenMap:
    """The token map in `zdir`, with an error naming the file when missing."""
    return TokenMap.load(zdir)


def union_rows(part: str, out: torch.Tensor, base_rows: torch.Tensor, donor_rows: dict[str, torch.Tensor],
               token_map: TokenMap, maps: dict[str, torch.Tensor]) -> torch.Tensor:
    """Fill `out` (padded_size, d_base) with the union's embedding (`part` embed) or lm_head (`head`) rows.

    Base rows (and the base's own padding rows) are copied; a slerp:<donor> token gets
    slerp(base row, matched mapped donor row, t); a <donor> token gets the matched mapped row;
    rows past the base's and the union's tokens stay zero.
    """
    n = min(base_rows.shape[0], out.shape[0])
    out[:n] = base_rows[:n].to(out.dtype)
    header = token_map.header
    t = header["slerp_t"]
    base_stats = NormStats(**header["norms"][part]["base"])
    for key, rows in donor_rows.items():
        M = maps.get(f"{part}.{key}")
        donor_stats = NormStats(**header["norms"][part][key])
        moved = token_map.rule_ids(key)
        for start in range(0, len(moved), CHUNK_ROWS):
            uids = moved[start:start + CHUNK_ROWS]
            mapped = match_norms(_mapped(rows[token_map.ids[key][uids].long()], M), donor_stats, base_stats)
            out[uids] = mapped.to(out.dtype)
        slerped = token_map.rule_ids(f"slerp:{key}") if t > 0 else torch.zeros(0, dtype=torch.long)
        for start in range(0, len(slerped), CHUNK_ROWS):
            uids = slerped[start:start + CHUNK_ROWS]
            mapped = match_norms(_mapped(rows[token_map.ids[key][uids].long()], M), donor_stats, base_stats)
            out[uids] = slerp(base_rows[token_map.ids["base"][uids].long()], mapped, t).to(out.dtype)
    return out


def load_maps(zdir: Path) -> dict[str, torch.Tensor]:
    """The saved row maps (`embed.<donor>`, `head.<donor>`)."""
    path = Path(zdir) / VOCAB_MAPS
    if not path.is_file():
        raise OutputError(f"{path}: missing; run the merge (or `zenith-merge tokenizer`) again without --resume")
    return {k: v for k, v in load_file(str(path)).items() if k != "none"}
