"""Keep a merged folder's config.json and generation_config.json in line with its plan and tokenizer.

The plan's target config is the source of truth for architecture, expert counts,
top-k, groups, vocabulary size and dtype; the output tokenizer is the source of
truth for special-token ids. `patch_output` applies both idempotently and, with
`check=True`, only reports what differs (drift), so a folder edited by hand or
by another tool can be checked without being written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..architectures import ARCHITECTURES
from ..errors import OutputError
from ..io.json_files import read_json_file
from ..io.manifest import write_json_atomic

# Config keys the merge owns, beyond an architecture's own dimension keys.
_MANAGED_KEYS = ("architectures", "model_type", "vocab_size", "dtype", "torch_dtype", "n_group", "topk_group",
                 "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace", "tie_word_embeddings")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token")


@dataclass(frozen=True)
class Drift:
    """One key whose value in the folder differs from what the plan and tokenizer say."""

    file: str
    key: str
    found: Any
    expected: Any

    def __str__(self) -> str:
        return f"{self.file}: {self.key} is {self.found!r}, expected {self.expected!r}"


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return read_json_file(path, error=OutputError)


def token_id(tokenizer_json: dict[str, Any], token: str) -> int | None:
    """The id of `token` in a tokenizers-library `tokenizer.json` (added tokens first, then the model vocab)."""
    for added in tokenizer_json.get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    vocab = (tokenizer_json.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        return vocab.get(token)
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        for i, entry in enumerate(vocab):
            if entry and entry[0] == token:
                return i
    return None


def special_token_ids(out_dir: Path) -> dict[str, int]:
    """`bos_token_id`/`eos_token_id`/`pad_token_id` as the folder's tokenizer defines them (only those it defines)."""
    tok_cfg = _read_json(out_dir / "tokenizer_config.json") or {}
    tok_json = _read_json(out_dir / "tokenizer.json")
    if tok_json is None:
        return {}
    ids = {}
    for key in _SPECIAL_TOKEN_KEYS:
        token = tok_cfg.get(key)
        if isinstance(token, dict):  # AddedToken serialised as a dict
            token = token.get("content")
        if isinstance(token, str):
            tid = token_id(tok_json, token)
            if tid is None:
                raise OutputError(f"{out_dir / 'tokenizer_config.json'}: {key} {token!r} is not in tokenizer.json")
            ids[f"{key}_id"] = tid
    return ids


def expected_config(target: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The managed keys of config.json: those the plan's target config sets, plus tokenizer-derived token ids."""
    arch = ARCHITECTURES.get((target.get("architectures") or [None])[0])
    keys = set(_MANAGED_KEYS)
    if arch is not None:
        keys |= {alt for alts in arch.dims.values() for alt in alts if alt.isidentifier()}
    want = {k: target[k] for k in sorted(keys) if k in target}
    want.update(special_token_ids(out_dir))
    return want


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def patch_output(out_dir: Path, *, check: bool = False, target: dict[str, Any] | None = None) -> list[Drift]:
    """Bring config.json and generation_config.json in line with the plan; return what differed.

    With `check=True` nothing is written. `target` defaults to the plan saved in `<out>/.zenith/plan.json`.
    """
    out_dir = Path(out_dir)
    if target is None:
        from ..plan.models import Plan

        target = Plan.load(out_dir).target_config
    drift: list[Drift] = []

    config = _read_json(out_dir / "config.json")
    if config is None:
        drift.append(Drift("config.json", "(file)", None, "present"))
        config = dict(target)
    want = expected_config(target, out_dir)
    for key, value in want.items():
        if config.get(key) != value:
            drift.append(Drift("config.json", key, config.get(key), value))
            config[key] = value

    gen = _read_json(out_dir / "generation_config.json")
    if gen is not None:
        eos = _eos_list(gen.get("eos_token_id"))
        for needed in _eos_list(config.get("eos_token_id")):
            if needed not in eos:
                eos.append(needed)
        eos_value = eos[0] if len(eos) == 1 else eos
        if gen.get("eos_token_id") != eos_value:
            drift.append(Drift("generation_config.json", "eos_token_id", gen.get("eos_token_id"), eos_value))
            gen["eos_token_id"] = eos_value
        for key in ("bos_token_id", "pad_token_id"):
            if key in config and config[key] is not None and gen.get(key) not in (None, config[key]):
                drift.append(Drift("generation_config.json", key, gen.get(key), config[key]))
                gen[key] = config[key]

    if not check and drift:
        write_json_atomic(out_dir / "config.json", config)
        if gen is not None:
            write_json_atomic(out_dir / "generation_config.json", gen)
    return drift
