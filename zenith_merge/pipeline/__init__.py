"""The one place that joins the plan's recipes and the stages to the writer.

`run_merge` goes config -> plan -> stages -> writer -> side files -> config update, and nothing else
calls the writer. `PlanTensorSource` turns a planned tensor's recipe into bytes, one tensor at a time, in
whichever process writes its shard."""

from .inputs import check_training_inputs, read_texts, union_dir
from .merge import run_merge
from .stage_runs import build_tokenizer, prepare_stages, run_stages
from .tensor_source import PlanTensorSource

__all__ = ["PlanTensorSource", "build_tokenizer", "check_training_inputs", "prepare_stages", "read_texts",
           "run_merge", "run_stages", "union_dir"]
