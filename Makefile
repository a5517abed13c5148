# The two commands a newcomer needs:  make start   (set up and run a node)
#                                     make test    (set up and run the test suite; .ci/run calls it)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned first so pip never swaps in another build: on this project's CPU machines pip finds the
# local CPU wheel; on a GPU machine the same pin pulls the CUDA build from PyPI.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: install install-dev system-packages start test test-unit lint bench bench-suite bench-wan bench-utilization \
	bench-convergence bench-overhead bench-scale bench-transport clean

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

# Debian's prometheus package (prometheus + promtool), for the tests that run a real Prometheus and promtool.
# Nothing to do when both are on PATH; as root (CI), apt-get installs it; otherwise those tests are skipped.
system-packages:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's prometheus package" >&2; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends prometheus >&2; \
	else \
		echo "prometheus/promtool not found: their tests will be skipped." \
			"To run them: sudo apt-get install --no-install-recommends prometheus" >&2; \
	fi

lint: install-dev
	$(BIN)/ruff check node protocol tests bench
	$(BIN)/mypy

# Tiers, fastest first: unit (no processes, no sockets), system (real OS resources), swarm, e2e.
test: install-dev system-packages lint
	$(BIN)/python -m pytest -q tests/unit tests/system tests/swarm tests/e2e

test-unit: install-dev
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

bench: install-dev
	$(BIN)/python -m bench.swarm_rounds

# The whole suite (issue 7), one item after another; needs root for the network namespaces. Writes
# bench-results/README.md (every table, the machine, the commit) and each item's tables and plots.
bench-suite: install-dev
	$(BIN)/python -m bench.suite --out bench-results

bench-utilization: install-dev
	$(BIN)/python -m bench.utilization --out bench-results/utilization

bench-convergence: install-dev
	$(BIN)/python -m bench.convergence --out bench-results/convergence

bench-overhead: install-dev
	$(BIN)/python -m bench.overhead --out bench-results/overhead

bench-scale: install-dev
	$(BIN)/python -m bench.scale --out bench-results/scale

# Needs root (network namespaces, tbf); prints "skipped" and exits 0 otherwise. Writes bench-results/wan/.
bench-wan: install-dev
	$(BIN)/python -m bench.wan_averaging --out bench-results/wan

bench-transport: install-dev
	$(BIN)/python -m bench.transport --out bench-results/transport
