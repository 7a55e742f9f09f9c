"""PNG screenshots of the MLflow runs page, the registered model page and the Prefect flow run
page of a project that has run the pipeline, taken in Debian's headless chromium.

    make screenshots            # this checkout: run `make run` first
    PYTHONPATH=. .venv/bin/python docs/screenshots.py --root . --out docs/img

Starts `mlflow server` on the project's store and `prefect server start` on its PREFECT_HOME,
each on 127.0.0.1 and a free port, and stops both afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import mlflow
import yaml
from playwright.sync_api import sync_playwright

from tests.helpers import free_port, launch_chromium, start_mlflow_ui, start_ui, stop_ui

VIEWPORT = {"width": 1600, "height": 1000}
SETTLE_MS = 5000  # the UIs render after their API calls return


def _model_name(root: Path) -> str:
    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    return params.get("register", {}).get("model_name", "roadshift-road-signs")


def _close_assistant(page) -> None:
    """MLflow 3.17 opens an assistant panel over the page; close it if present."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def mlflow_pages(root: Path, out: Path, browser) -> list[Path]:
    server, url = start_mlflow_ui(root, out / ".mlflow-ui.log")
    try:
        client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string="tags.`roadshift.stage` = 'pipeline'",
            max_results=1,
        )
        if not runs:
            sys.exit(f"{root}: no pipeline run in its MLflow store; run the pipeline first")
        experiment_id = runs[0].info.experiment_id
        page = browser.new_page(viewport=VIEWPORT)
        shots = []
        for path, name in (
            (f"/#/experiments/{experiment_id}/runs", "mlflow-runs.png"),
            (f"/#/models/{_model_name(root)}", "mlflow-registered-model.png"),
        ):
            page.goto(url + path)
            page.wait_for_timeout(SETTLE_MS)
            _close_assistant(page)
            page.wait_for_timeout(500)
            page.screenshot(path=out / name)
            shots.append(out / name)
        return shots
    finally:
        stop_ui(server)


def prefect_page(root: Path, out: Path, browser) -> Path:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(root / ".prefect")),
        # the UI calls the API at this address (default: port 4200, not the free one above)
        "PREFECT_SERVER_UI_API_URL": f"{url}/api",
    }
    command = [
        str(Path(sys.executable).parent / "prefect"),
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = start_ui(command, f"{url}/api/health", out / ".prefect-ui.log", env)
    try:
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(f"{url}/runs")
        page.wait_for_timeout(SETTLE_MS)
        link = page.locator("a[href*='/runs/flow-run/']").first
        if link.count():
            link.click()
            page.wait_for_timeout(SETTLE_MS)
        page.screenshot(path=out / "prefect-flow-run.png")
        return out / "prefect-flow-run.png"
    finally:
        stop_ui(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    root, out = args.root.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        shots = [*mlflow_pages(root, out, browser), prefect_page(root, out, browser)]
        browser.close()
    for shot in shots:
        print(shot)


if __name__ == "__main__":
    main()
