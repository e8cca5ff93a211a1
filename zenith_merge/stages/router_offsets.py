"""Calibrated router offsets: each grafted source's experts reached by its own domain's prompts.

Router rows moved between models (`gate_mode: transfer`: the donor's rows mapped through A)
keep their order among the donor's experts, but their scale against the base's rows is
arbitrary: on the demo graft they sent more code tokens than maths tokens to the donor. A
per-source offset b_s, added to the selection score of the source's slots, fixes the balance
without touching the weights the picked experts get. DeepSeek's `e_score_correction_bias`
is exactly such a selection-only term, so b_s is folded into it:

    choice_e = sigmoid(z_e) + bias_e + b_source(e)      (weights still sigmoid(z_e))

Per MoE layer and source s, b_s maximises hit - leak on the base model's MoE inputs for the
sources' prompts, where hit is the share of s's prompt tokens' top-k picks that land on s's
slots and leak the same share on the other sources' prompt tokens (Youden's J; the middle of
the best plateau). Without other sources' prompts, b_s is the smallest offset whose hit
reaches `target_share`. Sources are calibrated in `experts[]` order, each seeing the offsets
found before it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..forward.calibration import CapturePoint, capture_batch
from ..forward.loading import load_for_calibration, release_memory
from ..io.manifest import write_json_atomic
from ..maths.routing import RoutingSpec, route

OFFSETS_FILE = "router_offsets.json"
# Selection scores are sigmoids in (0, 1): offsets beyond +-1 change nothing more.
GRID = torch.linspace(-1.0, 1.0, 401, dtype=torch.float64)


def share_on(states: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor, spec: RoutingSpec,
             mask: torch.Tensor) -> float:
    """The share of the tokens' top-k picks that land on the slots in `mask` (tokens (n, hidden))."""
    if states.numel() == 0:
        return 0.0
    idx, _ = route(states.float() @ rows.float().T, spec, bias.float())
    return float(mask[idx].float().mean())


def _hit_leak(offset: float, bias: torch.Tensor, mask: torch.Tensor, own: torch.Tensor | None,
              other: torch.Tensor | None, rows: torch.Tensor, spec: RoutingSpec) -> tuple[float, float]:
    """(hit, leak) with `offset` added to the bias of the slots in `mask`."""
    trial = bias + offset * mask.double()
    hit = share_on(own, rows, trial, spec, mask) if own is not None else 0.0
    leak = share_on(other, rows, trial, spec, mask) if other is not None else 0.0
    return hit, leak


def calibrate_layer(states: Mapping[str, torch.Tensor], rows: torch.Tensor, bias: torch.Tensor,
                    slot_sources: Sequence[str], spec: RoutingSpec, sources: Sequence[str], *,
                    target_share: float = 0.5) -> dict[str, dict[str, float]]:
    """Offsets for `sources` at one layer, with each source's hit and leak before and after.

    `states[source]`: the MoE inputs (tokens, hidden) of that source's prompts; `slot_sources[j]`:
    the source of slot j; `bias`: the layer's selection bias before calibration.
    """
    bias = bias.double().clone()
    out = {}
    for s in sources:
        mask = torch.tensor([x == s for x in slot_sources])
        own = states.get(s)
        others = [t for k, t in states.items() if k != s and t.numel()]
        other = torch.cat(others) if others else None

        before = _hit_leak(0.0, bias, mask, own, other, rows, spec)
        grid = [_hit_leak(float(b), bias, mask, own, other, rows, spec) for b in GRID]
        if other is not None:
            j = torch.tensor([h - k for h, k in grid])
            best = torch.nonzero(j >= j.max() - 1e-12).flatten()
            pick = int(best[len(best) // 2])
        else:
            reach = [i for i, (h, _) in enumerate(grid) if h >= target_share]
            pick = reach[0] if reach else max(range(len(grid)), key=lambda i: grid[i][0])
        offset = float(GRID[pick])
        bias = bias + offset * mask.double()
        out[s] = {"offset": offset, "hit_before": before[0], "leak_before": before[1],
                  "hit": grid[pick][0], "leak": grid[pick][1]}
    return out


def prompt_states(base_path: Path, layers: Sequence[int], prompts: Mapping[str, Sequence[str]], *,
                  mlp_module: str, load: Mapping | None = None) -> dict[str, dict[int, torch.Tensor]]:
    """source -> layer -> the base model's MoE inputs (tokens, hidden) on the source's prompts (BOS first)."""
    model, tokenizer = load_for_calibration(base_path, **(load or {}))
    bos = tokenizer.bos_token or ""
    points = {layer: CapturePoint.input_of(mlp_module.format(layer=layer)) for layer in layers}
    out: dict[str, dict[int, torch.Tensor]] = {}
    try:
        for source, texts in prompts.items():
            per_text = capture_batch(model, tokenizer, [bos + t for t in texts], list(points.values())) if texts else []
            out[source] = {layer: torch.cat([s[p] for s in per_text]) if per_text else torch.zeros(0, 1)
                           for layer, p in points.items()}
    finally:
        del model
        release_memory()
    return out


def save_offsets(offsets: dict[int, dict[str, dict[str, float]]], folder: Path, key: str) -> Path:
    """Write `<folder>/router_offsets.json` (layer -> source -> offset, hit, leak) with its plan key."""
    path = Path(folder) / OFFSETS_FILE
    write_json_atomic(path, {"key": key, "layers": {str(layer): v for layer, v in offsets.items()}})
    return path


def load_offsets(folder: Path, key: str | None = None) -> dict[int, dict[str, dict[str, float]]] | None:
    """The saved offsets (when computed for `key`, if given), else None."""
    path = Path(folder) / OFFSETS_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if key is not None and data.get("key") != key:
        return None
    return {int(layer): v for layer, v in data["layers"].items()}
