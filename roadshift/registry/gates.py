"""The promotion gates: the scores they compare and the decision they reach.

The gates compare two ``Scores`` on the same target test split: the challenger's from the
evaluate stage, the champion's from scoring the champion model itself on that split at
decision time (``roadshift.registry.scoring``; its stored tags only when it cannot be loaded,
and the reason says so). The challenger also faces the baselines of its own evaluate run
(``Baselines``): it must beat the source-only and scratch models and, if configured, not have
forgotten the source. Pure: no registry calls, so every gate is tested on crafted figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from roadshift.config import RegisterSection
from roadshift.registry.tags import (
    FINETUNED_SOURCE_ACCURACY,
    FORCED,
    GATE_METRIC,
    METRIC_TAG_PREFIX,
    PROMOTED,
    RECALL_TAG_PREFIX,
    REFUSED,
    SCRATCH_GATE_METRIC,
    SOURCE_ONLY_GATE_METRIC,
    SOURCE_ONLY_SOURCE_ACCURACY,
)

_FLOAT_SLACK = 1e-9
_TAG_UNSAFE = re.compile(r"[^\w.\- /]")


# --------------------------------------------------------------------------- scores


def tag_safe(name: str) -> str:
    """A class name as a tag-key segment (MLflow keys allow ``\\w . - space /`` only)."""
    return _TAG_UNSAFE.sub("_", name)


@dataclass(frozen=True)
class Baselines:
    """What the challenger's own evaluate run measured: its target macro-F1 beside the
    source-only and scratch models' on the same target test split, and the source test
    accuracy of the source-only model and of the fine-tuned one. None where the run recorded
    no such figure (an older run, or ``evaluate.scratch_baseline: false`` for scratch)."""

    target_macro_f1: float | None = None
    source_only_target_macro_f1: float | None = None
    scratch_target_macro_f1: float | None = None
    source_only_source_accuracy: float | None = None
    finetuned_source_accuracy: float | None = None


@dataclass(frozen=True)
class Scores:
    """One model's figures on the target test split: what the gates compare.

    ``recall`` is keyed by ``tag_safe`` class name, so figures read back from tags and
    figures computed from labels compare class for class. ``baselines``: the figures of the
    model's own evaluate run that the baseline gates read (None: unknown).
    """

    macro_f1: float | None
    recall: dict[str, float] = field(default_factory=dict)
    source: str = "stored tags"
    baselines: Baselines | None = None


def _finite(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def baselines_from_metrics(metrics: Mapping[str, object]) -> Baselines:
    """The baseline gates' figures from ``metrics/evaluate.json`` (or a run's metrics)."""
    return Baselines(
        target_macro_f1=_finite(metrics.get(GATE_METRIC)),
        source_only_target_macro_f1=_finite(metrics.get(SOURCE_ONLY_GATE_METRIC)),
        scratch_target_macro_f1=_finite(metrics.get(SCRATCH_GATE_METRIC)),
        source_only_source_accuracy=_finite(metrics.get(SOURCE_ONLY_SOURCE_ACCURACY)),
        finetuned_source_accuracy=_finite(metrics.get(FINETUNED_SOURCE_ACCURACY)),
    )


def baselines_from_tags(tags: Mapping[str, str]) -> Baselines:
    """The same figures from a registered version's ``metrics.<name>`` tags, which registration
    copies from its run's ``evaluate.json``."""
    return baselines_from_metrics(
        {
            key[len(METRIC_TAG_PREFIX) :]: value
            for key, value in tags.items()
            if key.startswith(METRIC_TAG_PREFIX)
        }
    )


def scores_from_metrics(
    metrics: Mapping[str, float],
    per_class: Mapping[str, Mapping[str, float]] | None,
    source: str,
) -> Scores:
    """Scores from the evaluate stage's ``evaluate.json`` and ``evaluate_per_class.json``,
    with the run's baselines from the same ``evaluate.json``."""
    recall = {
        tag_safe(name): value
        for name, row in (per_class or {}).items()
        if (value := _finite(row.get("recall"))) is not None
    }
    return Scores(
        _finite(metrics.get(GATE_METRIC)), recall, source, baselines_from_metrics(metrics)
    )


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
    # floor | beats_scratch | beats_source_only | source_accuracy_drop | margin | class_recall
    name: str
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


_UNKNOWN = "baselines unknown"


def _beats_gate(name: str, score: float | None, baseline: float, what: str, key: str) -> GateResult:
    """The challenger's target macro-F1 must exceed one baseline of its own run (a tie fails:
    transfer that only matches a baseline bought nothing)."""
    if score is None:
        return GateResult(name, False, f"the challenger has no {GATE_METRIC}")
    gain = score - baseline
    if gain <= 0:
        return GateResult(
            name,
            False,
            f"{GATE_METRIC} {score:.4f} does not beat the {what} baseline of its own run "
            f"({key} {baseline:.4f}, gain {gain:+.4f}; register.require_beats_baselines)",
        )
    return GateResult(
        name,
        True,
        f"{GATE_METRIC} {score:.4f} beats the {what} baseline of its own run "
        f"({key} {baseline:.4f}) by {gain:+.4f}",
    )


def _baseline_gates(score: float | None, run: Baselines) -> list[GateResult]:
    """``register.require_beats_baselines``: beat the scratch and the source-only model of the
    challenger's own run, on that run's target test split. The run's own ``target_macro_f1``
    is compared (``score`` only where the run recorded none), so a version re-scored on a newer
    test split by ``roadshift promote`` is still judged against figures from one split."""
    score = run.target_macro_f1 if run.target_macro_f1 is not None else score
    if run.source_only_target_macro_f1 is None:
        reason = (
            f"{_UNKNOWN}: the challenger's run recorded no {SOURCE_ONLY_GATE_METRIC}, so "
            "register.require_beats_baselines was not checked"
        )
        return [
            GateResult("beats_scratch", None, reason),
            GateResult("beats_source_only", None, reason),
        ]
    if run.scratch_target_macro_f1 is None:
        scratch = GateResult(
            "beats_scratch",
            None,
            f"no scratch baseline in the challenger's run (no {SCRATCH_GATE_METRIC}: "
            "evaluate.scratch_baseline is false or the scratch model was not trained)",
        )
    else:
        scratch = _beats_gate(
            "beats_scratch", score, run.scratch_target_macro_f1, "scratch", SCRATCH_GATE_METRIC
        )
    source_only = _beats_gate(
        "beats_source_only",
        score,
        run.source_only_target_macro_f1,
        "source-only",
        SOURCE_ONLY_GATE_METRIC,
    )
    return [scratch, source_only]


def _source_accuracy_gate(run: Baselines, limit: float) -> GateResult:
    """``register.max_source_accuracy_drop``: fine-tuning must not have forgotten the source."""
    setting = f"register.max_source_accuracy_drop={limit:.4f}"
    before, after = run.source_only_source_accuracy, run.finetuned_source_accuracy
    if before is None or after is None:
        missing = " and ".join(
            key
            for key, value in (
                (SOURCE_ONLY_SOURCE_ACCURACY, before),
                (FINETUNED_SOURCE_ACCURACY, after),
            )
            if value is None
        )
        return GateResult(
            "source_accuracy_drop",
            None,
            f"{_UNKNOWN}: the challenger's run recorded no {missing}, so {setting} was not checked",
        )
    drop = before - after
    figures = (
        f"source test accuracy {before:.4f} (source-only) -> {after:.4f} (fine-tuned), "
        f"drop {drop:+.4f}"
    )
    if drop > limit + _FLOAT_SLACK:
        return GateResult(
            "source_accuracy_drop",
            False,
            f"{figures} is more than {setting}: the fine-tuned model forgot the source",
        )
    return GateResult("source_accuracy_drop", True, f"{figures} is within {setting}")


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
    """The gates: an absolute floor; the baselines of the challenger's own run (beat the
    scratch and the source-only model, ``require_beats_baselines``; lose at most
    ``max_source_accuracy_drop`` source test accuracy, when set); then, if there is a champion,
    a macro-F1 margin over it and no class's recall falling by more than
    ``max_class_recall_drop``.

    Every enabled gate is evaluated and reported, pass, fail or skipped, so a refusal names all
    its causes; a gate switched off in ``cfg`` is left out. A tie on macro-F1 keeps the
    champion and fails a baseline. A first-ever model faces no champion gates.
    """
    run = challenger.baselines or Baselines()
    gates = [_floor_gate(challenger.macro_f1, cfg)]
    if cfg.require_beats_baselines:
        gates += _baseline_gates(challenger.macro_f1, run)
    if cfg.max_source_accuracy_drop is not None:
        gates.append(_source_accuracy_gate(run, cfg.max_source_accuracy_drop))
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
    baselines: Baselines | None = None,
) -> PromotionDecision:
    """``check_gates`` on bare numbers, for callers that hold no ``Scores``."""
    return check_gates(
        Scores(challenger_score, dict(challenger_recall or {}), baselines=baselines),
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
