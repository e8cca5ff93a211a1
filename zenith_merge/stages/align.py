"""Hidden-space alignment: linear maps between a base's and a donor's hidden spaces, by ridge least squares.

A donor expert grafted into a base of another width reads the base's normalised MoE input
and must write into the base's residual stream. Two maps per (base layer, donor layer) pair,
fitted on calibration text run through both models, make that a plain FFN again:

    A: base normalised MoE input   -> donor normalised MoE input   (d_donor, d_base)
    B: donor residual after layer  -> base residual after layer    (d_base, d_donor)
    gate' = gate @ A,  up' = up @ A,  down' = B @ down

The tokenizers differ, so tokens are paired where their END character offsets coincide: the
hidden state at a token summarises the text up to its end, so two tokens ending at the same
character have read the same text.

    alignment = fit_alignment(base, donor, [(1, 0), (2, 1)], texts,
                              base_points=lambda l: (f"model.layers.{l}.mlp", f"model.layers.{l}"),
                              donor_points=lambda l: (f"model.layers.{l}.mlp", f"model.layers.{l}"))
    save_alignment(alignment, output / ".zenith")
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import CalibrationError
from ..forward.calibration import CapturedChunk, CapturePoint, capture_hidden
from ..forward.loading import load_for_calibration, release_memory
from ..io.manifest import file_sha256
from ..maths.ridge import RidgeAccumulator, RidgeFit, accumulator_bytes, pair_groups

__all__ = [
    "Alignment",
    "LayerPoints",
    "RidgeAccumulator",
    "RidgeFit",
    "accumulator_bytes",
    "fit_alignment",
    "fit_alignment_groups",
    "load_alignment",
    "pair_by_offsets",
    "pair_groups",
    "read_info",
    "read_maps",
    "save_alignment",
    "save_alignment_groups",
    "split_passages",
]

ALIGN_TENSORS = "align.safetensors"
ALIGN_JSON = "align.json"
FORMAT_VERSION = 2
# raised whenever one config starts fitting different maps, so a saved fit of an older rule is not reused
# (2: the calibration texts' passages are taken in turn, not one text after another)
FIT_REVISION = 2

# layer -> (MoE block module name, decoder layer module name), e.g. 2 -> ("model.layers.2.mlp", "model.layers.2").
# The caller derives it from the architecture tables; this stage never guesses module names.
LayerPoints = Callable[[int], tuple[str, str]] | Mapping[int, tuple[str, str]]


# ------------------------------------------------------------------ token pairing


def pair_by_offsets(ends_a: torch.Tensor, ends_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (idx_a, idx_b) of the tokens of two tokenizations of one text that end at the same character.

    Why: hidden states of two models are comparable only where both have read the same text, and a
    token's state summarises the text up to its end. Ends must be non-decreasing (token order). Where
    several tokens share an end (a byte-level BPE splitting one character), the last one is used: it is
    the one that has read the whole character.
    """
    idx_a, idx_b = _last_of_runs(ends_a, "ends_a"), _last_of_runs(ends_b, "ends_b")
    keep_a = torch.isin(ends_a[idx_a], ends_b[idx_b])
    idx_a = idx_a[keep_a]
    idx_b = idx_b[torch.isin(ends_b[idx_b], ends_a[idx_a])]
    return idx_a, idx_b


def _last_of_runs(ends: torch.Tensor, name: str) -> torch.Tensor:
    if ends.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(ends.shape)}")
    if ends.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if (ends[1:] < ends[:-1]).any():
        raise ValueError(f"{name} must be non-decreasing (token order)")
    last = torch.ones_like(ends, dtype=torch.bool)
    last[:-1] = ends[1:] != ends[:-1]
    return last.nonzero().flatten()


def split_passages(text: str, max_chars: int) -> list[str]:
    """Cut a text at line ends into passages of at most `max_chars` characters (a longer line is cut hard).

    Why: both models then run each passage from its start, so paired tokens have read exactly the
    same context; chunking each model's tokens separately would give them different contexts.
    """
    passages, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if current:
                passages.append(current)
                current = ""
            passages.append(line[:max_chars])
            line = line[max_chars:]
        if len(current) + len(line) > max_chars:
            passages.append(current)
            current = ""
        current += line
    if current.strip():
        passages.append(current)
    return [p for p in passages if p.strip()]


def interleaved_passages(texts: Sequence[str], max_chars: int) -> Iterator[str]:
    """The passages of every text (`split_passages`), taken in turn: one of each text, then the next of each.

    Why: the fit stops at a token budget, and read one text after another the budget went to the first
    texts alone (merge/config.yml's `[demo:code, demo:maths]` with `max_tokens: 8000` fitted the maps on
    code only, and on held-out maths they explained less than the mean did). Taken in turn, every
    listed text has its share of the budget until it runs out.
    """
    queues = [split_passages(t, max_chars) for t in texts]
    for k in range(max((len(q) for q in queues), default=0)):
        for q in queues:
            if k < len(q):
                yield q[k]


# ------------------------------------------------------------------ fitting on two models


@dataclass
class Alignment:
    """Fitted maps per (base_layer, donor_layer) pair: A (d_donor, d_base), B (d_base, d_donor), float32."""

    pairs: list[tuple[int, int]]
    A: dict[tuple[int, int], torch.Tensor]
    B: dict[tuple[int, int], torch.Tensor]
    r2_A: dict[tuple[int, int], float]
    r2_B: dict[tuple[int, int], float]
    n_tokens: int
    ridge: float
    d_base: int
    d_donor: int
    meta: dict = field(default_factory=dict)


def _modules(points: LayerPoints, layer: int) -> tuple[str, str]:
    """(MoE block, decoder layer) module names of `layer`."""
    return points(layer) if callable(points) else points[layer]


def _points(points: LayerPoints, layer: int) -> tuple[CapturePoint, CapturePoint]:
    mlp, block = _modules(points, layer)
    return CapturePoint.input_of(mlp), CapturePoint.output_of(block)


def _run(model, tokenizer, passage: str, points: list[CapturePoint], max_tokens_per_text: int,
         stop_after: str | None = None) -> tuple[torch.Tensor, dict[CapturePoint, torch.Tensor]]:
    """Ends and states of one passage, the first token of each chunk left out; the forward pass ends after
    `stop_after` (the deepest layer the group reads).

    The first position of a sequence is an attention sink in trained LMs, with activations far off
    the others; a handful of such rows would dominate a least-squares fit.
    """
    chunks: list[CapturedChunk] = list(capture_hidden(model, tokenizer, [passage], points,
                                                      max_tokens_per_text=max_tokens_per_text,
                                                      stop_after=stop_after, progress=False))
    chunks = [c for c in chunks if len(c) > 1]
    if not chunks:
        return torch.zeros(0, dtype=torch.long), {}
    ends = torch.cat([c.ends[1:] for c in chunks])
    states = {p: torch.cat([c.states[p][1:] for c in chunks]) for p in points}
    return ends, states


def fit_alignment(base_path: str | Path, donor_path: str | Path, layer_pairs: Sequence[tuple[int, int]],
                  texts: Iterable[str], **kwargs) -> Alignment:
    """Fit A and B for each (base_layer, donor_layer) pair, all pairs in one pass; see `fit_alignment_groups`."""
    (alignment,) = fit_alignment_groups(base_path, donor_path, layer_pairs, texts, **kwargs)
    return alignment


def fit_alignment_groups(
    base_path: str | Path,
    donor_path: str | Path,
    layer_pairs: Sequence[tuple[int, int]],
    texts: Iterable[str],
    *,
    base_points: LayerPoints,
    donor_points: LayerPoints,
    ridge: float = 1e-2,
    max_tokens: int = 20000,
    max_accumulator_bytes: int | None = None,
    load_in_8bit: bool = False,
    max_memory: Mapping[str | int, int | str] | None = None,
    dtype: torch.dtype | str | None = None,
    passage_chars: int = 1024,
    max_tokens_per_text: int = 512,
    progress: bool = True,
) -> Iterator[Alignment]:
    """Fit A and B for each (base_layer, donor_layer) pair on calibration text run through both models,
    yielding one `Alignment` per group of pairs.

    Why: grafting a donor expert into a base of another width needs maps between the two hidden
    spaces (see the module docstring). Both models are loaded once with `load_for_calibration` (same
    `load_in_8bit`, `max_memory` and `dtype`, applied to each model) and fed the same passages of `texts`
    (`interleaved_passages`: one passage of each text in turn), pairing tokens by end offset as they go;
    at most `max_tokens` paired tokens are used. `base_points` / `donor_points` give, per layer, the MoE
    block's and the decoder layer's module names (from the architecture tables). Statistics are
    accumulated in float64, so memory does not grow with the number of tokens; with
    `max_accumulator_bytes` it does not grow with the number of layers either: the pairs are fitted in
    groups that fit (`pair_groups`), one pass over the text per group, and each group's maps are handed
    over (to be saved) before the next group starts.
    """
    pairs = [(int(b), int(d)) for b, d in layer_pairs]
    if not pairs:
        raise ValueError("no layer pairs to align")
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"duplicate layer pairs in {pairs}")
    texts = list(texts)
    base, base_tok = load_for_calibration(base_path, load_in_8bit=load_in_8bit, max_memory=max_memory, dtype=dtype)
    donor, donor_tok = load_for_calibration(donor_path, load_in_8bit=load_in_8bit, max_memory=max_memory, dtype=dtype)
    d_base, d_donor = base.config.hidden_size, donor.config.hidden_size
    try:
        for group in pair_groups(pairs, d_base, d_donor, max_accumulator_bytes):
            release_memory()  # the previous group's statistics and activations
            yield _fit_group(base, base_tok, donor, donor_tok, group, texts, base_points=base_points,
                             donor_points=donor_points, ridge=ridge, max_tokens=max_tokens,
                             passage_chars=passage_chars, max_tokens_per_text=max_tokens_per_text,
                             progress=progress, where=(base_path, donor_path))
    finally:
        del base, donor
        release_memory()


def _fit_group(base, base_tok, donor, donor_tok, pairs: list[tuple[int, int]], texts: list[str], *,
               base_points: LayerPoints, donor_points: LayerPoints, ridge: float, max_tokens: int,
               passage_chars: int, max_tokens_per_text: int, progress: bool, where) -> Alignment:
    """One pass over the text for one group of layer pairs, then their ridge fits."""
    base_in = {b: _points(base_points, b) for b, _ in pairs}
    donor_in = {d: _points(donor_points, d) for _, d in pairs}
    base_list = list(dict.fromkeys(p for pts in base_in.values() for p in pts))
    donor_list = list(dict.fromkeys(p for pts in donor_in.values() for p in pts))
    # each model's pass ends after the deepest decoder layer the group reads
    base_stop = _modules(base_points, max(b for b, _ in pairs))[1]
    donor_stop = _modules(donor_points, max(d for _, d in pairs))[1]
    d_base, d_donor = base.config.hidden_size, donor.config.hidden_size
    acc_a = {pair: RidgeAccumulator(d_base, d_donor) for pair in pairs}
    acc_b = {pair: RidgeAccumulator(d_donor, d_base) for pair in pairs}
    n_tokens = 0
    bar = tqdm(total=max_tokens, desc=f"alignment {pairs[0]}..{pairs[-1]}", unit="tok", disable=not progress,
               leave=False)
    try:
        for passage in interleaved_passages(texts, passage_chars):
            if n_tokens >= max_tokens:
                break
            ends_b, states_b = _run(base, base_tok, passage, base_list, max_tokens_per_text, base_stop)
            ends_d, states_d = _run(donor, donor_tok, passage, donor_list, max_tokens_per_text, donor_stop)
            idx_b, idx_d = pair_by_offsets(ends_b, ends_d)
            take = min(idx_b.numel(), max_tokens - n_tokens)
            idx_b, idx_d = idx_b[:take], idx_d[:take]
            if take == 0:
                continue
            for bl, dl in pairs:
                (b_mlp, b_layer), (d_mlp, d_layer) = base_in[bl], donor_in[dl]
                acc_a[bl, dl].add(states_b[b_mlp][idx_b], states_d[d_mlp][idx_d])
                acc_b[bl, dl].add(states_d[d_layer][idx_d], states_b[b_layer][idx_b])
            n_tokens += take
            bar.update(take)
    finally:
        bar.close()
    if n_tokens == 0:
        raise CalibrationError(f"{where[0]} and {where[1]}: no tokens of the calibration text end at the same "
                               f"character in both tokenizations; give more (or longer) texts")
    fits_a = {pair: acc_a.pop(pair).fit(ridge) for pair in pairs}
    fits_b = {pair: acc_b.pop(pair).fit(ridge) for pair in pairs}
    return Alignment(
        pairs=pairs,
        A={p: f.W.float() for p, f in fits_a.items()},
        B={p: f.W.float() for p, f in fits_b.items()},
        r2_A={p: f.r2 for p, f in fits_a.items()},
        r2_B={p: f.r2 for p, f in fits_b.items()},
        n_tokens=n_tokens,
        ridge=ridge,
        d_base=d_base,
        d_donor=d_donor,
        meta={"base": str(where[0]), "donor": str(where[1])},
    )


# ------------------------------------------------------------------ artefact


def _key(kind: str, pair: tuple[int, int]) -> str:
    return f"{kind}.{pair[0]}.{pair[1]}"


def save_alignment(alignment: Alignment, folder: str | Path) -> Path:
    """Write `align.safetensors` (A.<base>.<donor>, B.<base>.<donor>, float32) and `align.json` into folder."""
    return save_alignment_groups([alignment], folder, grouped=False)


def save_alignment_groups(groups: Iterable[Alignment], folder: str | Path, *, grouped: bool = True,
                          meta: Mapping | None = None) -> Path:
    """Write each group's maps as it comes (`align-<k>.safetensors`; `align.safetensors` when not `grouped`),
    then `align.json`: pairs, R^2, the file of each map and each file's sha256.

    Each file is written to a temporary name and renamed, tensors first: a folder with align.json has a
    complete alignment. A group's maps are dropped once written, so memory holds one group. Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info: dict = {"format": FORMAT_VERSION, "pairs": [], "r2": {"A": {}, "B": {}}, "files": {}, "sha256": {}}
    # neither enumerate() (its cached (k, alignment) tuple) nor a local left bound to a map may keep the
    # last group's maps alive while the generator fits the next group
    k = 0
    for alignment in groups:
        _write_group(alignment, folder, f"align-{k}.safetensors" if grouped else ALIGN_TENSORS, info, meta)
        del alignment
        k += 1
    tmp = folder / f".{ALIGN_JSON}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, folder / ALIGN_JSON)
    return folder


def _write_group(alignment: Alignment, folder: Path, name: str, info: dict, meta: Mapping | None) -> None:
    """One group's maps into folder/name (written, then renamed), and their entries into `info`."""
    tensors = {}
    for pair in alignment.pairs:
        for kind, maps, r2 in (("A", alignment.A, alignment.r2_A), ("B", alignment.B, alignment.r2_B)):
            tensors[_key(kind, pair)] = maps[pair].detach().to("cpu", torch.float32).contiguous()
            info["r2"][kind][_key(kind, pair)] = r2[pair]
            info["files"][_key(kind, pair)] = name
        info["pairs"].append(list(pair))
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": str(FORMAT_VERSION)})
    os.replace(tmp, folder / name)
    info["sha256"][name] = file_sha256(folder / name)
    info.update(n_tokens=alignment.n_tokens, ridge=alignment.ridge, d_base=alignment.d_base,
                d_donor=alignment.d_donor, meta={**alignment.meta, **(meta or {})})


def read_info(folder: str | Path) -> dict:
    """`align.json` of a folder, checked: its format, and every map file it names present."""
    folder = Path(folder)
    json_path = folder / ALIGN_JSON
    if not json_path.is_file():
        raise CalibrationError(f"{folder}: no complete alignment ({ALIGN_JSON} missing); fit it again")
    info = json.loads(json_path.read_text())
    if info.get("format") != FORMAT_VERSION:
        raise CalibrationError(f"{json_path}: alignment format {info.get('format')!r}, expected {FORMAT_VERSION}")
    for name in sorted(set(info["files"].values())):
        if not (folder / name).is_file():
            raise CalibrationError(f"{folder}: no complete alignment ({name} missing); fit it again")
    return info


def read_maps(folder: str | Path, pair: tuple[int, int], info: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one layer pair, read from the file that holds them (one pair's maps in memory)."""
    from safetensors import safe_open

    folder = Path(folder)
    info = info or read_info(folder)
    out = []
    for kind in ("A", "B"):
        key = _key(kind, pair)
        if key not in info["files"]:
            raise CalibrationError(f"{folder / ALIGN_JSON}: no map {key}; fit the alignment again")
        with safe_open(str(folder / info["files"][key]), "pt") as f:
            out.append(f.get_tensor(key))
    return out[0], out[1]


def load_alignment(folder: str | Path) -> Alignment:
    """Read an alignment written by `save_alignment`; raises CalibrationError naming what is missing or wrong."""
    folder = Path(folder)
    info = read_info(folder)
    tensors = {}
    for name in sorted(set(info["files"].values())):
        tensors.update(load_file(str(folder / name)))
    pairs = [(int(b), int(d)) for b, d in info["pairs"]]
    d_base, d_donor = int(info["d_base"]), int(info["d_donor"])
    A, B = {}, {}
    for pair in pairs:
        for kind, store, shape in (("A", A, (d_donor, d_base)), ("B", B, (d_base, d_donor))):
            key = _key(kind, pair)
            if key not in tensors or tuple(tensors[key].shape) != shape:
                found = tuple(tensors[key].shape) if key in tensors else "nothing"
                raise CalibrationError(f"{folder / info['files'].get(key, ALIGN_TENSORS)}: expected {key} of shape "
                                       f"{shape}, found {found}")
            store[pair] = tensors[key]
    return Alignment(
        pairs=pairs, A=A, B=B,
        r2_A={p: float(info["r2"]["A"][_key("A", p)]) for p in pairs},
        r2_B={p: float(info["r2"]["B"][_key("B", p)]) for p in pairs},
        n_tokens=int(info["n_tokens"]), ridge=float(info["ridge"]), d_base=d_base, d_donor=d_donor,
        meta=dict(info.get("meta", {})),
    )
