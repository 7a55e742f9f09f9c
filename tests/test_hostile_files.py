"""Hostile and careless files (issue 18, items 2, 3, 4, 8): every image decode is guarded,
links and special files never enter a data version, a refused tree keeps its old version,
and prediction applies training's rules.

Each fault is a RoadshiftError naming the file (or the request row); the CLI prints it as
one message and exits 2. Tests that could hang if a guard failed (a FIFO, ``/dev/zero``)
run in a subprocess with a timeout instead of asserting on time.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from roadshift.cli import main
from roadshift.config import Params, PrepareSection, load_params
from roadshift.data.images import (
    REDUCED_SIDE,
    ImageLimits,
    ImageRefusedError,
    decode_image_bytes,
    decode_image_file,
)
from roadshift.data.manifest import (
    CorruptImageError,
    UnsafeFileError,
    build_manifest,
)
from roadshift.data.versioning import DataVersionRefusedError
from roadshift.errors import RoadshiftError
from tests.helpers import (
    PROJECT_ROOT,
    make_project,
    png_bytes,
    png_declaring,
    venv_environment,
)

SUBPROCESS_TIMEOUT_S = 300  # bounds a hang on a busy machine; not a timing assertion
BOMB_SIDE = 12000


def noise(side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def jpeg_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def good_tree(domain_dir: Path) -> Path:
    for i in range(2):
        path = domain_dir / "stop" / f"good_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(noise(16, i)))
    return domain_dir


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**venv_environment(), "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


# --- item 2: the guarded decode ----------------------------------------------------------------


def test_a_small_png_declaring_12000px_is_refused_before_any_pixel_is_decoded():
    bomb = png_declaring(BOMB_SIDE, BOMB_SIDE)
    assert len(bomb) < 1_000_000  # a small file ...

    with pytest.raises(ImageRefusedError) as caught:
        decode_image_bytes(bomb, "row 0", ImageLimits())

    assert isinstance(caught.value, RoadshiftError)
    assert str(caught.value).startswith("row 0: declares 12000x12000 = 144000000 pixels")
    assert "prepare.image_limits.max_pixels" in str(caught.value)


def test_prepare_names_a_bomb_and_an_oversized_file_among_good_images(tmp_path):
    domain = good_tree(tmp_path / "target")
    (domain / "stop" / "bomb.png").write_bytes(png_declaring(BOMB_SIDE, BOMB_SIDE))
    (domain / "stop" / "big.png").write_bytes(png_bytes(noise(64)))
    cfg = PrepareSection(image_limits={"max_file_bytes": 5000})

    with pytest.raises(CorruptImageError) as caught:
        build_manifest(domain, "target", cfg, tmp_path)

    reasons = {p.path.name: p.reason for p in caught.value.problems}
    assert set(reasons) == {"bomb.png", "big.png"}
    assert "prepare.image_limits.max_file_bytes = 5000" in reasons["big.png"]


def test_large_images_decode_reduced_and_keep_their_declared_size():
    jpeg = decode_image_bytes(jpeg_bytes(4000, 3000), "photo.jpg", ImageLimits())
    png = decode_image_bytes(png_declaring(2100, 900), "wide.png", ImageLimits())

    assert (jpeg.width, jpeg.height) == (4000, 3000)
    assert jpeg.rgb.shape == (REDUCED_SIDE, REDUCED_SIDE, 3)
    assert (png.width, png.height) == (2100, 900)
    assert png.rgb.shape == (900, REDUCED_SIDE, 3)  # a side under the limit is kept


def test_fifos_devices_and_links_to_dev_zero_are_refused_by_name_without_blocking(tmp_path):
    """In a subprocess with a timeout: a guard that opened the FIFO would hang, one that
    read /dev/zero would run out of memory; neither may happen."""
    tree = good_tree(tmp_path / "target")
    os.mkfifo(tree / "stop" / "pipe.png")
    (tree / "stop" / "zero.png").symlink_to("/dev/zero")
    done = run_python(
        f"""
        from pathlib import Path
        from roadshift.data.images import ImageLimits, ImageRefusedError, decode_image_file
        for path in ["{tree}/stop/pipe.png", "{tree}/stop/zero.png", "/dev/zero"]:
            try:
                decode_image_file(Path(path), ImageLimits())
            except ImageRefusedError as refused:
                print(refused)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert (
        lines[0]
        == f"{tree}/stop/pipe.png: a FIFO (named pipe), not a regular image file; remove it"
    )
    assert lines[1].startswith(f"{tree}/stop/zero.png: a link to /dev/zero, which is a character")
    assert lines[2].startswith("/dev/zero: a character device")


def test_data_validate_names_a_fifo_and_a_dev_zero_link_and_finishes(tmp_path):
    tree = good_tree(tmp_path / "target")
    os.mkfifo(tree / "stop" / "pipe.png")
    (tree / "stop" / "zero.png").symlink_to("/dev/zero")
    done = subprocess.run(
        [sys.executable, "-m", "roadshift", "--root", str(tmp_path), "data", "validate", str(tree)],
        cwd=tmp_path,
        env={**venv_environment(), "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{tree}/stop/pipe.png: a FIFO (named pipe)" in done.stdout
    assert f"{tree}/stop/zero.png: a symbolic link to /dev/zero" in done.stdout
    assert "Traceback" not in done.stderr


# --- item 3: links in data folders, data add ---------------------------------------------------


def test_links_in_a_domain_tree_are_refused_by_name_before_anything_is_read(tmp_path):
    project = tmp_path / "project"
    domain = good_tree(project / "data/raw/target")
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(png_bytes(noise(16, 5)))
    (domain / "stop" / "leak.png").symlink_to(secret)
    (domain / "give_way").symlink_to(domain / "stop", target_is_directory=True)

    with pytest.raises(UnsafeFileError) as caught:
        build_manifest(domain, "target", PrepareSection(), project)

    message = str(caught.value)
    assert f"{domain}/give_way: a symbolic link to {domain}/stop;" in message
    assert f"{domain}/stop/leak.png: a symbolic link to {secret} (outside the project)" in message


@pytest.fixture
def project(tmp_path, tiny_params) -> Path:
    return make_project(tmp_path / "project", tiny_params)


def _data_add(project: Path, incoming: Path, capsys) -> tuple[int, str]:
    code = main(["--root", str(project), "data", "add", "target", str(incoming)])
    return code, capsys.readouterr().err


def test_data_add_refuses_a_link_to_an_outside_file_and_copies_nothing(project, tmp_path, capsys):
    outside = tmp_path / "shadow"
    outside.write_text("root:$6$secret\n")
    incoming = tmp_path / "inc"
    (incoming / "stop").mkdir(parents=True)
    (incoming / "stop" / "x.png").symlink_to(outside)

    code, err = _data_add(project, incoming, capsys)

    assert code == 2
    assert f"{incoming}/stop/x.png: a symbolic link to {outside} (outside the project)" in err
    assert "Traceback" not in err
    assert not (project / "data/raw/target/train/stop/x.png").exists()
    assert not (project / "data/raw/target.dvc").exists()


def test_data_add_checks_every_file_first_and_copies_nothing_unless_all_pass(
    project, tmp_path, capsys
):
    incoming = tmp_path / "inc"
    (incoming / "stop").mkdir(parents=True)
    (incoming / "stop" / "good.png").write_bytes(png_bytes(noise(32)))
    (incoming / "stop" / "notes.png").write_text("a text file\n")
    (incoming / "stop" / "half.jpg").write_bytes(jpeg_bytes(64, 64)[:300])
    Image.fromarray(noise(32)).save(incoming / "stop" / "anim.png", format="GIF")

    code, err = _data_add(project, incoming, capsys)

    assert code == 2
    assert err.startswith("roadshift: 3 incoming file(s) failed")
    assert f"{incoming}/stop/notes.png: not an image Pillow can read" in err
    assert f"{incoming}/stop/half.jpg: truncated or damaged image data" in err
    assert f"{incoming}/stop/anim.png: holds GIF data (extension .png)" in err
    assert "Traceback" not in err
    assert not any((project / "data/raw/target/train/stop").glob("good.png"))
    assert not (project / "data/raw/target.dvc").exists()


# --- items 3 and 4: what DVC versions is what prepare reads; refused trees keep their version --


def _dvc_files(project: Path, folder: str) -> set[str]:
    """The files of the committed data version, as ``dvc ls`` lists them (DVC's own view)."""
    done = subprocess.run(
        ["dvc", "ls", "-R", "--dvc-only", "--json", "--rev", "HEAD", ".", folder],
        cwd=project,
        env={**venv_environment(), "DVC_NO_ANALYTICS": "1"},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return {f"{folder}/{entry['path']}" for entry in json.loads(done.stdout)}


def test_the_manifest_lists_exactly_the_images_of_the_dvc_version(project):
    from tasks.dvc import version_data
    from tests.helpers import commit_everything

    params = load_params(project / "params.yaml")
    version_data.fn(project, params)
    commit_everything(project, "data versions")

    manifest = build_manifest(project / "data/raw/target", "target", params.prepare, project)

    assert set(manifest["path"]) == _dvc_files(project, "data/raw/target")


def _bomb(project: Path) -> None:
    (project / "data/raw/target/train/stop/bomb.png").write_bytes(png_declaring(12000, 12000))


def _empty(project: Path) -> None:
    shutil.rmtree(project / "data/raw/target")
    (project / "data/raw/target").mkdir()


def _linked_file(project: Path) -> None:
    donor = next((project / "data/raw/source/train/stop").glob("*.png"))
    (project / "data/raw/target/train/stop/linked.png").symlink_to(donor)


REFUSED_TREES = {
    "bomb": (_bomb, "data/raw/target/train/stop/bomb.png: declares 12000x12000"),
    "empty": (_empty, "data/raw/target: no images"),
    "linked_file": (_linked_file, "data/raw/target/train/stop/linked.png: a symbolic link"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED_TREES))
def test_a_refused_tree_stops_the_run_and_keeps_the_previous_pointer(project, kind):
    from tasks.dvc import version_data

    params = load_params(project / "params.yaml")
    version_data.fn(project, params)
    pointer = project / "data/raw/target.dvc"
    before = pointer.read_bytes()
    spoil, named = REFUSED_TREES[kind]
    spoil(project)

    with pytest.raises(DataVersionRefusedError) as caught:
        version_data.fn(project, params)

    assert named in str(caught.value)
    assert f"{pointer} keeps its previous version" in str(caught.value)
    assert pointer.read_bytes() == before


# --- item 8: predict and the served model apply training's rules ------------------------------


def test_prediction_refuses_a_1x1_image_and_gif_data_named_png(tmp_path):
    limits = ImageLimits.for_prediction(Params())
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(png_bytes(noise(1)))
    gif = tmp_path / "gif.png"
    Image.fromarray(noise(32)).save(gif, format="GIF")

    with pytest.raises(ImageRefusedError, match=r"tiny\.png: 1x1 px; sides must be 16 to 8192"):
        decode_image_file(tiny, limits)
    with pytest.raises(ImageRefusedError, match=r"gif\.png: holds GIF data"):
        decode_image_file(gif, limits)
    gif_bytes = gif.read_bytes()
    with pytest.raises(ImageRefusedError, match=r"^row 3: holds GIF data, not one of"):
        decode_image_bytes(gif_bytes, "row 3", limits)


SERVED_ROWS = 50
BOMB_REQUEST_BOUND_MB = 50  # nothing may be decoded: the rows are refused from their headers
LARGE_REQUEST_BOUND_MB = 400  # 50 x 6000x4000 photos: ~3.6 GB decoded whole; reduced ~160 MB

SERVED_MODEL_DRIVER = """
import contextlib, io, json, resource, sys
import mlflow, pandas as pd
from roadshift.cli import main
from tests.helpers import png_bytes, png_declaring, register_champion
from tests.test_hostile_files import jpeg_bytes, noise

root, name, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
register_champion(__import__("pathlib").Path(root), name)
model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
model.predict(pd.DataFrame({"image": [png_bytes(noise(32))]}))  # imports and first call done


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


report = {"base_mb": peak_mb()}
bomb = png_declaring(12000, 12000)
try:
    model.predict(pd.DataFrame({"image": [bomb] * rows}))
    report["bomb_error"] = None
except Exception as error:  # the served model's 400: MLflow's BAD_REQUEST exception
    report["bomb_error"] = str(error)
report["after_bomb_mb"] = peak_mb()
photo = jpeg_bytes(6000, 4000)
report["large_rows"] = len(model.predict(pd.DataFrame({"image": [photo] * rows})))
report["after_large_mb"] = peak_mb()

out, err = io.StringIO(), io.StringIO()
with open(f"{root}/tiny.png", "wb") as handle:
    handle.write(png_bytes(noise(1)))
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main(["--root", root, "predict", f"{root}/tiny.png", "--model",
                 f"models:/{name}@champion"])
report["cli"] = {"rc": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(report))
"""


@pytest.mark.slow
def test_the_served_model_refuses_50_bomb_rows_and_decodes_50_large_photos_in_bounded_memory(
    tmp_path,
):
    """The registered pyfunc, loaded from the registry in a fresh process (what `mlflow
    models serve` runs per request), measured by its peak RSS (getrusage)."""
    env = {**venv_environment(), "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SERVED_MODEL_DRIVER, str(tmp_path), "hostile", str(SERVED_ROWS)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.splitlines()[-1])
    print(report)

    assert report["bomb_error"].startswith("row 0: declares 12000x12000")
    assert report["after_bomb_mb"] - report["base_mb"] < BOMB_REQUEST_BOUND_MB
    assert report["large_rows"] == SERVED_ROWS
    assert report["after_large_mb"] - report["base_mb"] < LARGE_REQUEST_BOUND_MB
    cli = report["cli"]
    assert cli["rc"] == 2
    assert cli["stderr"].strip() == (
        f"roadshift: predict: {tmp_path}/tiny.png: 1x1 px; sides must be 16 to 8192 px "
        "(validate.min_image_side / validate.max_image_side), as for training images "
        "(fix or remove the file, or pass --skip-bad to skip such files)"
    )
