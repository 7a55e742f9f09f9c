"""Lineage from a real temporary git repository with DVC pointer files."""

from __future__ import annotations

from pathlib import Path

import pytest

from roadshift.config import parse_params
from roadshift.data.dvc_repo import data_versions, dvc_data_version
from roadshift.registry.lineage import (
    directory_digest,
    git_commit,
    git_is_dirty,
    lineage_tags,
    params_hash,
    sha256_file,
)
from tests.helpers import commit_everything, git

SOURCE_MD5 = "0123456789abcdef0123456789abcdef.dir"
TARGET_MD5 = "fedcba9876543210fedcba9876543210.dir"


def _pointer(md5: str, path: str) -> str:
    return f"outs:\n- md5: {md5}\n  size: 1234\n  nfiles: 12\n  hash: md5\n  path: {path}\n"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "source.dvc").write_text(_pointer(SOURCE_MD5, "source"))
    (tmp_path / "data" / "raw" / "target.dvc").write_text(_pointer(TARGET_MD5, "target"))
    (tmp_path / "params.yaml").write_text("base:\n  seed: 1\n")
    return commit_everything(tmp_path, "data pointers")


def test_lineage_tags_name_commit_data_versions_params_and_extras(repo):
    params = parse_params({})
    tags = lineage_tags(params, repo, {"prefect.flow_run_id": "flow-123"})
    assert tags["git.commit"] == git(repo, "rev-parse", "HEAD")
    assert len(tags["git.commit"]) == 40
    assert tags["git.dirty"] == "false"
    assert tags["data.source.version"] == SOURCE_MD5
    assert tags["data.target.version"] == TARGET_MD5
    assert tags["params.hash"] == params_hash(params)
    assert tags["prefect.flow_run_id"] == "flow-123"
    assert all(isinstance(value, str) for value in tags.values())


def test_a_changed_tracked_file_is_dirty_but_dvc_bookkeeping_and_outputs_are_not(repo):
    (repo / "data" / "raw" / "target.dvc").write_text(_pointer("1" * 32 + ".dir", "target"))
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / "metrics.json").write_text("{}\n")
    assert not git_is_dirty(repo)
    (repo / "params.yaml").write_text("base:\n  seed: 2\n")
    assert git_is_dirty(repo)


def test_outside_git_the_commit_is_unknown_and_not_dirty(tmp_path):
    assert git_commit(tmp_path) == "unknown"
    assert not git_is_dirty(tmp_path)
    assert data_versions(parse_params({}), tmp_path) == {"source": "unknown", "target": "unknown"}


def test_dvc_data_version_reads_the_pointer_and_rejects_a_broken_one(repo, tmp_path):
    assert dvc_data_version(repo / "data" / "raw" / "source.dvc") == SOURCE_MD5
    assert dvc_data_version(repo / "data" / "raw" / "missing.dvc") is None
    broken = tmp_path / "broken.dvc"
    broken.write_text("outs: []\n")
    with pytest.raises(ValueError, match="not a DVC pointer file"):
        dvc_data_version(broken)


def test_data_versions_follow_the_configured_domain_paths(repo):
    (repo / "elsewhere.dvc").write_text(_pointer(TARGET_MD5, "elsewhere"))
    params = parse_params(
        {"data": {"source": {"path": "data/raw/source"}, "target": {"path": "elsewhere"}}}
    )
    assert data_versions(params, repo) == {"source": SOURCE_MD5, "target": TARGET_MD5}


def test_params_hash_changes_with_any_value_and_only_then():
    assert params_hash(parse_params({})) == params_hash(parse_params({"finetune": {"lr": 1e-3}}))
    assert params_hash(parse_params({})) != params_hash(parse_params({"finetune": {"lr": 2e-3}}))


def test_digests_depend_on_names_and_bytes_not_on_timestamps(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"\x00" * 64)
    (folder / "model.json").write_text("{}")
    first = directory_digest(folder)
    assert sha256_file(folder / "weights.safetensors") == (
        "f5a5fd42d16a20302798ef6ed309979b43003d2320d9f0e8ea9831a92759fb4b"
    )
    (folder / "model.json").write_text("{}")  # rewritten, same bytes
    assert directory_digest(folder) == first
    (folder / "model.json").write_text('{"a": 1}')
    assert directory_digest(folder) != first
    (folder / "model.json").rename(folder / "spec.json")
    (folder / "spec.json").write_text("{}")
    assert directory_digest(folder) != first
