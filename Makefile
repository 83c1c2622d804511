# nkudo: the two commands of the README are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STATE := $(CURDIR)/.demo
WHEELHOUSE := dist/wheelhouse
WHEELHOUSE_STAMP := $(WHEELHOUSE)/.complete
# The wheelhouse serves the oldest supported hosts, not this one: every wheel is one a glibc 2.28 host
# (RHEL 8, Ubuntu 20.04, Debian 11) with the venv's Python version can install.
ARCH := $(shell uname -m)
TARGET = --only-binary=:all: --platform manylinux_2_28_$(ARCH) --platform manylinux_2_17_$(ARCH) \
	--python-version $(shell $(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')

.PHONY: venv build test lint typecheck pytest bench demo dashboard clean wheel wheelhouse

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel "Cython>=3.0" "cffi>=1.16"

$(STAMP): $(BIN)/python pyproject.toml setup.py
	$(BIN)/pip install -q --no-build-isolation -e '.[control-plane,simulator,test]'
	touch $(STAMP)

venv: $(STAMP)

# Rebuild the native extensions in place (after editing nkudo_native/ or ext/).
build: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace

lint: build
	$(BIN)/ruff check src tests benchmarks ext setup.py

typecheck: build
	$(BIN)/mypy

pytest: build $(WHEELHOUSE_STAMP)
	$(BIN)/pytest -q tests

# The record of a run: pytest-benchmark's JSON (its commit_info names the commit and whether the
# tree was dirty; each gate's ratio and inputs are in its extra_info).
BENCH_JSON = .benchmarks/run-$(shell git rev-parse HEAD 2>/dev/null || echo unversioned).json

bench: build $(WHEELHOUSE_STAMP)
	mkdir -p .benchmarks
	$(BIN)/pytest -q benchmarks --benchmark-min-rounds=5 --benchmark-max-time=0.5 --benchmark-columns=min,median,max,rounds --benchmark-json=$(BENCH_JSON)

test: lint typecheck pytest bench

# The agent wheel as it ships: sdist, wheel built from the sdist, `auditwheel repair` to the lowest manylinux
# policy the native modules allow (fails above manylinux_2_28). Both land in dist/; see packaging/build_wheel.py.
wheel: $(STAMP)
	rm -f dist/nkudo-*.whl dist/nkudo-*.tar.gz
	$(BIN)/python packaging/build_wheel.py dist --portable
	rm -f dist/nkudo-*-linux_*.whl

# Air-gapped installs (README "Install"): dist/wheelhouse/ holds the portable agent wheel and every wheel it
# depends on (`pip install --no-index --find-links dist/wheelhouse nkudo`); extras/ what the control-plane and
# simulator extras add; build/ the build requirements, to build the sdist offline. Uses the registry once;
# the tests install from it with --no-index (tests/wheel_env.py).
wheelhouse: wheel
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)/extras $(WHEELHOUSE)/build
	cp dist/nkudo-*manylinux*.whl $(WHEELHOUSE)/
	$(BIN)/pip download -q $(TARGET) -d $(WHEELHOUSE) $(WHEELHOUSE)/nkudo-*.whl
	whl=$$(ls $(WHEELHOUSE)/nkudo-*.whl) && $(BIN)/pip download -q $(TARGET) --find-links $(WHEELHOUSE) \
		-d $(WHEELHOUSE)/extras "nkudo[control-plane,simulator] @ file://$(CURDIR)/$$whl"
	$(BIN)/pip download -q $(TARGET) -d $(WHEELHOUSE)/build \
		$$($(BIN)/python -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
	cd $(WHEELHOUSE) && for w in extras/*.whl; do [ ! -e "$${w#extras/}" ] || rm "$$w"; done
	touch $(WHEELHOUSE_STAMP)

# Rebuilt when the declared dependencies change (the tests install from it offline).
$(WHEELHOUSE_STAMP): pyproject.toml setup.py MANIFEST.in
	$(MAKE) wheelhouse

demo: build
	@bash scripts/demo.sh

# The demo, left running afterwards (control plane, agent, a few VMs) so the dashboard shows a live site; it
# prints the dashboard's URL and login and waits: Ctrl-C stops and removes everything.
dashboard: build
	@bash scripts/demo.sh --keep

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache $(DEMO_STATE) nkudo_native/*.c nkudo_native/*.so src/*.egg-info
