"""End to end: `node demo` starts a local swarm, every node finishes a round, the demo stops them all.

The demo runs as a NodeProcess in its own session; its nodes run in process groups of their own (so that
a terminal's Ctrl+C reaches the demo only), but in that same session, which is what is checked for leftovers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import List

import pytest

from tests.procs import NodeProcess, child_env, write_text_corpus, write_tiny_manifest

pytestmark = pytest.mark.e2e


def in_session(session: int, wait: float = 0.0) -> List[int]:
    """Live processes (zombies excluded) of ``session``, after up to ``wait`` s for it to empty."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # not a process, or gone
            if fields[0] != "Z" and int(fields[3]) == session:
                found.append(int(entry))
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)


def kill_session(session: int) -> List[int]:
    """SIGKILL what is left of ``session`` (a failed test); return what was there."""
    leaked = in_session(session)
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leaked


def test_demo_runs_three_nodes_for_a_round_and_leaves_nothing(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml", experts=2, steps=10)
    corpus = write_text_corpus(tmp_path / "text.txt")
    args = ["demo", "--nodes", "3", "--max-rounds", "1", "--manifest", str(manifest), "--data", str(corpus),
            "--experts", "1", "--log-dir", str(tmp_path / "logs"), "--json"]  # fmt: skip
    demo = NodeProcess.node(args, tmp_path, "demo")
    leaked: List[int] = []
    try:
        ready = demo.next_event(timeout=240, kind="demo_ready")
        assert ready["nodes"] == 3 and len(set(ready["pids"])) == 3
        assert ready["page_url"].startswith("http://127.0.0.1:")
        rounds: dict = {}
        while True:
            event = demo.next_event(timeout=120)
            if event["event"] == "round":
                rounds.setdefault(event["node"], []).append(event["round"])
            if event["event"] == "stopped":
                break
        assert sorted(rounds) == [1, 2, 3], rounds
        assert event["exit_codes"] == [0, 0, 0] and min(event["rounds_done"]) >= 1, event
        assert demo.proc.wait(timeout=30) == 0, demo.stderr_tail()
        assert in_session(demo.proc.pid, wait=5.0) == [], "the demo left processes behind"
        assert sorted((tmp_path / "logs").iterdir()) == [tmp_path / "logs" / f"node-{i}.log" for i in (1, 2, 3)]
    finally:
        leaked = demo.cleanup() + kill_session(demo.proc.pid)
    assert not leaked, leaked


def test_demo_errors_are_one_line_with_the_documented_code(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "node", "demo", "--nodes", "0"], cwd=tmp_path, env=child_env(),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("node: error: argument --nodes: ") and bad.stderr.count("\n") == 1, bad.stderr

    # A node that fails to start (its data path is missing): the demo ends with that node's code and error line.
    args = ["demo", "--nodes", "2", "--data", str(tmp_path / "missing"), "--log-dir", str(tmp_path / "logs")]
    demo = NodeProcess.node(args, tmp_path, "demo")
    leaked: List[int] = []
    try:
        assert demo.proc.wait(timeout=120) == 3, demo.stderr_tail()
        err = demo.log_path.read_text()
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert err.startswith("node: error: node 1 failed to start: ") and "missing" in err and "node-1.log" in err
        assert in_session(demo.proc.pid, wait=5.0) == []
    finally:
        leaked = demo.cleanup() + kill_session(demo.proc.pid)
    assert not leaked, leaked
