"""The `node` command as a user sees it: help, exit codes, one-line errors, the ready line.

Each test runs `python -m node` in a subprocess (a few seconds each: torch is imported). Which flags
exist is frozen in-process by tests/unit/test_cli_surface.py; here every one of them must reach --help.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from node.faces.cli import build_parser
from tests.unit.test_cli_surface import long_flags, subcommands

pytestmark = pytest.mark.e2e

UNREACHABLE_PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWKVT8rzJo9rUEyVZAWiqSjRoDDhEU738oJjeskTykUhvz"

TINY_MANIFEST = """\
name: cli-test
model:
  n_layers: 1
  n_experts: 2
  d_model: 32
  seq_len: 32
  n_heads: 2
  expert_hidden: 32
training:
  inner_steps: 5
  batch_size: 4
"""

def _node(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMMONS_")}
    return subprocess.run(
        [sys.executable, "-m", "node", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _err_lines(result: subprocess.CompletedProcess) -> List[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _assert_one_error_line(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = _err_lines(result)
    assert len(lines) == 1, result.stderr
    return lines[0]


def _assert_last_line_error(result: subprocess.CompletedProcess, code: int) -> str:
    """Log lines (INFO) may come first; the last line is the one error line."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    last = _err_lines(result)[-1]
    assert last.startswith("node: error:"), result.stderr
    assert sum(line.startswith("node: error:") for line in _err_lines(result)) == 1
    return last


def _tiny_inputs(tmp_path: Path) -> tuple:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(TINY_MANIFEST)
    rng = random.Random(0)
    data = tmp_path / "data.txt"
    data.write_text("".join(rng.choice(string.ascii_letters + " .,\n") for _ in range(50_000)))
    return str(manifest), str(data)


def _p2pd_left_behind(marker: str, grace: float = 3.0) -> List[str]:
    """p2pd processes whose command line holds ``marker`` (our identity path), after a grace period.

    Counting every p2pd is racy when other tests run peers at the same time; the identity file
    lives in this test's tmp_path and p2pd gets it as ``-id=<path>``, so it names our daemons only.
    """
    deadline = time.monotonic() + grace
    while True:
        result = subprocess.run(["pgrep", "-a", "-x", "p2pd"], capture_output=True, text=True)
        ours = [line for line in result.stdout.splitlines() if marker in line]
        if not ours or time.monotonic() >= deadline:
            return ours
        time.sleep(0.2)


def test_help_lists_commands(tmp_path: Path) -> None:
    result = _node(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert "start" in result.stdout and "status" in result.stdout
    assert "exit codes" in result.stdout


def test_start_help_lists_every_flag(tmp_path: Path) -> None:
    result = _node(tmp_path, "start", "--help")
    assert result.returncode == 0, result.stderr
    missing = sorted(flag for flag in long_flags(subcommands(build_parser())["start"]) if flag not in result.stdout)
    assert not missing, f"`node start --help` lost flags: {missing}"
    assert "COMMONS_" in result.stdout  # the environment variables are documented there


def test_bad_flag_value_is_one_line(tmp_path: Path) -> None:
    result = _node(tmp_path, "start", "--experts", "notanint")
    line = _assert_one_error_line(result, 2)
    assert "--experts" in line and "notanint" in line
    assert result.stdout == ""


def test_bad_multiaddr_is_one_line(tmp_path: Path) -> None:
    result = _node(tmp_path, "start", "--host-maddrs", "/ip4/notanip/tcp/0")
    line = _assert_one_error_line(result, 2)
    assert line.startswith("node: error:") and "--host-maddrs" in line and "/ip4/notanip/tcp/0" in line


def test_missing_data_path(tmp_path: Path) -> None:
    manifest, _ = _tiny_inputs(tmp_path)
    missing = str(tmp_path / "no-such-corpus")
    result = _node(tmp_path, "start", "--manifest", manifest, "--data", missing, "--device", "cpu")
    line = _assert_last_line_error(result, 3)
    assert missing in line
    assert result.stdout == ""


def test_invalid_manifest(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_expert: 4\n")  # typo: unknown key
    result = _node(tmp_path, "start", "--manifest", str(bad), "--device", "cpu")
    line = _assert_last_line_error(result, 2)
    assert "model.n_expert" in line and str(bad) in line
    assert result.stdout == ""


@pytest.mark.parametrize("content", [b"garbage\n", b""])
def test_a_bad_identity_file_is_a_user_error_before_any_daemon_starts(tmp_path: Path, content: bytes) -> None:
    key = tmp_path / "identity.key"
    key.write_bytes(content)
    result = _start_tiny(tmp_path, str(key))
    line = _assert_last_line_error(result, 2)  # was exit 4, "the p2p daemon failed to start"
    assert str(key) in line and "identity file" in line
    assert _p2pd_left_behind(str(key), grace=0.5) == []


def test_a_config_that_never_ends_is_refused_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    result = _node(tmp_path, "start", "--config", "/dev/zero")  # was read until memory ran out
    line = _assert_one_error_line(result, 2)
    assert "/dev/zero" in line and "not a regular file" in line and time.monotonic() - started < 30


def _start_tiny(tmp_path: Path, identity: str, *extra: str) -> subprocess.CompletedProcess:
    """`node start` on the tiny manifest and corpus, with a known identity file to find its p2pd by."""
    manifest, data = _tiny_inputs(tmp_path)
    args = ["start", "--identity", identity, "--manifest", manifest, "--data", data, "--device", "cpu"]
    return _node(tmp_path, *args, *extra)


def test_unreachable_bootstrap_peer(tmp_path: Path) -> None:
    identity = str(tmp_path / "identity.key")
    result = _start_tiny(tmp_path, identity, "--initial-peers", UNREACHABLE_PEER)
    line = _assert_last_line_error(result, 4)
    assert "127.0.0.1/tcp/1" in line and "none of the bootstrap peers answered" in line
    # The daemon started fine: hivemind's "Daemon failed to start: <p2pd's timestamp>" misnamed the cause.
    assert "Daemon failed to start" not in line and not re.search(r"\d{4}/\d\d/\d\d \d\d:\d\d", line), line
    assert result.stdout == ""
    assert _p2pd_left_behind(identity) == [], "node left its p2pd process behind"


def test_one_round_alone_prints_one_ready_line(tmp_path: Path) -> None:
    identity = str(tmp_path / "identity.key")
    result = _start_tiny(tmp_path, identity, "--max-rounds", "1", "--experts", "1")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    ready = json.loads(lines[0])
    assert ready["event"] == "ready"
    assert {"peer_id", "maddrs", "swarm_id"} <= set(ready)
    assert isinstance(ready["maddrs"], list) and ready["maddrs"]
    assert all(ready["peer_id"] in maddr for maddr in ready["maddrs"])
    assert len(ready["swarm_id"]) == 16
    assert ready["modules"][0] == "trunk" and len(ready["modules"]) == 2
    assert _p2pd_left_behind(identity) == [], "node left its p2pd process behind"


def test_status_requires_initial_peers(tmp_path: Path) -> None:
    result = _node(tmp_path, "status", "--json")
    line = _assert_one_error_line(result, 2)
    assert "--initial-peers" in line
