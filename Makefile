# Every target creates the virtual environment it needs on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

.PHONY: venv demo test test-slow bench
venv: $(STAMP)

## The main job: trains the digits MLP with riemod beside optax Adam and prints the certificate.
demo: $(STAMP)
	$(BIN)/riemod demo

## The default test run (CI runs this through .ci/run).
test: $(STAMP)
	$(BIN)/ruff check riemod tests benchmarks examples docs
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile

## Slow statistical and scaling checks.
test-slow: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -m slow

## The benchmark suite (results under benchmarks/results/).
bench: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m benchmarks.run_all
