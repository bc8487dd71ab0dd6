# `make demo` runs the main job, `make test` the tests. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned, so that pip does not pull the newest CUDA build when a CPU wheel is at hand.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.kvstream-installed

.PHONY: install demo test test-gpu bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvstream demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m "gpu or gpu2" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m kvstream.bench.run_all

bench-quick: $(STAMP)
	$(VENV)/bin/kvstream bench all --quick

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
