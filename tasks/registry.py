"""Registration as a Prefect task: log the model under the pipeline's MLflow run.

Moving ``champion`` must be atomic with respect to other promoters. Beside a local MLflow
store (SQLite, file) ``roadshift.registry`` takes a file lock. A remote tracking server has
no file to lock beside, so this task holds one slot of the Prefect global concurrency limit
``roadshift-registry-<model_name>`` around the whole registration; every flow run that
registers that model waits its turn. Create the limit once per Prefect server:

    prefect gcl create roadshift-registry-roadshift-road-signs --limit 1

Prefect 3.8 never creates a missing limit: with ``strict=False`` it logs a warning and runs
unguarded. This wrapper checks for the limit first and says plainly what that means: a
warning on a remote store (registrations are then not serialised), a debug line on a local
one (the file lock already serialises them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import task

from roadshift.config import Params
from roadshift.data.mlflow_inputs import log_data_inputs
from roadshift.registry.lock import lock_path, registry_limit_name
from roadshift.stages.register import run_register
from roadshift.tracking import stage_run_name

SLOT_TIMEOUT_S = 1800.0  # a registration scores the champion and logs a model: minutes at most


def _logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("roadshift.registry.register")


def _limit_state(name: str) -> tuple[str, str]:
    """("present" | "wide" | "absent" | "unavailable", detail) for the concurrency limit."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        return "absent", f"Prefect global concurrency limit {name!r} does not exist"
    except Exception as error:  # server unreachable, auth: degrade, and say so
        return "unavailable", f"could not read Prefect concurrency limit {name!r}: {error}"
    if not limit.active:
        return "absent", f"Prefect global concurrency limit {name!r} is inactive"
    if limit.limit != 1:
        return "wide", f"{name!r} allows {limit.limit} at once; set --limit 1 to serialise"
    return "present", f"holding {name!r}"


@contextmanager
def registry_slot(
    model_name: str, store_uri: str, timeout_seconds: float = SLOT_TIMEOUT_S
) -> Iterator[str]:
    """Hold one slot of ``roadshift-registry-<model_name>`` if that limit exists.

    Yields what happened (``held: ...``, ``unguarded: ...``) so callers can report it. A
    missing limit or an unreachable Prefect API degrades to running without it; a limit that
    stays busy past ``timeout_seconds`` raises Prefect's timeout error (the task retries).
    """
    from prefect.concurrency.sync import concurrency

    name = registry_limit_name(model_name)
    state, detail = _limit_state(name)
    if state in ("absent", "unavailable"):
        remote = lock_path(store_uri, model_name) is None
        level = logging.WARNING if remote else logging.DEBUG
        consequence = (
            f"registrations of {model_name!r} on {store_uri} are NOT serialised across flow "
            f"runs; create it: prefect gcl create {name} --limit 1"
            if remote
            else "the local store's promotion file lock serialises registrations"
        )
        _logger().log(level, "%s; %s", detail, consequence)
        yield f"unguarded: {detail}"
        return
    if state == "wide":
        _logger().warning(detail)
    with concurrency(
        name,
        occupy=1,
        timeout_seconds=timeout_seconds,
        strict=False,  # deleted between the check and here: run unguarded, Prefect warns
        raise_on_lease_renewal_failure=False,  # a renewal hiccup must not kill a registration
    ):
        yield f"held: {detail}"


@task(name="register", retries=2, retry_delay_seconds=5)
def register(root: Path, params: Params, parent_run_id: str, extra_tags: dict[str, str]):
    import mlflow

    with (
        registry_slot(params.register.model_name, mlflow.get_registry_uri()) as slot,
        mlflow.start_run(
            run_name=stage_run_name("register"), parent_run_id=parent_run_id, nested=True
        ) as run,
    ):
        log_data_inputs(params, root, "register")
        mlflow.set_tag("roadshift.stage", "register")
        mlflow.set_tag("roadshift.registry_slot", slot)
        outcome = run_register(params, root, {**extra_tags, "mlflow.parent_run_id": parent_run_id})
        registration = outcome.details["registration"]
        mlflow.set_tags({"registered.version": str(registration.version)})
        return registration, run.info.run_id
