"""How much the libraries under ``roadshift`` print: a run shows its own lines, the summary
and the promotion decision; everything else is in the Prefect UI, MLflow and the reports.

Set through the switches each library documents: Prefect's logging settings
(``PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL`` overrides its logging.yml's console handler
and leaves the handler that sends logs to the Prefect API alone), MLflow's
``MLFLOW_LOGGING_LEVEL``, and the levels of DVC's loggers. ``--verbose`` (or
``ROADSHIFT_VERBOSE=1``) shows all of it, with the tracebacks of expected errors.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "ROADSHIFT_VERBOSE"
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
_DVC_LOGGERS = ("dvc", "dvc_objects", "dvc_data")


def verbose_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(VERBOSE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def set_library_verbosity(verbose: bool) -> None:
    """Before Prefect or MLflow is imported (both read these then); stage commands, which
    DVC starts as subprocesses, inherit them. A value the user set is kept."""
    level = "INFO" if verbose else "WARNING"
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", level)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", level)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"


class RunFailureFilter(logging.Filter):
    """Keeps Prefect's flow- and task-run errors off the console (they still reach the
    Prefect API, so the UI shows every failed run with its error).

    A run that fails reaches the person once, at the end: an expected error as the command's
    one message, a bug as its traceback. Without this each failure is printed three or four
    times, each with the whole chain of DVC and Prefect tracebacks.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith(_RUN_LOGGERS) and record.levelno >= logging.ERROR)


def quiet_flow_console() -> None:
    """After the flow's libraries are imported: DVC sets its loggers' levels when imported,
    and Prefect attaches its console handler to the root logger then."""
    import dvc.logger  # noqa: F401  (configures DVC's loggers; quieted below)
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in _DVC_LOGGERS:  # "Running stage ...", "Updating lock file", git-add hints
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(RunFailureFilter())
