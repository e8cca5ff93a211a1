"""How the written merge routes: per layer, per domain, the share of top-k picks and of routing
weight that lands on each source's experts.

The merged model's own routers are applied, from its written tensors, to the MoE inputs the
merged model computes on each domain's text (with `routing.route`, the rule the model's forward
pass follows). For a token t with picks P_t and weights w_t,e, a source s gets

    pick share(s)   = sum_t |P_t ∩ slots(s)| / sum_t |P_t|
    weight share(s) = sum_t sum_{e in P_t ∩ slots(s)} w_t,e / sum_t sum_{e in P_t} w_t,e

Saved as `.zenith/routing.json` and drawn as `.zenith/routing.png` (one heatmap per source:
domains x layers).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..architectures import architecture_of, optional_tensor_name, tensor_name
from ..errors import OutputError
from ..forward import dense as dense_forward
from ..forward.calibration import CapturePoint, capture_hidden
from ..forward.loading import load_for_calibration, release_memory
from ..io.json_files import read_json_file
from ..io.manifest import read_manifest, write_json_atomic
from ..io.reader import Checkpoint
from ..maths.routing import route, routing_spec
from ..plan.models import Plan

ROUTING_FILE = "routing.json"
ROUTING_PNG = "routing.png"


def prompt_domains(plan: Plan) -> dict[str, list[str]]:
    """Each source's positive prompts, as routing-report texts (assembly plans: each experts[] entry's)."""
    if plan.transforms:
        return {f"{key} prompts": list(t.prompts) for key, t in plan.transforms.items() if t.prompts}
    return {f"experts.{i} prompts": list(e.get("positive_prompts") or [])
            for i, e in enumerate(plan.config.get("experts") or []) if e.get("positive_prompts")}


def slot_owners(plan: Plan, layer: int, n_experts: int) -> list[str]:
    """The source each output expert of `layer` comes from (every expert the base's when the plan has no table)."""
    try:
        slots = plan.layer_experts(layer).slots
    except KeyError:
        return ["base"] * n_experts
    if len(slots) != n_experts:
        raise ValueError(f"layer {layer}: the plan has {len(slots)} expert slots, the output {n_experts} experts")
    return [s.source for s in slots]


def output_key(out_dir: Path) -> str:
    """What identifies the written bytes: the manifest's shard sha256s (a report is kept only for the same bytes)."""
    manifest = read_manifest(out_dir) or {}
    shards = {name: s.get("sha256") for name, s in (manifest.get("shards") or {}).items()}
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()


def routing_usage(out_dir: Path, domains: Mapping[str, Sequence[str]], *, load: Mapping | None = None,
                  max_tokens: int = 2048, progress: bool = True) -> dict:
    """Pick and weight shares per MoE layer, domain and source, plus each expert's pick counts."""
    out_dir = Path(out_dir)
    plan = Plan.load(out_dir)
    with Checkpoint.open(out_dir, check_shapes=False) as ckpt:
        config = ckpt.config
        arch = architecture_of(config, where=str(out_dir / "config.json"))
        spec = routing_spec(config, where=str(out_dir / "config.json"))
        routers = {}
        for layer in range(int(config.get("num_hidden_layers", 0))):
            name = tensor_name(arch, "router", layer)
            if name not in ckpt:
                continue
            bias, logit_bias = (_read_role(ckpt, arch, role, layer) for role in ("router_bias", "router_logit_bias"))
            routers[layer] = (ckpt.read(name).float(), bias, logit_bias)
    if not routers:
        return {}
    owners = {layer: slot_owners(plan, layer, routers[layer][0].shape[0]) for layer in routers}
    sources = list(dict.fromkeys(s for per in owners.values() for s in per))
    points = {layer: CapturePoint.input_of(arch.mlp_module.format(layer=layer)) for layer in routers}
    counts = {d: {layer: torch.zeros(spec.n_experts, dtype=torch.long) for layer in routers} for d in domains}
    weights = {d: {layer: torch.zeros(spec.n_experts, dtype=torch.float64) for layer in routers} for d in domains}
    tokens = dict.fromkeys(domains, 0)

    def count(domain: str, states: Mapping[int, torch.Tensor]) -> None:
        for layer, x in states.items():
            w, bias, logit_bias = routers[layer]
            idx, gate = route(torch.nn.functional.linear(x.float(), w, logit_bias), spec, bias)
            counts[domain][layer] += torch.bincount(idx.reshape(-1), minlength=spec.n_experts)
            weights[domain][layer].index_add_(0, idx.reshape(-1), gate.reshape(-1).double())

    chunk = dense_forward.PLAIN_MAX_TOKENS
    if not (load or {}).get("load_in_8bit") and dense_forward.supported(config, max_tokens=chunk):
        # the plain layer-by-layer pass: no transformers import, one layer's weights in memory at a time (read
        # once for every text); each text cut into chunks of at most 512 tokens (each its own context), as
        # capture_hidden cuts them
        pieces: list[tuple[str, list[int]]] = []
        for domain, texts in domains.items():
            budget = max_tokens
            for ids in dense_forward.token_ids(out_dir, texts):
                for lo in range(0, len(ids), chunk):
                    if budget > 0 and ids[lo:lo + min(chunk, budget)]:
                        pieces.append((domain, ids[lo:lo + min(chunk, budget)]))
                        budget -= len(pieces[-1][1])
        for (domain, ids), states in zip(pieces, dense_forward.layer_states(out_dir, [ids for _, ids in pieces],
                                                                             list(routers))):
            tokens[domain] += len(ids)
            count(domain, states)
    else:
        model, tokenizer = load_for_calibration(out_dir, **(load or {}))
        try:
            for domain, texts in tqdm(list(domains.items()), desc="routing report", disable=not progress,
                                      leave=False):
                for chunk in capture_hidden(model, tokenizer, texts, list(points.values()),
                                            max_total_tokens=max_tokens, progress=False):
                    tokens[domain] += len(chunk.ends)
                    count(domain, {layer: chunk.states[point] for layer, point in points.items()})
        finally:
            del model
            release_memory()
    layers = {}
    for layer in routers:
        per_domain = {}
        for d in domains:
            c, w = counts[d][layer], weights[d][layer]
            total_c, total_w = int(c.sum()), float(w.sum())
            per_domain[d] = {
                s: {"picks": _share(sum(int(c[e]) for e, o in enumerate(owners[layer]) if o == s), total_c),
                    "weight": _share(sum(float(w[e]) for e, o in enumerate(owners[layer]) if o == s), total_w)}
                for s in sources}
            per_domain[d]["experts"] = c.tolist()
        layers[str(layer)] = per_domain
    return {"key": output_key(out_dir), "top_k": spec.top_k, "sources": sources, "domains": tokens,
            "slots": {str(layer): {s: owners[layer].count(s) for s in sources} for layer in routers},
            "layers": layers}


def _read_role(ckpt: Checkpoint, arch, role: str, layer: int) -> torch.Tensor | None:
    """A router's bias in float32: DeepSeek's selection-only score correction (`router_bias`) or GPT-OSS's
    bias added to the logits (`router_logit_bias`); None where the family or the checkpoint has none."""
    name = optional_tensor_name(arch, role, layer)
    return ckpt.read(name).float() if name is not None and name in ckpt else None


def _share(part: float, total: float) -> float | None:
    return part / total if total else None


def save_routing(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """`.zenith/routing.json` and its heatmap `.zenith/routing.png`: the heatmap first, so that the JSON,
    which a resume looks for, is there only when both are."""
    from .plots import routing_heatmap

    zdir = Path(out_dir) / ".zenith"
    zdir.mkdir(parents=True, exist_ok=True)
    png = routing_heatmap(zdir / ROUTING_PNG, report)
    write_json_atomic(zdir / ROUTING_FILE, report)
    return zdir / ROUTING_FILE, png


def load_routing(out_dir: Path) -> dict | None:
    """The saved routing report, when it belongs to the bytes now in `out_dir` and its heatmap is there too;
    else None (and the report is made again)."""
    path = Path(out_dir) / ".zenith" / ROUTING_FILE
    if not (path.is_file() and path.with_name(ROUTING_PNG).is_file()):
        return None
    report = read_json_file(path, error=OutputError)
    return report if report.get("key") == output_key(Path(out_dir)) else None


def routing_table(report: dict) -> list[str]:
    """Markdown: per layer and domain, each source's share of picks (and of weight)."""
    sources = report["sources"]
    lines = ["| layer | domain | " + " | ".join(f"{s} picks (weight)" for s in sources) + " |",
             "| ---: | --- | " + " | ".join("---:" for _ in sources) + " |"]
    for layer, per in report["layers"].items():
        slots = report["slots"][layer]
        for d, shares in per.items():
            cells = [f"{_pct(shares[s]['picks'])} ({_pct(shares[s]['weight'])})" for s in sources]
            lines.append(f"| {layer} | {d} | " + " | ".join(cells) + " |")
        lines.append(f"| {layer} | slots | " + " | ".join(f"{_pct(slots[s] / sum(slots.values()))}"
                                                         for s in sources) + " |")
    return lines


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"
