"""Loading a registered version without running code or unpickling data from the artifact store.

Whoever can write the artifact store must not be able to run code wherever a model loads. A
version is models-from-code (``roadshift.registry.pyfunc``): MLflow builds it by running the
``model_code.py`` logged beside the weights. So before MLflow sees a version, this module
downloads it into a private folder and checks it there: ``MLmodel`` (read as YAML, never
unpickled) names exactly that one loader, no pickled object and no code folder; the code file
is byte for byte the installed roadshift's own; the weights are the ones registered (their
sha256 against the version's ``weights.sha256`` tag, which lives in the tracking database, not
the artifact store). Only then does ``mlflow.pyfunc.load_model`` load that checked folder.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import yaml

from roadshift.errors import RoadshiftError

# Constants only: prediction loads models without importing torch or the model code itself.
from roadshift.registry.tags import (
    MODEL_CODE_FILE_NAME,
    MODEL_DIR_ARTIFACT,
    WEIGHTS_FILE_NAME,
    WEIGHTS_TAG,
)

# The pyfunc loader MLflow records for a models-from-code model, and the only one accepted.
CODE_MODEL_LOADER = "mlflow.pyfunc.loaders.code_model"
PYFUNC_FLAVOR = "python_function"
MODEL_CODE_FILE = Path(__file__).with_name(MODEL_CODE_FILE_NAME)
_CHUNK = 1 << 20
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))$")


class UnsafeModelError(RoadshiftError):
    """A model's files are not what roadshift logs; loading it could run someone else's code."""


def _refuse(uri: str, problem: str) -> UnsafeModelError:
    return UnsafeModelError(
        f"{uri}: refused to load: {problem}. The artifact store holds files roadshift did not "
        "write; check who can write it, then register the model again from its run "
        "(`roadshift run`) or load another version with --model models:/<name>/<version>"
    )


def _read_mlmodel(folder: Path, uri: str) -> dict[str, Any]:
    try:
        text = (folder / "MLmodel").read_text(encoding="utf-8")
        mlmodel = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise _refuse(
            uri, f"its MLmodel file is not readable YAML ({type(error).__name__})"
        ) from None
    if not isinstance(mlmodel, dict) or not isinstance(mlmodel.get("flavors"), dict):
        raise _refuse(uri, "its MLmodel file has no flavors mapping")
    return mlmodel


def _inside(folder: Path, relative: object, uri: str, what: str) -> Path:
    if not isinstance(relative, str):
        raise _refuse(uri, f"MLmodel gives {what} as {type(relative).__name__}, not a path")
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise _refuse(uri, f"MLmodel points {what} outside the model folder ({relative!r})")
    return path


def check_model_folder(folder: Path, uri: str) -> Path:
    """Refuse a downloaded model folder that is not exactly what roadshift logs; its model dir.

    Reads data only: YAML, bytes to compare, never a pickle and never the code it checks.
    """
    folder = Path(folder)
    flavors = _read_mlmodel(folder, uri)["flavors"]
    if set(flavors) != {PYFUNC_FLAVOR}:
        raise _refuse(uri, f"it has flavors {sorted(flavors)}, not only {PYFUNC_FLAVOR!r}")
    conf = flavors[PYFUNC_FLAVOR]
    if not isinstance(conf, dict) or conf.get("loader_module") != CODE_MODEL_LOADER:
        loader = conf.get("loader_module") if isinstance(conf, dict) else None
        raise _refuse(uri, f"its loader is {loader!r}, not the models-from-code loader")
    if conf.get("python_model") is not None or conf.get("code") is not None:
        raise _refuse(uri, "it carries a pickled model or a code folder")
    code_path = conf.get("model_code_path")
    if not isinstance(code_path, str) or Path(code_path).name != MODEL_CODE_FILE.name:
        raise _refuse(uri, f"its model code file is {code_path!r}, not {MODEL_CODE_FILE.name}")
    code = folder / MODEL_CODE_FILE.name
    if not code.is_file() or code.read_bytes() != MODEL_CODE_FILE.read_bytes():
        raise _refuse(uri, f"its {MODEL_CODE_FILE.name} is not this roadshift's own")
    artifacts = conf.get("artifacts")
    if not isinstance(artifacts, dict) or set(artifacts) != {MODEL_DIR_ARTIFACT}:
        raise _refuse(uri, f"its artifacts are not exactly {MODEL_DIR_ARTIFACT!r}")
    entry = artifacts[MODEL_DIR_ARTIFACT]
    relative = entry.get("path") if isinstance(entry, dict) else None
    return _inside(folder, relative, uri, "the model folder")


def _check_model_json(model_dir: Path, uri: str) -> None:
    try:
        spec = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _refuse(
            uri, f"its model.json is not readable JSON ({type(error).__name__})"
        ) from None
    if not isinstance(spec, dict):
        raise _refuse(uri, "its model.json is not a JSON object")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def registered_weights_sha256(uri: str) -> str | None:
    """The ``weights.sha256`` tag of the version a ``models:/`` URI names (None for other URIs)."""
    match = _REGISTRY_URI.match(uri)
    if match is None:
        return None
    client = mlflow.MlflowClient()
    if match["version"] is not None:
        version = client.get_model_version(match["name"], match["version"])
    else:
        version = client.get_model_version_by_alias(match["name"], match["alias"])
    return version.tags.get(WEIGHTS_TAG)


def load_checked_model(uri: str, *, suppress_warnings: bool = False) -> Any:
    """``mlflow.pyfunc.load_model`` of ``uri`` after ``check_model_folder`` passed on its files.

    MLflow's own errors (no such version or alias, unreachable store) pass through as
    ``MlflowException``; files that are not roadshift's raise ``UnsafeModelError``.
    """
    expected_sha256 = registered_weights_sha256(uri)
    with tempfile.TemporaryDirectory(prefix="roadshift-model-") as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        model_dir = check_model_folder(folder, uri)
        _check_model_json(model_dir, uri)
        weights = model_dir / WEIGHTS_FILE_NAME
        if expected_sha256 is not None and (
            not weights.is_file() or _sha256(weights) != expected_sha256
        ):
            raise _refuse(
                uri, f"its {WEIGHTS_FILE_NAME} is not the file registered (sha256 differs)"
            )
        # The weights are read into memory here: the folder may go once this returns.
        return mlflow.pyfunc.load_model(str(folder), suppress_warnings=suppress_warnings)
