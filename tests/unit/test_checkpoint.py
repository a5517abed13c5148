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


def _rewrite(tmp_path, generation: int, **changes) -> None:  # type: ignore[no-untyped-def]
    """Edit a generation's metadata as an attacker or a confused script would, keeping it self-consistent."""
    import hashlib
    import json

    path = tmp_path / f"ckpt-{generation:08d}.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    tensor_file = tmp_path / meta["tensor_file"]
    if tensor_file.exists():
        meta["sha256"] = hashlib.sha256(tensor_file.read_bytes()).hexdigest()
    path.write_text(json.dumps(meta))


def test_metadata_never_pairs_with_another_generations_tensors(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    for r in (1, 2, 3):
        store.save(snapshot(r))
    _rewrite(tmp_path, 3, tensor_file="ckpt-00000001.safetensors")  # pointing at an older tensor file
    (tmp_path / "ckpt-00000002.safetensors").write_bytes((tmp_path / "ckpt-00000001.safetensors").read_bytes())
    _rewrite(tmp_path, 2)  # an older tensor file copied over, checksum fixed
    loaded = store.latest("s1")
    assert loaded is not None and loaded.generation == 1 and loaded.outer_round == 1


@pytest.mark.parametrize("field, value", [("outer_round", 10**18), ("local_steps", -1), ("rounds_done", 10**13)])
def test_counters_out_of_range_fall_back(tmp_path, field, value):
    store = CheckpointStore(tmp_path, keep=3)
    store.save(snapshot(1))
    store.save(snapshot(2))
    _rewrite(tmp_path, 2, format=1, **{field: value})  # format 1: no counters inside the tensor file to compare
    loaded = store.latest("s1")
    assert loaded is not None and loaded.generation == 1


def test_counters_edited_in_the_metadata_disagree_with_the_tensor_file(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    store.save(snapshot(1))
    store.save(snapshot(2))
    _rewrite(tmp_path, 2, outer_round=500)  # in range, but not what generation 2's tensor file says
    assert store.latest("s1").generation == 1


def test_tensors_of_another_model_fall_back_instead_of_half_restoring(tmp_path):
    from node.training.diloco import check_fits

    store = CheckpointStore(tmp_path, keep=3)
    store.save(snapshot(1, size=1000))
    store.save(snapshot(2, size=999))  # checksum and format fine, shapes not this model's
    loaded = store.latest("s1", check=lambda s: check_fits(s.tensors, {"trunk": 1000}))
    assert loaded is not None and loaded.generation == 1
    with pytest.raises(ValueError, match="a module this model does not have"):
        check_fits({"global/expert.9.9": torch.zeros(3)}, {"trunk": 1000})


def test_a_generation_written_by_an_older_node_still_loads(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    store.save(snapshot(4))
    _rewrite(tmp_path, 1, format=1)
    loaded = store.latest("s1")
    assert loaded is not None and loaded.outer_round == 4
