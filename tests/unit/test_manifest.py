"""Unit tests for the swarm manifest: strict parsing and the swarm id."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from protocol.manifest import Manifest, ManifestError, ModelSpec, load_manifest, parse_manifest
from protocol.version import PROTOCOL_VERSION

TINY = """\
name: tiny
model:
  n_layers: 1
  n_experts: 2
  d_model: 32
  n_heads: 2
outer_optimizer:
  lr: 0.7
  momentum: 0.9
"""

# Same values as TINY: other key order, other spacing and flow style, comments, floats spelled differently.
TINY_REFORMATTED = """\
# a comment that changes nothing
outer_optimizer: {momentum: 0.90, lr: 7.0e-1}   # flow mapping
model:
    n_heads:   2
    d_model: 32
    n_experts: 2
    n_layers: 1
name: "tiny"
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(text: str) -> str:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text)
    return str(info.value)


def test_default_manifest_loads_and_equals_defaults() -> None:
    manifest = load_manifest()
    assert manifest == Manifest()
    assert manifest.swarm_id == Manifest().swarm_id
    assert manifest.protocol_version == PROTOCOL_VERSION
    assert len(manifest.swarm_id) == 16 and int(manifest.swarm_id, 16) >= 0


def test_empty_manifest_is_all_defaults() -> None:
    assert parse_manifest("") == Manifest()
    assert parse_manifest("# only a comment\n") == Manifest()


def test_swarm_id_ignores_formatting_key_order_and_comments(tmp_path: Path) -> None:
    a = load_manifest(_write(tmp_path, "a.yaml", TINY))
    b = load_manifest(str(_write(tmp_path, "b.yaml", TINY_REFORMATTED)))
    assert a == b
    assert a.canonical_json() == b.canonical_json()
    assert a.swarm_id == b.swarm_id
    assert a.swarm_id != Manifest().swarm_id


def test_int_for_float_is_the_same_swarm() -> None:
    assert parse_manifest("outer_optimizer: {lr: 1}").swarm_id == parse_manifest("outer_optimizer: {lr: 1.0}").swarm_id
    assert isinstance(parse_manifest("outer_optimizer: {lr: 1}").outer_optimizer.lr, float)


@pytest.mark.parametrize(
    "old, new",
    [
        ("lr: 0.7", "lr: 0.71"),
        ("momentum: 0.9", "momentum: 0.8"),
        ("n_experts: 2", "n_experts: 3"),
        ("n_layers: 1", "n_layers: 2"),
        ("name: tiny", "name: tiny2"),
    ],
)
def test_swarm_id_changes_with_any_value(old: str, new: str) -> None:
    assert old in TINY
    assert parse_manifest(TINY).swarm_id != parse_manifest(TINY.replace(old, new)).swarm_id


def test_swarm_id_changes_with_values_left_at_default_elsewhere() -> None:
    base = parse_manifest(TINY).swarm_id
    ids = {
        parse_manifest(TINY + "seed: 1\n").swarm_id,
        parse_manifest(TINY + "training: {inner_steps: 10}\n").swarm_id,
        parse_manifest(TINY + "averaging: {compression: fp16}\n").swarm_id,
        parse_manifest(TINY + "inner_optimizer: {lr: 0.002}\n").swarm_id,
    }
    assert base not in ids and len(ids) == 4
    # Writing a default value explicitly is not a change.
    assert parse_manifest(TINY + "seed: 0\n").swarm_id == base


def test_unknown_key_is_named() -> None:
    assert "colour" in _error("colour: blue\n")
    message = _error("model:\n  n_expert: 4\n")
    assert "model.n_expert" in message


def test_unknown_keys_of_mixed_types_are_a_manifest_error() -> None:
    # A YAML integer key next to a string key: listing the unknown keys must not crash.
    message = _error("1: a\nfoo: b\n")
    assert "foo" in message


@pytest.mark.parametrize(
    "text, field",
    [
        ("seed: '3'\n", "seed"),
        ("seed: 1.5\n", "seed"),
        ("name: 123\n", "name"),
        ("model: {n_experts: four}\n", "model.n_experts"),
        ("outer_optimizer: {lr: fast}\n", "outer_optimizer.lr"),
        ("averaging: {compression: [fp16]}\n", "averaging.compression"),
        ("placement: {policy: 1}\n", "placement.policy"),
        ("placement: {check_every_rounds: 2.5}\n", "placement.check_every_rounds"),
    ],
)
def test_wrong_type_is_named(text: str, field: str) -> None:
    message = _error(text)
    assert field in message and "type" in message


@pytest.mark.parametrize("text, field", [("seed: true\n", "seed"), ("model: {n_layers: yes}\n", "model.n_layers")])
def test_bool_is_not_an_int(text: str, field: str) -> None:
    assert field in _error(text)


@pytest.mark.parametrize(
    "text, field",
    [
        ("model: {n_layers: 0}\n", "model.n_layers"),
        ("model: {n_experts: -1}\n", "model.n_experts"),
        ("model: {vocab_size: 300}\n", "model.vocab_size"),
        ("model: {d_model: 30, n_heads: 4}\n", "model.d_model"),
        ("model: {n_experts: 2, top_k: 3}\n", "model.top_k"),
        ("outer_optimizer: {lr: 0}\n", "outer_optimizer.lr"),
        ("outer_optimizer: {momentum: 1.0}\n", "outer_optimizer.momentum"),
        ("outer_optimizer: {name: adam}\n", "outer_optimizer.name"),
        ("inner_optimizer: {lr: -0.1}\n", "inner_optimizer.lr"),
        ("inner_optimizer: {lr: .nan}\n", "inner_optimizer.lr"),
        ("training: {batch_size: 0}\n", "training.batch_size"),
        ("averaging: {compression: zstd}\n", "averaging.compression"),
        ("averaging: {gather_seconds: 10.0, round_timeout_seconds: 5.0}\n", "averaging.round_timeout_seconds"),
        ("name: ''\n", "name"),
        ("placement: {check_every_rounds: 0}\n", "placement.check_every_rounds"),
        ("placement: {affinity_batches: 0}\n", "placement.affinity_batches"),
        ("placement: {swap_margin: 0}\n", "placement.swap_margin"),
        ("placement: {swap_margin: 1.5}\n", "placement.swap_margin"),
    ],
)
def test_out_of_range_is_named(text: str, field: str) -> None:
    assert field in _error(text)


def test_infinite_learning_rate_is_refused() -> None:
    assert "outer_optimizer.lr" in _error("outer_optimizer: {lr: .inf}\n")


def test_int_too_large_for_a_float_is_refused() -> None:
    message = _error(f"outer_optimizer: {{lr: {10**400}}}\n")
    assert "outer_optimizer.lr" in message and "finite" in message


def test_unknown_keys_are_reported_before_wrong_values() -> None:
    message = _error("model: {n_layers: yes, n_expert: 4, colour: red}\n")
    assert "model.colour, model.n_expert" in message and "n_layers" not in message


def test_exponent_without_dot_is_a_float() -> None:
    assert parse_manifest("inner_optimizer: {lr: 1e-3}\n").inner_optimizer.lr == 0.001


def test_wrong_protocol_version() -> None:
    message = _error(f"protocol_version: {PROTOCOL_VERSION + 1}\n")
    assert "protocol_version" in message and str(PROTOCOL_VERSION + 1) in message


def test_invalid_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.yaml", "model: {n_layers: 1\nname: [\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert "not valid YAML" in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(path) in str(info.value) and "does not exist" in str(info.value)


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_top_level(text: str) -> None:
    assert "mapping" in _error(text)


def test_non_mapping_section_is_named() -> None:
    message = _error("model: 3\n")
    assert "model" in message and "mapping" in message
    assert "model" in _error("model:\n")


def test_module_names_order() -> None:
    spec = ModelSpec(n_layers=2, n_experts=3, top_k=2)
    assert spec.module_names() == (
        "trunk",
        "expert.0.0",
        "expert.0.1",
        "expert.0.2",
        "expert.1.0",
        "expert.1.1",
        "expert.1.2",
    )
    assert len(Manifest().model.module_names()) == 1 + Manifest().model.n_layers * Manifest().model.n_experts


def test_manifest_is_frozen() -> None:
    manifest = Manifest()
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest.seed = 1  # type: ignore[misc]


def test_placement_policy_defaults_to_least_replicated_and_takes_follow_data() -> None:
    assert Manifest().placement.policy == "least_replicated"
    assert parse_manifest("placement: {policy: follow_data}\n").placement.policy == "follow_data"


def test_unknown_placement_policy_is_one_clear_line() -> None:
    message = _error("placement: {policy: nearest}\n")
    assert "placement.policy" in message and "least_replicated, follow_data" in message and "'nearest'" in message
    assert "\n" not in message


def test_default_placement_and_membership_leave_the_swarm_id_as_it_was() -> None:
    # Swarms started before the placement and membership sections (and the sparse compression's fields) existed
    # keep their id: a default section or later field is not hashed.
    assert "placement" not in json.loads(Manifest().canonical_json())
    assert "membership" not in json.loads(Manifest().canonical_json())
    assert not {"topk", "error_feedback"} & set(json.loads(Manifest().canonical_json())["averaging"])
    later = ("placement", "membership")
    before = {k: v for k, v in dataclasses.asdict(Manifest()).items() if k not in later}
    before["averaging"] = {k: v for k, v in before["averaging"].items() if k not in ("topk", "error_feedback")}
    old_id = hashlib.sha256(json.dumps(before, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert load_manifest().swarm_id == Manifest().swarm_id == old_id
    assert parse_manifest(TINY + "placement: {policy: least_replicated}\n").swarm_id == parse_manifest(TINY).swarm_id


def test_sparse_settings_are_part_of_the_swarm_id_once_changed() -> None:
    base = parse_manifest(TINY + "averaging: {compression: sparse}\n").swarm_id
    ids = {
        parse_manifest(TINY + "averaging: {compression: sparse, topk: 32}\n").swarm_id,
        parse_manifest(TINY + "averaging: {compression: sparse, error_feedback: 0.9}\n").swarm_id,
    }
    assert base not in ids and len(ids) == 2 and base != parse_manifest(TINY).swarm_id
    for bad, says in (("topk: 0", "averaging.topk must be an integer from 1 to 4096"),
                      ("topk: 5000", "averaging.topk must be an integer from 1 to 4096"),
                      ("error_feedback: 1.5", "averaging.error_feedback must be in [0, 1]")):  # fmt: skip
        assert says in _error(f"averaging: {{compression: sparse, {bad}}}\n")


def test_any_placement_change_is_another_swarm() -> None:
    base = parse_manifest(TINY).swarm_id
    ids = {
        parse_manifest(TINY + "placement: {policy: follow_data}\n").swarm_id,
        parse_manifest(TINY + "placement: {policy: follow_data, check_every_rounds: 2}\n").swarm_id,
        parse_manifest(TINY + "placement: {swap_margin: 0.2}\n").swarm_id,
    }
    assert base not in ids and len(ids) == 3
