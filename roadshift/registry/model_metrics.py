"""A registered version's metrics, kept where MLflow 3 shows model metrics: on its logged model.

Registration logs the evaluate stage's figures and each class's recall (``recall.<class>``) as
metrics of the version's LoggedModel (``mlflow.log_metrics(..., model_id=...)``), so the model
version page lists them and the versions table is not a wall of ``metrics.*`` tags. The gates,
scoring and reproduction read them back through ``stored_figures``, which shapes them as the
``metrics.<name>`` tags that versions registered before this change carry, so both read alike.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlflow
from mlflow.entities.model_registry import ModelVersion

from roadshift.registry.tags import METRIC_TAG_PREFIX

_LOGGED_MODEL_URI = "models:/"


def logged_model_id(version: ModelVersion) -> str | None:
    """The LoggedModel behind a version: its source is ``models:/<model_id>`` in MLflow 3."""
    source = version.source or ""
    if not source.startswith(_LOGGED_MODEL_URI):
        return None
    model_id = source[len(_LOGGED_MODEL_URI) :]
    return model_id if model_id and "/" not in model_id and "@" not in model_id else None


def version_metrics(version: ModelVersion) -> dict[str, float]:
    """The metrics logged on the version's LoggedModel (the latest value of each)."""
    model_id = logged_model_id(version)
    if model_id is None:
        return {}
    latest: dict[str, tuple[int, float]] = {}
    for metric in mlflow.get_logged_model(model_id).metrics or []:
        stamp = metric.timestamp or 0
        if metric.key not in latest or stamp >= latest[metric.key][0]:
            latest[metric.key] = (stamp, float(metric.value))
    return {key: value for key, (_, value) in latest.items()}


def stored_figures(version: ModelVersion) -> dict[str, str]:
    """The version's tags plus its model metrics as ``metrics.<name>`` entries."""
    metrics = version_metrics(version)
    return {
        **version.tags,
        **{METRIC_TAG_PREFIX + key: repr(value) for key, value in metrics.items()},
    }


def log_model_metrics(model_id: str, metrics: Mapping[str, float]) -> None:
    """Log registration's figures on the LoggedModel (and the active run, as MLflow does)."""
    if metrics:
        mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, model_id=model_id)
