"""Checkpoints: round trip, damaged generations, SIGKILL during writes, a full disk."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from node.errors import ConfigError
from node.ops.checkpoint import CheckpointStore, Snapshot, write_generation
from node.ops.metrics import NodeMetrics

REPO = Path(__file__).resolve().parents[2]


def snapshot(round_number: int, size: int = 1000, swarm: str = "s1") -> Snapshot:
    generator = torch.Generator().manual_seed(round_number)
    return Snapshot(
        swarm_id=swarm,
        outer_round=round_number,
        rounds_done=round_number,
        local_steps=10 * round_number,
        hosted=["expert.0.1"],
        data_seed=7,
        tensors={"global/trunk": torch.randn(size, generator=generator), "momentum/trunk": torch.zeros(size)},
    )


def test_round_trip_and_only_the_newest_generations_are_kept(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for r in range(1, 5):
        store.save(snapshot(r))
    assert store.generations() == [4, 3]
    loaded = store.latest("s1")
    assert loaded is not None and loaded.outer_round == 4 and loaded.hosted == ["expert.0.1"]
    assert torch.equal(loaded.tensors["global/trunk"], snapshot(4).tensors["global/trunk"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000003.json", "ckpt-00000003.safetensors", "ckpt-00000004.json", "ckpt-00000004.safetensors",
    ]  # fmt: skip


@pytest.mark.parametrize("damage", ["bit_flip", "truncate", "delete_tensors", "garbage_json", "nan"])
def test_a_damaged_latest_generation_falls_back_to_the_previous(tmp_path, damage):
    store = CheckpointStore(tmp_path)
    store.save(snapshot(1))
    if damage == "nan":
        bad = snapshot(2)
        bad.tensors["global/trunk"][3] = float("nan")
        store.save(bad)
    else:
        store.save(snapshot(2))
    tensors = tmp_path / "ckpt-00000002.safetensors"
    if damage == "bit_flip":
        data = bytearray(tensors.read_bytes())
        data[len(data) // 2] ^= 0x10
        tensors.write_bytes(bytes(data))
    elif damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:1000])
    elif damage == "delete_tensors":
        tensors.unlink()
    elif damage == "garbage_json":
        (tmp_path / "ckpt-00000002.json").write_text("{not json")
    loaded = store.latest("s1")
    assert loaded is not None and loaded.generation == 1 and loaded.outer_round == 1


def test_a_checkpoint_of_another_swarm_is_refused(tmp_path):
    CheckpointStore(tmp_path).save(snapshot(1, swarm="other"))
    with pytest.raises(ConfigError, match="another --checkpoint-dir"):
        CheckpointStore(tmp_path).latest("s1")


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


def test_sigkill_during_writes_never_leaves_the_store_without_a_valid_generation(tmp_path):
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
def tiny_disk(tmp_path):
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


def test_a_full_disk_keeps_the_previous_checkpoint_and_counts_the_failure(tiny_disk):
    store = CheckpointStore(tiny_disk)
    metrics = NodeMetrics(version="0", protocol_version=1, swarm_id="s1")
    assert write_generation(store, snapshot(1, size=100_000), metrics)  # 0.8 MB fits
    assert not write_generation(store, snapshot(2, size=1_000_000), metrics)  # 8 MB does not
    assert metrics.registry.get_sample_value("commons_checkpoint_failures_total") == 1
    loaded = store.latest("s1")
    assert loaded is not None and loaded.outer_round == 1
    assert not list(tiny_disk.glob(".ckpt-*.tmp")), "a failed write must not leave temporary files"
    assert write_generation(store, snapshot(3, size=100_000), metrics)  # and writing works again once it fits


def test_a_read_only_disk_keeps_the_previous_checkpoint(tiny_disk):
    store = CheckpointStore(tiny_disk)
    metrics = NodeMetrics(version="0", protocol_version=1, swarm_id="s1")
    assert write_generation(store, snapshot(1), metrics)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    assert not write_generation(store, snapshot(2), metrics)
    assert metrics.registry.get_sample_value("commons_checkpoint_failures_total") == 1
    loaded = store.latest("s1")
    assert loaded is not None and loaded.outer_round == 1


def test_data_position_is_saved_and_restored(tmp_path):
    store = CheckpointStore(tmp_path)
    saved = snapshot(1)
    saved.data_position = (3, 8)
    store.save(saved)
    loaded = store.latest("s1")
    assert loaded is not None and loaded.data_position == (3, 8)
