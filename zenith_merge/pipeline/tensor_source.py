"""`PlanTensorSource`: each output tensor made from its recipe (copied, interpolated, grafted, FP8), one
tensor at a time, in whichever process writes its shard.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..architectures import ARCHITECTURES, facts, optional_tensor_name, tensor_name
from ..config import PROMPT_GATE_MODES
from ..errors import OutputError, ZenithError
from ..io.dequantize import StreamingDequantizer
from ..io.reader import Checkpoint
from ..io.safetensors_format import torch_dtype
from ..io.writer import TensorSpec
from ..maths.graft import fold_projection, interpolate, pad_to, relative_difference, rescaled_to_norm
from ..plan.models import (
    AssembleRecipe,
    CopyRecipe,
    ExpertRecipe,
    Fp8ScaleRecipe,
    MethodRecipe,
    MlaRecipe,
    Plan,
    RouterRecipe,
    VocabRecipe,
    ZerosRecipe,
)
from ..plan.resolve import source_router, source_tensor
from ..stages.router_offsets import OFFSETS_FILE as ROUTER_OFFSETS
from ..stages.router_training import MAPS_FILE as ALIGN_TRAINED
from ..stages.router_training import TRAINED_FILE as ROUTER_TRAINED
from .inputs import alignment_dir


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
        self._fused: tuple[tuple, torch.Tensor] | None = None  # expert_scope layer: the last layer's merged experts
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
        elif isinstance(recipe, ZerosRecipe):
            return torch.zeros(spec.shape, dtype=torch_dtype(spec.dtype))
        elif isinstance(recipe, MethodRecipe):
            out = self._method(recipe)
        elif isinstance(recipe, MlaRecipe):
            out = self._mla(recipe, torch_dtype(spec.dtype))
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

    def _mla(self, r: MlaRecipe, dtype: torch.dtype) -> torch.Tensor:
        """One MLA weight of a dense base layer's attention (maths/mla.py), in `dtype`."""
        from ..maths.mla import MLA_INPUTS, GqaLayout, gqa_as_mla

        ckpt = self._checkpoint("base")
        arch = ARCHITECTURES[self.plan.sources["base"].architecture]
        weights = {role: ckpt.read(tensor_name(arch, role, r.layer)) for role in MLA_INPUTS[r.part]}
        return gqa_as_mla(r.part, weights, GqaLayout.of(ckpt.config), dtype)

    def _rows(self, source: str, name: str) -> torch.Tensor:
        """A router tensor of a source (float32), read once per output layer."""
        if (source, name) not in self._router_cache:
            self._router_cache[source, name] = self._checkpoint(source).read(name).float()
        return self._router_cache[source, name]

    def _router(self, r: RouterRecipe) -> torch.Tensor:
        self._router_cache.clear()
        if r.part == "shared":
            return self._shared_gate_row(r)[None]
        if ROUTER_TRAINED in self.plan.artefacts and self.plan.layer_experts(r.layer).like is None:
            # router training's rows replace the gate mode's (training runs no MTP layer: those keep theirs)
            from ..stages.router_training import read_trained

            arch = ARCHITECTURES[self.plan.target_config["architectures"][0]]
            role = "router" if r.part == "weight" else "router_bias"
            return read_trained(Path(self.plan.output_dir) / ".zenith", tensor_name(arch, role, r.layer))
        base_arch = ARCHITECTURES[self.plan.sources["base"].architecture]
        role = "router" if r.part == "weight" else "router_bias"
        base_name = optional_tensor_name(base_arch, role, r.layer)
        base_rows = self._rows("base", base_name) if base_name is not None and base_name in self._checkpoint("base") \
            else None
        return torch.stack([self._router_row(r, j, slot, base_rows)
                            for j, slot in enumerate(self.plan.layer_experts(r.layer).slots)])

    def _shared_gate_row(self, r: RouterRecipe) -> torch.Tensor:
        """The shared expert's gate row (Qwen2-MoE's shared_expert_gate): the gate mode's row for its source, as a
        routed slot's."""
        le = self.plan.layer_experts(r.layer)
        return self._router_row(RouterRecipe(layer=r.layer, part="weight"), len(le.slots), le.shared, None)

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

    def _method(self, r: MethodRecipe) -> torch.Tensor:
        """The method over the inputs' tensors, or (expert_scope layer) rows of the method over the layer's fused
        experts, which the next expert tensors of the layer reuse."""
        dtype = torch_dtype(r.merge_dtype)
        if r.fused:
            key = (r.fused, r.layer, r.sources)
            if self._fused is None or self._fused[0] != key:
                from ..plan.methods import fused_names

                self._fused = None  # free the last layer's before reading this one's
                base = self._checkpoint("base")
                stack = fused_names(ARCHITECTURES[self.plan.sources["base"].architecture], base.config, r.fused,
                                    r.layer)
                tensors = [torch.stack([torch.cat([self._checkpoint(s).read(n) for n in names]) for names in stack])
                           .to(dtype) for s in r.sources]
                self._fused = (key, self._run_method(r, tensors))
            rows = self._checkpoint("base").info(r.tensor).shape[0]
            return self._fused[1][r.expert, r.row:r.row + rows].clone()
        return self._run_method(r, [_vocab_rows(self._checkpoint(key).read(r.tensor).to(dtype), r)
                                    for key in r.sources])

    def _run_method(self, r: MethodRecipe, tensors: list[torch.Tensor]) -> torch.Tensor:
        from ..maths.methods import merge

        gen = torch.Generator().manual_seed(r.seed) if r.seed is not None else None
        try:
            if r.expert_axis is not None:  # a fused expert tensor, expert by expert
                return torch.stack([merge(r.method, list(parts), r.base, r.inputs, r.shared, gen)
                                    for parts in zip(*(t.unbind(r.expert_axis) for t in tensors))], r.expert_axis)
            return merge(r.method, tensors, r.base, r.inputs, r.shared, gen)
        except ValueError as err:
            raise OutputError(f"{r.tensor}: merge_method {r.method}: {err}") from None

    def close(self) -> None:
        for ckpt in self._open.values():
            ckpt.close()
        self._open.clear()
        self._alignments.clear()
        self._router_cache.clear()
        self._union = None
        self._fp8_last = None
        self._grams = None
        self._fused = None
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


def _vocab_rows(t: torch.Tensor, r: MethodRecipe) -> torch.Tensor:
    """method_vocab: the tokenizer's rows of one input (read in the merge dtype, as mergekit loads it), padded to
    `vocab_out` with their mean row (mergekit's PermutedEmbeddings)."""
    if r.vocab_rows is None:
        return t
    rows = t[:r.vocab_rows]
    if r.vocab_out == r.vocab_rows:
        return rows
    pad = rows.mean(dim=0, keepdim=True).expand(r.vocab_out - r.vocab_rows, *rows.shape[1:])
    return torch.cat([rows, pad])
