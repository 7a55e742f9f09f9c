"""The pipeline's stages as Prefect tasks; training stages retry on failure."""

from __future__ import annotations

from tasks.dvc import reproduce_stage

prepare = reproduce_stage.with_options(name="prepare")
validate = reproduce_stage.with_options(name="validate")
pretrain = reproduce_stage.with_options(name="pretrain", retries=1, retry_delay_seconds=5)
finetune = reproduce_stage.with_options(name="finetune", retries=1, retry_delay_seconds=5)
scratch = reproduce_stage.with_options(name="scratch", retries=1, retry_delay_seconds=5)
evaluate = reproduce_stage.with_options(name="evaluate", retries=1, retry_delay_seconds=5)

# in the order they run (dvc.yaml's dependency order)
STAGE_TASKS = {
    "prepare": prepare,
    "validate": validate,
    "pretrain": pretrain,
    "finetune": finetune,
    "scratch": scratch,
    "evaluate": evaluate,
}
