"""Running the stages a plan asks for (tokenizer union, usage, alignment, prompt vectors, RegMean statistics,
router offsets), each reused when its artefact is already in the output folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..architectures import ARCHITECTURES, tensor_name
from ..config import MergeConfig
from ..errors import PlanError, ZenithError
from ..io.writer import prepare_output_dir
from ..plan.build import build_plan
from ..plan.models import (
    Plan,
)
from ..plan.resolve import resolve
from ..stages.router_offsets import OFFSETS_FILE as ROUTER_OFFSETS
from .inputs import (
    alignment_dir,
    calibration_load,
    calibration_texts,
    check_training_inputs,
    file_sha256,
    protect_texts,
    read_texts,
)
from .tensor_source import PlanTensorSource

log = logging.getLogger(__name__)


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
                                        progress=progress, source=cfg.gate_source)
        pv.save_vectors(vectors, layers, zdir, key)
    return file_sha256(zdir / pv.VECTORS_FILE)


def warn_if_memory_short(plan: Plan) -> None:
    """Say before any work when the plan's peak-memory estimate exceeds this machine's memory (the kernel's OOM
    killer would end the merge without a word), naming the tensor that needs most."""
    from ..system import physical_memory

    ram, e = physical_memory(), plan.estimates
    if ram is not None and e.peak_memory_bytes > ram:
        hint = ""
        if plan.method == "method" and plan.config.get("merge_method") in ("ties", "breadcrumbs", "breadcrumbs_ties",
                                                                          "della", "della_linear"):
            hint = (f"; {plan.config['merge_method']} sorts each task vector's magnitudes (about 28 bytes per "
                    f"element): density 1 for the largest tensors skips it, e.g. density: [{{filter: embed_tokens, "
                    f"value: 1.0}}, {{filter: lm_head, value: 1.0}}, {{value: 0.5}}]")
        if any(getattr(t.recipe, "fused", ()) for t in plan.tensors):
            hint += ("; expert_scope: expert holds one routed expert at a time, not a layer's experts of every "
                     "model (each expert then has its own statistics)")
        log.warning("estimated peak memory %.1f GiB is more than this machine's %.1f GiB (the largest tensor: %s)%s",
                    e.peak_memory_bytes / 2**30, ram / 2**30, e.largest_tensor, hint)


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
        artefacts["usage.json"] = file_sha256(zdir / "usage.json")
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
            artefacts[f"align-{source}"] = file_sha256(folder / "align.json")  # which holds each map file's sha256
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
    return file_sha256(path)


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
    return file_sha256(zdir / ROUTER_OFFSETS)


def prepare_stages(cfg: MergeConfig, *, config_dir: Path | None = None, output_dir: str | Path | None = None,
                   resume: bool = True, overwrite: bool = False, progress: bool = True) -> Plan:
    """Plan, then run the stages into `<output>/.zenith/` and save the resolved plan; write no weights.

    With `resume`, an output folder from an earlier run is continued (its artefacts reused when
    they belong to the same plan); `overwrite` empties it first.
    """
    plan = build_plan(cfg, config_dir=config_dir, output_dir=output_dir)
    check_training_inputs(plan, cfg, config_dir)
    warn_if_memory_short(plan)
    out = Path(plan.output_dir)
    prepare_output_dir(out, resume=resume, overwrite=overwrite,
                       source_dirs=[Path(s.path) for s in plan.sources.values()])
    if plan.needs_stages:
        plan = run_stages(plan, cfg, config_dir=config_dir, progress=progress)
    plan.save(out)
    return plan
