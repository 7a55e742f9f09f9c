"""Prefect tasks over DVC: version the raw data, reproduce one stage, push to the remote.

Stages run through DVC rather than being called directly so that dvc.lock
records every input and output hash and an unchanged stage is skipped, whether
the pipeline was started by this flow or by a plain ``dvc repro``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from roadshift.config import Params
from roadshift.data.dvc_repo import chosen_remote, domain_folders, dvc_data_version, open_repo
from roadshift.data.versioning import verify_data_folders
from roadshift.layout import Layout
from roadshift.stages.failures import clear_stage_failure, recorded_stage_failure


@dataclass(frozen=True)
class StageRun:
    stage: str
    ran: bool
    seconds: float

    @property
    def status(self) -> str:
        return "ran" if self.ran else "skipped (inputs unchanged)"


def _put_first(variable: str, entry: str) -> None:
    """``entry`` at the front of a path-list variable, once."""
    entries = [e for e in os.environ.get(variable, "").split(os.pathsep) if e and e != entry]
    os.environ[variable] = os.pathsep.join([entry, *entries])


def _stage_environment(root: Path) -> None:
    """DVC runs each stage command in a shell: this interpreter's tools, this checkout's code.

    On a worker the checkout is a fresh clone of the deployed commit, which may differ
    from the roadshift installed in the worker's image; the stages must run the clone's.
    """
    _put_first("PATH", str(Path(sys.executable).parent))
    _put_first("PYTHONPATH", str(Path(root).resolve()))


@task(name="version-data")
def version_data(root: Path, params: Params) -> dict[str, str]:
    """``dvc add`` each domain folder and the unlabelled target pool; a changed folder becomes
    a new data version (keys: source, target, target_unlabeled).

    Each folder first passes prepare's own scan (``verify_data_folders``): a tree with a link,
    a FIFO, a bomb or broken image, or no images stops the run here, naming the file, and
    every ``.dvc`` pointer keeps the version it had."""
    layout = Layout(root)
    folders = domain_folders(params, root)
    with open_repo(root) as repo:
        # an unchanged folder was scanned when it was versioned: decode only what changed
        changed = {
            name: folder
            for name, folder in folders.items()
            if not layout.data_pointer(folder).is_file()
            or repo.status(targets=[str(layout.data_pointer(folder))])
        }
        verify_data_folders(params, Path(root), changed)
        repo.add([str(folder) for folder in folders.values()])
    return {
        name: dvc_data_version(layout.data_pointer(folder)) or "unknown"
        for name, folder in folders.items()
    }


@task(name="dvc-stage")
def reproduce_stage(root: Path, stage: str) -> StageRun:
    """``dvc repro <stage>``: runs the stage's command if its deps, params or outs changed."""
    _stage_environment(root)
    clear_stage_failure(root, stage)  # what a run before this one left
    started = time.perf_counter()
    try:
        with open_repo(root) as repo:
            reproduced = repo.reproduce(targets=[stage], single_item=True)
    except Exception as error:
        failure = recorded_stage_failure(root, stage)
        if failure is None:  # not an expected failure: keep DVC's error and its traceback
            raise
        raise failure from error
    return StageRun(stage, ran=bool(reproduced), seconds=time.perf_counter() - started)


@task(name="dvc-push", retries=2, retry_delay_seconds=5)
def push_to_remote(root: Path) -> int:
    """Send data and model versions to the DVC remote so any of them can be reproduced."""
    with open_repo(root) as repo:
        return repo.push(remote=chosen_remote(repo))
