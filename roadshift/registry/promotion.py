"""Champion/challenger promotion: the gates, the scores they compare, and moving ``champion``.

Three writers move the ``champion`` alias: the pipeline's registration, ``roadshift promote``
and ``roadshift rollback``. Each must decide against the champion as it is *when the alias
moves*, not as it was when the writer started (minutes earlier, for a registration that first
logs a model). So every one of them takes the promotion lock, re-reads the champion inside
it, re-decides, and only then moves ``previous-champion`` and ``champion``.

The lock is a file lock beside a local store (SQLite or file), keyed on the store and the
model name. A remote tracking server has no file to lock beside: there the Prefect flow
holds the global concurrency limit ``roadshift-registry-<model>`` around registration
(``tasks/registry.py``), and this module takes no lock of its own.

The gates compare two ``Scores`` on the same target test split: the challenger's from the
evaluate stage, the champion's from scoring the champion model itself on that split at
decision time (its stored tags only when it cannot be loaded, and the reason says so).
Every decision and each gate's reason is written as tags on both versions.
"""

from __future__ import annotations

import getpass
import hashlib
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from roadshift.config import RegisterSection

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"
GATE_METRIC = "target_macro_f1"
# A champion score on today's test set handed in with the metrics; used only when the
# champion itself is not scored here (no evaluation set), ahead of its stored tags.
CHAMPION_GATE_METRIC = f"champion_{GATE_METRIC}"
METRIC_TAG_PREFIX = "metrics."
RECALL_TAG_PREFIX = "metrics.recall."

# The latest decision on a version (registration, promote --version, promote --force).
DECISION_TAG = "promotion.decision"  # promoted | refused | forced
REASON_TAG = "promotion.reason"  # every gate's reason, "; "-joined
MODE_TAG = "promotion.mode"  # pipeline | manual | forced
BY_TAG = "promotion.by"
AT_TAG = "promotion.at"  # UTC ISO time, microseconds: orders decisions
WHY_TAG = "promotion.why"  # the operator's --reason
GATE_TAG_PREFIX = "promotion.gate."  # .floor / .margin / .class_recall = "pass|fail|skipped: ..."
AGAINST_TAG = "promotion.champion_version"  # the champion decided against, re-read in the lock
REPLACED_TAG = "promotion.replaced"  # the champion this version replaced: rollback's history
# The champion's scores the decision used, and where they came from.
CHAMPION_SCORE_TAG = CHAMPION_GATE_METRIC
CHAMPION_RECALL_TAG_PREFIX = "champion_recall."
CHAMPION_SCORES_FROM_TAG = "champion_scores_from"
# On the champion that was challenged.
CHALLENGED_BY_TAG_PREFIX = "promotion.challenged_by."  # + challenger version
LAST_CHALLENGE_TAG = "promotion.last_challenge"
# Rollback, on both ends.
ROLLED_BACK_TAG = "rolled_back"  # on the version rolled back from; kept for good
RESTORED_TAG = "restored"  # on the version rolled back to

PROMOTED, REFUSED, FORCED = "promoted", "refused", "forced"
DEFAULT_LOCK_TIMEOUT_S = 600.0
LOW_RECALL = 0.5
_FLOAT_SLACK = 1e-9
_TAG_UNSAFE = re.compile(r"[^\w.\- /]")


class PromotionError(ValueError):
    """An expected refusal to act (unknown version, no previous champion, missing reason):
    the CLI shows it as one line and exits 2."""


# --------------------------------------------------------------------------- scores


def tag_safe(name: str) -> str:
    """A class name as a tag-key segment (MLflow keys allow ``\\w . - space /`` only)."""
    return _TAG_UNSAFE.sub("_", name)


@dataclass(frozen=True)
class Scores:
    """One model's figures on the target test split: what the gates compare.

    ``recall`` is keyed by ``tag_safe`` class name, so figures read back from tags and
    figures computed from labels compare class for class.
    """

    macro_f1: float | None
    recall: dict[str, float] = field(default_factory=dict)
    source: str = "stored tags"


def _finite(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def scores_from_metrics(
    metrics: Mapping[str, float],
    per_class: Mapping[str, Mapping[str, float]] | None,
    source: str,
) -> Scores:
    """Scores from the evaluate stage's ``evaluate.json`` and ``evaluate_per_class.json``."""
    recall = {
        tag_safe(name): value
        for name, row in (per_class or {}).items()
        if (value := _finite(row.get("recall"))) is not None
    }
    return Scores(_finite(metrics.get(GATE_METRIC)), recall, source)


def scores_from_tags(tags: Mapping[str, str], source: str) -> Scores:
    recall = {
        key[len(RECALL_TAG_PREFIX) :]: value
        for key, raw in tags.items()
        if key.startswith(RECALL_TAG_PREFIX) and (value := _finite(raw)) is not None
    }
    return Scores(_finite(tags.get(METRIC_TAG_PREFIX + GATE_METRIC)), recall, source)


def recall_tags(per_class: Mapping[str, Mapping[str, float]] | None) -> dict[str, str]:
    """``metrics.recall.<class>`` tags: the class-recall gate reads a champion's back from these."""
    return {
        RECALL_TAG_PREFIX + tag_safe(name): repr(value)
        for name, row in (per_class or {}).items()
        if (value := _finite(row.get("recall"))) is not None
    }


# --------------------------------------------------------------------------- gates


@dataclass(frozen=True)
class GateResult:
    name: str  # floor | margin | class_recall
    passed: bool | None  # None: the gate does not apply
    reason: str

    @property
    def status(self) -> str:
        return {True: "pass", False: "fail", None: "skipped"}[self.passed]


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str
    gates: tuple[GateResult, ...] = ()
    forced: bool = False

    @property
    def label(self) -> str:
        if self.forced:
            return FORCED
        return PROMOTED if self.promote else REFUSED


def _floor_gate(score: float | None, cfg: RegisterSection) -> GateResult:
    if score is None:
        return GateResult("floor", False, f"the challenger has no {GATE_METRIC}")
    if score + _FLOAT_SLACK < cfg.min_macro_f1:
        return GateResult(
            "floor",
            False,
            f"{GATE_METRIC} {score:.4f} is below the floor "
            f"register.min_macro_f1={cfg.min_macro_f1:.4f}",
        )
    return GateResult(
        "floor",
        True,
        f"{GATE_METRIC} {score:.4f} passes the floor register.min_macro_f1={cfg.min_macro_f1:.4f}",
    )


def _margin_gate(
    score: float | None, champion: float | None, label: str, cfg: RegisterSection
) -> GateResult:
    if champion is None:
        return GateResult(
            "margin",
            False,
            f"champion {label} has no recorded {GATE_METRIC} to compare against; "
            "promote by hand if intended",
        )
    if score is None:
        return GateResult("margin", False, f"the challenger has no {GATE_METRIC}")
    gain = score - champion
    if gain <= 0 or gain + _FLOAT_SLACK < cfg.min_improvement:
        return GateResult(
            "margin",
            False,
            f"{GATE_METRIC} {score:.4f} vs champion {label} {champion:.4f}: gain {gain:+.4f} "
            f"is not above register.min_improvement={cfg.min_improvement:.4f}",
        )
    return GateResult(
        "margin",
        True,
        f"{GATE_METRIC} {score:.4f} beats champion {label} {champion:.4f} by {gain:+.4f} "
        f"(register.min_improvement={cfg.min_improvement:.4f})",
    )


def _recall_gate(
    challenger: Mapping[str, float],
    champion: Mapping[str, float],
    label: str,
    cfg: RegisterSection,
) -> GateResult:
    limit = f"register.max_class_recall_drop={cfg.max_class_recall_drop:.2f}"
    if not champion:
        return GateResult(
            "class_recall",
            None,
            f"champion {label} has no per-class recall, so {limit} was not checked",
        )
    if not challenger:
        return GateResult(
            "class_recall",
            False,
            f"the challenger has no per-class recall, so {limit} cannot be checked "
            f"against champion {label}",
        )
    # A class the challenger lost altogether counts as recall 0.
    drops = sorted(
        ((champion[c] - challenger.get(c, 0.0), c) for c in champion), key=lambda d: (-d[0], d[1])
    )
    failing = [(drop, c) for drop, c in drops if drop > cfg.max_class_recall_drop + _FLOAT_SLACK]

    def _line(drop: float, name: str) -> str:
        after = f"{challenger[name]:.3f}" if name in challenger else "absent"
        return f"{name} {champion[name]:.3f} -> {after} ({-drop:+.3f})"

    if failing:
        return GateResult(
            "class_recall",
            False,
            f"recall fell by more than {limit} against champion {label}: "
            + ", ".join(_line(drop, name) for drop, name in failing),
        )
    worst_drop, worst = drops[0]
    detail = f"largest drop {_line(worst_drop, worst)}" if worst_drop > 0 else "none fell"
    return GateResult(
        "class_recall",
        True,
        f"no class's recall fell by more than {limit} against champion {label} ({detail})",
    )


def check_gates(
    challenger: Scores,
    champion: Scores | None,
    champion_label: str | None,
    cfg: RegisterSection,
) -> PromotionDecision:
    """The gates: an absolute floor; then, if there is a champion, a macro-F1 margin over it
    and no class's recall falling by more than ``max_class_recall_drop``.

    Every gate is evaluated and reported, pass or fail, so a refusal names all its causes.
    A tie on macro-F1 keeps the champion. A first-ever model faces the floor only.
    """
    gates = [_floor_gate(challenger.macro_f1, cfg)]
    if champion_label is None or champion is None:
        gates.append(
            GateResult(
                "margin", None, "no champion yet, so the margin and class-recall gates do not apply"
            )
        )
    else:
        gates.append(_margin_gate(challenger.macro_f1, champion.macro_f1, champion_label, cfg))
        gates.append(_recall_gate(challenger.recall, champion.recall, champion_label, cfg))
    promote = all(gate.passed is not False for gate in gates)
    return PromotionDecision(promote, "; ".join(g.reason for g in gates), tuple(gates))


def decide_promotion(
    challenger_score: float,
    champion_score: float | None,
    champion_label: str | None,
    cfg: RegisterSection,
    challenger_recall: Mapping[str, float] | None = None,
    champion_recall: Mapping[str, float] | None = None,
) -> PromotionDecision:
    """``check_gates`` on bare numbers, for callers that hold no ``Scores``."""
    return check_gates(
        Scores(challenger_score, dict(challenger_recall or {})),
        Scores(champion_score, dict(champion_recall or {})) if champion_label else None,
        champion_label,
        cfg,
    )


def forced_decision(gated: PromotionDecision, user: str, why: str) -> PromotionDecision:
    """Promote whatever the gates said; keep what they said in the reason for the audit."""
    verdict = "would have passed" if gated.promote else "would have refused"
    return PromotionDecision(
        True,
        f"forced by {user}: {why} (the gates {verdict}: {gated.reason})",
        gated.gates,
        forced=True,
    )


# --------------------------------------------------------------------------- registry reads


def registered_model(client: MlflowClient, name: str) -> RegisteredModel | None:
    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    registered = registered_model(client, name)
    if registered is None or alias not in registered.aliases:
        return None
    return client.get_model_version(name, str(registered.aliases[alias]))


def champion_version(client: MlflowClient, name: str) -> ModelVersion | None:
    return alias_version(client, name, CHAMPION)


def existing_version(client: MlflowClient, name: str, version: str | int) -> ModelVersion:
    """The version, or a ``PromotionError`` that names it and what does exist."""
    if registered_model(client, name) is None:
        raise PromotionError(f"no registered model named {name!r} (register.model_name)")
    text = str(version).strip()
    if text.lower().startswith("v"):
        text = text[1:]
    if not text.isdigit():
        raise PromotionError(f"{version!r} is not a model version number of {name!r}")
    try:
        return client.get_model_version(name, text)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
    known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    listed = ", ".join(str(v) for v in known) or "none"
    raise PromotionError(f"{name!r} has no version {text} (versions: {listed})")


# --------------------------------------------------------------------------- scoring a version


@dataclass(frozen=True)
class EvaluationSet:
    """A labelled split as the raw encoded files, so a registered model scores on exactly what
    the challenger was scored on, through its own serving path (no training transforms)."""

    images: tuple[bytes, ...]
    labels: tuple[str, ...]
    class_names: tuple[str, ...]
    description: str


def evaluation_set_from_manifest(
    manifest_path: Path, root: Path, split: str = "test"
) -> EvaluationSet:
    """The manifest's ``split`` rows, read as bytes; class names are the manifest's label set,
    the same set the evaluate stage's macro-F1 averages over."""
    from roadshift.data.dataset import split_frame
    from roadshift.data.manifest import class_names, read_manifest

    manifest = read_manifest(manifest_path)
    rows = split_frame(manifest, split)
    if rows.empty:
        raise ValueError(f"{manifest_path}: no images in the {split} split")
    images = tuple((Path(root) / path).read_bytes() for path in rows["path"])
    return EvaluationSet(
        images=images,
        labels=tuple(str(label) for label in rows["label"]),
        class_names=class_names(manifest),
        description=f"the {split} split of {manifest_path.name} ({len(images)} images)",
    )


def score_predictions(
    labels: tuple[str, ...], predicted: list[str], class_names: tuple[str, ...], source: str
) -> Scores:
    """Macro-F1 and per-class recall over ``class_names``, as the evaluate stage computes them
    (a label outside the set is a miss for the true class, never a class of its own)."""
    from sklearn.metrics import f1_score, recall_score

    names = list(class_names)
    macro_f1 = f1_score(labels, predicted, labels=names, average="macro", zero_division=0)
    recalls = recall_score(labels, predicted, labels=names, average=None, zero_division=0)
    recall = {tag_safe(n): float(r) for n, r in zip(names, recalls, strict=True)}
    return Scores(float(macro_f1), recall, source)


def score_model(model_uri: str, evaluation: EvaluationSet) -> Scores:
    """Load a registered pyfunc and score it on the raw images of ``evaluation``."""
    import mlflow
    import pandas as pd

    from roadshift.registry.pyfunc import IMAGE_COLUMN

    # no package-version comparison against the version's requirements (~0.5 s a model,
    # a scan of every installed distribution): it warns, never changes the scores
    model = mlflow.pyfunc.load_model(model_uri, suppress_warnings=True)
    frame = model.predict(pd.DataFrame({IMAGE_COLUMN: list(evaluation.images)}))
    predicted = [str(label) for label in frame["label"]]
    return score_predictions(
        evaluation.labels, predicted, evaluation.class_names, f"scored on {evaluation.description}"
    )


class VersionScorer:
    """Scores registered versions on one evaluation set, each version once.

    Without an evaluation set, or when a version cannot be loaded, its stored tags stand in,
    and ``Scores.source`` says so and why. A registration scores the champion before taking
    the lock and again inside it only if the champion changed meanwhile.
    """

    def __init__(
        self,
        name: str,
        evaluation: EvaluationSet | None,
        score: Callable[[str, EvaluationSet], Scores] = score_model,
        macro_f1_hint: float | None = None,
    ) -> None:
        self.name = name
        self.evaluation = evaluation
        self._score = score
        self._hint = macro_f1_hint
        self._cache: dict[str, Scores] = {}

    def __call__(self, version: ModelVersion) -> Scores:
        key = str(version.version)
        if key not in self._cache:
            self._cache[key] = self._scores(version)
        return self._cache[key]

    def _scores(self, version: ModelVersion) -> Scores:
        label = f"v{version.version}"
        if self.evaluation is None:
            stored = scores_from_tags(version.tags, f"stored tags of {label} (no test split given)")
            if self._hint is not None:
                return replace(
                    stored, macro_f1=self._hint, source=f"{CHAMPION_GATE_METRIC} given in metrics"
                )
            return stored
        try:
            return self._score(f"models:/{self.name}/{version.version}", self.evaluation)
        except Exception as error:  # any load/predict failure: fall back, and say so
            message = " ".join(str(error).split())[:300]
            return scores_from_tags(
                version.tags,
                f"stored tags of {label}: it could not be loaded to score on "
                f"{self.evaluation.description} ({type(error).__name__}: {message})",
            )


# --------------------------------------------------------------------------- the lock


def _slug(model_name: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", model_name)[:80]
    return f"{readable}-{hashlib.sha256(model_name.encode()).hexdigest()[:8]}"


def lock_path(store_uri: str, model_name: str) -> Path | None:
    """The promotion lock file for a local store, beside it; None for a remote store.

    SQLite: ``<db>.<model>-<hash>.promotion.lock`` next to the database file. File store:
    inside its folder. One file per store and model name, so promoters of one model on one
    store exclude each other and nothing else.
    """
    parsed = urlparse(store_uri)
    if parsed.scheme == "sqlite":
        raw = (
            store_uri[len("sqlite:///") :].split("?", 1)[0]
            if store_uri.startswith("sqlite:///")
            else ""
        )
        if not raw or raw == ":memory:":
            return None
        database = Path(unquote(raw))
        return database.with_name(f"{database.name}.{_slug(model_name)}.promotion.lock")
    if parsed.scheme == "file" or (parsed.scheme == "" and store_uri):
        folder = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(store_uri)
        return folder / f".{_slug(model_name)}.promotion.lock"
    return None


def registry_limit_name(model_name: str) -> str:
    """The Prefect global concurrency limit that serialises registration on remote stores."""
    return f"roadshift-registry-{model_name}"


@contextmanager
def promotion_lock(
    store_uri: str, model_name: str, timeout: float = DEFAULT_LOCK_TIMEOUT_S
) -> Iterator[str]:
    """Hold the promotion lock of ``model_name`` on ``store_uri``; yields what was locked.

    Waits up to ``timeout`` seconds, then raises ``PromotionError`` naming the lock file.
    """
    path = lock_path(store_uri, model_name)
    if path is None:
        yield (
            f"no file lock: {store_uri} is not a local store; the training-pipeline flow "
            f"serialises registration with the Prefect global concurrency limit "
            f"{registry_limit_name(model_name)!r}"
        )
        return
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    # One instance per file, re-entrant within a thread (registration holds the lock around
    # the decision, which takes it again); other threads and processes wait.
    lock = FileLock(str(path), is_singleton=True)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise PromotionError(
            f"waited {timeout:g} s for the promotion lock {path} of {model_name!r}; another "
            "promotion of it is still running"
        ) from None
    try:
        yield f"file lock {path}"
    finally:
        lock.release()


# --------------------------------------------------------------------------- writing decisions


def current_user() -> str:
    """Who is promoting: the login name, else ``$USER``, else ``unknown``."""
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):  # no passwd entry in some containers
        return os.environ.get("USER") or "unknown"


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _set_tags(client: MlflowClient, name: str, version: str, tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _replace_prefixed(
    client: MlflowClient, mv: ModelVersion, prefix: str, tags: Mapping[str, str]
) -> None:
    """Set ``tags`` and drop older keys under ``prefix`` that are no longer true."""
    for key in mv.tags:
        if key.startswith(prefix) and key not in tags:
            client.delete_model_version_tag(mv.name, str(mv.version), key)
    _set_tags(client, mv.name, str(mv.version), tags)


@dataclass(frozen=True)
class PromotionOutcome:
    name: str
    version: str
    decision: PromotionDecision
    champion_before: str | None  # the champion decided against, as re-read inside the lock
    challenger_scores: Scores
    champion_scores: Scores | None
    aliases: dict[str, str]  # the registered model's aliases afterwards
    already_champion: bool
    lock: str
    at: str

    @property
    def champion(self) -> str | None:
        return self.aliases.get(CHAMPION)


def _decision_tags(
    decision: PromotionDecision,
    champion: ModelVersion | None,
    champion_scores: Scores | None,
    *,
    mode: str,
    user: str,
    at: str,
    why: str | None,
) -> dict[str, str]:
    tags = {
        DECISION_TAG: decision.label,
        REASON_TAG: decision.reason,
        MODE_TAG: mode,
        BY_TAG: user,
        AT_TAG: at,
        AGAINST_TAG: str(champion.version) if champion else "none",
        **{GATE_TAG_PREFIX + g.name: f"{g.status}: {g.reason}" for g in decision.gates},
    }
    if why:
        tags[WHY_TAG] = why
    if champion_scores is not None:
        tags[CHAMPION_SCORES_FROM_TAG] = champion_scores.source
        if champion_scores.macro_f1 is not None:
            tags[CHAMPION_SCORE_TAG] = repr(champion_scores.macro_f1)
    return tags


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    registered = registered_model(client, name)
    return {k: str(v) for k, v in (registered.aliases if registered else {}).items()}


def promote_under_lock(
    client: MlflowClient,
    name: str,
    version: str,
    challenger: Scores,
    cfg: RegisterSection,
    scorer: VersionScorer,
    *,
    store_uri: str,
    mode: str,
    user: str,
    why: str | None = None,
    force: bool = False,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
) -> PromotionOutcome:
    """Decide on ``version`` against the champion as it is inside the lock, record the
    decision on both versions, and move the aliases if it is promoted.

    ``champion`` and ``previous-champion`` are two writes; no other promoter can run between
    them (they take the same lock), and a reader in between sees the old champion in both.
    """
    version = str(version)
    with promotion_lock(store_uri, name, lock_timeout) as locked:
        champion = champion_version(client, name)  # re-read: another promoter may have moved it
        at = now_utc()
        if champion is not None and str(champion.version) == version:
            return PromotionOutcome(
                name,
                version,
                PromotionDecision(True, f"v{version} is already champion; nothing changed"),
                version,
                challenger,
                None,
                _aliases(client, name),
                already_champion=True,
                lock=locked,
                at=at,
            )
        champion_label = f"v{champion.version}" if champion else None
        champion_scores = scorer(champion) if champion else None
        decision = check_gates(challenger, champion_scores, champion_label, cfg)
        if force:
            decision = forced_decision(decision, user, why or "")
        candidate = client.get_model_version(name, version)
        _set_tags(
            client,
            name,
            version,
            _decision_tags(
                decision, champion, champion_scores, mode=mode, user=user, at=at, why=why
            ),
        )
        if champion_scores is not None:
            _replace_prefixed(
                client,
                candidate,
                CHAMPION_RECALL_TAG_PREFIX,
                {
                    CHAMPION_RECALL_TAG_PREFIX + c: repr(r)
                    for c, r in champion_scores.recall.items()
                },
            )
        if champion is not None:
            outcome = "replaced" if decision.promote else "kept"
            _set_tags(
                client,
                name,
                str(champion.version),
                {
                    CHALLENGED_BY_TAG_PREFIX + version: f"{outcome} at {at} ({mode}, {user}): "
                    f"v{version} {decision.label}: {decision.reason}",
                    LAST_CHALLENGE_TAG: f"v{version} {decision.label} at {at}; champion {outcome}",
                },
            )
        if decision.promote:
            if champion is not None:
                client.set_registered_model_alias(name, PREVIOUS_CHAMPION, str(champion.version))
                client.set_model_version_tag(name, version, REPLACED_TAG, str(champion.version))
            client.set_registered_model_alias(name, CHAMPION, version)
        aliases = _aliases(client, name)
    return PromotionOutcome(
        name,
        version,
        decision,
        str(champion.version) if champion else None,
        challenger,
        champion_scores,
        aliases,
        already_champion=False,
        lock=locked,
        at=at,
    )


# --------------------------------------------------------------------------- manual moves


def promote_version(
    client: MlflowClient,
    name: str,
    version: str | int,
    cfg: RegisterSection,
    *,
    store_uri: str,
    user: str,
    why: str | None = None,
    force: bool = False,
    evaluation: EvaluationSet | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
) -> PromotionOutcome:
    """``roadshift promote``: the same gates against the current champion, or ``force``.

    With an evaluation set (the project's current target test split) both the candidate and
    the champion are scored on it, since the candidate's stored figures may come from an
    older split; without one both sides use their stored tags.
    """
    why = (why or "").strip() or None
    if force and why is None:
        raise PromotionError("--force needs --reason: say why the gates are being bypassed")
    candidate = existing_version(client, name, version)
    scorer = VersionScorer(name, evaluation)
    challenger = scorer(candidate)
    champion = champion_version(client, name)
    if champion is not None and str(champion.version) != str(candidate.version):
        scorer(champion)  # score outside the lock; re-scored inside only if it moved
    return promote_under_lock(
        client,
        name,
        str(candidate.version),
        challenger,
        cfg,
        scorer,
        store_uri=store_uri,
        mode="forced" if force else "manual",
        user=user,
        why=why,
        force=force,
        lock_timeout=lock_timeout,
    )


@dataclass(frozen=True)
class RollbackOutcome:
    name: str
    rolled_back_from: str
    restored: str
    previous_champion: str | None
    at: str


def rollback(
    client: MlflowClient,
    name: str,
    *,
    store_uri: str,
    user: str,
    why: str,
    to: str | int | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
) -> RollbackOutcome:
    """``roadshift rollback``: ``champion`` back to ``previous-champion`` (or ``to``).

    Afterwards ``previous-champion`` is the version the restored one replaced when it last
    became champion (rollback walks the champion history back), never the version just
    rolled back from; with no such history the alias is removed.
    """
    why = (why or "").strip()
    if not why:
        raise PromotionError("rollback needs --reason: say why the champion is being replaced")
    if registered_model(client, name) is None:
        raise PromotionError(f"no registered model named {name!r} (register.model_name)")
    with promotion_lock(store_uri, name, lock_timeout):
        current = champion_version(client, name)
        if current is None:
            raise PromotionError(f"{name!r} has no champion to roll back from")
        if to is None:
            target = alias_version(client, name, PREVIOUS_CHAMPION)
            if target is None:
                raise PromotionError(
                    f"{name!r} has no previous-champion to roll back to (champion is "
                    f"v{current.version}); name a version with --to N"
                )
        else:
            target = existing_version(client, name, to)
        old, new = str(current.version), str(target.version)
        if old == new:
            raise PromotionError(f"v{new} is already champion of {name!r}; nothing to roll back")
        at = now_utc()
        client.set_registered_model_alias(name, CHAMPION, new)
        history = target.tags.get(REPLACED_TAG)
        previous = history if history and history not in (old, new) else None
        if previous is not None:
            try:
                client.set_registered_model_alias(name, PREVIOUS_CHAMPION, previous)
            except MlflowException:  # that version was deleted since
                previous = None
        if previous is None and PREVIOUS_CHAMPION in _aliases(client, name):
            client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
        _set_tags(
            client,
            name,
            old,
            {
                ROLLED_BACK_TAG: f"to v{new} at {at} by {user}: {why}",
                f"{ROLLED_BACK_TAG}.to": new,
                f"{ROLLED_BACK_TAG}.by": user,
                f"{ROLLED_BACK_TAG}.at": at,
                f"{ROLLED_BACK_TAG}.reason": why,
            },
        )
        _set_tags(
            client,
            name,
            new,
            {
                RESTORED_TAG: f"from v{old} at {at} by {user}: {why}",
                f"{RESTORED_TAG}.from": old,
                f"{RESTORED_TAG}.by": user,
                f"{RESTORED_TAG}.at": at,
                f"{RESTORED_TAG}.reason": why,
            },
        )
    return RollbackOutcome(name, old, new, previous, at)
