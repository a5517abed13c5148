"""Checkpoints against the real OS: a writer SIGKILLed mid-write, a full disk, a read-only disk.

The SIGKILL test starts writer processes (about 35 s); the disk tests mount a 3 MiB tmpfs and are
skipped where mounting is not allowed (they need root)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from node.ops.checkpoint import CheckpointStore, Snapshot, write_generation
from node.ops.metrics import NodeMetrics
from tests.procs import REPO
from tests.unit.test_checkpoint import snapshot

pytestmark = pytest.mark.system


WRITER = """
import sys, torch
from node.ops.checkpoint import CheckpointStore, Snapshot
store = CheckpointStore(sys.argv[1], keep=3)
r = int(sys.argv[2])
while True:
    r += 1
    store.save(Snapshot("s1", r, r, r, [], 0, {"global/trunk": torch.full((2_000_000,), float(r))}))
    print(r, flush=True)
"""


def test_sigkill_during_writes_never_leaves_the_store_without_a_valid_generation(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    store.save(Snapshot("s1", 0, 0, 0, [], 0, {"global/trunk": torch.zeros(2_000_000)}))
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    trials = 25
    for trial in range(trials):
        before = store.latest("s1")
        assert before is not None
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(before.outer_round)], stdout=subprocess.PIPE, env=env
        )
        time.sleep(1.0 + rng.random() * 0.6)  # python + torch import, then some 8 MB writes
        writer.send_signal(signal.SIGKILL)
        out, _ = writer.communicate(timeout=30)
        completed = [int(x) for x in out.split()]
        after = store.latest("s1")
        assert after is not None, f"trial {trial}: no valid generation"
        assert torch.equal(after.tensors["global/trunk"], torch.full((2_000_000,), float(after.outer_round)))
        # Every save that reported success is there; at most the one in flight is lost.
        expected = completed[-1] if completed else before.outer_round
        assert after.outer_round >= expected, (trial, after.outer_round, completed)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs, so writes hit ENOSPC for real; skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_keeps_the_previous_checkpoint_and_counts_the_failure(tiny_disk: Path) -> None:
    store = CheckpointStore(tiny_disk)
    metrics = NodeMetrics(version="0", protocol_version=1, swarm_id="s1")
    assert write_generation(store, snapshot(1, size=100_000), metrics)  # 0.8 MB fits
    assert not write_generation(store, snapshot(2, size=1_000_000), metrics)  # 8 MB does not
    assert metrics.registry.get_sample_value("commons_checkpoint_failures_total") == 1
    loaded = store.latest("s1")
    assert loaded is not None and loaded.outer_round == 1
    assert not list(tiny_disk.glob(".ckpt-*.tmp")), "a failed write must not leave temporary files"
    assert write_generation(store, snapshot(3, size=100_000), metrics)  # and writing works again once it fits


def test_a_read_only_disk_keeps_the_previous_checkpoint(tiny_disk: Path) -> None:
    store = CheckpointStore(tiny_disk)
    metrics = NodeMetrics(version="0", protocol_version=1, swarm_id="s1")
    assert write_generation(store, snapshot(1), metrics)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    assert not write_generation(store, snapshot(2), metrics)
    assert metrics.registry.get_sample_value("commons_checkpoint_failures_total") == 1
    loaded = store.latest("s1")
    assert loaded is not None and loaded.outer_round == 1
