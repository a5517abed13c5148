"""End to end: `node doctor` against a real node on loopback, and on a machine set up wrong.

Each doctor runs as a `node` process in its own process group (tests/procs.py): its p2pd, its light
client's DHT process and p2pd must all be gone when it exits.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Iterator, List, NamedTuple, Sequence

import pytest

from tests.procs import NodeProcess, write_text_corpus, write_tiny_manifest

pytestmark = pytest.mark.e2e

CHECKS = [
    "p2p daemon", "listen port", "bootstrap peer", "reachable from outside", "clock skew", "identity",
    "checkpoint dir", "data", "device",
]  # fmt: skip


class Swarm(NamedTuple):
    node: NodeProcess
    manifest: Path
    corpus: Path
    identity: Path


class Done(NamedTuple):
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """One node on loopback, with an identity key of its own."""
    home = tmp_path_factory.mktemp("swarm")
    manifest = write_tiny_manifest(home / "manifest.yaml")
    corpus = write_text_corpus(home / "text.txt")
    identity = home / "node" / "identity.key"
    args = ["start", "--manifest", str(manifest), "--data", str(corpus), "--experts", "1", "--identity", str(identity)]
    node = NodeProcess.node(args, home / "node", "node")
    try:
        node.wait_ready()
        yield Swarm(node, manifest, corpus, identity)
        assert node.proc.poll() is None, "the doctor must not disturb the node it asks"
        assert node.terminate() == 0, node.stderr_tail()
    finally:
        assert node.cleanup() == [], "the node left processes behind"


def doctor(args: Sequence[str], cwd: Path) -> Done:
    """Run `node doctor` to its end; assert that it left no process behind."""
    process = NodeProcess.node(["doctor", *args], cwd, "doctor")
    try:
        out, _ = process.proc.communicate(timeout=120)
        assert process.leftovers(wait=5.0) == [], "the doctor left processes behind"
        return Done(process.proc.returncode, out.decode(), process.log_path.read_text())
    finally:
        process.cleanup()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def lines(done: Done, status: str) -> List[str]:
    return [line for line in done.stdout.splitlines() if line.startswith(status + "  ")]


def test_every_check_passes_against_a_running_node(swarm: Swarm, tmp_path: Path) -> None:
    port = free_port()
    args = ["--initial-peers", swarm.node.maddr, "--manifest", str(swarm.manifest), "--data", str(swarm.corpus)]
    args += ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", "--checkpoint-dir", str(tmp_path / "ck"), "--json"]
    done = doctor(args, tmp_path)
    assert done.code == 0, done.stdout + done.stderr
    (line,) = done.stdout.splitlines()
    report = json.loads(line)
    assert report["ok"] is True
    checks = {check["name"].split(" …")[0]: check for check in report["checks"]}
    assert list(checks) == CHECKS
    assert {name: check["status"] for name, check in checks.items()} == {name: "pass" for name in CHECKS}
    assert all(check["ok"] and check["fix"] == "" for check in checks.values())
    assert f"swarm id {swarm.node.ready['swarm_id']} (same manifest" in checks["bootstrap peer"]["detail"]
    assert checks["bootstrap peer"]["name"].endswith(swarm.node.ready["peer_id"][-8:])
    assert f"TCP port {port} on 127.0.0.1 is free" in checks["listen port"]["detail"]
    assert f"127.0.0.1 port {port} and connected" in checks["reachable from outside"]["detail"]  # our own port
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "ck").exists()  # looked at, not made


def test_a_key_the_running_node_uses_is_reported_in_use(swarm: Swarm, tmp_path: Path) -> None:
    args = ["--initial-peers", swarm.node.maddr, "--manifest", str(swarm.manifest), "--data", str(swarm.corpus)]
    done = doctor([*args, "--identity", str(swarm.identity)], tmp_path)
    assert done.code == 6, done.stdout + done.stderr
    (failure,) = lines(done, "FAIL")
    peer = swarm.node.ready["peer_id"]
    assert failure.startswith(f"FAIL  identity: {swarm.identity}: peer id …{peer[-8:]} is in use")
    assert " — fix: stop the node that uses this key" in failure
    assert len(lines(done, "PASS")) == 7 and done.stdout.splitlines()[-1] == "1 of 9 checks failed (1 skipped)"


def test_a_machine_set_up_wrong_gets_a_fail_line_for_each_problem(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", "--checkpoint-dir", str(tmp_path / "a-file" / "ck")]
        done = doctor([*args, "--data", str(tmp_path / "missing")], tmp_path)
    assert done.code == 6, done.stdout + done.stderr
    failures = {line.split(":")[0].removeprefix("FAIL  "): line for line in lines(done, "FAIL")}
    assert set(failures) == {"listen port", "checkpoint dir", "data"}
    assert f"cannot listen on 127.0.0.1 port {port}" in failures["listen port"]
    assert "is not a directory" in failures["checkpoint dir"] and "does not exist" in failures["data"]
    assert all(" — fix: " in line for line in failures.values())
    skips = lines(done, "SKIP")
    assert len(skips) == 3 and all("no --initial-peers" in line for line in skips)
    assert done.stdout.splitlines()[-1] == "3 of 9 checks failed (3 skipped)"
    assert "Traceback" not in done.stderr


def test_a_bad_option_is_a_one_line_user_error(tmp_path: Path) -> None:
    done = doctor(["--manifest", str(tmp_path / "missing.yaml")], tmp_path)
    assert done.code == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("node: error: manifest file") and "--manifest" in line
