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

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..architectures import architecture_of, classify, optional_tensor_name, shared_input_of, tensor_name
from ..errors import CalibrationError, OutputError
from ..forward.calibration import CapturePoint, capture_hidden
from ..forward.loading import load_for_calibration, release_memory
from ..io.manifest import fsync_dir, temp_path
from ..io.reader import Checkpoint
from ..io.safetensors_format import build_header, saved_key
from ..maths.regmean import gram_groups
from ..maths.routing import route, routing_spec

log = logging.getLogger(__name__)

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

    def nbytes(self) -> int:
        """Bytes the float64 sums hold."""
        return sum(t.numel() * t.element_size() for t in self.sums.values())

    def drop(self, name: str) -> None:
        """Free one weight's sum (once its mean is written)."""
        self.sums.pop(name, None)

    def means(self, names: Sequence[str], widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """E[x x^T] per weight (zeros for a weight that never saw a token, e.g. an expert never picked)."""
        out = {}
        for name in names:
            n = self.counts.get(name, 0)
            out[name] = (self.sums[name] / n).float() if n else torch.zeros(widths[name], widths[name])
        return out


@dataclass
class _Layout:
    """What the passes over one parent's text hook and accumulate, for the weights RegMean merges."""

    stored: dict[str, str]  # weight -> the weight whose statistic it shares (`shared_input_of`)
    widths: dict[str, int]  # weight -> its input width
    modules: dict[str, str]  # stored weight read at a module's input -> that module
    experts: dict[int, dict[int, dict[str, str]]]  # layer -> expert -> proj -> stored weight
    routers: dict[int, tuple[torch.Tensor, torch.Tensor | None]]
    expert_weights: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]
    spec: object = None
    act: object = None
    mlp_module: str = ""
    layer_module: str = ""
    layers: dict[str, int | None] = field(default_factory=dict)  # stored weight -> its decoder layer (None: after)

    def groups(self, max_memory: int | None) -> list[list[str]]:
        """The distinct statistics in groups that fit `max_memory`, by depth (`gram_groups`)."""
        return gram_groups([(n, self.widths[n], self.layers[n]) for n in dict.fromkeys(self.stored.values())],
                           max_memory)


def _layout(model_path: Path, tensors: Sequence[str]) -> _Layout:
    with Checkpoint.open(model_path, check_shapes=False) as ckpt:
        config = ckpt.config
        arch = architecture_of(config, where=str(model_path / "config.json"))
        stored = shared_input_of(arch, tensors)
        out = _Layout(stored, {name: ckpt.info(name).shape[-1] for name in tensors}, {}, {}, {}, {},
                      mlp_module=arch.mlp_module, layer_module=arch.layer_module)
        for name in tensors:
            tid = classify(arch, name)
            out.layers[stored[name]] = tid.layer if tid is not None else None
            if tid is not None and tid.role in EXPERT_ROLES:
                out.experts.setdefault(tid.layer, {}).setdefault(tid.expert, {})[EXPERT_ROLES[tid.role]] = stored[name]
            elif name.endswith(".weight"):
                out.modules[stored[name]] = stored[name].removesuffix(".weight")
            else:
                raise CalibrationError(f"{model_path}: {name} is not a linear weight RegMean can merge")
        if out.experts:
            out.spec = routing_spec(config, where=str(model_path / "config.json"))
            out.act = ACTIVATIONS.get(config.get("hidden_act", "silu"))
            if out.act is None:
                raise CalibrationError(f"{model_path / 'config.json'}: hidden_act {config.get('hidden_act')!r}: RegMean "
                                       f"computes expert inputs for {', '.join(ACTIVATIONS)} only")
            for layer, per in out.experts.items():
                bias_name = optional_tensor_name(arch, "router_bias", layer)
                out.routers[layer] = (ckpt.read(tensor_name(arch, "router", layer)).float(),
                                      ckpt.read(bias_name).float() if bias_name and bias_name in ckpt else None)
                for e in per:
                    out.expert_weights[(layer, e)] = tuple(ckpt.read(tensor_name(arch, role, layer, e)).float()
                                                           for role in ("expert_gate", "expert_up"))
    return out


def _pass(model, tokenizer, lay: _Layout, group: Sequence[str], texts: Sequence[str], *, max_tokens: int,
          progress: bool, desc: str = "RegMean statistics") -> tuple[_Accumulator, int]:
    """One pass over the text, accumulating the statistics in `group` only (only their inputs hooked)."""
    want = set(group)
    points = {CapturePoint.input_of(m): name for name, m in lay.modules.items() if name in want}
    experts: dict[int, dict[int, dict[str, str]]] = {}  # the group's: layer -> expert -> proj -> stored weight
    for layer, per in lay.experts.items():
        for e, names in per.items():
            mine = {p: n for p, n in names.items() if n in want}
            if mine:
                experts.setdefault(layer, {})[e] = mine
    moe_points = {layer: CapturePoint.input_of(lay.mlp_module.format(layer=layer)) for layer in experts}
    layers = [lay.layers[name] for name in group]
    # the layers after the group's deepest are not needed: the pass ends there (lm_head's input comes last)
    stop_after = None if None in layers else lay.layer_module.format(layer=max(layers))
    acc, seen = _Accumulator(), 0
    for chunk in capture_hidden(model, tokenizer, texts, [*points, *moe_points.values()],
                                max_total_tokens=max_tokens, stop_after=stop_after, progress=progress, desc=desc):
        seen += len(chunk)
        for point, name in points.items():
            acc.add([name], chunk.states[point])
        for layer, point in moe_points.items():
            x = chunk.states[point]
            weight, bias = lay.routers[layer]
            idx, _ = route(x @ weight.T, lay.spec, bias)
            for e, names in experts[layer].items():
                xe = x[(idx == e).any(dim=-1).nonzero().squeeze(-1)]
                acc.add(sorted({names[p] for p in ("gate", "up") if p in names}), xe)
                if "down" in names:
                    gate, up = lay.expert_weights[(layer, e)]
                    acc.add([names["down"]], lay.act(xe @ gate.T) * (xe @ up.T))
    return acc, seen


def _passes(model_path: Path, lay: _Layout, groups: Sequence[Sequence[str]], texts: Sequence[str], *,
            max_tokens: int, load: Mapping | None, progress: bool) -> Iterator[tuple[_Accumulator, int]]:
    """The parent loaded once, then one pass per group of statistics (each group's sums freed before the next)."""
    model, tokenizer = load_for_calibration(model_path, **(load or {}))
    try:
        for i, group in enumerate(groups):
            if len(groups) > 1:
                log.info("RegMean statistics of %s: pass %d of %d, %d matrices", model_path, i + 1, len(groups),
                         len(group))
            desc = "RegMean statistics" + (f", pass {i + 1} of {len(groups)}" if len(groups) > 1 else "")
            acc, seen = _pass(model, tokenizer, lay, group, texts, max_tokens=max_tokens, progress=progress,
                              desc=desc)
            if seen == 0:
                raise CalibrationError(f"{model_path}: assembly.regmean.data gave no tokens to compute statistics "
                                       f"from")
            yield acc, seen
            del acc
    finally:
        del model
        release_memory()


def input_grams(model_path: Path, tensors: Sequence[str], texts: Sequence[str], *, max_tokens: int,
                load: Mapping | None = None, progress: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """(E[x x^T] of each weight's input on `texts`, tokens seen): the RegMean statistics of one parent, in memory,
    from one pass. Weights that read one input get the same tensor object."""
    lay = _layout(Path(model_path), tensors)
    groups = lay.groups(None)
    ((acc, seen),) = _passes(Path(model_path), lay, groups, texts, max_tokens=max_tokens, load=load,
                             progress=progress)
    means = acc.means(groups[0], lay.widths)
    return {name: means[lay.stored[name]] for name in tensors}, seen


@dataclass(frozen=True)
class GramsWritten:
    """What `write_input_grams` did: tokens per pass, passes run (of how many), the largest float64 sums one pass
    held."""

    tokens: int
    passes: int
    peak_sum_bytes: int
    groups: int = 1


def part_file(path: Path, index: int, count: int) -> Path:
    """Where group `index` of `count` is kept until the whole file is assembled: a resumed run skips its pass."""
    return path.with_name(f"{path.stem}.part{index + 1}-of{count}{path.suffix}")


def _write_streamed(path: Path, names: Sequence[str], widths: Mapping[str, int], metadata: Mapping[str, str],
                    matrices: Iterator[torch.Tensor]) -> None:
    """A safetensors file of float32 (width x width) matrices, `names` in order, written one matrix at a time
    under a temporary name and renamed when complete."""
    tmp = temp_path(path, f".{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(build_header([(name, "F32", (widths[name],) * 2) for name in names], dict(metadata)))
            for name, matrix in zip(names, matrices, strict=True):
                if matrix.dtype != torch.float32 or tuple(matrix.shape) != (widths[name],) * 2:
                    raise ValueError(f"{name}: a {tuple(matrix.shape)} {matrix.dtype} matrix where the header says "
                                     f"({widths[name]}, {widths[name]}) float32")
                f.write(matrix.contiguous().view(torch.uint8).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _drained(acc: _Accumulator, names: Sequence[str], widths: Mapping[str, int]) -> Iterator[torch.Tensor]:
    """Each weight's mean in turn, its float64 sum freed as it goes."""
    for name in names:
        mean = acc.means([name], widths)[name]
        acc.drop(name)
        yield mean


def _read_parts(parts: Sequence[Path], groups: Sequence[Sequence[str]]) -> Iterator[torch.Tensor]:
    from safetensors import safe_open

    for part, group in zip(parts, groups):
        with safe_open(str(part), framework="pt") as f:
            for name in group:
                yield f.get_tensor(name)


def write_input_grams(model_path: Path, tensors: Sequence[str], texts: Sequence[str], path: Path, *, key: str,
                      max_tokens: int, load: Mapping | None = None, max_memory: int | None = None,
                      progress: bool = True) -> GramsWritten:
    """Compute one parent's RegMean statistics and stream them into `path` (float32, atomically: a temporary
    name until the last matrix is written), with `key` and the shared-input aliases in its metadata.

    With `max_memory`, the statistics are split into groups whose float64 sums fit in it, one pass over the
    text each. Each group's matrices are written to a part file and their sums freed before the next pass;
    a run cut short and started again skips the groups whose parts are complete. The parts are then
    copied into `path`, one matrix at a time, and removed.
    """
    lay = _layout(Path(model_path), tensors)
    groups = lay.groups(max_memory)
    order = [name for group in groups for name in group]
    aliases = {name: rep for name, rep in lay.stored.items() if name != rep}
    metadata = {"key": key, ALIASES: json.dumps(aliases, sort_keys=True)}
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    single = len(groups) == 1  # one pass writes the file itself; several write parts, copied in at the end
    parts = [final] if single else [part_file(final, i, len(groups)) for i in range(len(groups))]
    part_meta = [metadata] if single else [{"key": hashlib.sha256(json.dumps([key, g]).encode()).hexdigest()}
                                           for g in groups]
    for stale in set(final.parent.glob(f"{final.stem}.part*-of*{final.suffix}")) - set(parts):
        stale.unlink()  # parts of another grouping
    todo = [i for i in range(len(groups)) if single or saved_key(parts[i]) != part_meta[i]["key"]]
    tokens, peak = 0, 0
    passes = _passes(Path(model_path), lay, [groups[i] for i in todo], texts, max_tokens=max_tokens, load=load,
                     progress=progress)
    with contextlib.closing(passes):  # closing: the parent is freed after the last pass
        for i, (acc, seen) in zip(todo, passes):
            tokens, peak = seen, max(peak, acc.nbytes())
            _write_streamed(parts[i], groups[i], lay.widths, part_meta[i], _drained(acc, groups[i], lay.widths))
    if not single:
        _write_streamed(final, order, lay.widths, metadata, _read_parts(parts, groups))
        for part in parts:
            part.unlink()
    return GramsWritten(tokens, len(todo), peak, len(groups))


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
