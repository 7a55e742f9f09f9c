"""Registering a model folder as a version of the registered model.

Registration logs the model (``roadshift.registry.pyfunc``), registers it as a new version
(``challenger``), writes a model card beside it, and hands the champion decision to
``roadshift.registry.aliases``: gates against the champion as re-read under the promotion lock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from roadshift.config import RegisterSection
from roadshift.registry.aliases import (
    PromotionOutcome,
    champion_version,
    current_user,
    promote_under_lock,
    registered_model,
)
from roadshift.registry.gates import GateResult, Scores, recall_tags, scores_from_metrics
from roadshift.registry.lineage import directory_digest, sha256_file
from roadshift.registry.lock import DEFAULT_LOCK_TIMEOUT_S, promotion_lock
from roadshift.registry.model_card import DataSummary, render_model_card, version_description
from roadshift.registry.model_metrics import log_model_metrics
from roadshift.registry.pyfunc import log_pyfunc_model, read_model_spec
from roadshift.registry.safe_load import load_checked_model
from roadshift.registry.scoring import EvaluationSet, VersionScorer
from roadshift.registry.tags import (
    CHALLENGER,
    CHAMPION,
    CHAMPION_GATE_METRIC,
    DECISION_TAG,
    GATE_METRIC,
    METRIC_TAG_PREFIX,
    REASON_TAG,
    WEIGHTS_TAG,
)

MODEL_DIR_TAG = "model_dir.sha256"
MODEL_CARD_TAG = "model_card.uri"


@dataclass(frozen=True)
class RegistrationResult:
    name: str
    version: str
    aliases: tuple[str, ...]
    decision: str  # "promoted" | "refused"
    reason: str
    already_registered: bool
    weights_sha256: str
    model_uri: str
    champion_before: str | None = None  # the champion decided against
    champion_scores: Scores | None = None  # its scores the gates used, and their source
    challenger_scores: Scores | None = None
    gates: tuple[GateResult, ...] = ()
    model_card_uri: str | None = None
    lock: str = ""
    registry_aliases: dict[str, str] = field(default_factory=dict)  # every alias, afterwards

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"


def load_champion(name: str) -> mlflow.pyfunc.PyFuncModel:
    """The champion, loaded only after its files passed ``roadshift.registry.safe_load``."""
    return load_checked_model(f"models:/{name}@{CHAMPION}")


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def version_with_weights(
    client: MlflowClient, name: str, weights_sha256: str
) -> ModelVersion | None:
    """The oldest version of ``name`` registered from exactly these weights, if any."""
    if registered_model(client, name) is None:
        return None
    versions = client.search_model_versions(
        f"name = {_quoted(name)} AND tags.`{WEIGHTS_TAG}` = {_quoted(weights_sha256)}"
    )
    matching = [v for v in versions if v.tags.get(WEIGHTS_TAG) == weights_sha256]
    return min(matching, key=lambda v: int(v.version), default=None)


def _version_tags(tags: Mapping[str, str], weights_sha256: str, model_dir: Path) -> dict[str, str]:
    """Lineage only: the metrics go on the logged model (``roadshift.registry.model_metrics``)."""
    return {
        **{key: str(value) for key, value in tags.items()},
        WEIGHTS_TAG: weights_sha256,
        MODEL_DIR_TAG: directory_digest(model_dir),
    }


def _model_metrics(
    metrics: Mapping[str, float], per_class: Mapping[str, Mapping[str, float]] | None
) -> dict[str, float]:
    """The evaluate stage's figures and ``recall.<class>``: what the gates read back later."""
    recall = {
        key.removeprefix(METRIC_TAG_PREFIX): float(value)
        for key, value in recall_tags(per_class).items()
    }
    return {**{key: float(value) for key, value in metrics.items()}, **recall}


def _already_registered(
    client: MlflowClient, existing: ModelVersion, weights_sha256: str
) -> RegistrationResult:
    current = client.get_model_version(existing.name, existing.version)
    decision = current.tags.get(DECISION_TAG, "unknown")
    return RegistrationResult(
        name=current.name,
        version=str(current.version),
        aliases=tuple(sorted(current.aliases)),
        decision=decision,
        reason=f"weights already registered as version {current.version}; nothing registered "
        f"(its promotion then: {decision}: {current.tags.get(REASON_TAG, 'no reason recorded')})",
        already_registered=True,
        weights_sha256=weights_sha256,
        model_uri=f"models:/{current.name}/{current.version}",
        model_card_uri=current.tags.get(MODEL_CARD_TAG),
    )


def _log_model_card(client: MlflowClient, name: str, version: str, card: str) -> str:
    """Log the card to the active run (the run the model was logged with); tag its location."""
    run_id = mlflow.active_run().info.run_id
    artifact_file = f"model_card/{name}/v{version}/model_card.md"
    mlflow.log_text(card, artifact_file)
    uri = f"runs:/{run_id}/{artifact_file}"
    client.set_model_version_tag(name, version, MODEL_CARD_TAG, uri)
    return uri


def _create_version(client, name: str, model_info, tags: Mapping[str, str]):
    """A new version of ``name`` from the logged model, through the client API: what
    ``mlflow.register_model`` does, without its messages printed to stderr."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    return client.create_model_version(
        name,
        model_info.model_uri,
        run_id=model_info.run_id,
        tags=dict(tags),
        model_id=model_info.model_id,
    )


def register_model_dir(
    model_dir: Path,
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    cfg: RegisterSection,
    *,
    per_class: Mapping[str, Mapping[str, float]] | None = None,
    evaluation: EvaluationSet | None = None,
    data: Sequence[DataSummary] = (),
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
) -> RegistrationResult:
    """Register the model folder as a new version of ``cfg.model_name``, unless its weights
    already are one; alias it ``challenger`` and promote it to ``champion`` if the gates pass.

    ``per_class`` is the evaluate stage's per-class table (its recall feeds the class-recall
    gate and becomes the model metric ``recall.<class>``). ``evaluation`` is the current target
    test split: the champion is scored on it, so both sides are compared on the same data;
    without it the champion's stored metrics stand in. ``data`` feeds the model card.

    Call inside an active MLflow run: the pyfunc model and the model card are logged to it.
    """
    model_dir = Path(model_dir)
    spec = read_model_spec(model_dir)
    client = MlflowClient()
    name = cfg.model_name
    weights_sha256 = sha256_file(model_dir / "weights.safetensors")
    existing = version_with_weights(client, name, weights_sha256)
    if existing is not None and DECISION_TAG in existing.tags:
        return _already_registered(client, existing, weights_sha256)

    if GATE_METRIC not in metrics:
        raise ValueError(
            f"metrics lack {GATE_METRIC!r}, the promotion gate; got {sorted(metrics)} "
            "(run the evaluate stage first)"
        )
    if mlflow.active_run() is None:
        raise RuntimeError("register_model_dir: no active MLflow run to log the model to")

    challenger = scores_from_metrics(
        metrics, per_class, "the evaluate stage on the target test split"
    )
    hint = metrics.get(CHAMPION_GATE_METRIC)
    scorer = VersionScorer(
        name, evaluation, macro_f1_hint=float(hint) if hint is not None else None
    )
    champion = champion_version(client, name)
    if champion is not None:
        scorer(champion)  # the slow part (load + predict) before the lock; redone only if moved
    model_info = log_pyfunc_model(model_dir) if existing is None else None
    if model_info is not None:
        log_model_metrics(model_info.model_id, _model_metrics(metrics, per_class))

    store_uri = mlflow.get_registry_uri()
    with promotion_lock(store_uri, name, lock_timeout):
        # Again inside the lock: a concurrent run may have registered these weights meanwhile.
        existing = version_with_weights(client, name, weights_sha256)
        if existing is not None and DECISION_TAG in existing.tags:
            return _already_registered(client, existing, weights_sha256)
        if existing is None:
            registered = _create_version(
                client, name, model_info, _version_tags(tags, weights_sha256, model_dir)
            )
            version = str(registered.version)
        else:  # registered by an earlier attempt that stopped before deciding: decide now
            version = str(existing.version)
        client.set_registered_model_alias(name, CHALLENGER, version)
        outcome: PromotionOutcome = promote_under_lock(
            client,
            name,
            version,
            challenger,
            cfg,
            scorer,
            store_uri=store_uri,
            mode="pipeline",
            user=current_user(),
            lock_timeout=lock_timeout,
        )

    client.update_model_version(
        name, version, description=version_description(metrics, tags, outcome.decision)
    )
    card = render_model_card(
        name,
        version,
        metrics,
        per_class,
        {**tags, WEIGHTS_TAG: weights_sha256, MODEL_DIR_TAG: directory_digest(model_dir)},
        data,
        cfg,
        outcome.decision,
        spec.class_names,
    )
    card_uri = _log_model_card(client, name, version, card)
    return RegistrationResult(
        name=name,
        version=version,
        aliases=tuple(sorted(a for a, v in outcome.aliases.items() if v == version)),
        decision=outcome.decision.label,
        reason=outcome.decision.reason,
        already_registered=False,
        weights_sha256=weights_sha256,
        model_uri=f"models:/{name}/{version}",
        champion_before=outcome.champion_before,
        champion_scores=outcome.champion_scores,
        challenger_scores=outcome.challenger_scores,
        gates=outcome.decision.gates,
        model_card_uri=card_uri,
        lock=outcome.lock,
        registry_aliases=outcome.aliases,
    )
