"""What a stage hands back to the shell that ran it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StageOutcome:
    """Numbers and files a stage produced, for the shell (CLI/flow) to log and show."""

    metrics: dict[str, float]
    artifacts: list[Path] = field(default_factory=list)
    details: dict = field(default_factory=dict)
