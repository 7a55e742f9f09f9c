"""No load path runs code from the artifact store: a registered version is models-from-code
(data files plus roadshift's own model_code.py), and every file of it swapped for a live
pickle payload is refused or ignored, never unpickled, by roadshift's loader, `roadshift
predict` and MLflow's own `mlflow.pyfunc.load_model`. Real MLflow on SQLite, a tiny real model."""

from __future__ import annotations

import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from safetensors import SafetensorError

from roadshift.cli import main
from roadshift.registry.safe_load import UnsafeModelError, load_checked_model
from tests.helpers import CLASSES, make_model_dir, png_bytes, register_champion

NAME = "safe-road-signs"
URI = f"models:/{NAME}/1"


class Payload:
    """Unpickling this writes ``marker``: proof that a loader unpickled what it was given."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("safe-load")
    register_champion(root, NAME)
    yield root
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def artifacts(store) -> Path:
    """The registered version's files as the artifact store holds them (what an attacker edits)."""
    location = MlflowClient().get_model_version_download_uri(NAME, "1")
    folder = Path(location.removeprefix("file://"))
    assert (folder / "MLmodel").is_file(), location
    return folder


@pytest.fixture
def pristine(artifacts, tmp_path) -> Iterator[Path]:
    """Put the artifact store back as registered after each test."""
    backup = tmp_path / "backup"
    shutil.copytree(artifacts, backup)
    yield artifacts
    shutil.rmtree(artifacts)
    shutil.copytree(backup, artifacts)


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "unpickled.txt"


def every_file(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def loads_and_predicts(load) -> str:
    """'refused: ...' or 'loaded' (and then it predicts like a model)."""
    try:
        model = load()
    except (UnsafeModelError, MlflowException, SafetensorError, ValueError, OSError) as error:
        return f"refused: {type(error).__name__}"
    image = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    assert set(model.predict(image)["label"]) <= set(CLASSES)
    return "loaded"


def test_the_payload_is_live(marker):
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "unpickled"


def test_a_version_holds_data_files_and_roadshifts_model_code_only(artifacts):
    names = {p.relative_to(artifacts).as_posix() for p in every_file(artifacts)}
    assert "model_code.py" in names
    assert not [n for n in names if n.endswith((".pkl", ".pickle")) or n.startswith("code/")]
    assert {n.rsplit("/", 1)[-1] for n in names if n.startswith("artifacts/")} == {
        "model.json",
        "weights.safetensors",
    }
    conf = yaml.safe_load((artifacts / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in conf and conf["code"] is None


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(lambda: load_checked_model(URI), id="roadshift-loader"),
        pytest.param(lambda: mlflow.pyfunc.load_model(URI), id="mlflow-pyfunc"),
    ],
)
def test_each_file_swapped_for_a_pickle_payload_is_never_unpickled(pristine, marker, load):
    payload = pickle.dumps(Payload(marker))
    outcomes = {}
    for path in every_file(pristine):
        original = path.read_bytes()
        path.write_bytes(payload)
        outcomes[path.relative_to(pristine).as_posix()] = loads_and_predicts(load)
        path.write_bytes(original)
        assert not marker.exists(), f"{path.name} was unpickled"
    print("\n".join(f"{name}: {outcome}" for name, outcome in sorted(outcomes.items())))
    # The files the model is built from cannot be swapped unnoticed.
    for needed in ("MLmodel", "model_code.py"):
        assert outcomes[needed].startswith("refused"), outcomes


def test_every_file_swapped_at_once_is_refused_and_never_unpickled(pristine, marker):
    payload = pickle.dumps(Payload(marker))
    for path in every_file(pristine):
        path.write_bytes(payload)
    with pytest.raises(UnsafeModelError, match="MLmodel file is not readable YAML"):
        load_checked_model(URI)
    assert loads_and_predicts(lambda: mlflow.pyfunc.load_model(URI)).startswith("refused")
    assert not marker.exists()


def test_an_mlmodel_turned_into_a_cloudpickle_model_is_refused(pristine, marker, monkeypatch):
    """The attack that needs no broken file: a valid MLmodel naming a pickled python_model."""
    (pristine / "python_model.pkl").write_bytes(pickle.dumps(Payload(marker)))
    mlmodel = yaml.safe_load((pristine / "MLmodel").read_text())
    conf = mlmodel["flavors"]["python_function"]
    conf.pop("model_code_path")
    conf.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl")
    (pristine / "MLmodel").write_text(yaml.safe_dump(mlmodel))

    with pytest.raises(UnsafeModelError, match="not the models-from-code loader"):
        load_checked_model(URI)
    assert not marker.exists()
    # What docs/serving.md tells `mlflow models serve` users to set: MLflow then refuses too.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(MlflowException, match="pickle is disallowed"):
        mlflow.pyfunc.load_model(URI)
    assert not marker.exists()


def test_model_code_that_is_not_roadshifts_own_is_never_run(pristine, marker):
    (pristine / "model_code.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(UnsafeModelError, match=r"model_code\.py is not this roadshift's own"):
        load_checked_model(URI)
    assert not marker.exists()


def test_weights_other_than_the_registered_ones_are_refused(pristine, tmp_path):
    other = make_model_dir(tmp_path / "other", seed=7) / "weights.safetensors"
    (registered,) = pristine.glob("artifacts/*/weights.safetensors")
    shutil.copyfile(other, registered)
    with pytest.raises(UnsafeModelError, match="not the file registered"):
        load_checked_model(f"models:/{NAME}@champion")


def test_roadshift_predict_refuses_a_tampered_model_in_one_line(
    store, pristine, marker, tmp_path, monkeypatch, capsys
):
    (pristine / "model_code.py").write_bytes(pickle.dumps(Payload(marker)))
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump({"register": {"model_name": NAME}}))
    image = tmp_path / "sign.png"
    image.write_bytes(png_bytes(np.zeros((32, 32, 3), dtype=np.uint8)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri())

    code = main(["--root", str(project), "predict", str(image)])

    err = capsys.readouterr().err
    assert code == 2
    assert "refused to load" in err and "Traceback" not in err
    assert not marker.exists()


def test_logging_and_loading_raise_no_cloudpickle_or_type_hint_warning(store, tmp_path, capfd):
    model_dir = make_model_dir(tmp_path / "quiet", seed=3)
    from roadshift.registry.pyfunc import log_pyfunc_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mlflow.start_run(run_name="quiet"):
            info = log_pyfunc_model(model_dir)
        mlflow.pyfunc.load_model(info.model_uri)
    said = " ".join(str(w.message) for w in caught) + capfd.readouterr().err
    assert "CloudPickle" not in said
    assert "type hints" not in said
