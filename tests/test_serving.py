"""The champion behind MLflow's own scoring server: `mlflow models serve` as a real subprocess on a
free local port, fed base64 PNGs over HTTP exactly as the README's curl command sends them."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import (
    CLASSES,
    PROJECT_ROOT,
    png_bytes,
    register_champion,
    stop_process_group,
    venv_environment,
)

from roadshift.registry.register import load_champion

pytestmark = [pytest.mark.slow, pytest.mark.integration]

NAME = "serve-road-signs"
# Model download, uvicorn start and the pyfunc's imports (torch, albumentations) on a busy
# 2-core machine take 10-30 s; the limit only bounds a server that never comes up.
START_TIMEOUT_S = 300
README_PORT = 5001
# The README's command, character for character, except for the port.
CURL_COMMAND = (
    "curl -s http://127.0.0.1:{port}/invocations -H 'Content-Type: application/json' \\\n"
    '  -d "{{\\"dataframe_split\\": {{\\"columns\\": [\\"image\\"], '
    '\\"data\\": [[\\"$(base64 -w0 sign.png)\\"]]}}}}"'
)


def payload(*images: bytes) -> bytes:
    """The JSON the scoring server turns into a DataFrame with one base64 text cell per image.

    The logged signature has no input schema, so the server leaves the text as text and
    RoadSignClassifier decodes base64 itself.
    """
    rows = [[base64.b64encode(image).decode("ascii")] for image in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


def post(url: str, body: bytes) -> dict:
    request = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _log_tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def wait_for_ping(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{_log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"no /ping answer from {url} within {START_TIMEOUT_S} s:\n{_log_tail(log)}")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[tuple[Path, str]]:
    root = tmp_path_factory.mktemp("serving")
    uri = register_champion(root, NAME)
    yield root, uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def server(store) -> Iterator[str]:
    root, tracking_uri = store
    url = f"http://127.0.0.1:{free_port()}"
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{NAME}@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        url.rsplit(":", 1)[1],
    ]
    log = root / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command,
            cwd=root,
            env={
                **venv_environment(),
                "MLFLOW_TRACKING_URI": tracking_uri,
                "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",  # as docs/serving.md says
            },
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_ping(url, process, log)
        yield url
    finally:
        stop_process_group(process)


@pytest.fixture(scope="module")
def signs() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    red = np.zeros((40, 40, 3), dtype=np.uint8)
    red[..., 0] = 220
    return [red, rng.integers(0, 256, size=(30, 52, 3), dtype=np.uint8)]


def test_the_server_predicts_like_the_registered_model(server, signs):
    answer = post(server, payload(*(png_bytes(image) for image in signs)))

    served = pd.DataFrame(answer["predictions"])
    assert list(served.columns) == ["label", *(f"prob_{c}" for c in CLASSES)]
    assert set(served["label"]) <= set(CLASSES)
    np.testing.assert_allclose(served.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-6)
    champion = load_champion(NAME)
    expected = pd.concat([champion.predict(image) for image in signs], ignore_index=True)
    assert list(served["label"]) == list(expected["label"])
    np.testing.assert_allclose(served.iloc[:, 1:], expected.iloc[:, 1:], atol=1e-5)


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("base64")), reason="no curl")
def test_the_readme_curl_command_gets_the_same_answer(server, signs, tmp_path):
    (tmp_path / "sign.png").write_bytes(png_bytes(signs[0]))
    command = CURL_COMMAND.format(port=server.rsplit(":", 1)[1])
    done = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == post(server, payload(png_bytes(signs[0])))


def test_the_serving_guide_documents_that_command():
    guide = (PROJECT_ROOT / "docs" / "serving.md").read_text()
    assert CURL_COMMAND.format(port=README_PORT) in guide


def test_bytes_that_are_not_an_image_get_a_400_naming_the_row_and_no_server_paths(server, store):
    with pytest.raises(urllib.error.HTTPError) as refused:
        post(server, payload(b"not an image"))
    assert refused.value.code == 400
    text = refused.value.read().decode()
    body = json.loads(text)
    assert body["error_code"] == "BAD_REQUEST"
    assert "row 0: bytes are not an image Pillow can decode" in body["message"]
    # No traceback, so nothing of the server's file system: not its store, venv or code.
    assert "stack_trace" not in body and "Traceback" not in text
    for server_path in (str(store[0]), sys.prefix, str(PROJECT_ROOT), "site-packages", ".py"):
        assert server_path not in text
