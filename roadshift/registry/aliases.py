"""Champion/challenger promotion: reading the aliases and moving ``champion``.

Three writers move the ``champion`` alias: the pipeline's registration, ``roadshift promote``
and ``roadshift rollback``. Each must decide against the champion as it is *when the alias
moves*, not as it was when the writer started (minutes earlier, for a registration that first
logs a model). So every one of them takes the promotion lock (``roadshift.registry.lock``),
re-reads the champion inside it, re-decides (``roadshift.registry.gates``), and only then
moves ``previous-champion`` and ``champion``. Every decision and each gate's reason is written
as tags on both versions.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from roadshift.config import RegisterSection
from roadshift.registry.gates import (
    PromotionDecision,
    Scores,
    baselines_from_tags,
    check_gates,
    forced_decision,
)
from roadshift.registry.lock import DEFAULT_LOCK_TIMEOUT_S, PromotionError, promotion_lock
from roadshift.registry.model_metrics import stored_figures
from roadshift.registry.scoring import EvaluationSet, VersionScorer
from roadshift.registry.tags import (
    AGAINST_TAG,
    AT_TAG,
    BY_TAG,
    CHALLENGED_BY_TAG_PREFIX,
    CHAMPION,
    CHAMPION_RECALL_TAG_PREFIX,
    CHAMPION_SCORE_TAG,
    CHAMPION_SCORES_FROM_TAG,
    DECISION_TAG,
    GATE_TAG_PREFIX,
    LAST_CHALLENGE_TAG,
    MODE_TAG,
    PREVIOUS_CHAMPION,
    REASON_TAG,
    REPLACED_TAG,
    RESTORED_TAG,
    ROLLED_BACK_TAG,
    WHY_TAG,
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
        _replace_prefixed(  # gate tags of an earlier decision, e.g. of a gate now off, go
            client,
            candidate,
            GATE_TAG_PREFIX,
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
    older split; without one both sides use their stored tags. The baseline gates read the
    baselines of the candidate's own run from its ``metrics.<name>`` tags (skipped, "baselines
    unknown", for a version registered without them).
    """
    why = (why or "").strip() or None
    if force and why is None:
        raise PromotionError("--force needs --reason: say why the gates are being bypassed")
    candidate = existing_version(client, name, version)
    scorer = VersionScorer(name, evaluation)
    baselines = baselines_from_tags(stored_figures(candidate))
    challenger = replace(scorer(candidate), baselines=baselines)
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
