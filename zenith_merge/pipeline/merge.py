"""The one place that joins the plan's recipes to the writer.

`run_merge` goes config -> plan -> writer -> side files -> config update, and
nothing else calls the writer. `PlanTensorSource` turns a planned tensor's recipe
into bytes, one tensor at a time, in whichever process writes its shard.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..architectures import ARCHITECTURES, facts, tensor_name
from ..config import PROMPT_GATE_MODES, MergeConfig, resolve_path
from ..errors import ConfigError, OutputError, PlanError, ZenithError
from ..io.dequantize import StreamingDequantizer
from ..io.manifest import write_json_atomic
from ..io.reader import Checkpoint
from ..io.safetensors_format import torch_dtype
from ..io.writer import TensorSpec, WriteResult, prepare_output_dir, write_checkpoint
from ..maths.graft import fold_projection, interpolate, pad_to, relative_difference, rescaled_to_norm
from ..plan.build import build_plan
from ..plan.models import (
    UNION_SIDE_FILES,
    AssembleRecipe,
    CopyRecipe,
    ExpertRecipe,
    Fp8ScaleRecipe,
    Plan,
    RouterRecipe,
    VocabRecipe,
)
from ..plan.resolve import resolve, source_router, source_tensor
from ..stages.router_offsets import OFFSETS_FILE as ROUTER_OFFSETS
from ..stages.router_training import MAPS_FILE as ALIGN_TRAINED
from ..stages.router_training import TRAINED_FILE as ROUTER_TRAINED
from .output_config import patch_output

log = logging.getLogger(__name__)


class PlanTensorSource:
    """Produces each output tensor from its recipe. Picklable: it carries only the plan, and opens
    source checkpoints and stage artefacts lazily in the process that uses it."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._recipes = None
        self._open: dict[str, Checkpoint] = {}
        self._fp8_last: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._alignments: dict[str, object] = {}
        self._router_cache: dict[tuple[str, str], torch.Tensor] = {}
        self._vectors: dict[str, torch.Tensor] | None = None
        self._offsets: dict | None = None
        self._align_info: dict[str, dict] = {}
        self._union: tuple[dict, dict] | None = None  # the token map and row maps, read once
        self._grams = None  # RegMean's saved statistics, each file opened once
        self._dequantizer = StreamingDequantizer()  # FP8 copies written as BF16, in reused buffers

    def __getstate__(self):
        return {"plan": self.plan}

    def __setstate__(self, state):
        self.__init__(state["plan"])

    def _checkpoint(self, key: str) -> Checkpoint:
        if key not in self._open:
            src = self.plan.sources[key]
            self._open[key] = Checkpoint.open(Path(src.path), allow_pickle=self.plan.config.get("allow_pickle", False))
        return self._open[key]

    def maps(self, source: str, layer: int, source_layer: int):
        """(A, B) of a source's layer pair, or (None, None) where the source needs no map.

        Read one pair at a time (a pair of a large model is hundreds of MB) and kept while
        consecutive tensors use it, which in plan order they do.
        """
        if self.plan.transforms[source].align != "fit":
            return None, None
        key = (source, layer, source_layer)
        if key not in self._alignments and ALIGN_TRAINED in self.plan.artefacts:  # trained maps replace the fit
            from ..stages.router_training import read_trained_maps

            self._alignments.clear()
            self._alignments[key] = read_trained_maps(Path(self.plan.output_dir) / ".zenith", source, layer,
                                                      source_layer)
        if key not in self._alignments:
            from ..stages.align import read_info, read_maps

            folder = alignment_dir(Path(self.plan.output_dir), source)
            if source not in self._align_info:
                try:
                    self._align_info[source] = read_info(folder)
                except ZenithError as err:
                    raise OutputError(f"{err}; run `zenith-merge align` (or merge without --resume) again") from None
            maps = read_maps(folder, (layer, source_layer), self._align_info[source])
            self._alignments.clear()
            self._alignments[key] = maps
        return self._alignments[key]

    def produce(self, spec: TensorSpec):
        """The bytes (same dtype: raw copy) or tensor (converted) for one output tensor."""
        recipe = self._recipe(spec.name)
        if isinstance(recipe, Fp8ScaleRecipe):
            return self._fp8_copy(recipe.tensor, spec, "_scale_inv") or self._fp8(recipe.tensor)[1]
        if spec.dtype == "F8_E4M3":
            return self._fp8_copy(spec.name, spec) or self._fp8(spec.name)[0]
        if isinstance(recipe, CopyRecipe):
            ckpt = self._checkpoint(recipe.source)
            if ckpt.info(recipe.tensor).dtype == spec.dtype and not recipe.pad:
                if ckpt.is_fp8(recipe.tensor) and spec.dtype == "BF16":  # dequantised in flat memory
                    return self._dequantizer(ckpt, recipe.tensor)
                return ckpt.byte_range(recipe.tensor) or ckpt.read_bytes(recipe.tensor)
        return self.tensor(spec)

    def tensor(self, spec: TensorSpec) -> torch.Tensor:
        """One output tensor, always as a tensor of its planned dtype and shape (what `produce` writes).

        The search scores candidate merges in memory from these, so it scores exactly what a merge writes.
        """
        recipe = self._recipe(spec.name)
        if isinstance(recipe, CopyRecipe):
            out = self._checkpoint(recipe.source).read(recipe.tensor)
        elif isinstance(recipe, ExpertRecipe):
            out = self._expert(recipe)
        elif isinstance(recipe, RouterRecipe):
            out = self._router(recipe)
        elif isinstance(recipe, VocabRecipe):
            return self._vocab(recipe, spec)
        else:
            out = self._assemble(recipe)
        return pad_to(out, spec.shape).to(torch_dtype(spec.dtype))

    def _fp8_copy(self, name: str, spec: TensorSpec, suffix: str = ""):
        """The stored bytes of an FP8 output weight (or of its scales, `suffix` _scale_inv) that the plan copies
        from a source holding it in the same block FP8: copied, not quantised again, so a copy keeps both its
        weight and scale bytes exactly. None where the weight is computed, or its source stores it otherwise."""
        from ..kernels.fp8 import DEFAULT_BLOCK

        recipe = self._recipe(name)
        if not isinstance(recipe, CopyRecipe) or recipe.pad:
            return None
        ckpt = self._checkpoint(recipe.source)
        if not ckpt.is_fp8(recipe.tensor) or tuple(ckpt.fp8_block) != tuple(DEFAULT_BLOCK):
            return None
        stored = ckpt.stored_info(recipe.tensor + suffix)
        if tuple(stored.shape) != tuple(spec.shape) or stored.dtype != spec.dtype:
            return None
        return ckpt.stored_byte_range(recipe.tensor + suffix) or ckpt.read_stored(recipe.tensor + suffix)

    def _fp8(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, scale_inv) of an output weight written as block FP8; computed once for the weight and its scales."""
        if self._fp8_last is None or self._fp8_last[0] != name:
            from ..kernels.fp8 import DEFAULT_BLOCK, quantize

            scale = self._recipe(f"{name}_scale_inv")
            self._recipe(name)
            w = self.tensor(TensorSpec(name, scale.via, self._shapes[name]))
            self._fp8_last = (name, quantize(w, DEFAULT_BLOCK))
        return self._fp8_last[1]

    def _recipe(self, name: str):
        if self._recipes is None:
            self._recipes = {t.name: t.recipe for t in self.plan.tensors}
            self._shapes = {t.name: t.shape for t in self.plan.tensors}
        return self._recipes[name]

    def _expert(self, r: ExpertRecipe) -> torch.Tensor:
        slot = self.plan.slot(r.layer, r.slot)
        A, B = self.maps(slot.source, self._stage_layer(r.layer), slot.source_layer)
        return fold_projection(self.source_weight(r.layer, r.slot, r.proj), r.proj, A=A, B=B, scale=slot.scale)

    def source_weight(self, layer: int, slot_index: int, proj: str) -> torch.Tensor:
        """An output expert slot's projection as its source holds it, before folding: with mergekit's
        noise, or replaced by random weights of the same norm (`random_experts`, a control), seeded."""
        slot = self.plan.slot(layer, slot_index)
        w = self._checkpoint(slot.source).read(source_tensor(self.plan, slot, proj))
        transform = self.plan.transforms[slot.source]
        if transform.noise_scale or transform.random_experts:
            gen = _generator(self.plan.config.get("seed", 0), layer, slot_index * 7 + _PROJ_INDEX[proj])
            noise = torch.randn(w.shape, generator=gen)
            if transform.random_experts:
                w = rescaled_to_norm(noise, w)
            if transform.noise_scale:  # mergekit's noise_scale: W + noise_scale * N(0, 1)
                w = w.float() + transform.noise_scale * noise
        return w

    def _rows(self, source: str, name: str) -> torch.Tensor:
        """A router tensor of a source (float32), read once per output layer."""
        if (source, name) not in self._router_cache:
            self._router_cache[source, name] = self._checkpoint(source).read(name).float()
        return self._router_cache[source, name]

    def _router(self, r: RouterRecipe) -> torch.Tensor:
        self._router_cache.clear()
        if ROUTER_TRAINED in self.plan.artefacts and self.plan.layer_experts(r.layer).like is None:
            # router training's rows replace the gate mode's (training runs no MTP layer: those keep theirs)
            from ..stages.router_training import read_trained

            arch = ARCHITECTURES[self.plan.target_config["architectures"][0]]
            role = "router" if r.part == "weight" else "router_bias"
            return read_trained(Path(self.plan.output_dir) / ".zenith", tensor_name(arch, role, r.layer))
        base_arch = ARCHITECTURES[self.plan.sources["base"].architecture]
        role = "router" if r.part == "weight" else "router_bias"
        base_name = tensor_name(base_arch, role, r.layer) if role in base_arch.roles else None
        base_rows = self._rows("base", base_name) if base_name is not None and base_name in self._checkpoint("base") \
            else None
        return torch.stack([self._router_row(r, j, slot, base_rows)
                            for j, slot in enumerate(self.plan.layer_experts(r.layer).slots)])

    def _stage_layer(self, layer: int) -> int:
        """The layer whose maps, prompt vectors and offsets `layer`'s grafted slots use (an MTP layer: the last
        MoE layer's)."""
        return self.plan.layer_experts(layer).stage_layer

    def _router_row(self, r: RouterRecipe, j: int, slot, base_rows: torch.Tensor | None) -> torch.Tensor:
        """One slot's router row (or score correction): the base's own, or the gate mode's for a grafted expert."""
        if slot.source == "base" and slot.kind == "routed":
            return base_rows[slot.expert]
        mode = self.plan.config.get("gate_mode", "random")
        layer = self._stage_layer(r.layer)
        if r.part == "bias":
            return self._bias_row(slot, layer, mode, base_rows) + self._offset(slot.source, layer)
        if mode in PROMPT_GATE_MODES:
            # mergekit's prompt-based row: the source's unit prompt vector, at the base rows' mean norm where
            # the base has a router; a routed donor expert adds its own mapped row, which orders the donor's
            # experts among themselves (all of one source share the prompt vector)
            row = self._prompt_vector(slot.source, layer)
            if base_rows is not None:
                row = row * base_rows.norm(dim=-1).mean()
            if slot.kind == "routed" and source_router(self.plan, slot, "weight") is not None:
                row = row + self._mapped_row(slot, layer)
            return row
        if mode == "transfer":
            return self._mapped_row(slot, layer)
        width = facts(self.plan.target_config).hidden_size
        std = float(base_rows.std()) if base_rows is not None and base_rows.numel() > 1 else width ** -0.5
        return random_router_row(width, std, self.plan.config.get("seed", 0), r.layer, j,
                                 uniform=mode == "uniform_random")

    def _bias_row(self, slot, layer: int, mode: str, base_rows: torch.Tensor | None) -> torch.Tensor:
        """A grafted slot's score correction before calibration: a same-family donor keeps its own (it shares
        the base's scale); others start at the base's mean correction."""
        if mode == "transfer" and self.plan.transforms[slot.source].align == "identity":
            name = source_router(self.plan, slot, "bias")
            if name is not None and name in self._checkpoint(slot.source):
                return self._rows(slot.source, name)[slot.expert]
        return base_rows.mean() if base_rows is not None else torch.tensor(0.0)

    def _offset(self, source: str, layer: int) -> float:
        """The calibrated selection offset of a source's slots at `layer` (0 before calibration)."""
        if ROUTER_OFFSETS not in self.plan.artefacts:
            return 0.0
        if self._offsets is None:
            from ..stages.router_offsets import load_offsets

            self._offsets = load_offsets(Path(self.plan.output_dir) / ".zenith") or {}
        return self._offsets.get(layer, {}).get(source, {}).get("offset", 0.0)

    def _mapped_row(self, slot, layer: int) -> torch.Tensor:
        """The source's own router row of the slot's expert, mapped into the base's space: row . A."""
        donor = self._rows(slot.source, source_router(self.plan, slot, "weight"))
        A, _ = self.maps(slot.source, layer, slot.source_layer)
        return fold_projection(donor[slot.expert:slot.expert + 1], "gate", A=A)[0]

    def _prompt_vector(self, source: str, layer: int) -> torch.Tensor:
        if self._vectors is None:
            from ..stages.prompt_vectors import load_vectors

            self._vectors = load_vectors(Path(self.plan.output_dir) / ".zenith")
        return self._vectors[f"{source}.{layer}"]

    def _vocab(self, r: VocabRecipe, spec: TensorSpec) -> torch.Tensor:
        """The union's embedding or lm_head, built in the output dtype from the token map."""
        from ..stages.tokenizer import load_maps, load_token_map, rows_tensor, union_rows

        zdir = Path(self.plan.output_dir) / ".zenith"
        if self._union is None:
            self._union = (load_token_map(zdir), load_maps(zdir))
        token_map, maps = self._union
        base = self._checkpoint("base")
        base_rows = base.read(r.tensor or rows_tensor(base, self.plan.sources["base"].architecture, r.part))
        donors = {}
        for key in self.plan.vocab.donors:
            ckpt = self._checkpoint(key)
            donors[key] = ckpt.read(rows_tensor(ckpt, self.plan.sources[key].architecture, r.part))
        out = torch.zeros(spec.shape, dtype=torch_dtype(spec.dtype))
        return union_rows(r.part, out, base_rows, donors, token_map, maps)

    def _assemble(self, r: AssembleRecipe) -> torch.Tensor:
        base = self._checkpoint("base").read(r.tensor)
        parents = {key: (base if key == "base" else self._checkpoint(key).read(r.tensor)) for key in r.sources}
        far = max((relative_difference(t, base) for key, t in parents.items() if key != "base"), default=0.0)
        if far <= r.threshold:
            return base
        if len(parents) == 1:
            return next(iter(parents.values()))
        if r.regmean:
            from ..maths.regmean import regmean_merge
            from ..stages.regmean import GramReader

            if self._grams is None:
                self._grams = GramReader(Path(self.plan.output_dir) / ".zenith")
            grams = [self._grams.read(key, r.tensor) for key in parents]
            return regmean_merge(list(parents.values()), grams, list(r.weights), off_diagonal=r.off_diagonal,
                                 ridge=r.ridge)
        return interpolate(list(parents.values()), list(r.weights))

    def close(self) -> None:
        for ckpt in self._open.values():
            ckpt.close()
        self._open.clear()
        self._alignments.clear()
        self._router_cache.clear()
        self._union = None
        self._fp8_last = None
        self._grams = None
        self._dequantizer.clear()


_PROJ_INDEX = {"gate": 0, "up": 1, "down": 2}


def _generator(seed: int, layer: int, offset: int) -> torch.Generator:
    """A generator seeded by (config seed, layer, offset within the layer): the same numbers on every run."""
    return torch.Generator().manual_seed((seed * 1_000_003 + layer * 10_007 + offset) % 2**31)


def random_router_row(width: int, std: float, seed: int, layer: int, slot: int, *, uniform: bool) -> torch.Tensor:
    """A seeded random router row with the spread `std` of the base's rows (mergekit's `random`/`uniform_random`)."""
    gen = _generator(seed, layer, slot)
    if uniform:  # uniform on [-a, a] has std a / sqrt(3)
        return (torch.rand(width, generator=gen) * 2 - 1) * std * 3 ** 0.5
    return torch.randn(width, generator=gen) * std


def union_dir(out_dir: Path) -> Path:
    """Where the tokenizer stage keeps the union tokenizer's files: `<output>/.zenith/tokenizer/`."""
    from ..stages.tokenizer import TOKENIZER_DIR

    return out_dir / ".zenith" / TOKENIZER_DIR


def alignment_dir(out_dir: Path, source: str) -> Path:
    """Where a source's fitted maps A and B are kept: `<output>/.zenith/align-<source>/`."""
    return out_dir / ".zenith" / f"align-{source}"


@dataclass(frozen=True)
class MergeResult:
    plan: Plan
    output_dir: Path
    write: WriteResult


def write_side_files(plan: Plan, out_dir: Path) -> None:
    """Copy the plan's side files byte for byte: tokenizer, chat-template and generation files from their
    source (or the union's, from the tokenizer stage) and the custom-code modules the config's `auto_map`
    names, from the base; then write the target config.json. A planned file gone from its source since the
    plan (a folder edited during the merge) is an error naming it, not a traceback."""
    from ..plan.sources import copy_file_atomic

    for name, key in plan.side_files.items():
        src = union_dir(out_dir) / name if key == UNION_SIDE_FILES else Path(plan.sources[key].path) / name
        if not src.is_file():
            raise OutputError(f"{src}: side file {name} (from {key}) is missing; the plan found it there: restore "
                              f"it, or plan again")
        copy_file_atomic(src, out_dir / name)
    write_json_atomic(out_dir / "config.json", plan.target_config)


def check_training_inputs(plan: Plan, cfg: MergeConfig, config_dir: Path | None) -> None:
    """Refuse training text that is missing or too short for one sequence before any stage runs or any
    weight is written (training comes last, after the hours a big merge takes)."""
    if not plan.stages.train_routers:
        return
    from ..stages.router_training import check_training_text

    texts, where = training_texts(cfg, config_dir)
    check_training_text(plan, texts, where, read_texts(cfg.align.teacher_data, "align.teacher_data", config_dir))


def training_texts(cfg: MergeConfig, config_dir: Path | None) -> tuple[list[str], str]:
    """Router (and alignment) training's text, and where the config names it: `router.data`, or by default
    `align.calibration` and every expert's positive prompts."""
    if cfg.router.data:
        return read_texts(cfg.router.data, "router.data", config_dir), "router.data"
    texts = [*read_texts(cfg.align.calibration, "align.calibration", config_dir),
             *(p for e in cfg.experts for p in e.positive_prompts)]
    return texts, "router.data (empty: align.calibration and the experts' positive_prompts)"


def read_texts(items, key: str, config_dir: Path | None) -> list[str]:
    """The texts a config list names: text files (relative to the config) or demo:code / demo:maths."""
    texts = []
    for i, item in enumerate(items):
        if item.startswith("demo:"):
            from ..demo import calibration_text

            domain = item.removeprefix("demo:")
            if domain not in ("code", "maths"):
                raise ConfigError(f"{key}.{i}: unknown demo text {item!r}; use demo:code or demo:maths")
            texts.append(calibration_text(domain))
            continue
        path = resolve_path(item, config_dir)
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"{key}.{i}: cannot read {path} ({err.strerror})") from None
    return texts


def calibration_texts(cfg: MergeConfig, config_dir: Path | None) -> list[str]:
    """The alignment's calibration text: `align.calibration` (files, or demo:<domain>), else every prompt."""
    texts = read_texts(cfg.align.calibration, "align.calibration", config_dir)
    if not texts:
        texts = [p for e in cfg.experts for p in (*e.positive_prompts, *e.negative_prompts)]
    if not texts:
        raise ConfigError("align.calibration: fitting the hidden-space maps needs calibration text; give text "
                          "files (or experts' prompts)")
    return texts


def calibration_load(cfg: MergeConfig) -> dict:
    """`load_for_calibration`'s options from the config: 8-bit, the CPU memory cap, the dtype."""
    dtype = cfg.calibration_dtype if cfg.calibration_dtype == "stored" else getattr(torch, cfg.calibration_dtype)
    max_memory = {"cpu": cfg.calibration_max_memory} if cfg.calibration_max_memory is not None else None
    return {"load_in_8bit": cfg.load_in_8bit, "max_memory": max_memory, "dtype": dtype}


def _sha(path: Path) -> str:
    from ..io.manifest import file_sha256

    return file_sha256(path)


def _align(plan: Plan, source: str, pairs, texts: list[str], folder: Path, *, key: str, cfg: MergeConfig,
           progress: bool) -> None:
    """Fit (or reuse, when fitted for this plan) the maps A and B of one source's layer pairs."""
    from ..stages.align import (
        ALIGN_JSON,
        FIT_REVISION,
        fit_alignment_groups,
        read_info,
        save_alignment_groups,
    )

    key = f"{key}.fit{FIT_REVISION}"
    if (folder / ALIGN_JSON).is_file():
        try:
            if read_info(folder).get("meta", {}).get("plan_key") == key:
                return
        except ZenithError:
            pass  # incomplete or older: fit again
    base_arch = ARCHITECTURES[plan.sources["base"].architecture]
    src_arch = ARCHITECTURES[plan.sources[source].architecture]
    groups = fit_alignment_groups(
        plan.sources["base"].path, plan.sources[source].path, list(pairs), texts,
        base_points=lambda layer: (base_arch.mlp_module.format(layer=layer), base_arch.layer_module.format(layer=layer)),
        donor_points=lambda layer: (src_arch.mlp_module.format(layer=layer), src_arch.layer_module.format(layer=layer)),
        ridge=cfg.align.ridge, max_tokens=cfg.align.max_tokens, max_accumulator_bytes=cfg.align.max_memory,
        progress=progress, **calibration_load(cfg))
    save_alignment_groups(groups, folder, grouped=cfg.align.max_memory is not None, meta={"plan_key": key})
    info = read_info(folder)
    log.info("aligned %s: %s", source, ", ".join(
        f"{b}.{d}: R2(A) {info['r2']['A'][f'A.{b}.{d}']:.2f}, R2(B) {info['r2']['B'][f'B.{b}.{d}']:.2f}"
        for b, d in info["pairs"]))


def _prompt_vectors(plan: Plan, cfg: MergeConfig, zdir: Path, *, key: str, progress: bool) -> str:
    """Compute (or reuse) the sources' prompt vectors for prompt-based router rows; their sha256."""
    from ..stages import prompt_vectors as pv

    layers = [le.layer for le in plan.expert_table if le.like is None]  # MTP layers use the last layer's
    if pv.saved_key(zdir) != key:
        prompts = {s: (plan.transforms[s].prompts, plan.transforms[s].negative_prompts)
                   for s in plan.stages.prompt_vectors}
        base = Path(plan.sources["base"].path)
        if cfg.gate_mode == "cheap_embed":
            vectors = pv.cheap_embed_vectors(base, layers, prompts)
        else:
            vectors = pv.hidden_vectors(base, layers, prompts, mode=cfg.gate_mode, load=calibration_load(cfg),
                                        progress=progress)
        pv.save_vectors(vectors, layers, zdir, key)
    return _sha(zdir / pv.VECTORS_FILE)


def protect_texts(plan: Plan, config_dir: Path | None) -> list[str]:
    """The text the union tokenizer must split as the base does: `tokenizer.protect`, else the base's prompts."""
    return read_texts(plan.vocab.protect, "tokenizer.protect", config_dir) or list(plan.vocab.protect_prompts)


def build_tokenizer(cfg: MergeConfig, *, config_dir: Path | None = None, output_dir: str | Path | None = None,
                    overwrite: bool = False) -> Plan:
    """Run only the tokenizer stage: the union tokenizer, token map and row maps into `<output>/.zenith/`.

    A later `merge --resume` of the same config reuses them.
    """
    plan = build_plan(cfg, config_dir=config_dir, output_dir=output_dir)
    if plan.vocab is None:
        raise PlanError("tokenizer: this merge keeps the base's tokenizer (tokenizer.source is not union, or no "
                        "expert's vocabulary differs from the base's); there is no union to build")
    out = Path(plan.output_dir)
    prepare_output_dir(out, resume=not overwrite, overwrite=overwrite,
                       source_dirs=[Path(s.path) for s in plan.sources.values()])
    from ..stages.tokenizer import build_union

    build_union(plan, protect_texts(plan, config_dir), out / ".zenith", key=plan.plan_id)
    return plan


def run_stages(plan: Plan, cfg: MergeConfig, *, config_dir: Path | None = None, progress: bool = True) -> Plan:
    """Run the stages the plan asks for (expert usage, alignment fits) and return the resolved plan.

    Artefacts go to `<output>/.zenith/`; ones computed for this same plan are reused, so a
    resumed merge does not redo them.
    """
    from ..stages.usage import expert_usage, load_usage, save_usage

    out, key = Path(plan.output_dir), plan.plan_id
    zdir = out / ".zenith"
    artefacts: dict[str, str] = {}
    usage = None
    if plan.stages.usage:
        usage = load_usage(zdir, key)
        if usage is None:
            usage = {}
            for source, layers in plan.stages.usage.items():
                log.info("expert usage of %s on its prompts, layers %s", source, list(layers))
                usage[source] = expert_usage(Path(plan.sources[source].path), layers, plan.transforms[source].prompts,
                                             load=calibration_load(cfg), progress=progress)
            save_usage(usage, zdir, key)
        artefacts["usage.json"] = _sha(zdir / "usage.json")
    if plan.vocab is not None:
        from ..stages.tokenizer import build_union

        artefacts.update(build_union(plan, protect_texts(plan, config_dir), zdir, key=key))
    if plan.stages.prompt_vectors:
        artefacts["prompt_vectors"] = _prompt_vectors(plan, cfg, zdir, key=key, progress=progress)
    if plan.stages.align:
        texts = calibration_texts(cfg, config_dir)
        for source, pairs in plan.stages.align.items():
            folder = alignment_dir(out, source)
            _align(plan, source, pairs, texts, folder, key=key, cfg=cfg, progress=progress)
            artefacts[f"align-{source}"] = _sha(folder / "align.json")  # which holds each map file's sha256
    for source, stage in plan.stages.regmean.items():
        artefacts[f"regmean-{source}"] = _regmean_grams(plan, source, stage, zdir, cfg=cfg, config_dir=config_dir,
                                                        progress=progress)
    plan = resolve(plan, usage, artefacts)
    if plan.stages.router_offsets:
        artefacts[ROUTER_OFFSETS] = _router_offsets(plan, cfg, zdir, key=key)
        plan = plan.model_copy(update={"artefacts": dict(artefacts)})
    return plan


def _regmean_grams(plan: Plan, source: str, stage, zdir: Path, *, cfg: MergeConfig, config_dir: Path | None,
                   progress: bool) -> str:
    """Compute (or reuse, when computed from the same inputs) one parent's RegMean Gram matrices; their sha256."""
    from ..stages import regmean as rm

    texts = read_texts(stage.data, f"assembly.regmean.data.{plan.sources[source].ref}", config_dir)
    load = calibration_load(cfg)
    key = rm.grams_key(plan.sources[source].fingerprint, texts, stage.max_tokens, load)
    path = rm.grams_file(zdir, source)
    if not rm.saved_covers(path, key, stage.tensors):
        log.info("RegMean statistics of %s: %d weights on %s", source, len(stage.tensors), ", ".join(stage.data))
        done = rm.write_input_grams(Path(plan.sources[source].path), stage.tensors, texts, path, key=key,
                                    max_tokens=stage.max_tokens, load=load, max_memory=stage.max_memory,
                                    progress=progress)
        log.info("RegMean statistics of %s: %d tokens, %d of %d passes run, at most %.1f MiB of sums", source,
                 done.tokens, done.passes, done.groups, done.peak_sum_bytes / 2**20)
    return _sha(path)


def _router_offsets(plan: Plan, cfg: MergeConfig, zdir: Path, *, key: str) -> str:
    """Calibrate (or reuse) the grafted sources' selection offsets on the resolved plan's router rows; their sha256.

    The rows are the writer's own (the recipes of the plan, before any offset), and the states
    the base model's MoE inputs on every source's prompts.
    """
    from ..maths.routing import routing_spec
    from ..stages.router_offsets import calibrate_layer, load_offsets, prompt_states, save_offsets

    if load_offsets(zdir, key) is None:
        arch = ARCHITECTURES[plan.sources["base"].architecture]
        layers = [le.layer for le in plan.expert_table if le.like is None]  # MTP layers use the last layer's
        prompts = {k: list(t.prompts) for k, t in plan.transforms.items() if t.prompts}
        states = prompt_states(Path(plan.sources["base"].path), layers, prompts, mlp_module=arch.mlp_module,
                               load=calibration_load(cfg))
        spec = routing_spec(plan.target_config)
        out_arch = ARCHITECTURES[plan.target_config["architectures"][0]]
        source = PlanTensorSource(plan)
        specs = {t.name: t.spec for t in plan.tensors}
        offsets = {}
        try:
            for le in (le for le in plan.expert_table if le.like is None):
                rows = source.produce(specs[tensor_name(out_arch, "router", le.layer)]).float()
                bias = source.produce(specs[tensor_name(out_arch, "router_bias", le.layer)]).float()
                offsets[le.layer] = calibrate_layer(
                    {k: v[le.layer] for k, v in states.items()}, rows, bias, [sl.source for sl in le.slots], spec,
                    plan.stages.router_offsets, target_share=cfg.router.target_share)
        finally:
            source.close()
        save_offsets(offsets, zdir, key)
        log.info("router offsets: %s", "; ".join(
            f"L{layer} " + ", ".join(f"{s} {v['offset']:+.3f} (hit {v['hit']:.2f}, leak {v['leak']:.2f})"
                                     for s, v in per.items()) for layer, per in offsets.items()))
    return _sha(zdir / ROUTER_OFFSETS)


def prepare_stages(cfg: MergeConfig, *, config_dir: Path | None = None, output_dir: str | Path | None = None,
                   resume: bool = True, overwrite: bool = False, progress: bool = True) -> Plan:
    """Plan, then run the stages into `<output>/.zenith/` and save the resolved plan; write no weights.

    With `resume`, an output folder from an earlier run is continued (its artefacts reused when
    they belong to the same plan); `overwrite` empties it first.
    """
    plan = build_plan(cfg, config_dir=config_dir, output_dir=output_dir)
    check_training_inputs(plan, cfg, config_dir)
    out = Path(plan.output_dir)
    prepare_output_dir(out, resume=resume, overwrite=overwrite,
                       source_dirs=[Path(s.path) for s in plan.sources.values()])
    if plan.needs_stages:
        plan = run_stages(plan, cfg, config_dir=config_dir, progress=progress)
    plan.save(out)
    return plan


def _write(plan: Plan, out: Path, **kwargs) -> WriteResult:
    """Write the plan's shards into `out` (the writer's options in kwargs)."""
    source = PlanTensorSource(plan)
    try:
        return write_checkpoint(out, plan.shard_specs(), source, plan_id=plan.plan_id, **kwargs)
    finally:
        source.close()


def routing_domains(cfg: MergeConfig, plan: Plan, config_dir: Path | None) -> dict[str, list[str]]:
    """The texts the routing report runs: each source's positive prompts, and each calibration text."""
    from ..checks.routing_report import prompt_domains

    domains = prompt_domains(plan)
    for item, text in zip(cfg.align.calibration, read_texts(cfg.align.calibration, "align.calibration", config_dir)):
        domains[item] = [text]
    return domains


def write_routing_report(cfg: MergeConfig, plan: Plan, out: Path, *, config_dir: Path | None,
                         progress: bool) -> None:
    """The routing report of a written MoE merge, unless one for the same bytes is there already."""
    from ..checks.routing_report import load_routing, routing_usage, save_routing

    if load_routing(out) is not None:
        return
    domains = routing_domains(cfg, plan, config_dir)
    if not domains:
        log.info("no routing report: no prompts or calibration text to route")
        return
    report = routing_usage(out, domains, load=calibration_load(cfg), progress=progress)
    if report:
        save_routing(report, out)


def _check_resumed_sources(cfg: MergeConfig, config_dir: Path | None, output_dir: str | Path | None) -> None:
    """Refuse a resume whose sources changed since the interrupted run (its `.zenith/plan.json`), naming the
    source: a parent swapped for another of the same layout would otherwise be written beside the old one's
    finished shards. Nothing to check where no readable plan is there (the writer's plan-id check remains)."""
    from ..plan.models import PLAN_FILE
    from ..plan.output import output_path
    from ..plan.sources import check_unchanged

    out = output_path(cfg, config_dir, output_dir)
    if not (out / PLAN_FILE).is_file():
        return
    try:
        earlier = Plan.load(out)
    except ValueError:  # pydantic's ValidationError: another version's plan, whose plan id the writer refuses
        return
    check_unchanged(earlier.sources, out)


def run_merge(
    cfg: MergeConfig,
    *,
    config_dir: Path | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> MergeResult:
    """Plan, run the stages, and write a merge; on resume, finished shards are kept and the rest rewritten.

    With router or alignment training, the merge is written first (the model trains from it), then
    the shards holding the routers (and the experts whose maps train) are written again; a resumed run picks up at
    whichever of those steps was cut short. A resume first checks that every source of the interrupted run
    still has the fingerprint it was planned with (`sources.check_unchanged`), before a stage runs or the
    plan is saved over the interrupted one.
    """
    if resume:
        _check_resumed_sources(cfg, config_dir, output_dir)
    plan = prepare_stages(cfg, config_dir=config_dir, output_dir=output_dir, resume=resume, overwrite=overwrite,
                          progress=progress)
    out = Path(plan.output_dir)
    write = dict(workers=workers or cfg.workers, backend=cfg.backend, progress=progress)
    if plan.stages.train_routers:
        from ..stages.router_training import TRAINED_FILE, train_routers, trained_key

        zdir, untrained_id = out / ".zenith", plan.plan_id
        if trained_key(zdir) != untrained_id:
            texts, where = training_texts(cfg, config_dir)
            teacher = read_texts(cfg.align.teacher_data, "align.teacher_data", config_dir)
            _write(plan, out, resume=resume, **write)
            write_side_files(plan, out)  # the model trains from the folder: it needs config and tokenizer
            patch_output(out)
            log.info("training the router rows%s for %d steps", " and maps" if plan.stages.train_maps else "",
                     plan.stages.train_routers)
            train_routers(out, plan, texts, key=untrained_id, teacher_texts=teacher, where=where, progress=progress,
                          tensor_source=PlanTensorSource(plan) if plan.stages.train_maps else None)
        trained = {TRAINED_FILE: _sha(zdir / TRAINED_FILE)}
        if plan.stages.train_maps:
            trained[ALIGN_TRAINED] = _sha(zdir / ALIGN_TRAINED)
        plan = plan.model_copy(update={"artefacts": {**plan.artefacts, **trained}})
        plan.save(out)
        keep = frozenset(s.filename for s in plan.shards) - set(plan.retrained_shards)
        result = _write(plan, out, resume=True, carry=(untrained_id, keep), **write)
    else:
        result = _write(plan, out, resume=resume, **write)
    write_side_files(plan, out)
    patch_output(out)
    if cfg.routing_report:
        write_routing_report(cfg, plan, out, config_dir=config_dir, progress=progress)
    from ..checks.model_card import write_model_card

    token_map = None
    if plan.vocab is not None:
        from ..vocab.token_map import TokenMap

        token_map = TokenMap.load(out / ".zenith").header
    from ..checks.routing_report import load_routing

    write_model_card(plan, out, token_map, load_routing(out))
    log.info("merged %d tensors into %s", len(plan.tensors), out)
    return MergeResult(plan=plan, output_dir=out, write=result)
