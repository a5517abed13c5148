"""End to end: two `node start` processes in separate directories, `node status`, SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.procs import NodeProcess, child_env, write_text_corpus, write_tiny_manifest

pytestmark = pytest.mark.e2e


def status_json(maddr: str, cwd) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "node", "status", "--initial-peers", maddr, "--json"],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("asking 1 peer(s) about their swarm"), done.stderr  # not silent while it waits
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])


def test_two_nodes_find_each_other_average_and_leave_cleanly(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml", experts=2, steps=20)
    nodes = []
    try:
        for name, seed in (("first", 1), ("second", 2)):
            workdir = tmp_path / name
            workdir.mkdir()
            corpus = write_text_corpus(workdir / "text.txt", seed=seed)
            args = ["start", "--manifest", str(manifest), "--data", str(corpus), "--experts", "1"]
            args += ["--identity", str(workdir / "identity.key"), "--log-format", "json"]
            if nodes:
                args += ["--initial-peers", nodes[0].maddr]
            node = NodeProcess.node(args, workdir, name)
            nodes.append(node)
            ready = node.wait_ready()
            assert {"peer_id", "maddrs", "swarm_id"} <= set(ready)
            assert ready["maddrs"] and all(m.endswith("/p2p/" + ready["peer_id"]) for m in ready["maddrs"])
        assert nodes[0].ready["swarm_id"] == nodes[1].ready["swarm_id"]
        ids = {n.ready["peer_id"] for n in nodes}

        # Both complete at least two rounds averaged together, as their JSON logs report.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(len(averaged_rounds(n)) >= 2 for n in nodes):
                break
            time.sleep(1)
        assert all(len(averaged_rounds(n)) >= 2 for n in nodes), [n.stderr_tail() for n in nodes]

        status = status_json(nodes[1].maddr, tmp_path)
        assert status["swarm_id"] == nodes[0].ready["swarm_id"]
        peers = {p["peer_id"]: p for p in status["peers"]}
        assert ids <= set(peers)
        for peer_id in ids:
            assert "trunk" in peers[peer_id]["modules"]
            assert any(m.startswith("expert.") for m in peers[peer_id]["modules"])
            assert peers[peer_id]["local_steps"] > 0
        replicas = {m["module"]: m["replicas"] for m in status["modules"]}
        assert list(replicas) == ["trunk", "expert.0.0", "expert.0.1"]  # every module of the manifest
        assert replicas["trunk"] >= 2
        assert replicas.get("expert.0.0", 0) + replicas.get("expert.0.1", 0) >= 2

        for node in nodes:
            started = time.monotonic()
            assert node.terminate(timeout=30) == 0, node.stderr_tail()
            assert time.monotonic() - started < 15, "SIGTERM took too long"
            assert node.leftovers() == [], f"{node.name} left processes behind"
            # A clean stop logs no traceback (open streams used to log one each when the loop was cancelled).
            assert "Traceback" not in node.log_path.read_text(), node.stderr_tail(60)
            assert sum(1 for line in node.stdout_lines if line.strip()) == 1, node.stdout_lines
    finally:
        leaks = {n.name: n.cleanup() for n in nodes}
        assert not any(leaks.values()), leaks


def averaged_rounds(node: NodeProcess) -> list:
    """Rounds whose JSON log line says the trunk was averaged with the other node."""
    return [e["round"] for e in node.events("round") if e["trunk_group"] == 2 and e["trunk_fraction"] == 1.0]


def test_a_node_with_another_manifest_is_refused(tmp_path):
    ours = write_tiny_manifest(tmp_path / "ours.yaml", experts=2, steps=20)
    theirs = write_tiny_manifest(tmp_path / "theirs.yaml", experts=2, steps=21)  # one value differs
    corpus = write_text_corpus(tmp_path / "text.txt")
    common = ["--data", str(corpus), "--experts", "1"]
    first = NodeProcess.node(["start", "--manifest", str(ours), *common], tmp_path / "first", "first")
    joiner = None
    try:
        first.wait_ready()
        args = ["start", "--manifest", str(theirs), *common, "--initial-peers", first.maddr]
        joiner = NodeProcess.node(args, tmp_path / "joiner", "joiner")
        assert joiner.proc.wait(timeout=60) == 5
        err = joiner.log_path.read_text()
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("node: error: ") and "manifest" in last and "--manifest" in last, last
        assert joiner.stdout_lines == [] and joiner.proc.stdout.read() == b""
        assert joiner.leftovers() == []
        assert first.proc.poll() is None, "the refused peer must not disturb the running one"
        assert first.terminate() == 0
    finally:
        leaks = {n.name: n.cleanup() for n in (first, joiner) if n is not None}
        assert not any(leaks.values()), leaks
