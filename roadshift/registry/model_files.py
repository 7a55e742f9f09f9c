"""A registered version's roadshift model folder, for work the pyfunc's predictions cannot do.

Shift monitoring and label suggestions need the champion's embeddings (the head's input), not
only its probabilities. Every registered pyfunc carries the model folder it was logged from as
its ``model_dir`` artifact (``roadshift.registry.pyfunc.log_pyfunc_model``); this downloads the
version and finds that folder through the MLmodel file, whatever the pyfunc class looks like.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from roadshift.errors import RoadshiftError
from roadshift.registry.aliases import alias_version, existing_version
from roadshift.registry.tags import CHAMPION

MODEL_DIR_ARTIFACT = "model_dir"


class RegisteredModelError(RoadshiftError):
    """No such registered version, or one without a roadshift model folder."""


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    model_dir: Path
    tags: dict[str, str]
    model_id: str | None = None  # the version's MLflow 3 logged model, where it has one

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


def resolve_version(client: MlflowClient, name: str, version: str | None) -> ModelVersion:
    """``version`` (``3`` or ``v3``), or the champion when None."""
    if version is not None:
        return existing_version(client, name, version)
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        raise RegisteredModelError(
            f"{name!r} has no champion in {client.tracking_uri}: run the pipeline "
            "(`roadshift run`) or name a version with --model-version N"
        )
    return champion


def model_dir_of(local_model: Path) -> Path:
    """The ``model_dir`` artifact inside a downloaded pyfunc model."""
    from mlflow.models import Model

    flavor = Model.load(str(local_model)).flavors.get("python_function", {})
    artifacts = flavor.get("artifacts") or {}
    entry = artifacts.get(MODEL_DIR_ARTIFACT)
    if not entry or "path" not in entry:
        raise RegisteredModelError(
            f"{local_model}: the logged model has no {MODEL_DIR_ARTIFACT!r} artifact; "
            "it was not logged by roadshift (log_pyfunc_model)"
        )
    return Path(local_model) / entry["path"]


def download_registered_model(name: str, version: str | None, destination: Path) -> RegisteredModel:
    """The version (champion by default) downloaded to ``destination``, with its tags."""
    import mlflow

    client = MlflowClient()
    found = resolve_version(client, name, version)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{found.version}", dst_path=str(destination)
    )
    return RegisteredModel(
        name,
        str(found.version),
        model_dir_of(Path(local)),
        dict(found.tags),
        getattr(found, "model_id", None),
    )
