"""Register the fine-tuned model with its lineage, and let the gates decide on ``champion``."""

from __future__ import annotations

from pathlib import Path

from roadshift.config import Params
from roadshift.jsonio import read_json
from roadshift.layout import Layout
from roadshift.lineage import lineage_tags
from roadshift.registry import register_model_dir
from roadshift.stages.common import StageOutcome


def run_register(
    params: Params, root: Path, extra_tags: dict[str, str] | None = None
) -> StageOutcome:
    """Call inside an active MLflow run: the model is logged to it."""
    layout = Layout(root)
    metrics = read_json(layout.metrics("evaluate"))
    tags = lineage_tags(params, root, extra_tags or {})
    result = register_model_dir(layout.model_dir("target"), metrics, tags, params.register)
    return StageOutcome(metrics={}, details={"registration": result, "tags": tags})
