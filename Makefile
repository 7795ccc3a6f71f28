# Two entry points: `make run` serves the worker, `make test` runs every check CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

$(VENV)/.run: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.run requirements-dev.txt
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $@

.PHONY: run test lint
run: $(VENV)/.run  ## bake MODEL_ID (skipped when already baked), then serve on HOST:PORT
	$(PY) download.py
	$(PY) app.py

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

test: lint  ## lint, then the whole test suite
	$(PY) -m pytest
