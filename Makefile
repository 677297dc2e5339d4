# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs mtdisent with what it needs on first use: the demo only the package and
# matplotlib for its figures, the tests also pytest, hypothesis and MONAI; ruff and mypy only for lint/typecheck.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint typecheck check clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.installed-%: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e '.[$*]'
	touch $@

demo: $(VENV)/.installed-plots
	$(VENV)/bin/mtdisent demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check mtdisent plugins tests examples benchmarks
	$(VENV)/bin/ruff format --check mtdisent plugins

typecheck: $(VENV)/.installed-dev
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) build *.egg-info
