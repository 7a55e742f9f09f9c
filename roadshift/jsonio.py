"""JSON files the stages hand to each other and to DVC: written atomically, read with a clear error.

Kept free of heavy imports so light stages (validate) and the flow can use it cheaply.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def write_json(path: Path, payload: Any) -> Path:
    """Sorted keys, so the same results give the same bytes (and DVC sees no change)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
    return path


LEFT_OUT_KEY = "left_out"


def write_metrics(
    path: Path, metrics: dict[str, Any], left_out: dict[str, str] | None = None
) -> Path:
    """A stage's metrics file without undefined figures: NaN and infinities are left out,
    since JSON has none (``json`` would write a bare ``NaN``, which other readers reject and
    ``dvc metrics show`` prints as a number). Under ``left_out``, each figure missing from
    the file and why: ``left_out`` from the caller, and "not a finite number" for the rest."""
    kept = finite_metrics(metrics)
    reasons = {
        key: f"not a finite number ({value})" for key, value in metrics.items() if key not in kept
    }
    reasons.update(left_out or {})
    if reasons:
        kept[LEFT_OUT_KEY] = dict(sorted(reasons.items()))
    return write_json(path, kept)


def finite_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` less its non-finite floats (nested dicts filtered the same way)."""
    kept: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            kept[key] = finite_metrics(value)
        elif not (isinstance(value, float) and not math.isfinite(value)):
            kept[key] = value
    return kept


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the stage that writes it first")
    return json.loads(path.read_text())


def read_metrics(path: Path) -> dict[str, float]:
    """A metrics file's figures, without its ``left_out`` notes."""
    return {
        key: float(value)
        for key, value in read_json(path).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
