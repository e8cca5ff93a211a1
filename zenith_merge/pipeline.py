"""The one place that joins the plan's recipes to the writer.

`run_merge` goes config -> plan -> writer -> side files -> config update, and
nothing else calls the writer. `PlanTensorSource` turns a planned tensor's recipe
into bytes, one tensor at a time, in whichever process writes its shard.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import MergeConfig
from .io.manifest import write_json_atomic
from .io.reader import Checkpoint
from .io.safetensors_format import torch_dtype
from .io.writer import TensorSpec, WriteResult, prepare_output_dir, write_checkpoint
from .output_config import patch_output
from .plan import Plan, build_plan

log = logging.getLogger(__name__)


class PlanTensorSource:
    """Produces each output tensor from its recipe. Picklable: it carries only the plan, and opens
    source checkpoints lazily in the process that uses it."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._recipes = None
        self._open: dict[str, Checkpoint] = {}

    def __getstate__(self):
        return {"plan": self.plan}

    def __setstate__(self, state):
        self.__init__(state["plan"])

    def _checkpoint(self, key: str) -> Checkpoint:
        if key not in self._open:
            src = self.plan.sources[key]
            self._open[key] = Checkpoint.open(Path(src.path), allow_pickle=self.plan.config.get("allow_pickle", False))
        return self._open[key]

    def produce(self, spec: TensorSpec):
        """The bytes (same dtype: raw copy) or tensor (converted) for one output tensor."""
        if self._recipes is None:
            self._recipes = {t.name: t.recipe for t in self.plan.tensors}
        recipe = self._recipes[spec.name]
        ckpt = self._checkpoint(recipe.source)
        info = ckpt.info(recipe.tensor)
        if info.dtype == spec.dtype:
            return ckpt.byte_range(recipe.tensor) or ckpt.read_bytes(recipe.tensor)
        return ckpt.read(recipe.tensor).to(torch_dtype(spec.dtype))

    def close(self) -> None:
        for ckpt in self._open.values():
            ckpt.close()
        self._open.clear()


@dataclass(frozen=True)
class MergeResult:
    plan: Plan
    output_dir: Path
    write: WriteResult


def write_side_files(plan: Plan, out_dir: Path) -> None:
    """Copy tokenizer and generation files from their sources and write the target config.json."""
    for name, key in plan.side_files.items():
        src = Path(plan.sources[key].path) / name
        tmp = out_dir / f".{name}.tmp"
        shutil.copyfile(src, tmp)
        tmp.replace(out_dir / name)
    write_json_atomic(out_dir / "config.json", plan.target_config)


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
    """Plan and write a merge; on resume, finished shards are kept and the rest rewritten."""
    plan = build_plan(cfg, config_dir=config_dir, output_dir=output_dir)
    out = Path(plan.output_dir)
    prepare_output_dir(out, resume=resume, overwrite=overwrite, source_dirs=[Path(s.path) for s in plan.sources.values()])
    plan.save(out)
    source = PlanTensorSource(plan)
    try:
        result = write_checkpoint(
            out, plan.shard_specs(), source, plan_id=plan.plan_id, resume=resume,
            workers=workers or cfg.workers, backend=cfg.backend, progress=progress,
        )
    finally:
        source.close()
    write_side_files(plan, out)
    patch_output(out)
    log.info("merged %d tensors into %s", len(plan.tensors), out)
    return MergeResult(plan=plan, output_dir=out, write=result)
