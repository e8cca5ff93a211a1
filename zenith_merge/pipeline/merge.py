"""`run_merge`: config -> plan -> stages -> writer -> side files -> config update -> reports; nothing else
calls the writer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import MergeConfig
from ..errors import OutputError
from ..io.manifest import copy_file_atomic, mark_complete, write_json_atomic
from ..io.writer import WriteResult, write_checkpoint
from ..plan.models import (
    UNION_SIDE_FILES,
    Plan,
)
from ..stages.router_training import MAPS_FILE as ALIGN_TRAINED
from .inputs import calibration_load, file_sha256, read_texts, training_texts, union_dir
from .output_config import patch_output
from .stage_runs import prepare_stages
from .tensor_source import PlanTensorSource

log = logging.getLogger(__name__)


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

    for name, key in plan.side_files.items():
        src = union_dir(out_dir) / name if key == UNION_SIDE_FILES else Path(plan.sources[key].path) / name
        if not src.is_file():
            raise OutputError(f"{src}: side file {name} (from {key}) is missing; the plan found it there: restore "
                              f"it, or plan again")
        copy_file_atomic(src, out_dir / name)
    write_json_atomic(out_dir / "config.json", plan.target_config)


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
    write = dict(workers=workers or cfg.workers, backend=cfg.backend, progress=progress,
                 allow_nonfinite=cfg.allow_nonfinite)
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
        trained = {TRAINED_FILE: file_sha256(zdir / TRAINED_FILE)}
        if plan.stages.train_maps:
            trained[ALIGN_TRAINED] = file_sha256(zdir / ALIGN_TRAINED)
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
    mark_complete(out)  # the last step: only now does the folder say it is complete
    log.info("merged %d tensors into %s", len(plan.tensors), out)
    return MergeResult(plan=plan, output_dir=out, write=result)
