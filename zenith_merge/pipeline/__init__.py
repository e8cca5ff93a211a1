"""The one place that joins the plan's recipes and the stages to the writer.

`run_merge` goes config -> plan -> stages -> writer -> side files -> config update, and nothing else
calls the writer. `PlanTensorSource` turns a planned tensor's recipe into bytes, one tensor at a time, in
whichever process writes its shard."""

from .merge import (
    PlanTensorSource,
    build_tokenizer,
    check_training_inputs,
    prepare_stages,
    read_texts,
    run_merge,
    run_stages,
    union_dir,
)

__all__ = ["PlanTensorSource", "build_tokenizer", "check_training_inputs", "prepare_stages", "read_texts",
           "run_merge", "run_stages", "union_dir"]
