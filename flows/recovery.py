"""Before a run: mark the runs a killed run left behind as ended, in MLflow and in Prefect,
and remove a DVC lock file it left unreadable.

A run killed with SIGKILL (or a machine that lost power) cannot mark its own MLflow runs
or Prefect flow run as ended; they would show RUNNING forever. Every run records its
owner (host, PID, start time: ``roadshift.supervise.owner_tag``); the next run on the same
host ends those whose process is gone. Runs of another host, or of a process still alive,
are left alone. ``roadshift run`` calls this while it holds the project's run lock.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from roadshift.config import Params
from roadshift.supervise import Owner

RUN_TAG = "roadshift-run"
"""Prefect tag on every flow run ``roadshift run`` starts."""
OWNER_PREFIX = "roadshift-owner:"
"""Prefect tag prefix: the rest is the owner (``roadshift.supervise.owner_tag``)."""
KILLED_NOTE = "its process ended without finishing the run (killed)"


def prefect_run_tags(owner: str) -> tuple[str, str]:
    """The tags a supervised run's flow run carries, so a later run can find and judge it."""
    return RUN_TAG, f"{OWNER_PREFIX}{owner}"


def end_abandoned_mlflow_runs(params: Params, root: Path) -> list[str]:
    """Set RUNNING MLflow runs of this project's experiment whose owner is gone to KILLED;
    their ids. A local store that does not exist yet holds nothing to end (and is not
    created here)."""
    from mlflow import MlflowClient

    from roadshift.layout import resolve_tracking_uri
    from roadshift.tracking import OWNER_TAG, explain_tracking_outage

    uri = resolve_tracking_uri(params.tracking, root)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        return []
    with explain_tracking_outage(uri, "looking for runs a killed run left RUNNING"):
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(params.tracking.experiment)
        if experiment is None:
            return []
        running = client.search_runs(
            [experiment.experiment_id],
            filter_string="attributes.status = 'RUNNING'",
            max_results=1000,
        )
        ended = []
        for run in running:
            owner = Owner.parse(run.data.tags.get(OWNER_TAG))
            if owner is not None and owner.is_gone():
                client.set_tag(run.info.run_id, "roadshift.ended", KILLED_NOTE)
                client.set_terminated(run.info.run_id, "KILLED")
                ended.append(run.info.run_id)
    return ended


def crash_abandoned_flow_runs() -> list[str]:
    """Set flow runs of ``roadshift run`` left RUNNING or PENDING by a process that is gone
    to Crashed (with their running task runs); their names."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    unfinished = [StateType.RUNNING, StateType.PENDING]
    crashed = []
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=unfinished)),
                tags=FlowRunFilterTags(all_=[RUN_TAG]),
            )
        )
        for flow_run in flow_runs:
            owners = [t[len(OWNER_PREFIX) :] for t in flow_run.tags if t.startswith(OWNER_PREFIX)]
            owner = Owner.parse(owners[0]) if owners else None
            if owner is None or not owner.is_gone():
                continue
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                task_run_filter=TaskRunFilter(
                    state=TaskRunFilterState(type=TaskRunFilterStateType(any_=unfinished))
                ),
            )
            for task_run in task_runs:
                client.set_task_run_state(task_run.id, Crashed(message=KILLED_NOTE), force=True)
            client.set_flow_run_state(flow_run.id, Crashed(message=KILLED_NOTE), force=True)
            crashed.append(flow_run.name)
    return crashed


def remove_unreadable_dvc_rwlock(root: Path, settle: float = 1.0) -> bool:
    """Remove DVC's ``.dvc/tmp/rwlock`` when it is not valid JSON; whether it was removed.

    DVC rewrites that file in place each time a stage takes or drops its locks; a process
    killed during the write leaves half a file, and every later DVC command stops with
    ``RWLockFileCorruptedError``. Removing it is DVC's own advice for a lock no live process
    holds, and a file nobody can read holds nothing DVC could honour. Judged twice,
    ``settle`` seconds apart, so a DVC command writing it right now is left alone.
    """
    path = Path(root) / ".dvc" / "tmp" / "rwlock"

    def unreadable() -> bool:
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return False
        except ValueError:  # JSONDecodeError and bytes that are not UTF-8
            return True
        return False

    if not unreadable():
        return False
    time.sleep(settle)
    if not unreadable():
        return False
    path.unlink(missing_ok=True)
    return True


def end_abandoned_runs(params: Params, root: Path) -> None:
    """The above; one line each for what was ended or repaired."""
    if remove_unreadable_dvc_rwlock(root):
        print("removed DVC's lock file .dvc/tmp/rwlock, which a killed run left half-written")
    ended = end_abandoned_mlflow_runs(params, root)
    if ended:
        print(f"marked {len(ended)} MLflow run(s) a killed run left RUNNING as KILLED")
    crashed = crash_abandoned_flow_runs()
    if crashed:
        print(f"marked Prefect flow run(s) a killed run left running as Crashed: {crashed}")
