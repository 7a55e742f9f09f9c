"""The model card of a registered version: what it is for, what it was made from, how well it
does and where it fails. Rendering is pure, so it is tested without a registry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from roadshift.config import RegisterSection
from roadshift.registry.gates import PromotionDecision
from roadshift.registry.tags import (
    FINETUNED_SOURCE_ACCURACY,
    GATE_METRIC,
    SOURCE_ONLY_SOURCE_ACCURACY,
)

LOW_RECALL = 0.5


@dataclass(frozen=True)
class DataSummary:
    """What the model card says about one domain's data, read from its validated manifest."""

    domain: str
    description: str
    path: str
    version: str  # the DVC md5 of the domain's folder
    images_per_split: dict[str, int]
    classes: tuple[str, ...]
    synthetic: bool = False  # the embedded generated set, judged by its file names


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _data_section(data: Sequence[DataSummary]) -> list[str]:
    if not data:
        return ["No manifests were available when this version was registered."]
    known = ("train", "val", "test")
    present = {s for d in data for s in d.images_per_split}
    splits = [s for s in known if s in present] + sorted(present - set(known))
    lines = [
        "| domain | description | data version (DVC md5) | "
        + " | ".join(f"{s} images" for s in splits)
        + " | classes |",
        "|---|---|---|" + "---|" * len(splits) + "---|",
    ]
    for d in data:
        counts = " | ".join(str(d.images_per_split.get(s, 0)) for s in splits)
        lines.append(
            f"| {d.domain} | {d.description} | `{d.version}` | {counts} | {len(d.classes)} |"
        )
    lines.append("")
    lines.append(f"Classes: {', '.join(data[0].classes)}.")
    return lines


def _per_class_section(per_class: Mapping[str, Mapping[str, float]]) -> list[str]:
    lines = ["| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    for name, row in sorted(per_class.items()):
        lines.append(
            f"| {name} | {row.get('precision', float('nan')):.3f} | "
            f"{row.get('recall', float('nan')):.3f} | {row.get('f1', float('nan')):.3f} | "
            f"{int(row.get('support', 0))} |"
        )
    return lines


def _limits(
    metrics: Mapping[str, float],
    per_class: Mapping[str, Mapping[str, float]],
    data: Sequence[DataSummary],
) -> list[str]:
    limits = []
    synthetic = [d.domain for d in data if d.synthetic]
    if synthetic:
        limits.append(
            f"- **Synthetic data** ({', '.join(synthetic)}): the images are generated "
            "(`roadshift data synth`); the figures measure the synthetic task and say nothing "
            "about photographs of real roads."
        )
    if "domain_gap_accuracy" in metrics:
        limits.append(
            "- **Domain gap**: the source-only model loses "
            f"{metrics['domain_gap_accuracy']:.3f} accuracy from the source to the target test "
            f"split; this model's target accuracy is {_fmt(metrics.get('target_accuracy', '?'))}. "
            "Signs, scenes or cameras unlike the target data will widen the gap again."
        )
    if SOURCE_ONLY_SOURCE_ACCURACY in metrics and FINETUNED_SOURCE_ACCURACY in metrics:
        before = float(metrics[SOURCE_ONLY_SOURCE_ACCURACY])
        after = float(metrics[FINETUNED_SOURCE_ACCURACY])
        limits.append(
            f"- **Source retained**: on the source test split this model scores {after:.3f} "
            f"accuracy, the source-only model {before:.3f} ({after - before:+.3f}); a large "
            "drop means fine-tuning forgot the source domain."
        )
    low = sorted(
        (row["recall"], name)
        for name, row in per_class.items()
        if row.get("recall", 1) < LOW_RECALL
    )
    if low:
        limits.append(
            f"- **Classes with low recall** (below {LOW_RECALL}): "
            + ", ".join(f"{name} {recall:.2f}" for recall, name in low)
            + ". Expect these signs to be missed often."
        )
    elif per_class:
        limits.append(f"- No class's recall is below {LOW_RECALL} on the target test split.")
    supports = [int(row.get("support", 0)) for row in per_class.values()]
    if supports and min(supports) < 30:
        limits.append(
            f"- **Small test split**: as few as {min(supports)} test images per class; one image "
            f"moves that class's recall by {1 / max(min(supports), 1):.2f}."
        )
    target = next((d for d in data if d.domain == "target"), None)
    if target is not None and target.classes:
        per_class_train = target.images_per_split.get("train", 0) / len(target.classes)
        limits.append(
            f"- **Few target labels**: about {per_class_train:.0f} target training images per "
            "class."
        )
    return limits or ["- None recorded."]


def render_model_card(
    name: str,
    version: str,
    metrics: Mapping[str, float],
    per_class: Mapping[str, Mapping[str, float]] | None,
    tags: Mapping[str, str],
    data: Sequence[DataSummary],
    cfg: RegisterSection,
    decision: PromotionDecision | None = None,
    class_names: Sequence[str] = (),
) -> str:
    """The model card as Markdown: what the model is for, what it was made from, how well it
    does and where it fails. Pure, so it is tested without a registry."""
    per_class = per_class or {}
    classes = list(class_names) or (list(data[0].classes) if data else sorted(per_class))
    target = next((d for d in data if d.domain == "target"), None)
    where = target.description if target else "the target domain"
    lines = [
        f"# Model card: {name} version {version}",
        "",
        "## Intended use",
        "",
        f"Classify one cropped road-sign image from {where} into one of {len(classes)} classes "
        f"({', '.join(classes)}). Input: raw RGB uint8 images shaped (N, H, W, 3), any size, "
        "or PNG/JPEG bytes in an `image` column; the model resizes and normalises them itself. "
        "Output: a `label` and one `prob_<class>` column per class.",
        "",
        "Not for: finding signs in whole scenes (it expects a crop), signs outside these "
        "classes (it will still name one of them), or any safety-critical decision.",
        "",
        "## Data",
        "",
        *_data_section(data),
        "",
        "## Metrics (target test split)",
        "",
        f"Gate metric `{GATE_METRIC}`: **{_fmt(metrics.get(GATE_METRIC, 'missing'))}**. "
        f"Promotion gates: floor `register.min_macro_f1={cfg.min_macro_f1}`, beating its own "
        "run's source-only and scratch baselines "
        f"`register.require_beats_baselines={cfg.require_beats_baselines}`, source test accuracy "
        f"falling by at most `register.max_source_accuracy_drop={cfg.max_source_accuracy_drop}`, "
        f"margin over the champion `register.min_improvement={cfg.min_improvement}`, no "
        "class's recall falling by more than "
        f"`register.max_class_recall_drop={cfg.max_class_recall_drop}`.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {key} | {_fmt(float(value))} |" for key, value in sorted(metrics.items())),
        "",
    ]
    if per_class:
        lines += [*_per_class_section(per_class), ""]
    if decision is not None:
        lines += [
            "## Promotion at registration",
            "",
            f"**{decision.label}**",
            "",
            *(f"- {gate.name}: {gate.status}: {gate.reason}" for gate in decision.gates),
            "",
            "Later decisions (`roadshift promote`, `roadshift rollback`) are tags on the version.",
            "",
        ]
    lines += ["## Limits", "", *_limits(metrics, per_class, data), "", "## Lineage", ""]
    lines += ["| tag | value |", "|---|---|"]
    lines += [f"| {key} | `{value}` |" for key, value in sorted(tags.items())]
    return "\n".join(lines) + "\n"


# The figures a version's one-paragraph description leads with, in this order.
HEADLINE_METRICS = (
    GATE_METRIC,
    "target_accuracy",
    "source_only_target_macro_f1",
    "scratch_target_macro_f1",
)
DESCRIPTION_REASON_CHARS = 300


def version_description(
    metrics: Mapping[str, float], tags: Mapping[str, str], decision: PromotionDecision
) -> str:
    """The registry's description of a version: headline metrics, data versions, the decision.

    Short on purpose (the model card holds the rest): it is what the versions table and the
    version page show first.
    """
    figures = ", ".join(
        f"{key} {_fmt(float(metrics[key]))}" for key in HEADLINE_METRICS if key in metrics
    )
    data = ", ".join(
        f"{key.removeprefix('data.').removesuffix('.version')} {value[:8]}"
        for key, value in sorted(tags.items())
        if key.startswith("data.") and key.endswith(".version")
    )
    reason = decision.reason
    if len(reason) > DESCRIPTION_REASON_CHARS:
        reason = reason[: DESCRIPTION_REASON_CHARS - 3] + "..."
    lines = [
        f"Target test split: {figures or 'no metrics'}.",
        f"Data (DVC versions): {data or 'unknown'}.",
        f"Promotion at registration: {decision.label}: {reason}",
    ]
    return "\n\n".join(lines)
