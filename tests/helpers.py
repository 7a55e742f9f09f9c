"""What the tests share: tiny params, throwaway git+DVC projects, toy data and a tiny champion.

The one module that test modules (and tests/ddp_fit_worker.py) import helpers from; no test
module imports from another test module or from conftest.py, which holds fixtures only.

Libraries that read the environment when they are imported (albumentations, MLflow,
Prefect) are imported inside the functions that need them: conftest.py imports this
module before its ``pytest_configure`` sets the offline environment.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from roadshift.train.loaders import make_loader

PROJECT_ROOT = Path(__file__).resolve().parents[1]

AUGMENT_BASICS_OFF = dict(
    scale_min=1.0,
    rotate_limit=0,
    brightness_contrast=0.0,
    hue_saturation=0,
    blur_probability=0.0,
    noise_probability=0.0,
)
"""An augment section's crop, rotation, colour jitter, blur and noise all off, so a test sees
one augmentation alone."""

# What a project checkout needs for `dvc repro`: the pipeline definition and the
# stage sources that dvc.yaml lists as dependencies.
PROJECT_FILES = ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore")
PROJECT_DIRS = ("roadshift",)

TINY_PARAMS = {
    "base": {"seed": 7, "image_size": 32, "num_threads": 1},
    "synth": {
        "source_per_class": 10,
        "target_train_per_class": 4,
        "target_val_per_class": 2,
        "target_test_per_class": 3,
        "target_unlabeled_per_class": 2,
        "image_size": 32,
    },
    # dvc.yaml's prepare stage depends on the unlabelled pool's folder (DVC has no optional
    # deps), so a DVC test project names the one synthesize_dataset writes
    "data": {
        "target": {
            "path": "data/raw/target",
            "description": "Indian roads (IRC:67)",
            "unlabeled_path": "data/raw/target_unlabeled",
        }
    },
    "validate": {"min_images_per_class": 2},
    "pretrain": {"epochs": 2, "batch_size": 16, "lr": 0.003},
    # self-training runs on the pool: one epoch keeps the pipeline tests quick
    "finetune": {"epochs": 2, "batch_size": 16, "lr": 0.002, "self_training": {"epochs": 1}},
    "evaluate": {"batch_size": 64},
    # Two-epoch models near chance: whether transfer beats its baselines is a coin flip, and
    # these params test the pipeline's mechanics (tests/test_baseline_gates.py: the gates).
    "register": {"model_name": "tiny-road-signs", "require_beats_baselines": False},
}


# --- git and DVC projects --------------------------------------------------------------------


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()


def venv_environment() -> dict[str, str]:
    """The environment for a subprocess: this test session's, with the venv's tools first."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def make_project(root: Path, params: dict) -> Path:
    """A fresh git repo holding the pipeline definition, tiny params and tiny synthetic data."""
    from roadshift.config import params_to_dict, parse_params
    from roadshift.data.synth import synthesize_dataset

    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROJECT_ROOT / name, root / name)
    for name in PROJECT_DIRS:
        shutil.copytree(
            PROJECT_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    parsed = parse_params(params)
    # DVC reads each stage's params sections from the file itself: write them all out.
    (root / "params.yaml").write_text(yaml.safe_dump(params_to_dict(parsed), sort_keys=False))
    synthesize_dataset(root / "data" / "raw", parsed.synth, seed=parsed.base.seed)
    return commit_everything(root, "tiny project")


def commit_everything(root: Path, message: str) -> Path:
    """Make ``root`` a git repository if it is not one, and commit all of it."""
    if not (root / ".git").exists():
        git(root, "init", "-q", "-b", "main")
        git(root, "config", "user.name", "roadshift tests")
        git(root, "config", "user.email", "tests@roadshift.invalid")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)
    return root


# --- `roadshift run` as a process ------------------------------------------------------------


def start_run(root: Path, tmpdir: Path) -> subprocess.Popen:
    """``roadshift run`` in ``root`` as its own process; its temporary folders go under
    ``tmpdir``, so a test can see whether any are left."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = {**venv_environment(), "TMPDIR": str(tmpdir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        ["roadshift", "run"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def process_tree(pid: int) -> list:
    """``pid`` and every descendant (psutil.Process objects)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def wait_for_stage(run: subprocess.Popen, timeout: float = 300) -> list:
    """Wait until the run has a ``roadshift stage`` process; the run's whole tree then."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.poll() is None, "the run ended before a stage started"
        tree = process_tree(run.pid)
        for process in tree:
            try:
                if "stage" in process.cmdline():
                    return tree
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no stage started within {timeout} s")


def still_running(processes: list, timeout: float = 30) -> list[str]:
    """Those of ``processes`` still alive after ``timeout`` seconds (zombies count as ended)."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{process.pid} {' '.join(process.cmdline())}")
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


# --- a toy problem for the training loop -----------------------------------------------------


class Blobs(Dataset):
    """Two Gaussian blobs in 8-d: learnable in a few epochs by a tiny network."""

    def __init__(self, n: int, seed: int, poison: bool = False) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.targets = torch.arange(n) % 2
        self.inputs = torch.randn(n, 8, generator=generator) + 2.0 * self.targets[:, None]
        if poison:
            self.inputs[3, 0] = float("nan")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i], self.targets[i]


def tiny_net(seed: int = 0, batchnorm: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(8, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2)]
    return nn.Sequential(*layers)


def loaders(seed: int = 0, poison: bool = False):
    train = make_loader(Blobs(64, 1, poison), 16, shuffle=True, seed=seed)
    val = make_loader(Blobs(32, 2), 32, shuffle=False, seed=seed)
    return train, val


# --- a tiny registered champion --------------------------------------------------------------

CLASSES = ("stop", "give_way", "no_entry")


def make_model_dir(path: Path, seed: int = 0) -> Path:
    """A tiny model whose output depends on the image, so mixed-up rows would show.

    mobilenet_v3_small fresh from random init gives every image the same probabilities (its
    BatchNorm statistics fit no input); statistics taken from one batch of noise fix that.
    """
    from roadshift.data.transforms import create_eval_transform
    from roadshift.train.models import ModelSpec, create_model, save_model_dir

    torch.manual_seed(seed)
    model = create_model("mobilenet_v3_small", len(CLASSES))
    spec = ModelSpec("mobilenet_v3_small", CLASSES, image_size=32)
    transform = create_eval_transform(spec.image_size, spec.mean, spec.std)
    noise = np.random.default_rng(seed).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.stack([transform(image=image)["image"] for image in noise]))
    return save_model_dir(model.eval(), spec, path)


def register_champion(root: Path, name: str) -> str:
    """Point MLflow at a SQLite store under ``root``, register a tiny champion; its URI."""
    import mlflow

    from roadshift.config import RegisterSection, parse_params
    from roadshift.registry.register import register_model_dir
    from roadshift.registry.tags import CHAMPION
    from roadshift.tracking import configure_tracking

    configure_tracking(parse_params({"tracking": {"experiment": "predict-tests"}}), root)
    with mlflow.start_run(run_name="register"):
        result = register_model_dir(
            make_model_dir(root / "models" / "tiny"),
            {"target_macro_f1": 0.6},
            {},
            RegisterSection(model_name=name),
        )
    assert CHAMPION in result.aliases
    return mlflow.get_tracking_uri()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A real, valid RGB PNG of ``width`` x ``height`` black pixels, compressed row by row:
    a 12000 x 12000 one is about 420 KB on disk and 432 MB decoded (a decompression bomb),
    made without ever holding its pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    compressor = zlib.compressobj(9)
    row = bytes(1 + 3 * width)  # filter byte 0, then black pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- browser checks

# Debian's chromium (installed by .ci/run), driven by Playwright; no browser download.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
)
UI_START_TIMEOUT_S = 240


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, log: Path) -> None:
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + UI_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args[0]} exited: {log.read_text(errors='replace')[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no answer from {url} in {UI_START_TIMEOUT_S} s")


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to a server's own process group (it and what it started), SIGKILL if it lingers."""
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass


def start_ui(command: list[str], health_url: str, log: Path, env: dict[str, str] | None = None):
    """A server started in its own process group; stop it with ``stop_ui``."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command,
            env={**venv_environment(), **(env or {})},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for(health_url, process, log)
    except BaseException:
        stop_process_group(process)
        raise
    return process


stop_ui = stop_process_group


def start_mlflow_ui(root: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on the project's store (mlruns/mlflow.db), 127.0.0.1, a free port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{Path(root) / 'mlruns' / 'mlflow.db'}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    return start_ui(command, f"{url}/health", log), url


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))


# --- a project with a champion, and a webhook that records what it receives --------------------


def champion_project(root: Path, params: dict) -> Path:
    """``make_project`` (git, DVC, tiny synthetic data) with a tiny champion registered in its
    own MLflow store, under ``params``' model name."""
    make_project(root, params)
    register_champion(root, params["register"]["model_name"])
    return root


class WebhookReceiver:
    """A local HTTP endpoint that keeps every JSON body POSTed to it (``received``)."""

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, HTTPServer

        received: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.received = received
        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def save_block(self, name: str) -> str:
        """A Prefect Webhook block calling this endpoint (needs a Prefect API); its name."""
        from prefect.blocks.webhook import Webhook

        Webhook(method="POST", url=self.url, allow_private_urls=True).save(name, overwrite=True)
        return name

    def close(self) -> None:
        self.server.shutdown()
