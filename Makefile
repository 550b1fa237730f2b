# Two commands do all the set-up:  `make run` (the main job) and `make test` (the test suite).
# Both create or refresh the virtual environment in .venv from pyproject.toml + constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: help install run test test-fast bench bench-gpu lint constraints clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP)  ## create/refresh .venv with the pinned versions

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

run: $(STAMP)  ## the main job: three seeds on the bundled digits, then the ensemble report
	$(BIN)/python run.py -m seed=1,2,3

test: $(STAMP)  ## the test suite (offline, CPU, a few minutes)
	$(BIN)/python -m pytest

test-fast: $(STAMP)  ## the inner loop: the suite without the slow end-to-end runs (<= 2 min)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)  ## speed and memory benchmarks (print their figures)
	RUN_BENCHMARKS=1 $(BIN)/python -m pytest tests/benchmarks -s -p no:cacheprovider

bench-gpu: $(STAMP)  ## on a CUDA machine: img/s at 224 px, project vs bare loop (vs timm's train.py), input pipeline
	RUN_BENCHMARKS=1 $(BIN)/python -m pytest tests/benchmarks/bench_gpu.py -s -p no:cacheprovider

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .

constraints:  ## re-pin constraints.txt from the current .venv (after a deliberate upgrade)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:  ## remove the environment (never touches outputs/)
	rm -rf $(VENV)
