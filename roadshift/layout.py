"""Where each stage reads and writes, relative to the project root.

dvc.yaml names the same paths; keeping them in one place stops the CLI, the
flows and the tests from drifting apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from roadshift.config import UNLABELED_POOL

if TYPE_CHECKING:
    from roadshift.config import TrackingSection

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def prepared_dir(self) -> Path:
        return self.root / "data" / "prepared"

    def manifest(self, domain: str) -> Path:
        return self.prepared_dir / f"{domain}.csv"

    def validated_manifest(self, domain: str) -> Path:
        """A manifest copied here only after it passed validation; training reads these."""
        return self.root / "data" / "validated" / f"{domain}.csv"

    @property
    def unlabeled_manifest(self) -> Path:
        """The unlabelled target images (``data.target.unlabeled_path``); empty without a pool."""
        return self.manifest(UNLABELED_POOL)

    @property
    def validated_unlabeled_manifest(self) -> Path:
        """The unlabelled pool after it passed validation; what self-training reads."""
        return self.validated_manifest(UNLABELED_POOL)

    @property
    def validation_dir(self) -> Path:
        return self.root / "reports" / "validation"

    def model_dir(self, name: str) -> Path:
        """``source`` is the pretrained model, ``target`` the fine-tuned one."""
        return self.root / "models" / name

    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    def metrics(self, stage: str) -> Path:
        return self.metrics_dir / f"{stage}.json"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    def checkpoint_dir(self, stage: str) -> Path:
        """Per-epoch training checkpoints; outside DVC's outputs, which it deletes before a run."""
        return self.root / ".roadshift" / "checkpoints" / stage

    @property
    def decoded_cache_dir(self) -> Path:
        """Decoded uint8 image arrays (``roadshift.data.decoded``); rebuilt when missing."""
        return self.root / ".roadshift" / "cache" / "decoded"

    def stage_failure(self, stage: str) -> Path:
        """Why a stage command last stopped on an expected error, for the flow that ran it
        through DVC (DVC reports only "failed to reproduce"); removed when the stage starts."""
        return self.root / ".roadshift" / "stage-failures" / f"{stage}.json"

    @property
    def run_lock(self) -> Path:
        """Held (``fcntl.flock``) by the one ``roadshift run`` working in this project."""
        return self.root / ".roadshift" / "run.lock"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlruns"

    def data_pointer(self, domain_path: Path) -> Path:
        """The ``.dvc`` file DVC writes beside a tracked data folder."""
        path = domain_path if domain_path.is_absolute() else self.root / domain_path
        return path.with_name(path.name + ".dvc")


def resolve_tracking_uri(cfg: TrackingSection, root: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else ``tracking.tracking_uri``, else ``<root>/mlruns/mlflow.db``.

    Here, not in ``roadshift.tracking``: ``roadshift run`` needs it before importing MLflow.
    """
    from_env = os.environ.get(TRACKING_URI_ENV, "").strip()
    if from_env:
        return from_env
    if cfg.tracking_uri:
        return cfg.tracking_uri
    return f"sqlite:///{Layout(root.resolve()).mlflow_dir / 'mlflow.db'}"
