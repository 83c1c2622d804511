# nkudo: the two commands of the README are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STATE := $(CURDIR)/.demo

.PHONY: venv build test lint typecheck pytest bench demo clean wheel

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel "Cython>=3.0" "cffi>=1.16"

$(STAMP): $(BIN)/python pyproject.toml setup.py
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Rebuild the native extensions in place (after editing nkudo_native/ or ext/).
build: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace

lint: build
	$(BIN)/ruff check src tests benchmarks ext setup.py

typecheck: build
	$(BIN)/mypy

pytest: build
	$(BIN)/pytest -q tests

# The record of a run: pytest-benchmark's JSON (its commit_info names the commit and whether the
# tree was dirty; each gate's ratio and inputs are in its extra_info).
BENCH_JSON = .benchmarks/run-$(shell git rev-parse HEAD 2>/dev/null || echo unversioned).json

bench: build
	mkdir -p .benchmarks
	$(BIN)/pytest -q benchmarks --benchmark-min-rounds=5 --benchmark-max-time=0.5 --benchmark-columns=min,median,max,rounds --benchmark-json=$(BENCH_JSON)

test: lint typecheck pytest bench

wheel: build
	$(BIN)/pip wheel -q --no-build-isolation --no-deps -w dist .

demo: build
	@bash scripts/demo.sh

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache $(DEMO_STATE) nkudo_native/*.c nkudo_native/*.so src/*.egg-info
