"""Real Prometheus scraping two real nodes; /healthz following a node's data source."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Dict, List

import pytest

from tests.procs import NodeProcess, http_get, write_text_corpus, write_tiny_manifest

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(tmp: Path, name: str, manifest: Path, initial: List[str]) -> NodeProcess:
    workdir = tmp / name
    workdir.mkdir()
    corpus = write_text_corpus(workdir / "text.txt", seed=len(name))
    args = ["start", "--manifest", str(manifest), "--data", str(corpus), "--experts", "1"]
    args += ["--metrics-addr", "127.0.0.1:0", "--stall-seconds", "60"]
    if initial:
        args += ["--initial-peers", *initial]
    node = NodeProcess.node(args, workdir, name)
    node.wait_ready()
    return node


def query(base: str, expr: str) -> Dict[str, float]:
    code, body = http_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    if code != 200:
        return {}
    result = json.loads(body)["data"]["result"]
    return {r["metric"].get("instance", ""): float(r["value"][1]) for r in result}


def test_prometheus_scrapes_two_nodes_and_sees_training_progress(tmp_path, prometheus_bin):
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml", experts=2, steps=20)
    nodes: List[NodeProcess] = []
    prometheus = None
    try:
        nodes.append(start_node(tmp_path, "a", manifest, []))
        nodes.append(start_node(tmp_path, "b", manifest, [nodes[0].maddr]))
        targets = [urllib.parse.urlparse(n.ready["metrics_url"]).netloc for n in nodes]
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: commons\n    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
        )
        port = free_port()
        with open(tmp_path / "prometheus.log", "wb") as prometheus_log:  # the child writes to its own copy
            prometheus = subprocess.Popen(
                [
                    prometheus_bin["prometheus"],
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=prometheus_log,
            )
        base = f"http://127.0.0.1:{port}"
        first: Dict[str, float] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(first) < 2:
            time.sleep(1)
            first = query(base, "commons_training_steps_total")
        assert set(first) == set(targets), (first, (tmp_path / "prometheus.log").read_text()[-2000:])
        later: Dict[str, float] = {}
        while time.monotonic() < deadline:
            time.sleep(1)
            later = query(base, "commons_training_steps_total")
            if len(later) == 2 and all(later[t] > first[t] for t in targets):
                break
        assert all(later.get(t, 0) > first[t] for t in targets), (first, later)
        up = query(base, 'up{job="commons"}')
        assert up == {t: 1.0 for t in targets}
        for helper in ("p2pd", "dht"):  # each node's own helper processes, found under it in /proc
            cpu = query(base, f'commons_helper_cpu_seconds_total{{helper="{helper}"}}')
            rss = query(base, f'commons_helper_resident_memory_bytes{{helper="{helper}"}}')
            assert set(cpu) == set(rss) == set(targets), (helper, cpu, rss)
            assert all(0 < seconds < 600 for seconds in cpu.values()) and all(rss[t] > 4 << 20 for t in targets)
        for node in nodes:
            assert node.terminate() == 0
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        leaks = {n.name: n.cleanup() for n in nodes}
        assert not any(leaks.values()), leaks


def test_healthz_turns_503_while_the_data_source_is_gone_and_back_to_200(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml", experts=2, steps=20)
    node = start_node(tmp_path, "solo", manifest, [])
    try:
        health = node.ready["metrics_url"].replace("/metrics", "/healthz")
        assert http_get(health)[0] == 200
        corpus = tmp_path / "solo" / "text.txt"
        hidden = corpus.with_suffix(".away")
        corpus.rename(hidden)

        def wait_for_health(code: int) -> dict:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status, body = http_get(health)
                if status == code:
                    return json.loads(body)
                time.sleep(0.3)
            raise AssertionError(f"/healthz never answered {code}; last: {status} {body!r}\n{node.stderr_tail()}")

        unhealthy = wait_for_health(503)
        assert "data source" in unhealthy["reason"]
        assert node.proc.poll() is None, "the node must stay up while its data is away"
        hidden.rename(corpus)
        assert wait_for_health(200)["status"] == "ok"
        assert node.terminate() == 0
    finally:
        assert node.cleanup() == []
