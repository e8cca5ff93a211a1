"""Expert usage: how often a source's own router picks each expert on that source's prompts.

`experts[].keep: N` keeps the N most used experts of each layer; the mean total weight of a
token's picked experts feeds scale compensation where routing weights are not normalised. The router
is applied here from its checkpoint tensors with `routing.route`, so the counts follow
the same rule as the model's own forward pass, whatever the transformers version.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..architectures import architecture_of, optional_tensor_name, tensor_name
from ..forward.calibration import CapturePoint, capture_batch
from ..forward.loading import load_for_calibration, release_memory
from ..io.manifest import write_json_atomic
from ..io.reader import Checkpoint
from ..maths.routing import route, routing_spec

USAGE_FILE = "usage.json"
PROMPTS_PER_PASS = 16  # prompts run together: with offloaded weights, each pass reads the model once


def usage_order(counts: Sequence[int]) -> list[int]:
    """Expert indices, most used first; ties go to the lower index (so the order is deterministic)."""
    return sorted(range(len(counts)), key=lambda e: (-counts[e], e))


def expert_usage(model_path: Path, layers: Sequence[int], prompts: Sequence[str], *, load: Mapping | None = None,
                 max_tokens_per_prompt: int = 512, progress: bool = True) -> dict[int, dict]:
    """Per source layer: pick counts of every expert, their order, and the mean total weight of a token's picks.

    `load` holds `load_for_calibration`'s options (8-bit, max_memory, dtype).
    """
    with Checkpoint.open(model_path, check_shapes=False) as ckpt:
        config = ckpt.config
        arch = architecture_of(config, where=str(model_path / "config.json"))
        spec = routing_spec(config)
        routers = {}
        for layer in layers:
            weight = ckpt.read(tensor_name(arch, "router", layer)).float()
            bias_name = optional_tensor_name(arch, "router_bias", layer)
            bias = ckpt.read(bias_name).float() if bias_name and bias_name in ckpt else None
            routers[layer] = (weight, bias)
    model, tokenizer = load_for_calibration(model_path, **(load or {}))
    points = {layer: CapturePoint.input_of(arch.mlp_module.format(layer=layer)) for layer in layers}
    counts = {layer: torch.zeros(spec.n_experts, dtype=torch.long) for layer in layers}
    weight_sum = {layer: 0.0 for layer in layers}
    picks = {layer: 0 for layer in layers}
    try:
        batches = [prompts[i:i + PROMPTS_PER_PASS] for i in range(0, len(prompts), PROMPTS_PER_PASS)]
        for batch in tqdm(batches, desc="expert usage", disable=not progress, leave=False):
            for states in capture_batch(model, tokenizer, batch, list(points.values()),
                                        max_tokens_per_text=max_tokens_per_prompt):
                for layer, point in points.items():
                    weight, bias = routers[layer]
                    idx, w = route(states[point] @ weight.T, spec, bias)
                    counts[layer] += torch.bincount(idx.reshape(-1), minlength=spec.n_experts)
                    weight_sum[layer] += float(w.sum())
                    picks[layer] += idx.numel()
    finally:
        del model
        release_memory()
    out = {}
    for layer in layers:
        c = counts[layer].tolist()
        out[layer] = {"counts": c, "order": usage_order(c), "tokens": picks[layer] // max(1, spec.top_k),
                      "mean_total": weight_sum[layer] * spec.top_k / picks[layer] if picks[layer] else None}
    return out


def save_usage(usage: dict[str, dict[int, dict]], folder: Path, key: str) -> Path:
    """Write `<folder>/usage.json` (source -> layer -> stats) with the key of the plan it belongs to."""
    data = {"key": key, "sources": {src: {str(layer): s for layer, s in per.items()} for src, per in usage.items()}}
    path = Path(folder) / USAGE_FILE
    write_json_atomic(path, data)
    return path


def load_usage(folder: Path, key: str) -> dict[str, dict[int, dict]] | None:
    """The saved usage when it was computed for `key`, else None."""
    path = Path(folder) / USAGE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("key") != key:
        return None
    return {src: {int(layer): s for layer, s in per.items()} for src, per in data["sources"].items()}
