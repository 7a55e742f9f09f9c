"""The human side of the evaluate stage: four PNGs and a Markdown report under
``reports/evaluation/``.

The numbers live in ``metrics/`` and ``plots/`` for DVC; these files are for a person
deciding what to do next (which classes to label more of, whether the confidences can be
thresholded, which test images look mislabelled). Every file is deterministic — fixed size
and dpi, no timestamps or software version in the PNG metadata, ties broken by row — so
``dvc repro`` on unchanged inputs writes identical bytes.

Drawing uses bare Agg ``Figure`` objects rather than pyplot: no global backend switch and
no figure registry to leak from a long-running worker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from roadshift.data.dataset import load_rgb
from roadshift.evaluate.metrics import Calibration, ConfusionMatrix, Evaluation, Interval

DPI = 100
# No "Software: matplotlib x.y" chunk: the bytes then depend on the inputs only.
PNG_METADATA = {"Software": None}

# Relative to the project root; dvc.yaml declares it (cache: false) and the flow publishes it.
REPORT_DIR = Path("reports") / "evaluation"
CONFUSION_PNG = "confusion_matrix.png"
PER_CLASS_PNG = "per_class.png"
RELIABILITY_PNG = "reliability.png"
WORST_MISTAKES_PNG = "worst_mistakes.png"
REPORT_MD = "report.md"


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    """Write atomically, so an interrupted stage never leaves half a PNG for DVC to hash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=DPI, metadata=PNG_METADATA)
    tmp.replace(path)
    return path


def plot_confusion_matrix(confusion: ConfusionMatrix, path: Path, title: str) -> Path:
    """Counts, coloured by row share so a rare class's errors are as visible as a common one's."""
    counts = confusion.counts
    k = len(confusion.class_names)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    size = max(4.5, 0.55 * k + 2.5)
    figure = _figure(size + 1.0, size)
    ax = figure.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(int(counts[i, j])),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[i, j] > 0.6 else "black",
            )
    ax.set_xticks(range(k), confusion.class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), confusion.class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the actual class")
    figure.tight_layout()
    return _save(figure, path)


def plot_per_class(
    finetuned: Evaluation, source_only: Evaluation | None, path: Path, title: str
) -> Path:
    """Grouped horizontal bars per class: fine-tuned precision/recall/F1 and, when given, the
    source-only recall, so the classes transfer helped (or did not) stand out."""
    per_class = finetuned.report.per_class
    names = list(per_class)
    series = [
        ("precision", [per_class[n]["precision"] for n in names], "C0"),
        ("recall", [per_class[n]["recall"] for n in names], "C1"),
        ("F1", [per_class[n]["f1"] for n in names], "C2"),
    ]
    if source_only is not None:
        baseline = source_only.report.per_class
        series.append(("source-only recall", [baseline[n]["recall"] for n in names], "0.6"))
    height = 0.8 / len(series)
    figure = _figure(8.0, max(3.5, 0.65 * len(names) + 1.5))
    ax = figure.add_subplot()
    positions = np.arange(len(names))
    for s, (label, values, colour) in enumerate(series):
        offset = (s - (len(series) - 1) / 2) * height
        ax.barh(positions + offset, values, height=height, label=label, color=colour)
    ax.set_yticks(positions, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("score on the target test split")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def plot_reliability(calibration: Calibration, path: Path, title: str) -> Path:
    """Reliability diagram: per-bin accuracy against the diagonal of perfect calibration, with
    the bin counts underneath (a large gap in an almost empty bin matters little)."""
    bins = calibration.bins
    centres = np.array([(b.lower + b.upper) / 2 for b in bins])
    width = bins[0].upper - bins[0].lower
    filled = np.array([b.count > 0 for b in bins])
    accuracy = np.array([b.accuracy if b.count else 0.0 for b in bins])
    confidence = np.array([b.confidence if b.count else 0.0 for b in bins])
    figure = _figure(5.5, 6.0)
    grid = figure.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    ax = figure.add_subplot(grid[0])
    ax.bar(centres, accuracy, width=width, color="C0", edgecolor="black", label="accuracy")
    ax.bar(
        centres[filled],
        (confidence - accuracy)[filled],
        bottom=accuracy[filled],
        width=width,
        color="C3",
        alpha=0.3,
        edgecolor="C3",
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.3", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {calibration.ece:.3f})")
    ax.tick_params(labelbottom=False)
    ax.legend(loc="upper left", fontsize=8)
    counts_ax = figure.add_subplot(grid[1], sharex=ax)
    counts_ax.bar(centres, [b.count for b in bins], width=width, color="0.6", edgecolor="black")
    counts_ax.set_xlabel("confidence (top-1 probability)")
    counts_ax.set_ylabel("images")
    figure.subplots_adjust(left=0.14, right=0.96, top=0.94, bottom=0.09)
    return _save(figure, path)


def plot_worst_mistakes(
    evaluation: Evaluation, image_paths: Sequence[Path], rows: Sequence[int], path: Path
) -> Path:
    """The most confidently wrong test images with true label, prediction and confidence —
    often a labelling error or a look-alike class pair worth more target labels."""
    class_names = evaluation.confusion.class_names
    columns = max(1, min(4, len(rows)))
    lines = max(1, -(-len(rows) // columns))
    figure = _figure(2.4 * columns, 2.7 * lines)
    if not rows:
        ax = figure.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
        return _save(figure, path)
    for cell, row in enumerate(rows):
        ax = figure.add_subplot(lines, columns, cell + 1)
        ax.imshow(load_rgb(image_paths[row]), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        true = class_names[int(evaluation.targets[row])]
        predicted = class_names[int(evaluation.predictions[row])]
        confidence = float(evaluation.confidences[row])
        ax.set_title(f"true: {true}\npred: {predicted} ({confidence:.2f})", fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


@dataclass(frozen=True)
class ReportInputs:
    """What the Markdown report is written from (the stage already has all of it)."""

    metrics: Mapping[str, float]
    models: Mapping[str, Evaluation]  # display name -> evaluation on the target test split
    finetuned: str  # the key of ``models`` that is the model being shipped
    baseline: str | None  # the key of the source-only model, for per-class recall
    mistakes: Sequence[tuple[str, str, str, float]]  # (path, true, predicted, confidence)
    figures: Sequence[str]  # PNG file names written next to the report


def _with_interval(value: float, interval: Interval | None) -> str:
    if interval is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{interval.low:.3f}, {interval.high:.3f}]"


def _headline_table(inputs: ReportInputs) -> list[str]:
    level = next((i.level for e in inputs.models.values() for i in e.intervals.values()), None)
    note = f" ({level:.0%} bootstrap interval)" if level is not None else ""
    lines = [
        f"| model | accuracy{note} | macro-F1{note} | ECE |",
        "|---|---|---|---|",
    ]
    for name, evaluation in inputs.models.items():
        report = evaluation.report
        accuracy = _with_interval(report.accuracy, evaluation.intervals.get("accuracy"))
        macro_f1 = _with_interval(report.macro_f1, evaluation.intervals.get("macro_f1"))
        lines.append(f"| {name} | {accuracy} | {macro_f1} | {evaluation.calibration.ece:.3f} |")
    return lines


def _gap_and_gain(inputs: ReportInputs) -> list[str]:
    """The domain gap needs the source-only score on the *source* test split (from the
    metrics), the source retained the fine-tuned model's there too; the gains are the
    fine-tuned macro-F1 minus each other model's on this split."""
    home = inputs.metrics.get("source_only_source_accuracy")
    away = inputs.metrics.get("source_only_target_accuracy")
    kept = inputs.metrics.get("finetuned_source_accuracy")
    lines = []
    if home is not None and away is not None:
        lines.append(
            "- **Domain gap** (source-only accuracy on the source test split minus on the target "
            f"test split): {home:.3f} − {away:.3f} = **{home - away:.3f}**"
        )
    if home is not None and kept is not None:
        lines.append(
            f"- **Source retained** (accuracy on the source test split, {inputs.finetuned} vs "
            f"source-only): {kept:.3f} vs {home:.3f} = **{kept - home:+.3f}**"
        )
    shipped = inputs.models[inputs.finetuned].report.macro_f1
    for name, evaluation in inputs.models.items():
        if name != inputs.finetuned:
            gain = shipped - evaluation.report.macro_f1
            lines.append(f"- **Transfer gain** (macro-F1) over {name}: **{gain:+.3f}**")
    return lines


def _per_class_table(inputs: ReportInputs) -> list[str]:
    per_class = inputs.models[inputs.finetuned].report.per_class
    baseline = inputs.models[inputs.baseline].report.per_class if inputs.baseline else None
    extra = " | source-only recall" if baseline else ""
    lines = [
        f"| class | support | precision | recall | F1{extra} |",
        "|---|---|---|---|---|" + ("---|" if baseline else ""),
    ]
    for name, row in per_class.items():
        cells = [
            name,
            f"{int(row['support'])}",
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['f1']:.3f}",
        ]
        if baseline:
            cells.append(f"{baseline[name]['recall']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _mistakes_table(inputs: ReportInputs) -> list[str]:
    if not inputs.mistakes:
        return []
    lines = [
        "",
        "## Most confident mistakes",
        "",
        "| image | true | predicted | confidence |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{p}` | {t} | {pr} | {c:.3f} |" for p, t, pr, c in inputs.mistakes]
    return lines


_FIGURE_TITLES = {
    CONFUSION_PNG: "Confusion matrix",
    PER_CLASS_PNG: "Per-class precision, recall and F1",
    RELIABILITY_PNG: "Reliability diagram",
    WORST_MISTAKES_PNG: "Most confident mistakes",
}


def report_markdown(inputs: ReportInputs) -> str:
    """The report a reviewer reads first; image links are relative to the report's folder."""
    finetuned = inputs.models[inputs.finetuned]
    lines = [
        "# Evaluation on the target test split",
        "",
        *_headline_table(inputs),
        "",
        *_gap_and_gain(inputs),
        f"- **Expected calibration error** of the {inputs.finetuned} model: "
        f"**{finetuned.calibration.ece:.3f}** over {len(finetuned.calibration.bins)} "
        "equal-width confidence bins",
        "",
        "## Per class (fine-tuned)",
        "",
        *_per_class_table(inputs),
        *_mistakes_table(inputs),
        "",
        "## Figures",
    ]
    for name in inputs.figures:
        title = _FIGURE_TITLES.get(name, name)
        lines += ["", f"### {title}", "", f"![{title}]({name})"]
    return "\n".join(lines) + "\n"


def write_report(inputs: ReportInputs, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(report_markdown(inputs))
    tmp.replace(path)
    return path
