"""Rich progress bars for the training loop: one bar per epoch, the loss as it goes."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def stderr_progress(*status_columns: TextColumn) -> Progress:
    """The one bar layout roadshift uses (training epochs, batch prediction), on stderr so
    stdout stays clean for tables and piped output."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *status_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def progress_enabled(setting: bool | str) -> bool:
    """``auto`` shows bars only on an interactive terminal, never in CI logs or DVC captures."""
    if setting == "auto":
        return sys.stderr.isatty()
    return bool(setting)


class EpochProgress:
    """A no-op unless enabled, so the loop calls it unconditionally."""

    def __init__(self, enabled: bool, description: str, epochs: int) -> None:
        self.enabled, self.description, self.epochs = enabled, description, epochs
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> EpochProgress:
        if self.enabled:
            self._progress = stderr_progress(TextColumn("{task.fields[status]}"))
            self._progress.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(kind, error, trace)

    def start_epoch(self, epoch: int, steps: int) -> None:
        if self._progress is not None:
            label = f"{self.description} epoch {epoch}/{self.epochs}"
            self._task = self._progress.add_task(label, total=steps, status="")

    def advance(self, loss: float) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1, status=f"loss {loss:.3f}")

    def end_epoch(self, record: dict[str, float]) -> None:
        if self._progress is not None and self._task is not None:
            shown = "  ".join(
                f"{key} {value:.3f}"
                for key, value in record.items()
                if key in ("train_loss", "val_loss", "val_accuracy")
            )
            self._progress.update(self._task, status=shown)
