"""RegMean statistics: each parent's input second moments G = E[x x^T] for the linear weights RegMean merges.

A parent is run on its own domain's text (`assembly.regmean.data`), and for every planned
weight the inputs that weight's layer sees are accumulated. Attention, dense MLP, shared-expert
and head weights are hooked at their own module's input. A routed expert sees only the tokens
its router sends it, so the MoE block's input is captured and routed with the checkpoint's own
router (`routing.route`, the same rule as the model's forward pass): gate and up read those
tokens, down reads act(x gate^T) * (x up^T), computed from the checkpoint's expert weights. This
keeps the stage independent of how a transformers version fuses expert modules.

Weights that read one input tensor (`Architecture.shared_inputs`: an MLP's gate and up,
attention's q, k and v, MLA's q_a and kv_a) share one Gram matrix: it is accumulated and stored
once, under the first such weight's name, and the file's `aliases` metadata names it for the others.

The Gram matrices go to `.zenith/regmean-<source>.safetensors` (float32), keyed by everything
they depend on, so a resumed merge or another candidate of `zenith-merge search` with other
weights reuses them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..architectures import architecture_of, classify, shared_input_of, tensor_name
from ..calibration import CapturePoint, capture_hidden, load_for_calibration, release_memory
from ..errors import CalibrationError, OutputError
from ..io.reader import Checkpoint
from ..io.safetensors_format import save_keyed
from ..routing import route, routing_spec

EXPERT_ROLES = {"expert_gate": "gate", "expert_up": "up", "expert_down": "down"}
ACTIVATIONS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}


def grams_file(zdir: Path, source: str) -> Path:
    """Where a source's Gram matrices are saved."""
    return Path(zdir) / f"regmean-{source}.safetensors"


def grams_key(fingerprint: str, texts: Sequence[str], max_tokens: int, load: Mapping) -> str:
    """What each of a source's Gram matrices depends on: the source's bytes, the text, the token cap, the load.

    Not which weights are listed: one weight's statistics do not depend on the others', so a file
    computed for more weights serves a plan that needs fewer (the search's candidates)."""
    payload = [fingerprint, [hashlib.sha256(t.encode()).hexdigest() for t in texts], max_tokens,
               {k: str(v) for k, v in sorted(load.items())}]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


ALIASES = "aliases"  # metadata key: JSON {weight: the stored weight whose Gram matrix it shares}


def _aliases(metadata: Mapping[str, str] | None) -> dict[str, str]:
    return json.loads((metadata or {}).get(ALIASES, "{}"))


def saved_covers(path: Path, key: str, tensors: Sequence[str]) -> bool:
    """True when the saved Gram file was computed for `key` and holds (or aliases) every one of `tensors`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return metadata.get("key") == key and set(tensors) <= set(f.keys()) | set(_aliases(metadata))
    except Exception:  # absent, truncated or not safetensors: compute again
        return False


class _Accumulator:
    """Float64 sums of x x^T and token counts, per weight."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, names: Sequence[str], x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        x = x.to(torch.float64)
        gram = x.T @ x
        for name in names:
            if name in self.sums:
                self.sums[name] += gram
            else:
                self.sums[name] = gram.clone()
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def means(self, names: Sequence[str], widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """E[x x^T] per weight (zeros for a weight that never saw a token, e.g. an expert never picked)."""
        out = {}
        for name in names:
            n = self.counts.get(name, 0)
            out[name] = (self.sums[name] / n).float() if n else torch.zeros(widths[name], widths[name])
        return out


def input_grams(model_path: Path, tensors: Sequence[str], texts: Sequence[str], *, max_tokens: int,
                load: Mapping | None = None, progress: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """(E[x x^T] of each weight's input on `texts`, tokens seen): the RegMean statistics of one parent."""
    with Checkpoint.open(model_path, check_shapes=False) as ckpt:
        config = ckpt.config
        arch = architecture_of(config, where=str(model_path / "config.json"))
        widths = {name: ckpt.info(name).shape[-1] for name in tensors}
        stored = shared_input_of(arch, tensors)  # weight -> the weight whose statistic it shares
        experts: dict[int, dict[int, dict[str, str]]] = {}  # layer -> expert -> proj -> weight name
        modules: set[str] = set()  # hooked modules: one per distinct input
        for name in tensors:
            tid = classify(arch, name)
            if tid is not None and tid.role in EXPERT_ROLES:
                experts.setdefault(tid.layer, {}).setdefault(tid.expert, {})[EXPERT_ROLES[tid.role]] = stored[name]
            elif name.endswith(".weight"):
                modules.add(stored[name].removesuffix(".weight"))
            else:
                raise CalibrationError(f"{model_path}: {name} is not a linear weight RegMean can merge")
        expert_weights, routers = {}, {}
        if experts:
            spec = routing_spec(config, where=str(model_path / "config.json"))
            act = ACTIVATIONS.get(config.get("hidden_act", "silu"))
            if act is None:
                raise CalibrationError(f"{model_path / 'config.json'}: hidden_act {config.get('hidden_act')!r}: RegMean "
                                       f"computes expert inputs for {', '.join(ACTIVATIONS)} only")
            for layer, per in experts.items():
                bias_role = "router_bias" if "router_bias" in arch.roles else None
                bias_name = tensor_name(arch, bias_role, layer) if bias_role else None
                routers[layer] = (ckpt.read(tensor_name(arch, "router", layer)).float(),
                                  ckpt.read(bias_name).float() if bias_name and bias_name in ckpt else None)
                for e in per:
                    expert_weights[(layer, e)] = tuple(ckpt.read(tensor_name(arch, role, layer, e)).float()
                                                       for role in ("expert_gate", "expert_up"))
    points = {CapturePoint.input_of(m): m + ".weight" for m in sorted(modules)}
    moe_points = {layer: CapturePoint.input_of(arch.mlp_module.format(layer=layer)) for layer in experts}
    acc = _Accumulator()
    model, tokenizer = load_for_calibration(model_path, **(load or {}))
    seen = 0
    try:
        for chunk in capture_hidden(model, tokenizer, texts, [*points, *moe_points.values()],
                                    max_total_tokens=max_tokens, progress=progress):
            seen += len(chunk)
            for point, name in points.items():
                acc.add([name], chunk.states[point])
            for layer, point in moe_points.items():
                x = chunk.states[point]
                weight, bias = routers[layer]
                idx, _ = route(x @ weight.T, spec, bias)
                for e, names in experts[layer].items():
                    rows = (idx == e).any(dim=-1).nonzero().squeeze(-1)
                    xe = x[rows]
                    acc.add(sorted({names[p] for p in ("gate", "up") if p in names}), xe)
                    if "down" in names:
                        gate, up = expert_weights[(layer, e)]
                        acc.add([names["down"]], act(xe @ gate.T) * (xe @ up.T))
    finally:
        del model
        release_memory()
    if seen == 0:
        raise CalibrationError(f"{model_path}: assembly.regmean.data gave no tokens to compute statistics from")
    means = acc.means(sorted(set(stored.values())), widths)
    return {name: means[stored[name]] for name in tensors}, seen


def save_grams(grams: Mapping[str, torch.Tensor], path: Path, *, key: str) -> None:
    """Write a source's Gram matrices atomically, with the key they were computed for; weights that share
    one matrix (the same tensor object, as `input_grams` returns them) store it once."""
    first: dict[int, str] = {}
    tensors, aliases = {}, {}
    for name, gram in grams.items():
        owner = first.setdefault(id(gram), name)
        if owner == name:
            tensors[name] = gram.contiguous()
        else:
            aliases[name] = owner
    save_keyed(tensors, path, key, metadata={ALIASES: json.dumps(aliases, sort_keys=True)})


class GramReader:
    """Reads weights' saved Gram matrices, each source's file opened once (a merge reads hundreds)."""

    def __init__(self, zdir: Path):
        self.zdir = Path(zdir)
        self._open: dict[str, tuple[object, dict[str, str]]] = {}

    def read(self, source: str, name: str) -> torch.Tensor:
        """The Gram matrix of weight `name` in `source`'s statistics (shared with the weights reading its input)."""
        from safetensors import safe_open

        path = grams_file(self.zdir, source)
        try:
            if source not in self._open:
                f = safe_open(str(path), framework="pt")
                self._open[source] = (f, _aliases(f.metadata()))
            f, aliases = self._open[source]
            return f.get_tensor(aliases.get(name, name))
        except FileNotFoundError:
            raise OutputError(f"{path}: missing; run the merge without --resume (or `zenith-merge align`) to "
                              f"compute the RegMean statistics") from None
        except Exception as err:  # safetensors raises a bare SafetensorError for a missing key
            raise OutputError(f"{path}: no Gram matrix for {name} ({err}); the statistics are from another "
                              f"plan") from None


def read_gram(path: Path, name: str) -> torch.Tensor:
    """One weight's saved Gram matrix, from the file at `path`."""
    return GramReader(path.parent).read(path.name.removeprefix("regmean-").removesuffix(".safetensors"), name)
