"""deploy/compose.yaml under podman-compose: three nodes form one swarm and Prometheus scrapes all of them.

The compose file runs as shipped, with an override the test writes (as a user's would be): a tiny manifest
and text mounted in, so that rounds take seconds. Grafana is left out: no Grafana image or package can be
had here (its provisioning is checked against Grafana's schema in tests/unit/test_grafana_provisioning.py).
Prometheus runs with deploy/prometheus's compose scrape config and alert rules; the test asks its HTTP API
(published on a loopback port) for what it scraped, then stops the project (every node exits 0) and
removes it, volumes included.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Dict

import pytest

from tests.containers import podman
from tests.procs import REPO, http_get, write_text_corpus, write_tiny_manifest

pytestmark = pytest.mark.containers

COMPOSE = REPO / "deploy" / "compose.yaml"
NODES = ("bootstrap", "peer-1", "peer-2")
SHARE = "/swarm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_override(path: Path, share: Path) -> Path:
    """Every node trains the tiny manifest on the test's text, one expert each."""
    tiny = {
        "environment": {"COMMONS_MANIFEST": f"{SHARE}/manifest.yaml", "COMMONS_DATA": f"{SHARE}/text.txt",
                        "COMMONS_EXPERTS": "1"},
        "volumes": [f"{share}:{SHARE}:ro"],
    }  # fmt: skip
    path.write_text(json.dumps({"services": {name: tiny for name in NODES}}))  # JSON is YAML
    return path


def query(base: str, expr: str) -> Dict[str, float]:
    """{instance: value} of an instant query; empty while Prometheus does not answer."""
    code, body = http_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    if code != 200:
        return {}
    return {r["metric"].get("instance", ""): float(r["value"][1]) for r in json.loads(body)["data"]["result"]}


def test_compose_swarm_is_scraped_by_prometheus_and_stops_cleanly(images, scope, podman_compose, tmp_path):
    share = tmp_path / "share"
    share.mkdir(mode=0o755)  # read by the image's non-root user
    write_tiny_manifest(share / "manifest.yaml", experts=2, steps=10)
    write_text_corpus(share / "text.txt")
    override = write_override(tmp_path / "override.yaml", share)
    prometheus_port = free_port()
    env = dict(podman.environment(), COMMONS_IMAGE=podman.NODE_IMAGE, COMMONS_PROMETHEUS_IMAGE=podman.PROMETHEUS_IMAGE,
               COMMONS_P2P_PORT=str(free_port()), COMMONS_PROMETHEUS_PORT=str(prometheus_port))  # fmt: skip
    compose = [podman_compose, "--project-name", scope.prefix, "-f", str(COMPOSE), "-f", str(override)]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*compose, *args], env=env, capture_output=True, text=True, timeout=300)

    try:
        started = run("up", "--detach", "--no-build", *NODES, "prometheus")
        assert started.returncode == 0, started.stdout + started.stderr
        base = f"http://127.0.0.1:{prometheus_port}"
        targets = {f"{name}:9347" for name in NODES}
        # Prometheus scrapes every 15 s: a few scrapes until every node has trained and the bootstrap node's
        # swarm view holds all three.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            up = query(base, 'up{job="commons"}')
            steps = query(base, "commons_training_steps_total")
            peers = query(base, 'commons_swarm_view_peers{job="commons_swarm"}')
            if up == dict.fromkeys(targets, 1.0) and set(steps) == targets and min(steps.values()) > 0 and (
                peers.get("bootstrap:9347", 0) >= len(NODES)
            ):
                break
            time.sleep(3)
        logs = {name: podman.run("logs", "--tail", "20", f"{scope.prefix}_{name}_1", check=False) for name in NODES}
        assert up == dict.fromkeys(targets, 1.0), (up, logs)
        assert set(steps) == targets and min(steps.values()) > 0, (steps, logs)
        assert peers.get("bootstrap:9347", 0) >= len(NODES), (peers, logs)
        code, body = http_get(f"{base}/api/v1/rules")
        assert code == 200
        rules = {rule["name"] for group in json.loads(body)["data"]["groups"] for rule in group["rules"]}
        assert "CommonsNodeDown" in rules, rules  # deploy/prometheus/alerts.yml, loaded

        stopped = run("stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        for name in NODES:
            container = f"{scope.prefix}_{name}_1"
            assert podman.run("inspect", "--format", "{{.State.ExitCode}}", container).strip() == "0", (
                podman.run("logs", "--tail", "20", container, check=False)
            )
    finally:
        run("down", "--volumes")  # the scope fixture then removes whatever is left, and fails if it cannot
