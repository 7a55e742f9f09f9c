"""Bring your own data: domain folders come from params.yaml, wherever they sit in the project."""

from __future__ import annotations

import shutil

import mlflow
import pytest
import yaml

from roadshift.cli import main
from roadshift.config import ConfigError, parse_params
from roadshift.data.dvc_repo import domain_folders
from tests.helpers import git, make_project


def test_a_data_folder_outside_the_project_is_refused_naming_the_key(tmp_path, tiny_params):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "project" / "data" / "raw" / "source").mkdir(parents=True)
    tiny_params["data"] = {"target": {"path": str(outside)}}
    with pytest.raises(ConfigError, match=r"data\.target\.path: .*outside the project"):
        domain_folders(parse_params(tiny_params), tmp_path / "project")


def test_a_missing_data_folder_is_named(tmp_path, tiny_params, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": {"path": "nope"}}}))
    assert main(["--root", str(tmp_path), "run"]) == 2
    assert "data.source.path: folder" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.integration
def test_the_pipeline_trains_on_a_target_tree_at_a_path_of_the_users_choosing(
    tmp_path, tiny_params, prefect_server
):
    from flows.pipeline import training_pipeline

    root = make_project(tmp_path / "project", tiny_params)
    (root / "data" / "mine").mkdir()
    shutil.move(root / "data" / "raw" / "target", root / "data" / "mine" / "india")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["data"]["target"]["path"] = "data/mine/india"
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    git(root, "commit", "-q", "-m", "target data moved", "params.yaml")

    result = training_pipeline(root=str(root))

    assert all(run.ran for run in result.stages)
    pointer = yaml.safe_load((root / "data" / "mine" / "india.dvc").read_text())
    assert result.data_versions["target"] == pointer["outs"][0]["md5"]
    manifest = (root / "data" / "prepared" / "target.csv").read_text()
    assert "data/mine/india/test/" in manifest
    mlflow.set_tracking_uri(None)
