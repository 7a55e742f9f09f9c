"""Unlabelled target images (``data.target.unlabeled_path``): config, prepare's manifest, the
validate stage's suite, the synthetic pool, DVC versioning and lineage.

Tiny hand-made PNG trees for prepare and validate (GX is imported once, by a module fixture);
real DVC in a throwaway git project for versioning; the real synthesiser at 32 px.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from roadshift.cli import main
from roadshift.config import (
    UNLABELED_POOL,
    ConfigError,
    SynthSection,
    load_params,
    parse_params,
)
from roadshift.data.dvc_repo import data_versions, domain_folders, dvc_data_version
from roadshift.data.manifest import (
    MANIFEST_COLUMNS,
    UNLABELED_SPLIT,
    CorruptImageError,
    read_manifest,
    read_unlabeled_manifest,
)
from roadshift.data.synth import (
    CLASSES,
    synthesize_dataset,
    synthesize_unlabeled_pool,
    unlabeled_pool_classes,
)
from roadshift.layout import Layout
from roadshift.registry.lineage import lineage_tags
from roadshift.stages.prepare import run_prepare
from roadshift.stages.validate import DataValidationError, run_validate
from tests.helpers import (
    PROJECT_ROOT,
    commit_everything,
    git,
    make_project,
    venv_environment,
)

LABELS = ("give_way", "no_entry", "stop")
SPLIT_SIZES = {"source": {"train": 4, "test": 2}, "target": {"train": 3, "test": 2}}
POOL = "data/raw/target_unlabeled"
PARAMS = parse_params(
    {
        "validate": {"min_images_per_class": 2},
        "data": {"target": {"path": "data/raw/target", "unlabeled_path": POOL}},
    }
)
NO_POOL = parse_params({"validate": {"min_images_per_class": 2}})


def write_png(path: Path, seed: int, side: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory) -> Path:
    """Both labelled domains in split folders and a pool of 4 images at three depths."""
    import great_expectations  # noqa: F401  (pay the import once, not in the first test)

    root = tmp_path_factory.mktemp("clean")
    seed = 0
    for domain, sizes in SPLIT_SIZES.items():
        for split, count in sizes.items():
            for label in LABELS:
                for i in range(count):
                    write_png(root / "data/raw" / domain / split / label / f"{i}.png", seed)
                    seed += 1
    pool = root / POOL
    for name in ("a.png", "day1/b.png", "day1/cam2/c.png", "day2/d.PNG"):
        write_png(pool / name, 1000 + len(name))
    return root


@pytest.fixture
def project(clean_tree, tmp_path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(clean_tree, root)
    return root


# --- config ----------------------------------------------------------------------------------


def test_the_key_belongs_to_the_target_and_params_yaml_sets_the_embedded_pool():
    assert parse_params({}).data.target.unlabeled_path is None  # no pool unless asked for
    project = load_params(PROJECT_ROOT / "params.yaml")
    assert project.data.target.unlabeled_path == Path("data/raw/target_unlabeled")
    assert project.synth.target_unlabeled_per_class == SynthSection().target_unlabeled_per_class
    with pytest.raises(ConfigError, match=r"data\.source\.unlabeled_path: unknown key"):
        parse_params({"data": {"source": {"path": "s", "unlabeled_path": "u"}}})
    with pytest.raises(ConfigError, match=r"synth\.target_unlabeled_per_class"):
        parse_params({"synth": {"target_unlabeled_per_class": -1}})


def test_a_missing_outside_overlapping_or_null_pool_is_refused_naming_the_key(project, tmp_path):
    missing = parse_params(
        {"data": {"target": {"path": "data/raw/target", "unlabeled_path": "data/raw/nowhere"}}}
    )
    with pytest.raises(ConfigError, match=r"data\.target\.unlabeled_path: folder .*nowhere"):
        domain_folders(missing, project)
    with pytest.raises(FileNotFoundError, match=r"data\.target\.unlabeled_path = data/raw/nowhere"):
        run_prepare(missing, project)

    (tmp_path / "elsewhere").mkdir()
    outside = parse_params(
        {
            "data": {
                "target": {"path": "data/raw/target", "unlabeled_path": str(tmp_path / "elsewhere")}
            }
        }
    )
    with pytest.raises(ConfigError, match=r"data\.target\.unlabeled_path: .*outside the project"):
        domain_folders(outside, project)

    inside = parse_params(
        {"data": {"target": {"path": "data/raw/target", "unlabeled_path": "data/raw/target/train"}}}
    )
    with pytest.raises(ConfigError, match=r"data\.target\.unlabeled_path: .* overlap"):
        domain_folders(inside, project)

    # dvc.yaml depends on the folder: under DVC a null cannot stand, and the advice says why
    with pytest.raises(ConfigError, match=r"data\.target\.unlabeled_path: not set.*empty folder"):
        domain_folders(NO_POOL, project)
    assert set(domain_folders(PARAMS, project)) == {"source", "target", UNLABELED_POOL}


# --- prepare ---------------------------------------------------------------------------------


def test_prepare_lists_the_pool_at_any_depth_and_drops_copies_of_labelled_images(project, capsys):
    pool = project / POOL
    shutil.copyfile(project / "data/raw/target/test/stop/0.png", pool / "day2" / "copy.png")
    shutil.copyfile(project / "data/raw/source/train/stop/0.png", pool / "from_source.png")
    (pool / "notes.txt").write_text("not an image")
    write_png(pool / ".hidden" / "x.png", 5)

    written = run_prepare(PARAMS, project)

    assert written[UNLABELED_POOL] == Layout(project).unlabeled_manifest
    frame = read_unlabeled_manifest(written[UNLABELED_POOL])
    assert list(frame.columns) == list(MANIFEST_COLUMNS)
    assert list(frame["path"]) == [
        f"{POOL}/a.png",
        f"{POOL}/day1/b.png",
        f"{POOL}/day1/cam2/c.png",
        f"{POOL}/day2/d.PNG",
        f"{POOL}/from_source.png",  # only labelled *target* images count as labelled already
    ]
    assert set(frame["split"]) == {UNLABELED_SPLIT} and set(frame["domain"]) == {"target"}
    assert frame["label"].isna().all()
    assert set(frame["mode"]) == {"RGB"} and set(frame["width"]) == {20}
    out = capsys.readouterr().out
    assert "target_unlabeled: 5 unlabelled image(s); 1 dropped as byte-identical" in out
    assert f"{POOL}/day2/copy.png" in out
    # the labelled manifests are what they were
    target = read_manifest(written["target"])
    assert len(target) == 15 and not target["label"].isna().any()


def test_without_a_pool_prepare_writes_a_header_only_manifest(project):
    written = run_prepare(NO_POOL, project)

    assert written[UNLABELED_POOL].read_text() == ",".join(MANIFEST_COLUMNS) + "\n"
    frame = read_unlabeled_manifest(written[UNLABELED_POOL])
    assert frame.empty and list(frame.columns) == list(MANIFEST_COLUMNS)
    with pytest.raises(ValueError, match=r"target\.csv: not an unlabelled manifest"):
        read_unlabeled_manifest(written["target"])


# --- validate --------------------------------------------------------------------------------


def test_validate_reports_and_publishes_the_pool_under_its_own_name(project):
    run_prepare(PARAMS, project)
    summary = run_validate(PARAMS, project)

    layout = Layout(project)
    assert summary.success
    assert summary.images[UNLABELED_POOL] == {"total": 4}
    assert summary.metrics["target_unlabeled_total_images"] == 4.0
    assert layout.validated_unlabeled_manifest.read_bytes() == (
        layout.unlabeled_manifest.read_bytes()
    )
    report = json.loads((layout.validation_dir / "summary.json").read_text())
    checks = report["domains"][UNLABELED_POOL]["expectations"]
    assert {c["suite"] for c in checks} == {"target_unlabeled.images"}
    assert {"image_side", "mode", "format", "files_exist"} <= {c["check"] for c in checks}
    assert not {"labels", "min_per_class", "split_proportions"} & {c["check"] for c in checks}
    assert report["labels"] == list(LABELS)  # the pool adds no classes
    assert (layout.validation_dir / "target_unlabeled.json").is_file()
    assert "<h2>target_unlabeled: " in (layout.validation_dir / "index.html").read_text()


def test_an_empty_pool_passes(project):
    shutil.rmtree(project / POOL)
    (project / POOL).mkdir()
    run_prepare(PARAMS, project)
    summary = run_validate(PARAMS, project)
    assert summary.success and summary.images[UNLABELED_POOL] == {"total": 0}
    assert read_unlabeled_manifest(Layout(project).validated_unlabeled_manifest).empty


def test_a_corrupt_image_in_the_pool_is_refused_naming_the_file(project):
    """Decoding is the integrity pass of prepare, for the pool as for the labelled trees:
    validate never sees a file that did not decode, and nothing is published."""
    bad = project / POOL / "day1" / "truncated.png"
    bad.write_bytes((project / POOL / "a.png").read_bytes()[:60])
    with pytest.raises(CorruptImageError, match=r"truncated\.png: truncated or damaged"):
        run_prepare(PARAMS, project)


def test_validate_refuses_a_pool_image_breaking_the_side_rule_naming_it(project):
    write_png(project / POOL / "day1" / "tiny.png", 7, side=8)
    run_prepare(PARAMS, project)
    with pytest.raises(DataValidationError) as caught:
        run_validate(PARAMS, project)
    message = str(caught.value)
    assert "target_unlabeled expect_column_values_to_be_between on width" in message
    assert f"{POOL}/day1/tiny.png (width=8)" in message
    assert not Layout(project).validated_unlabeled_manifest.exists()
    assert not Layout(project).validated_manifest("target").exists()


# --- synth -----------------------------------------------------------------------------------

TINY = SynthSection(
    source_per_class=3,
    target_train_per_class=1,
    target_val_per_class=1,
    target_test_per_class=1,
    target_unlabeled_per_class=2,
    image_size=32,
)


def test_synth_writes_a_flat_deterministic_pool_and_leaves_labelled_trees_alone(tmp_path):
    counts = synthesize_dataset(tmp_path / "a", TINY, seed=3)
    synthesize_dataset(tmp_path / "b", TINY, seed=3)
    none = synthesize_dataset(
        tmp_path / "c", TINY.model_copy(update={"target_unlabeled_per_class": 0}), seed=3
    )

    pool = tmp_path / "a" / "target_unlabeled"
    assert counts[UNLABELED_POOL] == 8 * 2 and none[UNLABELED_POOL] == 0
    assert sorted(p.name for p in pool.iterdir()) == [f"{n:05d}.png" for n in range(16)]
    assert digests(pool) == digests(tmp_path / "b" / "target_unlabeled")
    assert list((tmp_path / "c" / "target_unlabeled").iterdir()) == []  # an empty pool
    for domain in ("source", "target"):  # the pool is drawn from streams of its own
        assert digests(tmp_path / "a" / domain) == digests(tmp_path / "c" / domain)
    labelled = set(digests(tmp_path / "a" / "target").values())
    assert not labelled & set(digests(pool).values())
    answer = unlabeled_pool_classes(2, seed=3)
    assert sorted(answer) == sorted(CLASSES * 2) and answer != sorted(answer)
    with Image.open(pool / "00000.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"


def test_synth_if_absent_adds_only_the_missing_pool(tmp_path):
    for domain in ("source", "target"):
        (tmp_path / "data" / "raw" / domain).mkdir(parents=True)
    params = {
        "synth": TINY.model_dump(),
        "data": {"target": {"path": "data/raw/target", "unlabeled_path": POOL}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    assert main(["--root", str(tmp_path), "data", "synth", "--if-absent"]) == 0

    assert len(list((tmp_path / POOL).glob("*.png"))) == 16
    assert not any((tmp_path / "data" / "raw" / "target").iterdir())
    expected = tmp_path / "expected"
    synthesize_unlabeled_pool(expected, 2, 32, seed=parse_params(params).base.seed)
    assert digests(tmp_path / POOL) == digests(expected)


# --- DVC versioning and lineage --------------------------------------------------------------


def test_the_pool_is_versioned_by_dvc_recorded_in_lineage_and_a_prepare_dep(tmp_path, tiny_params):
    from tasks.dvc import version_data

    root = make_project(tmp_path / "project", tiny_params)
    params = load_params(root / "params.yaml")
    pointer = root / "data/raw/target_unlabeled.dvc"

    first = version_data.fn(root, params)

    assert set(first) == {"source", "target", UNLABELED_POOL}
    assert first[UNLABELED_POOL] == dvc_data_version(pointer) and first[UNLABELED_POOL].endswith(
        ".dir"
    )
    assert data_versions(params, root) == first
    tags = lineage_tags(params, root)
    assert tags["data.target_unlabeled.version"] == first[UNLABELED_POOL]
    assert tags["data.target.version"] == first["target"]  # the existing tags keep their names
    assert git(root, "check-ignore", POOL) == POOL  # git holds the pointer, DVC the images

    # prepare's recorded deps hold the pool folder: a new unlabelled image makes it stale
    run_prepare(params, root)
    env = {**venv_environment(), "DVC_NO_ANALYTICS": "1"}

    def dvc(*args: str) -> str:
        done = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    dvc("commit", "--force", "prepare")
    commit_everything(root, "data versions and prepare's lock")
    assert json.loads(dvc("status", "--json", "prepare")) == {}
    shutil.copyfile(root / "data/raw/source/train/stop/00000.png", root / POOL / "new.png")

    status = json.loads(dvc("status", "--json", "prepare"))
    [changed] = [entry["changed deps"] for entry in status["prepare"] if "changed deps" in entry]
    assert changed == {POOL: "modified"}

    second = version_data.fn(root, params)
    assert second[UNLABELED_POOL] != first[UNLABELED_POOL]
    assert {k: second[k] for k in ("source", "target")} == {
        k: first[k] for k in ("source", "target")
    }
    assert lineage_tags(params, root)["data.target_unlabeled.version"] == second[UNLABELED_POOL]


def test_without_a_pool_no_pool_version_is_recorded(tmp_path):
    assert UNLABELED_POOL not in data_versions(NO_POOL, tmp_path)
    assert "data.target_unlabeled.version" not in lineage_tags(NO_POOL, tmp_path)


def test_the_unlabelled_accessor_reads_what_the_decoder_takes(project):
    """What finetune will call: rows in manifest order, paths relative to the project root."""
    from roadshift.data.decoded import decoded_images

    run_prepare(PARAMS, project)
    frame = read_unlabeled_manifest(Layout(project).unlabeled_manifest)
    images = decoded_images(frame, project, 16, cache_dir=None)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    assert isinstance(frame, pd.DataFrame) and frame["label"].isna().all()
