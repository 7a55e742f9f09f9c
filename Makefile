# Two commands for a fresh machine: `make run` and `make test`. Both set up .venv from the lock first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_ENABLED ?= true
export DVC_NO_ANALYTICS ?= 1
export NO_ALBUMENTATIONS_UPDATE ?= 1
export GX_ANALYTICS_ENABLED ?= false
export PYTHONUNBUFFERED := 1
# Flow runs on the temporary server are kept here, so `make prefect-ui` shows them afterwards.
export PREFECT_HOME ?= $(CURDIR)/.prefect
# DVC runs each stage as `roadshift stage <name>`: it must find the venv's tools.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup data run test test-fast bench lint format lock mlflow-ui prefect-ui screenshots

setup: $(STAMP)

# pip's local-index warnings ("Location ... is ignored") are noise on these machines; errors still fail the build.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing the pinned lock into $(VENV) (a few minutes the first time)..."
	@set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check -r requirements.lock 2>&1 | { grep -v "^WARNING: Location" || true; }
	@# compat mode puts the checkout itself on sys.path, so packages added later (flows/, tasks/) import too
	@set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check --no-deps --config-settings editable_mode=compat -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	@touch $@

data: $(STAMP)
	$(VENV)/bin/roadshift data synth --if-absent

run: data
	$(VENV)/bin/roadshift run

mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlruns/mlflow.db

prefect-ui: $(STAMP)
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

# PNGs of the MLflow runs and registered-model pages and the Prefect flow run (after make run).
screenshots: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) docs/screenshots.py --root . --out docs/img

# Two worker processes (pytest-xdist), each test file whole on one of them so a module's shared
# project is built once; most tests wait on servers and subprocesses, so two halve the wall time.
# `make test TEST_WORKERS=0` runs everything in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The unit tier: everything but the slow tests (Prefect flows, dvc repro, real training,
# servers); a few minutes at most. `make test` runs both tiers.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# Every benchmark in bench/, one after another; writes bench/RESULTS.md (about 10 minutes here).
bench: $(STAMP)
	$(PY) bench/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# Re-resolve requirements.in into a scratch venv and write the full pin list.
lock:
	rm -rf /tmp/roadshift-lock && $(PYTHON) -m venv /tmp/roadshift-lock
	/tmp/roadshift-lock/bin/pip install -q -r requirements.in 2>&1 | { grep -v "^WARNING: Location" || true; }
	{ head -3 requirements.lock; /tmp/roadshift-lock/bin/pip freeze; } > requirements.lock.new && mv requirements.lock.new requirements.lock
