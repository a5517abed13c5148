"""Checkpoints: round trip, damaged generations, another swarm's store, the data position.

A writer SIGKILLed mid-write, a full disk and a read-only one: tests/system/test_checkpoint_faults.py."""

from __future__ import annotations

import pytest
import torch

from node.errors import ConfigError
from node.ops.checkpoint import CheckpointStore, Snapshot


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


def test_data_position_is_saved_and_restored(tmp_path):
    store = CheckpointStore(tmp_path)
    saved = snapshot(1)
    saved.data_position = (3, 8)
    store.save(saved)
    loaded = store.latest("s1")
    assert loaded is not None and loaded.data_position == (3, 8)
