"""Register the fine-tuned model with its lineage and model card; the gates decide on ``champion``.

The shell gathers what registration needs from the project: the evaluate stage's metrics and
per-class table (the challenger's scores), the validated target manifest's test split (the
champion is scored on exactly those images) and each domain's manifest (the model card's
data section).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from roadshift.config import DOMAINS, Params
from roadshift.data.dvc_repo import UNKNOWN
from roadshift.data.manifest import class_names, read_manifest
from roadshift.jsonio import read_json, read_metrics
from roadshift.layout import Layout
from roadshift.registry.lineage import lineage_tags
from roadshift.registry.model_card import DataSummary
from roadshift.registry.register import register_model_dir
from roadshift.registry.scoring import EvaluationSet, evaluation_set_from_manifest
from roadshift.stages.outcome import StageOutcome

PER_CLASS_METRICS = "evaluate_per_class.json"
# `roadshift data synth` names files 00000.png, or <batch>-00000.png for added batches.
_SYNTH_FILE = re.compile(r"^(?:[\w.]+-)?\d{5}\.png$")


def looks_synthetic(manifest: pd.DataFrame) -> bool:
    """Whether every file is named the way the embedded generator names them: the model card
    then warns that the figures describe generated images. A heuristic, and said to be one."""
    names = [Path(p).name for p in manifest["path"]]
    return bool(names) and all(_SYNTH_FILE.match(name) for name in names)


def data_summary(params: Params, root: Path, domain: str, version: str) -> DataSummary | None:
    """One domain's card entry from its validated manifest; None before validation."""
    manifest_path = Layout(root).validated_manifest(domain)
    if not manifest_path.is_file():
        return None
    manifest = read_manifest(manifest_path)
    section = params.data.domain(domain)
    return DataSummary(
        domain=domain,
        description=section.description,
        path=str(section.path),
        version=version,
        images_per_split={str(k): int(v) for k, v in manifest["split"].value_counts().items()},
        classes=class_names(manifest),
        synthetic=looks_synthetic(manifest),
    )


def current_test_split(root: Path) -> EvaluationSet | None:
    """The validated target test split the challenger was evaluated on, as raw files."""
    manifest = Layout(root).validated_manifest("target")
    return evaluation_set_from_manifest(manifest, root) if manifest.is_file() else None


def run_register(
    params: Params, root: Path, extra_tags: dict[str, str] | None = None
) -> StageOutcome:
    """Call inside an active MLflow run: the model and its card are logged to it."""
    layout = Layout(root)
    metrics = read_metrics(layout.metrics("evaluate"))
    per_class_path = layout.metrics_dir / PER_CLASS_METRICS
    per_class = read_json(per_class_path) if per_class_path.is_file() else None
    tags = lineage_tags(params, root, extra_tags or {})
    data = [
        summary
        for domain in DOMAINS
        if (
            summary := data_summary(
                params, root, domain, tags.get(f"data.{domain}.version", UNKNOWN)
            )
        )
    ]
    result = register_model_dir(
        layout.model_dir("target"),
        metrics,
        tags,
        params.register,
        per_class=per_class,
        evaluation=current_test_split(root),
        data=data,
    )
    return StageOutcome(metrics={}, details={"registration": result, "tags": tags})
