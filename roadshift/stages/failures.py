"""A stage's expected failure, handed from the stage command to the flow that started it.

DVC runs each stage as a subprocess and reports only "failed to reproduce 'prepare'"; the
stage's own message (which file, which key, what to do) would otherwise reach the person
only as a line in the middle of the output. The stage command records it here; the flow
raises it again as the run's one final message.
"""

from __future__ import annotations

import json
from pathlib import Path

from roadshift.errors import RoadshiftError
from roadshift.layout import Layout


class StageFailedError(RoadshiftError):
    """A pipeline stage stopped on an expected error; the message is the stage's own."""

    def __init__(self, stage: str, kind: str, message: str) -> None:
        super().__init__(f"stage {stage} failed ({kind}): {message}")
        self.stage = stage
        self.kind = kind
        self.reason = message


def clear_stage_failure(root: Path, stage: str) -> None:
    Layout(root).stage_failure(stage).unlink(missing_ok=True)


def record_stage_failure(root: Path, stage: str, error: RoadshiftError) -> Path:
    path = Layout(root).stage_failure(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "kind": type(error).__name__, "message": str(error)}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def recorded_stage_failure(root: Path, stage: str) -> StageFailedError | None:
    """The failure the stage's last run recorded, or None (it failed unexpectedly, or not)."""
    path = Layout(root).stage_failure(stage)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return StageFailedError(stage, str(record.get("kind")), str(record.get("message")))
