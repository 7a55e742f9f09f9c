"""The data a run used, as MLflow dataset inputs: what the Runs page's Dataset column shows.

Each domain (source, target, the unlabelled target pool when it holds images) is one MLflow
dataset: its files as a table (path, label, split), its folder as the source, and its DVC data
version (``outs[0].md5`` of the ``.dvc`` pointer, at most 36 characters) as the digest. So
``mlflow.search_runs(filter_string="dataset.digest = '<md5>'")`` finds every run that used a
data version. The context says how the run used it: a domain's role for the pipeline run and
the data stages, ``train``/``test``/``unlabeled`` for the stages that train or evaluate.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from roadshift.config import DOMAINS, UNLABELED_POOL, Params
from roadshift.data.dvc_repo import UNKNOWN, data_versions
from roadshift.data.manifest import scan_image_folder, scan_unlabeled_folder
from roadshift.errors import RoadshiftError

# How each run uses each domain (the MLflow input's context); a domain not listed is unused.
ROLES: dict[str, str] = {"source": "source", "target": "target", UNLABELED_POOL: "unlabeled"}
STAGE_CONTEXTS: dict[str, dict[str, str]] = {
    "pipeline": ROLES,
    "prepare": ROLES,
    "validate": ROLES,
    "pretrain": {"source": "train"},
    "finetune": {"target": "train", UNLABELED_POOL: "unlabeled"},
    "scratch": {"target": "train"},
    "evaluate": {"source": "test", "target": "test"},
    "register": {"target": "test"},
}
# MLflow registers its local-file source class twice, so resolving any local path warns that
# the path "can be interpreted in multiple ways" (both the same class): nothing to act on.
_AMBIGUOUS_SOURCE = "The specified dataset source can be interpreted in multiple ways"


@dataclass(frozen=True)
class DataInput:
    domain: str  # source | target | target_unlabeled
    context: str
    path: str  # the folder, relative to the project when inside it
    version: str  # the DVC data version, or "unknown" when the folder is not DVC-tracked
    files: pd.DataFrame  # path (within the folder), label, split


def _folder(params: Params, domain: str) -> Path | None:
    if domain == UNLABELED_POOL:
        return params.data.target.unlabeled_path
    return params.data.domain(domain).path


def _files(folder: Path, domain: str, params: Params) -> pd.DataFrame:
    """The folder's images as a table; empty when its layout is wrong (prepare says why)."""
    extensions = params.prepare.extensions
    try:
        if domain == UNLABELED_POOL:
            found = scan_unlabeled_folder(folder, extensions)
        else:
            found = scan_image_folder(folder, extensions)
    except RoadshiftError:
        found = []
    return pd.DataFrame(
        {
            "path": [f.path.relative_to(folder).as_posix() for f in found],
            "label": [f.label for f in found],
            "split": [f.split or "" for f in found],
        },
        dtype=str,
    )


def data_inputs(params: Params, root: Path, run: str) -> list[DataInput]:
    """What ``run`` (``pipeline`` or a stage name) reads; the pool only when it holds images."""
    root = Path(root).resolve()
    versions = data_versions(params, root)
    inputs = []
    for domain, context in STAGE_CONTEXTS.get(run, {}).items():
        configured = _folder(params, domain)
        if configured is None:
            continue
        folder = configured if configured.is_absolute() else root / configured
        files = _files(folder, domain, params)
        if domain == UNLABELED_POOL and files.empty:
            continue
        shown = folder.relative_to(root) if folder.is_relative_to(root) else folder
        version = versions.get(domain, UNKNOWN)
        inputs.append(DataInput(domain, context, shown.as_posix(), version, files))
    return inputs


def as_dataset(data: DataInput) -> mlflow.data.dataset.Dataset:
    """The DVC version is the digest; an untracked folder gets MLflow's digest of the table."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_AMBIGUOUS_SOURCE, category=UserWarning)
        return mlflow.data.from_pandas(
            data.files,
            source=data.path,
            name=data.domain,
            digest=None if data.version == UNKNOWN else data.version,
        )


def log_data_inputs(params: Params, root: Path, run: str) -> list[DataInput]:
    """Log what ``run`` reads to the active MLflow run as dataset inputs; returns them."""
    inputs = data_inputs(params, root, run)
    for data in inputs:
        mlflow.log_input(as_dataset(data), context=data.context)
    return inputs


def short_versions(versions: Mapping[str, str]) -> str:
    """``src:1a2b3c4d tgt:5e6f7a8b``: the data versions a pipeline run's name carries."""
    short = {"source": "src", "target": "tgt"}
    return " ".join(f"{short[d]}:{versions.get(d, UNKNOWN)[:8]}" for d in DOMAINS if d in short)
