"""Robust aggregation, the reducer check, int8 encoding and learned deadlines."""

from __future__ import annotations

import numpy as np
import pytest

from node.averaging import Averager
from node.averaging.deadlines import Deadlines
from node.averaging.robust import (
    aggregate,
    centered_clip,
    coordinate_median,
    lower_median,
    region_spans,
    relative_distance,
    screen_outliers,
)
from protocol.manifest import AveragingSpec
from protocol.wire import (
    INT8_BLOCK,
    TensorPart,
    WireError,
    decode,
    encode,
    read_tensor,
    tensor_payload,
    wire_round_trip,
)


def honest(count: int, size: int = 2000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(size).astype(np.float32)
    return {f"h{i}": shared + 0.3 * rng.standard_normal(size).astype(np.float32) for i in range(count)}


def robust(parts: dict, trusted: str = "h0") -> np.ndarray:
    return aggregate(parts, trusted, method="centered_clip", clip_multiplier=4.0, outlier_ratio=8.0).values


def test_clean_parts_give_the_plain_mean():
    parts = honest(5)
    mean = np.mean(list(parts.values()), axis=0)
    np.testing.assert_allclose(robust(parts), mean, atol=1e-5)


def test_two_parts_are_averaged_plainly():
    parts = honest(2)
    np.testing.assert_allclose(robust(parts), (parts["h0"] + parts["h1"]) / 2, atol=1e-6)


@pytest.mark.parametrize("scale", [1e30, -100.0, 50.0])
def test_huge_parts_are_refused_as_outliers(scale):
    parts = honest(4)
    honest_only = robust(dict(parts))
    parts["evil"] = parts["h1"] * np.float32(scale)
    combined = aggregate(parts, "h0", method="centered_clip", clip_multiplier=4.0, outlier_ratio=8.0)
    assert combined.outliers == ("evil",)
    np.testing.assert_allclose(combined.values, honest_only, atol=1e-5)


def test_the_trusted_part_is_never_refused():
    parts = honest(3)
    parts["h0"] = parts["h0"] * 100
    kept, refused = screen_outliers(parts, "h0", 8.0)
    assert "h0" in kept and refused == []


@pytest.mark.parametrize("attack", ["sign_flip", "noise", "shift"])
def test_a_minority_moves_the_result_by_a_bounded_amount(attack):
    """Whatever a minority sends (below the outlier screen), the result stays within a few clip radii
    of the honest mean, while the plain mean is dragged away."""
    parts = honest(5, seed=3)
    honest_mean = np.mean(list(parts.values()), axis=0)
    spread = np.median([np.linalg.norm(v - honest_mean) for v in parts.values()])
    rng = np.random.default_rng(1)
    base = parts["h1"]
    for k in range(2):  # 2 of 7 are Byzantine
        if attack == "sign_flip":
            bad = -4 * base
        elif attack == "noise":
            bad = 6 * np.linalg.norm(base) / np.sqrt(base.size) * rng.standard_normal(base.size)
        else:
            bad = base + 15 * spread * np.ones_like(base) / np.sqrt(base.size)
        parts[f"evil{k}"] = bad.astype(np.float32)
    mean = aggregate(parts, "h0", method="mean", clip_multiplier=4.0, outlier_ratio=8.0).values
    moved = np.linalg.norm(robust(parts) - honest_mean)
    assert moved <= 2.5 * spread, (moved, spread)
    assert np.linalg.norm(mean - honest_mean) > moved


def test_centered_clip_of_identical_rows_is_that_row():
    row = np.arange(10, dtype=np.float32)
    center, radius, _ = centered_clip(np.stack([row, row, row]), 4.0)
    assert radius == 0.0
    np.testing.assert_array_equal(center, row)


def test_relative_distance_and_helpers():
    own = np.ones(4, dtype=np.float32)
    assert relative_distance(own, own) == 0.0
    assert relative_distance(2 * own, own) == pytest.approx(1.0)
    assert relative_distance(own, np.zeros(4, dtype=np.float32)) == float("inf")
    assert relative_distance(np.zeros(4), np.zeros(4)) == 0.0
    assert lower_median([3.0, 1.0, 2.0, 10.0]) == 2.0
    assert region_spans(5, 25, [10, 10, 10]) == [(0, 5, 10), (1, 10, 20), (2, 20, 25)]


@pytest.mark.parametrize("size", [1, INT8_BLOCK - 1, INT8_BLOCK, 3 * INT8_BLOCK + 5])
def test_int8_round_trip_error_is_within_half_a_step(size):
    values = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    values[0] = 0.0
    decoded = wire_round_trip(values, "int8")
    for start in range(0, size, INT8_BLOCK):
        block = slice(start, start + INT8_BLOCK)
        step = np.abs(values[block]).max() / 127
        assert np.abs(decoded[block] - values[block]).max() <= step / 2 + 1e-7


def _int8_part(numel: int) -> TensorPart:
    return TensorPart(type="part", swarm_id="s", module="trunk", round=0, group_id="0" * 16, slice_index=0,
                      sender="p", numel=numel, dtype="int8")  # fmt: skip


def test_int8_payload_decodes_and_is_validated():
    values = np.linspace(-1, 1, 2500, dtype=np.float32)
    payload = tensor_payload(values, "int8")
    assert len(payload) == 4 * 3 + 2500  # a scale per block, a byte per value: 4x smaller than float32
    message, view = decode(encode(_int8_part(2500), payload))
    np.testing.assert_allclose(read_tensor(message, view), values, atol=1 / 127)
    for bad_scale in (np.nan, -1.0, np.inf):
        broken = np.frombuffer(payload[:4], "<f4").copy()
        broken[0] = bad_scale
        message, view = decode(encode(_int8_part(2500), broken.tobytes() + payload[4:]))
        with pytest.raises(WireError, match="scale"):
            read_tensor(message, view)
    message, view = decode(encode(_int8_part(2500), payload[:-1]))
    with pytest.raises(WireError, match="bytes"):
        read_tensor(message, view)


def test_deadlines_start_at_the_cap_then_follow_what_was_observed():
    deadlines = Deadlines(cap=15.0, multiplier=3.0)
    assert deadlines.timeout("parts") == 15.0
    deadlines.observe("parts", 0.1)
    assert deadlines.timeout("parts") == 1.0  # the floor
    deadlines.observe("parts", 2.0)
    assert deadlines.timeout("parts") == pytest.approx(6.5)
    deadlines.observe("parts", 100.0)
    assert deadlines.timeout("parts") == 15.0  # never past the manifest's cap
    # per module: each module's memory learns its own waits
    spec = AveragingSpec(part_timeout_seconds=15.0)
    averager = Averager(None, "abc", hosted=lambda: {"trunk", "expert.0.0"}, spec=spec)
    averager.memory("trunk").deadlines.observe("parts", 0.1)
    assert averager.memory("trunk").deadlines.timeout("parts") == 1.0
    assert averager.memory("expert.0.0").deadlines.timeout("parts") == 15.0


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
def test_coordinate_median_matches_numpy(rows):
    values = np.random.default_rng(rows).standard_normal((rows, 70_001)).astype(np.float32)
    np.testing.assert_allclose(coordinate_median(values), np.median(values, axis=0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows, same", [(3, 2), (4, 3), (5, 3), (7, 4)])
def test_a_majority_of_identical_parts_is_the_result_bit_for_bit(rows, same):
    """A re-sync where most members hold the same state: the robust result is exactly that state, so a
    member can check it against the majority's state hash."""
    rng = np.random.default_rng(rows)
    majority = rng.standard_normal(10_001).astype(np.float32)
    parts = {f"p{i}": majority.copy() if i < same else rng.standard_normal(10_001).astype(np.float32)
             for i in range(rows)}  # fmt: skip
    combined = aggregate(parts, f"p{rows - 1}", method="centered_clip", clip_multiplier=1.0, outlier_ratio=8.0)
    assert combined.values.tobytes() == majority.tobytes()


def test_deadlines_scale_with_the_bytes_a_round_moves():
    deadlines = Deadlines(cap=15.0, multiplier=3.0)
    deadlines.observe("parts", 2.0, nbytes=1_000_000)
    assert deadlines.timeout("parts", 1_000_000) == pytest.approx(6.5)
    # a re-sync moves 3x the bytes: 3x the wait, and the cap grows with it (else it could never finish)
    assert deadlines.timeout("parts", 3_000_000) == pytest.approx(18.5)
    deadlines.observe("parts", 30.0, nbytes=1_000_000)
    assert deadlines.timeout("parts", 1_000_000) == 15.0
    assert deadlines.timeout("parts", 3_000_000) == 45.0
    assert deadlines.timeout("parts", 10) == 1.0  # a tiny round: the floor


def test_a_wait_that_ran_out_on_a_slow_member_lengthens_the_next_one():
    """Only complete waits used to teach: a swarm whose rounds got slower kept its short deadlines."""
    deadlines = Deadlines(cap=15.0, multiplier=3.0)
    deadlines.observe("results", 1.0, nbytes=1_000_000)
    assert deadlines.timeout("results", 1_000_000) == pytest.approx(3.5)
    deadlines.ran_out("results", 3.5, nbytes=1_000_000)  # it took at least that long
    assert deadlines.timeout("results", 1_000_000) == pytest.approx(11.0)
    deadlines.ran_out("results", 11.0, nbytes=1_000_000)
    assert deadlines.timeout("results", 1_000_000) == 15.0  # still never past the cap
    for _ in range(8):  # and forgotten once as many complete waits came after it as are remembered
        deadlines.observe("results", 1.0, nbytes=1_000_000)
    assert deadlines.timeout("results", 1_000_000) == pytest.approx(3.5)
