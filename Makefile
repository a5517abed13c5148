# The two commands a newcomer needs:  make start   (set up and run a node)
#                                     make test    (set up and run the test suite; .ci/run calls it)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned first so pip never swaps in another build: on this project's CPU machines pip finds the
# local CPU wheel; on a GPU machine the same pin pulls the CUDA build from PyPI.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: install install-dev start test test-unit lint bench bench-suite bench-wan bench-utilization bench-convergence \
	bench-overhead bench-scale bench-transport clean

# Progress goes to stderr so that `make start`'s stdout holds only the node's JSON ready line.
$(BIN)/python:
	@echo "creating $(VENV)" >&2
	@$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	@echo "installing $(TORCH_SPEC), then commons-node with its dependencies" >&2
	@$(BIN)/pip install --quiet "$(TORCH_SPEC)" >&2
	@$(BIN)/pip install --quiet -e . >&2
	@touch $@

# Test tools (pytest, ruff, mypy, Jupyter kernel, pandas, matplotlib) only for `make test`.
$(VENV)/.installed-dev: $(VENV)/.installed
	@echo "installing the test tools" >&2
	@$(BIN)/pip install --quiet -e ".[dev]" >&2
	@touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

start: install
	@$(BIN)/node start $(ARGS)

lint: install-dev
	$(BIN)/ruff check node protocol tests
	$(BIN)/mypy

test: install-dev lint
	$(BIN)/python -m pytest -q tests/unit tests/swarm tests/e2e

test-unit: install-dev
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

bench: install-dev
	$(BIN)/python -m tests.bench.swarm_rounds

# The whole suite (issue 7), one item after another; needs root for the network namespaces. Writes
# bench-results/README.md (every table, the machine, the commit) and each item's tables and plots.
bench-suite: install-dev
	$(BIN)/python -m tests.bench.suite --out bench-results

bench-utilization: install-dev
	$(BIN)/python -m tests.bench.utilization --out bench-results/utilization

bench-convergence: install-dev
	$(BIN)/python -m tests.bench.convergence --out bench-results/convergence

bench-overhead: install-dev
	$(BIN)/python -m tests.bench.overhead --out bench-results/overhead

bench-scale: install-dev
	$(BIN)/python -m tests.bench.scale --out bench-results/scale

# Needs root (network namespaces, tbf); prints "skipped" and exits 0 otherwise. Writes bench-results/wan/.
bench-wan: install-dev
	$(BIN)/python -m tests.bench.wan_averaging --out bench-results/wan

bench-transport: install-dev
	$(BIN)/python -m tests.bench.transport --out bench-results/transport
