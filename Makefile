# The two commands a newcomer needs:  make start   (set up and run a node)
#                                     make test    (set up and run the test suite; .ci/run calls it)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned first so pip never swaps in another build: on this project's CPU machines pip finds the
# local CPU wheel; on a GPU machine the same pin pulls the CUDA build from PyPI.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: install install-dev notebook system-packages start demo test test-unit lint bench bench-suite bench-wan bench-utilization \
	bench-convergence bench-flood bench-idle bench-languages bench-membership bench-nat bench-overhead bench-scale bench-transport clean

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

# `set -m`: the node runs as a job of its own, the terminal's foreground one, so a Ctrl+C reaches the node
# (which leaves the swarm and exits 0) and not make, which would otherwise die of it and exit 130.
start: install
	@set -m; $(BIN)/node start $(ARGS)

# N nodes on this machine (3 unless ARGS="--nodes N"), a live table and the swarm page's address; Ctrl+C stops all.
demo: install
	@$(BIN)/node demo $(ARGS)

# Debian's prometheus package (prometheus + promtool), for the tests that run a real Prometheus and promtool,
# Debian's chromium, for the test that loads the swarm page in a headless browser, and Debian's systemd for
# systemd-analyze (deploy/commons-node.service's verify and security tests; systemd need not be running), and
# Debian's nftables for the NAT routers of the reachability tests (tests/system/test_nat.py).
# Nothing to do when all are on PATH; as root (CI), apt-get installs them; otherwise those tests are skipped.
system-packages:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v chromium >/dev/null \
		&& command -v systemd-analyze >/dev/null && command -v nft >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's prometheus, chromium, systemd and nftables packages" >&2; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends prometheus chromium systemd \
			nftables >&2; \
	else \
		echo "prometheus/promtool, chromium, systemd-analyze or nft not found: their tests will be skipped." \
			"To run them: sudo apt-get install --no-install-recommends prometheus chromium systemd nftables" >&2; \
	fi

# The notebook extra in .venv, registered as a Jupyter kernel ("Commons") for the current user.
notebook: install
	@$(BIN)/pip install --quiet -e ".[notebook]" >&2
	@$(BIN)/python -m ipykernel install --user --name commons --display-name "Commons" >&2

lint: install-dev
	$(BIN)/ruff check node protocol tests bench
	$(BIN)/mypy

# Tiers, fastest first: unit (no processes, no sockets), system (real OS resources), swarm, e2e.
test: install-dev system-packages lint
	$(BIN)/python -m pytest -q tests/unit tests/system tests/swarm tests/e2e

test-unit: install-dev
	$(BIN)/python -m pytest -q tests/unit

# The containers tier (not in `make test`): deploy/Dockerfile and deploy/compose.yaml built and run with podman.
# Debian bookworm's podman, runc (crun fails on hybrid cgroups), debootstrap (the local base image: no image
# registry is reachable here) and the CNI dnsname plugin (containers find each other by name); as root,
# apt-get installs what is missing. The tier's podman commands read tests/containers/containers.conf (runc,
# ulimits within this machine's) unless CONTAINERS_CONF names another.
.PHONY: container-packages container-images test-containers
CONTAINER_PACKAGES := podman runc debootstrap golang-github-containernetworking-plugin-dnsname

container-packages:
	@if command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null \
		&& [ -e /usr/lib/cni/dnsname ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(CONTAINER_PACKAGES)" >&2; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends $(CONTAINER_PACKAGES) >&2; \
	else \
		echo "podman, runc, debootstrap or the CNI dnsname plugin not found: the containers tier will be skipped." \
			"To run it: sudo apt-get install --no-install-recommends $(CONTAINER_PACKAGES)" >&2; \
	fi

# This machine's way to build the images (the base from Debian's packages, torch from the local wheel):
# localhost/commons-debian-base:bookworm, localhost/commons-node:latest, localhost/commons-prometheus:latest.
container-images: install-dev container-packages
	$(BIN)/python -m tests.containers.podman

test-containers: install-dev container-packages
	$(BIN)/python -m pytest -q -m containers --durations=0 tests/containers

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

# Issue 19: the averaging round and the utilization with 2 of 4 members behind NAT routers, beside all public.
bench-membership: install-dev
	$(BIN)/python -m bench.membership --out bench-results/membership

bench-flood: install-dev
	$(BIN)/python -m bench.flood --baseline d933530 --out bench-results/flood

# Issue 21: what 4 nodes send per second when no round ends (DHT records and reads, transport), on 20 Mbit/s links.
bench-idle: install-dev
	$(BIN)/python -m bench.idle_traffic --out bench-results/idle-traffic

bench-nat: install-dev system-packages
	$(BIN)/python -m bench.wan_averaging --systems commons --compression none int8 --mbit 20 --mbytes 10 --rounds 4 \
		--private 2 --out bench-results/nat-averaging
	$(BIN)/python -m bench.utilization --mbit 20 --private 2 --rounds 8 --out bench-results/nat-utilization

bench-convergence: install-dev
	$(BIN)/python -m bench.convergence --out bench-results/convergence

# Each member on its own language: Debian's translated manual pages (installed here as root if missing).
bench-languages: install-dev
	@if [ ! -d /usr/share/man/pl ] && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		manpages-de manpages-fr manpages-es manpages-pl >&2; fi
	$(BIN)/python -m bench.languages --out bench-results/languages

bench-overhead: install-dev
	$(BIN)/python -m bench.overhead --out bench-results/overhead

bench-scale: install-dev
	$(BIN)/python -m bench.scale --out bench-results/scale

# Needs root (network namespaces, tbf); prints "skipped" and exits 0 otherwise. Writes bench-results/wan/.
bench-wan: install-dev
	$(BIN)/python -m bench.wan_averaging --out bench-results/wan

bench-transport: install-dev
	$(BIN)/python -m bench.transport --out bench-results/transport
