"""dvc.yaml's code deps cover each stage's import closure, so DVC re-runs a stage whenever
code it runs changes (and only then).

A stage command ``roadshift stage <name>`` goes through ``roadshift.stages.runner``, which
imports ``roadshift.stages.<name>`` by name (importlib, which no import graph sees): so the
closure starts from both. It follows every project import, function-level ones included
(grimp reads them all), plus each module's parent packages, whose ``__init__`` runs first.
``roadshift/cli.py`` (and ``__main__``) are left out on purpose: the command line only parses
arguments, loads params.yaml through roadshift.config and turns expected errors into
messages; it computes nothing a stage writes, and listing it would re-run every stage on any
CLI change.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STAGE_RUNNER = "roadshift.stages.runner"
EXPECTED_STAGES = ("prepare", "validate", "pretrain", "finetune", "scratch", "evaluate")


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]


def stage_command_name(stage: dict) -> str | None:
    match = re.fullmatch(r"roadshift\s+stage\s+(\w+)", str(stage.get("cmd", "")).strip())
    return match.group(1) if match else None


def module_file(module: str) -> Path:
    """The project file of a module, relative to the checkout."""
    base = Path(*module.split("."))
    package = base / "__init__.py"
    return package if (PROJECT_ROOT / package).is_file() else base.with_suffix(".py")


def import_closure(graph: grimp.ImportGraph, starts: list[str]) -> set[str]:
    """Every project module that importing ``starts`` can execute."""
    seen: set[str] = set()
    todo = list(starts)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(graph.find_modules_directly_imported_by(module))
        parent = module.rpartition(".")[0]
        if parent:  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            todo.append(parent)
    return seen


def is_covered(path: Path, deps: list[str]) -> bool:
    text = path.as_posix()
    return any(text == dep or text.startswith(dep + "/") for dep in deps)


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("roadshift", "flows", "tasks", cache_dir=None)


def test_every_pipeline_stage_runs_a_roadshift_stage_command():
    commands = {name: stage_command_name(stage) for name, stage in dvc_stages().items()}
    for name in EXPECTED_STAGES:
        assert commands.get(name) == name, f"dvc.yaml stage {name}: cmd {commands.get(name)!r}"


def test_the_stage_runner_module_exists(graph):
    """If the runner moves, STAGE_RUNNER above must follow it, or the closures lose its imports."""
    assert STAGE_RUNNER in graph.modules


@pytest.mark.parametrize("stage_name", EXPECTED_STAGES)
def test_stage_code_deps_cover_the_import_closure(graph, stage_name):
    stage = dvc_stages()[stage_name]
    command = stage_command_name(stage)
    module = f"roadshift.stages.{command}"
    assert module in graph.modules, f"dvc.yaml stage {stage_name}: no module {module}"
    starts = [module, *([STAGE_RUNNER] if STAGE_RUNNER in graph.modules else [])]
    closure = import_closure(graph, starts)
    assert "roadshift.cli" not in closure, "a stage module imports the command line"
    deps = [str(dep).rstrip("/") for dep in stage.get("deps", []) if isinstance(dep, str)]
    missing = sorted(
        module_file(m).as_posix() for m in closure if not is_covered(module_file(m), deps)
    )
    assert not missing, (
        f"dvc.yaml stage {stage_name!r} runs code missing from its deps, so DVC would not "
        f"re-run it when that code changes; add to its deps: {', '.join(missing)}"
    )
    for m in closure:
        assert (PROJECT_ROOT / module_file(m)).is_file(), module_file(m)


def test_dvcignore_keeps_bytecode_out_of_the_code_deps():
    """__pycache__ differs between Python builds: hashed as a dep it would re-run stages."""
    dvc = str(Path(sys.executable).parent / "dvc")
    bytecode = ["roadshift/__pycache__/config.cpython-311.pyc", "roadshift/data/__pycache__/x.pyc"]
    ignored = subprocess.run(
        [dvc, "check-ignore", *bytecode], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert ignored.returncode == 0, ignored.stdout + ignored.stderr
    assert set(ignored.stdout.split()) == set(bytecode), ignored.stdout
    source = subprocess.run(
        [dvc, "check-ignore", "roadshift/config.py"], cwd=PROJECT_ROOT, capture_output=True
    )
    assert source.returncode == 1, "a source file is dvc-ignored"


# --- shown with real DVC: a code change re-runs the stages that import it, and only those ----


@pytest.mark.slow
def test_editing_code_only_prepare_reaches_reruns_prepare_and_shared_code_reruns_both(tmp_path):
    """A throwaway git+DVC copy of the project (its own roadshift/ first on PYTHONPATH, so the
    stage commands run the copy's code), taken through prepare and validate by ``dvc repro``.
    A comment added to roadshift/stages/prepare.py re-runs prepare; its manifests come out the
    same bytes, so validate is skipped. An edit to roadshift/data/manifest.py, which both
    stages import, re-runs both."""
    import json
    import os

    from tests.helpers import TINY_PARAMS, commit_everything, make_project, venv_environment

    root = make_project(tmp_path / "project", TINY_PARAMS)
    env = {
        **venv_environment(),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }

    def run(*args: str, cwd: Path = root) -> str:
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def changed_deps() -> dict[str, set[str]]:
        """``dvc status`` of prepare and validate (the later stages never ran here): each of
        them whose deps changed, with the changed paths."""
        status = json.loads(run("dvc", "status", "--json", "prepare", "validate"))
        return {
            name.rpartition(":")[2]: {
                path
                for entry in entries
                if isinstance(entry, dict)
                for path in entry.get("changed deps", {})
            }
            for name, entries in status.items()
        }

    def append_comment(relative: str) -> None:
        with (root / relative).open("a") as source:
            source.write("# a comment: the code changed, its behaviour did not\n")

    # the stage commands import this copy's package, not the checkout's
    where = run(sys.executable, "-c", "import roadshift; print(roadshift.__file__)", cwd=tmp_path)
    assert Path(where.strip()).resolve() == (root / "roadshift" / "__init__.py").resolve()

    run("dvc", "add", "data/raw/source", "data/raw/target")
    commit_everything(root, "data versions")
    first = run("dvc", "repro", "validate")
    assert "Running stage 'prepare'" in first and "Running stage 'validate'" in first, first
    assert changed_deps() == {}
    assert "pretrain" not in first  # no training: repro stops at validate

    append_comment("roadshift/stages/prepare.py")
    assert changed_deps() == {"prepare": {"roadshift/stages/prepare.py"}}
    again = run("dvc", "repro", "validate")
    assert "Running stage 'prepare'" in again, again
    assert "Running stage 'validate'" not in again, again  # same manifests: nothing to redo
    assert changed_deps() == {}

    append_comment("roadshift/data/manifest.py")
    assert changed_deps() == {"prepare": {"roadshift/data"}, "validate": {"roadshift/data"}}
    both = run("dvc", "repro", "validate")
    assert "Running stage 'prepare'" in both and "Running stage 'validate'" in both, both
    assert changed_deps() == {}
