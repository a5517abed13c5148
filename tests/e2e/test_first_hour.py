"""What a newcomer does in the first hour, as they would do it: paste the printed join command, ask for
N rounds, press Ctrl+C on a terminal (issue 20's rough edges, each a test that failed before its fix)."""

from __future__ import annotations

import json
import os
import pty
import select
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import List

import pytest

from node.ops import descendants_of
from tests.procs import REPO, NodeProcess, child_env, write_text_corpus, write_tiny_manifest

pytestmark = pytest.mark.e2e


def test_the_printed_join_command_runs_as_pasted_from_another_directory(tmp_path: Path) -> None:
    """It used to say `node start ...`: Node.js's `node` on many machines, and not on PATH without the venv."""
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml", experts=2, steps=5)
    corpus = write_text_corpus(tmp_path / "text.txt")
    first = NodeProcess.node(["start", "--manifest", str(manifest), "--data", str(corpus), "--experts", "1"],
                             tmp_path / "first", "first")  # fmt: skip
    joiner = None
    try:
        ready = first.wait_ready()
        command = shlex.split(ready["join"])
        assert command[:4] == [sys.executable, "-m", "node", "start"], ready["join"]
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        # As pasted into a fresh shell: another directory, no virtualenv on PATH, nothing but the command.
        env = dict(child_env(), PATH="/usr/bin:/bin")
        env.pop("PYTHONPATH", None)
        extra = ["--data", str(corpus), "--experts", "1", "--max-rounds", "1", "--metrics-addr", "127.0.0.1:0"]
        joiner = NodeProcess([*command, *extra], elsewhere, "joiner", env=env)
        assert joiner.wait_ready()["swarm_id"] == ready["swarm_id"]  # the manifest came with the command
        assert joiner.proc.wait(timeout=90) == 0, joiner.stderr_tail()
    finally:
        leaks = {n.name: n.cleanup() for n in (first, joiner) if n is not None}
        assert not any(leaks.values()), leaks


def test_asking_for_n_rounds_runs_n_rounds(tmp_path: Path) -> None:
    """With overlapped rounds (the default), --max-rounds 3 used to leave after 4."""
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml", experts=2, steps=5)
    corpus = write_text_corpus(tmp_path / "text.txt")
    args = ["start", "--manifest", str(manifest), "--data", str(corpus), "--experts", "1", "--max-rounds", "3",
            "--log-format", "json", "--metrics-addr", "127.0.0.1:0"]  # fmt: skip
    node = NodeProcess.node(args, tmp_path / "node", "node")
    try:
        node.wait_ready()
        assert node.proc.wait(timeout=120) == 0, node.stderr_tail()
        assert [e["round"] for e in node.events("round")] == [0, 1, 2]
        left = node.events("left")
        assert len(left) == 1 and left[0]["rounds"] == 3, left
    finally:
        assert node.cleanup() == []


def _press_ctrl_c_on_a_terminal(argv: List[str], cwd: Path, env: dict) -> tuple:
    """Run ``argv`` on a new pseudo-terminal (its own session), wait for the JSON ready line and a round,
    type Ctrl+C as a user would (the terminal signals its foreground process group), and return the exit
    code, the terminal's output and every process the command had started."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session of its own with the pty as its terminal
        os.chdir(cwd)
        os.execvpe(argv[0], argv, env)
    output, started, descendants = b"", time.monotonic(), []
    try:
        while b'"event": "round"' not in output and time.monotonic() - started < 120:
            if select.select([fd], [], [], 1)[0]:
                output += os.read(fd, 65536)
        descendants = descendants_of(pid)
        assert b'"event": "round"' in output, output.decode(errors="replace")[-3000:]
        os.write(fd, b"\x03")
        while True:
            if not select.select([fd], [], [], 60)[0]:
                break
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the terminal closed: everything on it exited
                break
            if not chunk:
                break
            output += chunk
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), output.decode(errors="replace"), descendants
    finally:
        os.close(fd)
        for child in [pid, *descendants]:  # a failed test still reaps what it started
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("how", ["make start", "node start"])
def test_ctrl_c_on_a_terminal_stops_cleanly_with_exit_code_0_and_no_error(tmp_path: Path, how: str) -> None:
    """`make start` then Ctrl+C used to exit 130 (make died of the SIGINT the node handled), and a Ctrl+C
    that reaches p2pd logged an ERROR and made the DHT wait out its grace period."""
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml", experts=2, steps=5)
    corpus = write_text_corpus(tmp_path / "text.txt")
    args = ["--manifest", str(manifest), "--data", str(corpus), "--experts", "1", "--log-format", "json",
            "--metrics-addr", "127.0.0.1:0"]  # fmt: skip
    if how == "make start":
        argv, cwd = ["make", "-s", "start", "ARGS=" + shlex.join(args)], REPO
    else:
        argv, cwd = [sys.executable, "-m", "node", "start", *args], tmp_path
    code, output, started = _press_ctrl_c_on_a_terminal(argv, cwd, child_env())
    assert code == 0, output[-3000:]
    records = log_records_of(output)
    assert any(r.get("message", "").startswith("received SIGINT") for r in records), output[-3000:]
    loud = [r for r in records if r.get("level") in ("warning", "error", "critical")]
    assert loud == [], loud
    deadline = time.monotonic() + 5
    while any(alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in started if alive(p)] == [], "processes left behind"


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent (or an init that does not reap) to collect it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def log_records_of(output: str) -> list:
    """The JSON log records in a terminal's output (the lines may carry the terminal's echo before them, and the
    echo of Ctrl+C, "^C", can land between two records when the node is writing at that moment)."""
    found = []
    for line in output.replace("\r\n", "\n").replace("^C", "\n").splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            entry = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(entry, dict) and "level" in entry:
            found.append(entry)
    return found
