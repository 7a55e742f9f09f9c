"""`roadshift data add`: new labelled images join a domain and become a new DVC data version."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from roadshift.cli import main
from roadshift.data.dvc_repo import dvc_data_version
from roadshift.data.versioning import UnknownClassError, plan_copies
from tests.helpers import make_project


def _incoming_batch(folder: Path, classes: dict[str, int], donor: Path) -> Path:
    """``<folder>/<class>/<n>.png`` copied from one existing image."""
    for name, count in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            shutil.copyfile(donor, folder / name / f"new-{k}.png")
    return folder


@pytest.fixture
def project(tmp_path, tiny_params) -> Path:
    return make_project(tmp_path / "project", tiny_params)


def _donor(project: Path) -> Path:
    return next((project / "data/raw/target/train/stop").glob("*.png"))


def test_data_add_copies_into_train_and_prints_old_and_new_version(project, tmp_path, capsys):
    assert main(["--root", str(project), "data", "add", "target", str(tmp_path / "none")]) == 2
    incoming = _incoming_batch(tmp_path / "batch", {"stop": 2, "give_way": 1}, _donor(project))
    before = dvc_data_version(project / "data/raw/target.dvc")  # none yet: first version

    assert main(["--root", str(project), "data", "add", "target", str(incoming)]) == 0

    after = dvc_data_version(project / "data/raw/target.dvc")
    assert before is None and after and after.endswith(".dir")
    assert (project / "data/raw/target/train/stop/new-1.png").is_file()
    assert (project / "data/raw/target/train/give_way/new-0.png").is_file()
    assert f"target data version: none -> {after}" in capsys.readouterr().out

    more = _incoming_batch(tmp_path / "batch2", {"no_entry": 1}, _donor(project))
    assert main(["--root", str(project), "data", "add", "target", str(more)]) == 0
    newest = dvc_data_version(project / "data/raw/target.dvc")
    assert newest != after
    assert f"target data version: {after} -> {newest}" in capsys.readouterr().out


def test_data_add_refuses_unknown_classes_naming_them_and_copies_nothing(project, tmp_path, capsys):
    incoming = _incoming_batch(
        tmp_path / "batch", {"stop": 1, "camel_crossing": 1}, _donor(project)
    )
    assert main(["--root", str(project), "data", "add", "target", str(incoming)]) == 2
    assert "unknown class folder(s) camel_crossing" in capsys.readouterr().err
    assert not (project / "data/raw/target/train/stop/new-0.png").exists()
    assert not (project / "data/raw/target.dvc").exists()


def test_data_add_never_overwrites_an_existing_file(project, tmp_path):
    existing = _donor(project)
    incoming = tmp_path / "batch" / "stop"
    incoming.mkdir(parents=True)
    (incoming / existing.name).write_bytes(b"not the same image")
    with pytest.raises(FileExistsError, match=existing.name):
        plan_copies(incoming.parent, project / "data/raw/target", (".png",))
    assert existing.read_bytes() != b"not the same image"


def test_flat_domain_folders_receive_images_under_the_class_folder(tmp_path):
    domain = tmp_path / "mine"
    (domain / "cat").mkdir(parents=True)
    (domain / "dog").mkdir()
    incoming = tmp_path / "new" / "dog"
    incoming.mkdir(parents=True)
    (incoming / "d1.jpg").write_bytes(b"x")
    (incoming / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        plan_copies(incoming.parent, domain, (".jpg",))
    (incoming / "notes.txt").unlink()
    assert plan_copies(incoming.parent, domain, (".jpg",)) == [
        (incoming / "d1.jpg", domain / "dog" / "d1.jpg")
    ]
    (tmp_path / "new" / "horse").mkdir()
    with pytest.raises(UnknownClassError, match="horse"):
        plan_copies(incoming.parent, domain, (".jpg",))
