"""MLflow wiring: where runs go, one run per stage, and the per-epoch metric callback.

Nothing here runs at import: the tracking URI and experiment are set by
``configure_tracking`` inside the CLI or flow, never as a module side effect.
Stage commands run in DVC's subprocesses; they attach to the flow's parent run
through the ``ROADSHIFT_PARENT_RUN_ID`` environment variable.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import LifecycleStage

from roadshift.config import Params, TrackingSection, params_to_dict
from roadshift.errors import RoadshiftError
from roadshift.layout import TRACKING_URI_ENV, Layout, resolve_tracking_uri
from roadshift.supervise import owner_tag

PARENT_RUN_ENV = "ROADSHIFT_PARENT_RUN_ID"
STAGE_TAG = "roadshift.stage"
OWNER_TAG = "roadshift.owner"
"""host/PID/start time of the process that started a run: a later run ends it as KILLED
once that process is gone (flows/recovery.py)."""
RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
BACKOFF_ENV = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"


class TrackingUnavailableError(RoadshiftError, RuntimeError):
    """The tracking server stopped answering and MLflow's bounded retries ran out."""


def default_artifact_dir(root: Path) -> Path:
    return Layout(root.resolve()).mlflow_dir / "artifacts"


def _artifact_location(tracking_uri: str, root: Path) -> str | None:
    """Artifacts beside a SQLite store; a tracking server decides for itself.

    Without this a SQLite store puts artifacts in ``./mlruns`` relative to
    whatever directory the process happened to start in.
    """
    if tracking_uri.startswith("sqlite:"):
        return default_artifact_dir(root).as_uri()
    return None


def _ensure_sqlite_parent(tracking_uri: str) -> None:
    """SQLAlchemy creates the database file but not its folder."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and ":memory:" not in tracking_uri:
        Path(tracking_uri[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)


def _set_tracking_uri_in_process(tracking_uri: str) -> None:
    """``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``; undo that.

    Left in the environment, it would outrank the next project's own setting in
    this process (the environment wins in ``resolve_tracking_uri``). Stage
    subprocesses resolve the same URI from the same params and root.
    """
    before = os.environ.get(TRACKING_URI_ENV)
    mlflow.set_tracking_uri(tracking_uri)
    if before is None:
        os.environ.pop(TRACKING_URI_ENV, None)
    else:
        os.environ[TRACKING_URI_ENV] = before


def bound_request_retries(cfg: TrackingSection) -> None:
    """Give MLflow's HTTP client our retry budget unless its own variables are already set.

    MLflow's default (7 retries, backoff factor 2, 120 s timeout) keeps a run waiting
    for minutes on a dead server. Set in the environment, the budget also reaches the
    stage subprocesses DVC starts.
    """
    os.environ.setdefault(RETRIES_ENV, str(cfg.request_retries))
    os.environ.setdefault(BACKOFF_ENV, str(cfg.request_backoff_seconds))
    os.environ.setdefault(TIMEOUT_ENV, str(cfg.request_timeout_seconds))


def is_tracking_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def tracking_server_answers(tracking_uri: str, timeout_s: float = 5.0) -> bool:
    """One plain GET of the server's ``/health``; no retries, so the answer is quick."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, even if with an error status
    except (OSError, ValueError):
        return False


def _retry_budget() -> str:
    retries = os.environ.get(RETRIES_ENV, "?")
    backoff = os.environ.get(BACKOFF_ENV, "?")
    return f"{retries} retries, backoff factor {backoff} s ({RETRIES_ENV}, {BACKOFF_ENV})"


@contextmanager
def explain_tracking_outage(tracking_uri: str, doing: str) -> Iterator[None]:
    """Turn any failure while the tracking server is down into one clear, actionable error.

    MLflow reports an outage as a connection traceback from deep inside a request,
    or (under DVC) as a failed stage. Only when the server really does not answer
    is the error replaced; every other failure propagates untouched.
    """
    try:
        yield
    except TrackingUnavailableError:
        raise
    except Exception as error:
        if not is_tracking_server(tracking_uri) or tracking_server_answers(tracking_uri):
            raise
        raise TrackingUnavailableError(
            f"the MLflow tracking server {tracking_uri} stopped answering while {doing}; "
            f"gave up after {_retry_budget()}. What was logged before the outage is kept; "
            "the registry's aliases (champion) move only as a registration's last step, so "
            "they are as they were unless that step finished. Start the server again and "
            "rerun: DVC skips the stages that finished and training resumes from its last "
            "checkpoint"
        ) from error


def configure_tracking(params: Params, root: Path) -> str:
    """Point MLflow at the store and experiment for this project; returns the experiment id."""
    bound_request_retries(params.tracking)
    tracking_uri = resolve_tracking_uri(params.tracking, root)
    _ensure_sqlite_parent(tracking_uri)
    _set_tracking_uri_in_process(tracking_uri)
    name = params.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(
            name, artifact_location=_artifact_location(tracking_uri, root)
        )
    elif experiment.lifecycle_stage == LifecycleStage.DELETED:
        raise RuntimeError(
            f"MLflow experiment {name!r} at {tracking_uri} is deleted; restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) "
            "or set tracking.experiment to another name"
        )
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten_params(params: Params | Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"pretrain": {"lr": 0.003}}`` -> ``{"pretrain.lr": "0.003"}``; lists as JSON."""
    raw = params_to_dict(params) if isinstance(params, Params) else params
    flat: dict[str, str] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{dotted}."))
        elif isinstance(value, list | tuple):
            flat[dotted] = json.dumps(list(value))
        else:
            flat[dotted] = str(value)
    return flat


def _dvc_stage_param_keys(stage: str, root: Path) -> list[str] | None:
    """The params keys dvc.yaml lists for ``stage``, so runs and DVC agree on a stage's inputs."""
    dvc_file = root / "dvc.yaml"
    if not dvc_file.is_file():
        return None
    stages = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {})
    if stage not in stages:
        return None
    keys: list[str] = []
    for entry in stages[stage].get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, Mapping):  # {params.yaml: [key, ...]}
            for listed in entry.values():
                keys.extend(listed or [])
    return keys


def stage_params(stage: str, params: Params, root: Path) -> dict[str, str]:
    """The flattened params a stage depends on: dvc.yaml's list, else the stage's own section.

    A name that is neither a DVC stage nor a params section (the pipeline's own
    run) gets every parameter.
    """
    flat = flatten_params(params)
    keys = _dvc_stage_param_keys(stage, root)
    if keys is None:
        keys = [stage] if stage in Params.model_fields else None
    if keys is None:
        return flat
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in keys)}


# What each stage run is, for its name on the Runs page: "finetune (fine-tune on target)".
STAGE_TITLES = {
    "prepare": "manifests and splits",
    "validate": "data checks",
    "pretrain": "pretrain on source",
    "finetune": "fine-tune on target",
    "scratch": "target from scratch",
    "evaluate": "test splits",
    "register": "registry",
}


def stage_run_name(stage: str) -> str:
    title = STAGE_TITLES.get(stage)
    return f"{stage} ({title})" if title else stage


@contextmanager
def stage_run(stage: str, params: Params, root: Path) -> Iterator[mlflow.ActiveRun]:
    """One MLflow run for one stage, nested under ``ROADSHIFT_PARENT_RUN_ID`` when set.

    Call ``configure_tracking`` first. An exception inside marks the run FAILED
    and propagates.
    """
    parent_run_id = os.environ.get(PARENT_RUN_ENV, "").strip() or None
    with mlflow.start_run(
        run_name=stage_run_name(stage),
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None or mlflow.active_run() is not None,
        tags={
            STAGE_TAG: stage,
            OWNER_TAG: owner_tag(),
            # how this stage's OpenMP threads waited (roadshift.train.runtime); never
            # changes a result, explains a slow or fast stage
            "roadshift.omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "libgomp default"),
        },
    ) as run:
        mlflow.log_params(stage_params(stage, params, root))
        yield run


class MetricLogger:
    """The per-epoch callback training code receives: ``log_epoch(metrics, step)``.

    It logs to whichever run is active when called, and refuses to log with no
    active run rather than letting MLflow silently start a stray one.
    """

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        self.log_epoch(metrics, step)

    def log_epoch(self, metrics: Mapping[str, float], step: int) -> None:
        run = mlflow.active_run()
        if run is None:
            raise RuntimeError("MetricLogger: no active MLflow run; call it inside stage_run()")
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_stage_outcome(outcome: Any) -> None:
    """Log what a stage produced to the active run: its metrics, its chosen fine-tuning
    strategy and reason as tags, and every file it listed as an artifact."""
    metrics = getattr(outcome, "metrics", None)
    if metrics:
        mlflow.log_metrics({key: float(value) for key, value in metrics.items()})
    details = getattr(outcome, "details", None) or {}
    chosen = {key: str(details[key]) for key in ("strategy", "strategy_reason") if key in details}
    if chosen:
        mlflow.set_tags({f"roadshift.finetune.{key}": value for key, value in chosen.items()})
    for path in getattr(outcome, "artifacts", None) or []:
        if Path(path).is_file():
            mlflow.log_artifact(str(path))


def configure_existing_store(params: Params, root: Path, *, writes: bool = True) -> str:
    """Point MLflow at the project's store as the stage commands do; return the registry URI.

    For commands that read what the pipeline registered: a store that is missing, damaged,
    unreachable or (with ``writes``) read-only is an error here (``check_store``), never a
    new empty store or a traceback.
    """
    uri = check_store(params, root, must_exist=True, writes=writes)
    if writes:
        configure_tracking(params, root)
    else:  # reading needs no experiment, and a read-only store could not create one
        bound_request_retries(params.tracking)
        _set_tracking_uri_in_process(uri)
    return mlflow.get_registry_uri()


# --- store faults: one clear line before a command touches the store --------------------------


def _sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other kind of store."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or ":memory:" in tracking_uri:
        return None
    return Path(tracking_uri[len(prefix) :].split("?")[0])


def _server_fault(tracking_uri: str, timeout_s: float = 5.0) -> str | None:
    """Why a tracking server does not answer its ``/health``; None when it answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None  # it answered, even if with an error status
    except urllib.error.URLError as error:
        return str(error.reason)
    except (OSError, ValueError) as error:
        return str(error) or type(error).__name__


def _sqlite_fault(path: Path, writes: bool) -> str | None:
    """What is wrong with an existing SQLite store file, in words; None when it is usable.

    Read with SQLite itself (``quick_check``), and for ``writes`` a write lock taken and
    given back at once (``BEGIN IMMEDIATE``): file modes alone say nothing for root, nor for
    a read-only mount.
    """
    import sqlite3

    if not path.is_file():
        return "is not a regular file"
    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.as_uri()}?mode={'rw' if writes else 'ro'}", uri=True, timeout=5)
        ) as db:
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                return f"is damaged (SQLite quick_check: {verdict})"
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            if "experiments" not in tables:
                return "holds no MLflow tables"
            if writes:  # rewrite a header field as it is, and take it back
                version = db.execute("PRAGMA user_version").fetchone()[0]
                db.execute("BEGIN IMMEDIATE")
                db.execute(f"PRAGMA user_version = {int(version)}")
                db.rollback()
    except sqlite3.OperationalError as error:
        if "locked" in str(error):
            return None  # another writer is busy; MLflow waits for it
        if "readonly" in str(error) or "read-only" in str(error) or "unable to open" in str(error):
            return f"cannot be written ({error}): check its permissions and its folder's"
        return f"cannot be read as SQLite ({error})"
    except sqlite3.DatabaseError as error:  # "file is not a database", "malformed"
        return f"is not a readable SQLite database ({error})"
    return None


def check_store(params: Params, root: Path, *, must_exist: bool, writes: bool) -> str:
    """The tracking URI, after checking the store can be used; else one clear error naming
    the store and the fault (TrackingUnavailableError), before MLflow prints a traceback or
    quietly creates an empty store.

    ``must_exist``: the command reads what the pipeline registered, so a missing SQLite file
    is an error, never a new empty store. ``writes``: the command writes (a run, an alias).
    """
    uri = resolve_tracking_uri(params.tracking, root)
    if is_tracking_server(uri):
        fault = _server_fault(uri)
        if fault is not None:
            raise TrackingUnavailableError(
                f"the MLflow tracking server {uri} does not answer ({fault}); start it, or "
                "point MLFLOW_TRACKING_URI / tracking.tracking_uri at a running one"
            )
        return uri
    path = _sqlite_file(uri)
    if path is None:
        return uri  # another database: MLflow's own errors name it
    if not path.exists():
        if must_exist:
            raise TrackingUnavailableError(
                f"no MLflow store at {path}: nothing is registered yet (run the pipeline "
                "first, or set tracking.tracking_uri / MLFLOW_TRACKING_URI)"
            )
        return uri
    fault = _sqlite_fault(path, writes)
    if fault is not None:
        raise TrackingUnavailableError(
            f"the MLflow store {path} {fault}; restore it from a backup, or point "
            "MLFLOW_TRACKING_URI / tracking.tracking_uri at a working store"
        )
    return uri
