"""Fixtures only: the offline environment, tiny configs and a Prefect server for flow tests.

Helpers (tiny params, throwaway git+DVC projects, toy data) live in tests/helpers.py.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest
import yaml

from roadshift.cli import OFFLINE_ENV
from tests.helpers import TINY_PARAMS

_ENVIRONMENT = pytest.StashKey[pytest.MonkeyPatch]()
_PREFECT_HOME = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Offline settings, and a throwaway PREFECT_HOME, for the whole run; undone at its end.

    A hook, not a fixture, because some of these are read when a library is *imported*, and
    test modules import libraries while pytest collects them, before any fixture runs:
    albumentations (imported by roadshift.data.transforms) checks PyPI for updates at import
    unless NO_ALBUMENTATIONS_UPDATE is set, and ``prefect.context`` builds its global
    settings (PREFECT_HOME with its profiles and result storage, the ephemeral server) from
    the environment the first time it is imported, e.g. by a test module importing flows/.
    Subprocesses get this environment through ``tests.helpers.venv_environment()``.
    """
    patch = pytest.MonkeyPatch()
    config.stash[_ENVIRONMENT] = patch
    for key, value in {**OFFLINE_ENV, "PREFECT_SERVER_EPHEMERAL_ENABLED": "true"}.items():
        patch.setenv(key, value)
    # Always a throwaway one, also under `make test` (whose PREFECT_HOME is the project's
    # .prefect): runs the tests start, kill or leave failed stay out of the user's Prefect UI.
    home = tempfile.mkdtemp(prefix="roadshift-prefect-home-")
    config.stash[_PREFECT_HOME] = home
    patch.setenv("PREFECT_HOME", home)
    # Prefect attaches its console handler to the root logger when it is first imported,
    # writing to whatever sys.stderr is at that moment. Imported here, that is pytest's
    # capture for the whole session. Imported first inside a test that captures with capsys
    # (e.g. `roadshift label suggest` in-process), it would be that test's stream, closed
    # after it, and every later record (a GX INFO line in `data validate`) would fail to print
    # with a logging traceback: which tests hit it depended on the order files ran in.
    from prefect import flow  # noqa: F401  (the SDK entry point: sets up its logging)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _ENVIRONMENT in config.stash:
        config.stash[_ENVIRONMENT].undo()
    if _PREFECT_HOME in config.stash:
        shutil.rmtree(config.stash[_PREFECT_HOME], ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def no_outer_tracking() -> Iterator[None]:
    """No MLflow store or parent run leaks in from the shell: each test picks its own.

    Both are read only when a test configures tracking, so a fixture is early enough.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("ROADSHIFT_PARENT_RUN_ID", raising=False)
        yield


@pytest.fixture
def tiny_params() -> dict:
    return yaml.safe_load(yaml.safe_dump(TINY_PARAMS))


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server (temporary, SQLite) for every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
