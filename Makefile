# `make train`: set up .venv and train the quickstart.  `make test`: set up .venv and run every test.
# `make gpu-check`: on a machine with a CUDA device, the CUDA tests and GPU benchmarks (README: GPU check).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test gpu-check clean

setup: $(STAMP)

# torch first, pinned: on these machines torch==2.13.0 is a CPU build on local disk, while an
# unpinned torch pulled in by a dependency would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/leantrain train quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The machine's own python3 and torch: no .venv, nothing installed but the wheels carried in .whl/
# (--no-deps, into a scratch directory). Without a CUDA device it says so and exits 0.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) runs .pytest_cache
