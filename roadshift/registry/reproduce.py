"""Rebuild a registered model from its lineage and show that it comes out the same.

A model version records the git commit, each domain's DVC data version (the
``.dir`` md5 of its folder), the params hash, the pipeline's MLflow parent run
(which holds the resolved params) and the weights' sha256. Reproduction checks
that commit out into a temporary git worktree (the user's checkout is never
touched), points the worktree's DVC at the project's cache and remote, restores
the recorded data versions from them, writes the recorded params, runs the
pipeline's stages with ``dvc repro`` using the code of that commit, and compares
metrics and weight hashes with the registered ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from roadshift.config import DOMAINS, UNLABELED_POOL, Params, params_to_dict, parse_params
from roadshift.data.dvc_repo import UNKNOWN, remote_option
from roadshift.errors import RoadshiftError
from roadshift.jsonio import read_metrics
from roadshift.layout import Layout
from roadshift.registry.lineage import params_hash, sha256_file
from roadshift.registry.model_metrics import stored_figures

RESOLVED_PARAMS_ARTIFACT = "resolved_params.json"
REPRODUCES_TAG = "roadshift.reproduces"


class ReproductionError(RoadshiftError, RuntimeError):
    """The recorded lineage cannot be restored (commit, data version or params missing)."""


@dataclass(frozen=True)
class Lineage:
    """What a registered version says it was made from."""

    model_name: str
    version: str
    git_commit: str
    git_dirty: bool
    data_versions: dict[str, str]
    params_hash: str
    parent_run_id: str | None
    weights_sha256: str
    metrics: dict[str, float]

    @classmethod
    def from_tags(cls, name: str, version: str, tags: Mapping[str, str]) -> Lineage:
        missing = [
            key
            for key in ("git.commit", "params.hash", "weights.sha256")
            if not tags.get(key) or tags.get(key) == UNKNOWN
        ]
        if missing:
            raise ReproductionError(
                f"model {name} version {version} lacks lineage tags {missing}; "
                "it was not registered by the roadshift pipeline"
            )
        return cls(
            model_name=name,
            version=str(version),
            git_commit=tags["git.commit"],
            git_dirty=tags.get("git.dirty", "false") == "true",
            data_versions={
                d: tags.get(f"data.{d}.version", UNKNOWN)
                for d in (*DOMAINS, UNLABELED_POOL)
                if d in DOMAINS or f"data.{d}.version" in tags
            },
            params_hash=tags["params.hash"],
            parent_run_id=tags.get("mlflow.parent_run_id"),
            weights_sha256=tags["weights.sha256"],
            metrics={
                key.removeprefix("metrics."): float(value)
                for key, value in tags.items()
                if key.startswith("metrics.") and _is_number(value)
            },
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class Reproduction:
    lineage: Lineage
    metrics: dict[str, float]
    weights_sha256: str
    worktree: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def weights_identical(self) -> bool:
        return self.weights_sha256 == self.lineage.weights_sha256

    def metric_rows(self) -> list[tuple[str, float | None, float | None]]:
        keys = sorted(set(self.lineage.metrics) & set(self.metrics))
        return [(key, self.lineage.metrics.get(key), self.metrics.get(key)) for key in keys]

    @property
    def metrics_identical(self) -> bool:
        rows = self.metric_rows()
        return bool(rows) and all(original == again for _, original, again in rows)

    @property
    def identical(self) -> bool:
        return self.weights_identical and self.metrics_identical


def _run(command: list[str], cwd: Path, env: Mapping[str, str] | None = None) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=dict(env) if env else None, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise ReproductionError(
            f"`{' '.join(command)}` failed in {cwd} (exit {done.returncode}):\n"
            f"{(done.stdout + done.stderr).strip()[-4000:]}"
        )
    return done.stdout


@contextmanager
def temporary_worktree(root: Path, commit: str, keep: bool = False) -> Iterator[Path]:
    """``git worktree add --detach`` of ``commit`` in a temporary folder, removed afterwards."""
    if subprocess.run(
        ["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=root, capture_output=True
    ).returncode:
        raise ReproductionError(
            f"git commit {commit} is not in the repository at {root}; fetch it first"
        )
    parent = Path(tempfile.mkdtemp(prefix="roadshift-reproduce-"))
    worktree = parent / "worktree"
    _run(["git", "worktree", "add", "--detach", str(worktree), commit], cwd=root)
    try:
        yield worktree
    finally:
        if not keep:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(worktree)],
                cwd=root,
                capture_output=True,
            )
            shutil.rmtree(parent, ignore_errors=True)


def _dvc_remote_urls(root: Path) -> dict[str, str]:
    """Every configured DVC remote of the project, with local paths made absolute."""
    from roadshift.data.dvc_repo import open_repo

    with open_repo(root) as repo:
        remotes = dict(repo.config.get("remote", {}))
    urls = {}
    for name, settings in remotes.items():
        url = str(settings.get("url", ""))
        if url and "://" not in url:
            url = str((root / ".dvc" / url).resolve()) if not Path(url).is_absolute() else url
        urls[name] = url
    return urls


def share_dvc_storage(root: Path, worktree: Path) -> None:
    """Point the worktree's DVC at the project's cache and remotes (local config only)."""
    dvc = [str(Path(sys.executable).parent / "dvc")]
    cache = (root / ".dvc" / "cache").resolve()
    _run([*dvc, "config", "--local", "cache.dir", str(cache)], cwd=worktree)
    for name, url in _dvc_remote_urls(root).items():
        _run([*dvc, "remote", "modify", "--local", name, "url", url], cwd=worktree)


def _write_data_pointer(worktree: Path, folder: Path, md5: str) -> Path:
    pointer = Layout(worktree).data_pointer(folder)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    # "hash: md5" marks a DVC 3 pointer; without it DVC looks in the legacy 2.x cache layout
    out = {"md5": md5, "path": folder.name, "hash": "md5"}
    pointer.write_text(yaml.safe_dump({"outs": [out]}))
    return pointer


def restore_data(worktree: Path, params: Params, lineage: Lineage, env: Mapping[str, str]) -> None:
    """Write each domain's recorded ``.dvc`` pointer and fetch that version from cache or remote."""
    dvc = str(Path(sys.executable).parent / "dvc")
    folders = {domain: params.data.domain(domain).path for domain in DOMAINS}
    if params.data.target.unlabeled_path is not None:  # the pool prepare scanned, if any
        folders[UNLABELED_POOL] = params.data.target.unlabeled_path
    pointers = []
    for domain, folder in folders.items():
        md5 = lineage.data_versions.get(domain, UNKNOWN)
        if md5 == UNKNOWN:
            raise ReproductionError(
                f"model {lineage.model_name} v{lineage.version} records no DVC data version "
                f"for the {domain} data; it cannot be rebuilt from versioned data"
            )
        pointers.append(_write_data_pointer(worktree, folder, md5))
    done = subprocess.run(
        [dvc, "pull", *remote_option(), *[str(p) for p in pointers]],
        cwd=worktree,
        env=dict(env),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        versions = ", ".join(f"{d} {lineage.data_versions.get(d, UNKNOWN)}" for d in folders)
        raise ReproductionError(
            f"the recorded data versions ({versions}) are in neither the DVC cache nor any "
            f"reachable remote ({', '.join(_dvc_remote_urls(worktree)) or 'none configured'}); "
            f"dvc said:\n{(done.stdout + done.stderr).strip()[-2000:]}"
        )


def recorded_params(worktree: Path, lineage: Lineage) -> Params:
    """The params the version was trained with: the parent run's resolved params when MLflow
    has them, else the commit's params.yaml; either must match the recorded hash."""
    candidates: list[tuple[str, dict]] = []
    if lineage.parent_run_id:
        try:
            import mlflow

            raw = mlflow.artifacts.load_dict(
                f"runs:/{lineage.parent_run_id}/{RESOLVED_PARAMS_ARTIFACT}"
            )
            candidates.append((f"run {lineage.parent_run_id} {RESOLVED_PARAMS_ARTIFACT}", raw))
        except Exception:  # the run or artifact may be gone; the commit's file remains
            pass
    params_file = worktree / "params.yaml"
    if params_file.is_file():
        candidates.append(
            (
                f"params.yaml at {lineage.git_commit[:12]}",
                yaml.safe_load(params_file.read_text()) or {},
            )
        )
    for source, raw in candidates:
        params = parse_params(raw, source=source)
        if params_hash(params) == lineage.params_hash:
            return params
    tried = ", ".join(source for source, _ in candidates) or "nothing"
    raise ReproductionError(
        f"no params matching the recorded hash {lineage.params_hash[:12]} (tried {tried})"
    )


def _stage_environment(worktree: Path, tracking_uri: str, parent_run_id: str) -> dict[str, str]:
    """Stages run the commit's code (PYTHONPATH first), log under the reproduction run."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(worktree), env.get("PYTHONPATH")]))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["ROADSHIFT_PARENT_RUN_ID"] = parent_run_id
    return env


def rebuild(
    root: Path,
    lineage: Lineage,
    tracking_uri: str,
    parent_run_id: str,
    keep_worktree: bool = False,
) -> Reproduction:
    """Check out, restore, re-run and measure; the caller owns the MLflow run ``parent_run_id``."""
    notes = []
    if lineage.git_dirty:
        notes.append(
            "the original run had uncommitted changes (git.dirty=true): code not in the commit "
            "cannot be restored, so differences are possible"
        )
    with temporary_worktree(root, lineage.git_commit, keep=keep_worktree) as worktree:
        env = _stage_environment(worktree, tracking_uri, parent_run_id)
        share_dvc_storage(root, worktree)
        params = recorded_params(worktree, lineage)
        (worktree / "params.yaml").write_text(
            yaml.safe_dump(params_to_dict(params), sort_keys=False)
        )
        restore_data(worktree, params, lineage, env)
        dvc = str(Path(sys.executable).parent / "dvc")
        _run([dvc, "repro", "--force", "evaluate"], cwd=worktree, env=env)
        layout = Layout(worktree)
        metrics = read_metrics(layout.metrics("evaluate"))
        weights = sha256_file(layout.model_dir("target") / "weights.safetensors")
        return Reproduction(lineage, metrics, weights, worktree if keep_worktree else None, notes)


def comparison_table(reproduction: Reproduction) -> str:
    """Original vs reproduced, as Markdown (printed by the CLI, logged to MLflow)."""
    lines = ["| | registered | reproduced | same |", "|---|---|---|---|"]
    for key, original, again in reproduction.metric_rows():
        lines.append(
            f"| {key} | {original:.6f} | {again:.6f} | {'yes' if original == again else 'NO'} |"
        )
    lineage = reproduction.lineage
    lines.append(
        f"| weights sha256 | {lineage.weights_sha256[:16]} | {reproduction.weights_sha256[:16]} "
        f"| {'yes' if reproduction.weights_identical else 'NO'} |"
    )
    return "\n".join(lines)


def reproduction_summary(reproduction: Reproduction) -> dict[str, object]:
    return {
        "model": reproduction.lineage.model_name,
        "version": reproduction.lineage.version,
        "git_commit": reproduction.lineage.git_commit,
        "data_versions": reproduction.lineage.data_versions,
        "identical": reproduction.identical,
        "weights_sha256": {
            "registered": reproduction.lineage.weights_sha256,
            "reproduced": reproduction.weights_sha256,
        },
        "metrics": {
            key: {"registered": original, "reproduced": again}
            for key, original, again in reproduction.metric_rows()
        },
        "notes": reproduction.notes,
    }


def summary_json(reproduction: Reproduction) -> str:
    return json.dumps(reproduction_summary(reproduction), indent=2, sort_keys=True)


def _find_version(client, name: str, version: str | None, run_id: str | None):
    from mlflow.exceptions import MlflowException

    if version is not None:
        try:
            return client.get_model_version(name, str(version))
        except MlflowException:
            raise ReproductionError(f"model {name} has no version {version}") from None
    found = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    if not found:
        raise ReproductionError(f"no version of model {name} was registered from run {run_id}")
    return found[0]


def reproduce_registered(
    root: Path,
    params: Params,
    *,
    version: str | None = None,
    run_id: str | None = None,
    keep_worktree: bool = False,
) -> Reproduction:
    """Rebuild ``version`` (or the version registered from ``run_id``) of the project's model,
    logged as an MLflow run tagged with what it reproduced."""
    import mlflow
    from mlflow import MlflowClient

    from roadshift.tracking import configure_existing_store, resolve_tracking_uri

    if (version is None) == (run_id is None):
        raise ValueError("give exactly one of a model version or a run id")
    configure_existing_store(params, root)
    tracking_uri = resolve_tracking_uri(params.tracking, root)
    name = params.register.model_name
    found = _find_version(MlflowClient(), name, version, run_id)
    lineage = Lineage.from_tags(name, str(found.version), stored_figures(found))
    with mlflow.start_run(
        run_name=f"reproduce-{name}-v{lineage.version}",
        tags={REPRODUCES_TAG: f"models:/{name}/{lineage.version}"},
    ) as run:
        mlflow.log_params(
            {
                "git_commit": lineage.git_commit,
                **{f"data_{d}": v for d, v in lineage.data_versions.items()},
            }
        )
        reproduction = rebuild(root, lineage, tracking_uri, run.info.run_id, keep_worktree)
        mlflow.log_metrics({f"reproduced_{k}": v for k, v in reproduction.metrics.items()})
        mlflow.log_text(comparison_table(reproduction), "reproduction.md")
        mlflow.log_dict(reproduction_summary(reproduction), "reproduction.json")
        mlflow.set_tags(
            {
                "roadshift.reproduced.identical": str(reproduction.identical).lower(),
                "roadshift.reproduced.weights_sha256": reproduction.weights_sha256,
            }
        )
    return reproduction
