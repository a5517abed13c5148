"""Sparse averaging (``compression: sparse``): the codec (protocol/sparse.py), and all-reduces that send it.

The codec: what it keeps of each block, that a receiver decodes exactly what the sender meant, and that any
malformed payload is one SparseError (hypothesis). The averaging: in-process peers in virtual time (as in
test_averaging_faults.py) with the production Matchmaker and Averager. A round's result is the robust aggregate
of the members' decoded parts; what a member did not send is kept and sent later (error feedback); a scaled
sparse part is screened out; a part in another format is refused, and the frame limit holds every honest
sparse message.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.averaging import AllReduceResult, Averager, Matchmaker, largest_message_bytes
from node.averaging.robust import aggregate
from node.averaging.run import RESULT_DTYPE_OF
from node.averaging.slices import chunked_bounds, slice_values
from node.net import InProcessNetwork, VirtualClock, run_virtual
from protocol import sparse
from protocol.manifest import AveragingSpec
from protocol.wire import payload_bytes, tensor_payload
from tests.attacks import Attacker, make_vector

SWARM_ID = "b" * 16
NUMEL = 40_000
SPEC = AveragingSpec(gather_seconds=1.0, part_timeout_seconds=5.0, round_timeout_seconds=30.0, chunk_elements=625,
                     compression="sparse", topk=64, error_feedback=0.95)  # fmt: skip
# 625 float32 values a message: sparse slices of 10_000, so 40_000 values make one chunk of 4 slices.


# --- the codec --------------------------------------------------------------------------------------------------
def test_a_part_keeps_the_topk_largest_values_of_each_block_with_their_signs() -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal(3 * sparse.BLOCK + 100).astype(np.float32)
    decoded = sparse.decode(sparse.encode_topk2(values, 64), values.size, "topk2")
    for start in range(0, values.size, sparse.BLOCK):
        block, got = values[start : start + sparse.BLOCK], decoded[start : start + sparse.BLOCK]
        kept = np.flatnonzero(got)
        assert len(kept) == min(64, block.size)
        assert set(kept) == set(np.argsort(-np.abs(block))[: len(kept)])
        assert (np.sign(got[kept]) == np.sign(block[kept])).all()
        assert len(np.unique(np.abs(got[kept]))) <= 2  # two magnitudes a block: 2 bits a value
    payload = sparse.encode_topk2(values, 64)
    assert len(payload) == sparse.size_of(decoded, "topk2") < 4 * values.size / 100


def test_zeros_are_not_sent_and_an_all_zero_vector_is_a_few_bytes() -> None:
    values = np.zeros(10_000, dtype=np.float32)
    values[[5, 9000]] = [1.0, -2.0]
    payload = sparse.encode_topk2(values, 64)
    assert len(payload) == sparse.payload_size(2, 10_000, "topk2")
    np.testing.assert_array_equal(sparse.decode(payload, 10_000, "topk2"), values)  # one value a level: exact
    assert not sparse.decode(sparse.encode_topk2(np.zeros(7, np.float32), 64), 7, "topk2").any()


@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(1, 3 * sparse.BLOCK + 5),
    topk=st.integers(1, sparse.BLOCK),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e30]),
)
def test_valid_payloads_round_trip_to_what_the_sender_applies(numel: int, topk: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(numel) * scale).astype(np.float32)
    values[rng.random(numel) < 0.2] = 0.0
    part = sparse.decode(sparse.encode_topk2(values, topk), numel, "topk2")
    assert np.isfinite(part).all() and np.count_nonzero(part) <= np.count_nonzero(values)
    result = sparse.decode(sparse.encode_topk8(values), numel, "topk8")
    support = values != 0
    assert not result[~support].any()
    for start in range(0, numel, sparse.BLOCK):  # 8 bits of the block's largest magnitude
        block = slice(start, start + sparse.BLOCK)
        largest = float(np.abs(values[block]).max(initial=0.0))
        assert np.abs(result[block] - values[block]).max(initial=0.0) <= largest / 254 * 1.001
    assert tensor_payload(values, "topk8") == sparse.encode_topk8(values)


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from(sparse.SPARSE_DTYPES), numel=st.integers(0, 9000), data=st.data())
def test_arbitrary_payloads_are_finite_vectors_or_one_sparse_error(dtype: str, numel: int, data: st.DataObject):
    raw = data.draw(st.binary(max_size=200))
    try:
        out = sparse.decode(raw, numel, dtype)
    except sparse.SparseError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert out.shape == (numel,) and out.dtype == np.float32 and np.isfinite(out).all()


def _valid() -> Tuple[bytes, int]:
    values = np.zeros(5000, dtype=np.float32)
    values[[1, 7, 4097, 4999]] = [1.0, -3.0, 2.0, 0.5]
    return sparse.encode_topk8(values), 5000


def _patched(payload: bytes, offset: int, new: bytes) -> bytes:
    return payload[:offset] + new + payload[offset + len(new) :]


@pytest.mark.parametrize(
    "case, why",
    [
        ("count_past_block", "more values than a block holds"),
        ("short", "its counts need"),
        ("long", "its counts need"),
        ("position_past_end", "past its block's end"),
        ("not_increasing", "not strictly increasing"),
        ("negative_scale", "negative or non-finite scale"),
        ("nan_scale", "negative or non-finite scale"),
    ],
)
def test_each_malformed_payload_names_what_is_wrong(case: str, why: str) -> None:
    payload, numel = _valid()
    blocks = sparse.block_count(numel)
    positions = 2 * blocks  # counts: 2 and 2; positions 1, 7 | 1, 903 packed in 6 bytes; scales; codes
    scales = positions + 6
    if case == "count_past_block":
        payload = _patched(payload, 2, np.array([905], "<u2").tobytes())
    elif case == "short":
        payload = payload[:-1]
    elif case == "long":
        payload = payload + b"\0"
    elif case == "position_past_end":  # the second block is 904 values long; 4095 is past it
        payload = _patched(payload, positions + 3, bytes([0xFF, 0xFF, 0x0F]))
    elif case == "not_increasing":  # 1, 1 in the first block
        payload = _patched(payload, positions, bytes([1, 0x10, 0]))
    elif case == "negative_scale":
        payload = _patched(payload, scales, np.array([-1.0], "<f4").tobytes())
    elif case == "nan_scale":
        payload = _patched(payload, scales, np.array([np.nan], "<f4").tobytes())
    with pytest.raises(sparse.SparseError, match=why):
        sparse.decode(payload, numel, "topk8")


def test_nonzero_pad_bits_are_refused() -> None:
    values = np.zeros(100, np.float32)
    values[3] = 1.0
    payload = bytearray(sparse.encode_topk2(values, 64))
    payload[-1] |= 0b1100  # the second 2-bit code of the last byte: past the one value sent
    with pytest.raises(sparse.SparseError, match="pad bits"):
        sparse.decode(bytes(payload), 100, "topk2")


def test_the_frame_limit_holds_every_honest_sparse_message_even_a_full_result() -> None:
    """A result may send every value of a slice (groups of more than 4096 / topk members): the limit holds it."""
    chunk, numel = 65_536, 5_000_000
    for size in (2, 4, 100):
        for growth in (1, 4):
            largest = max(hi - lo for lo, hi in chunked_bounds(numel, size, growth * slice_values(chunk, "topk2")))
            assert payload_bytes(largest, "topk8") <= largest_message_bytes(chunk, numel, "sparse")
    assert largest_message_bytes(chunk, numel, "sparse") < 12 << 20


# --- averaging with sparse parts ----------------------------------------------------------------------------------
class Swarm:
    def __init__(self, network: InProcessNetwork, clock: VirtualClock, count: int, spec: AveragingSpec,
                 attacker: Optional[int] = None) -> None:  # fmt: skip
        self.ports = [network.join(f"peer-{i}") for i in range(count)]
        self.ids = [p.peer_id for p in self.ports]
        self.spec = spec
        kinds = [Attacker if i == attacker else Averager for i in range(count)]
        self.averagers: List[Averager] = [kind(p, SWARM_ID, hosted=lambda: {"trunk"}, spec=spec, clock=clock.monotonic)
                                          for kind, p in zip(kinds, self.ports, strict=True)]  # fmt: skip
        self.matchmakers = [Matchmaker(p, SWARM_ID, spec.gather_seconds, smallest_message=spec.message_bytes)
                            for p in self.ports]  # fmt: skip

    async def average(self, round_number: int, vectors: Dict[int, np.ndarray]) -> Dict[int, AllReduceResult]:
        async def one(i: int) -> AllReduceResult:
            others = [self.ids[j] for j in vectors if j != i]
            group = await self.matchmakers[i].form_group("trunk", round_number, "0" * 32, NUMEL, others,
                                                         self.spec.round_timeout_seconds)  # fmt: skip
            return await self.averagers[i].all_reduce(group, vectors[i])

        results = await asyncio.gather(*(self.ports[i].spawn(one(i)) for i in vectors))
        return dict(zip(vectors, results, strict=True))


def averaged(scenario, count: int = 4, spec: AveragingSpec = SPEC, attacker: Optional[int] = None):  # type: ignore[no-untyped-def]
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)

    async def main():  # type: ignore[no-untyped-def]
        swarm = Swarm(network, clock, count, spec, attacker)
        for averager in swarm.averagers:
            await averager.start()
        try:
            return await scenario(swarm)
        finally:
            await network.close()

    return run_virtual(main(), clock=clock)


def expected_result(parts: Dict[int, np.ndarray], spec: AveragingSpec) -> np.ndarray:
    """Each reducer's slice: the robust aggregate of the members' decoded parts, sent back in 8 bits."""
    out = np.empty(NUMEL, dtype=np.float32)
    for lo, hi in chunked_bounds(NUMEL, len(parts), slice_values(spec.chunk_elements, "topk2")):
        decoded = {str(i): sparse.decode(sparse.encode_topk2(v[lo:hi], spec.topk), hi - lo, "topk2")
                   for i, v in parts.items()}  # fmt: skip
        combined = aggregate(decoded, "0", method=spec.aggregator, clip_multiplier=spec.clip_multiplier,
                             outlier_ratio=spec.outlier_ratio).values  # fmt: skip
        out[lo:hi] = sparse.decode(sparse.encode_topk8(combined), hi - lo, "topk8")
    return out


@pytest.mark.parametrize("aggregator", ["mean", "centered_clip"])
def test_a_sparse_round_is_bit_identical_everywhere_and_is_the_aggregate_of_the_decoded_parts(aggregator: str):
    spec = dataclasses.replace(SPEC, aggregator=aggregator)
    vectors = {i: make_vector(3, i, NUMEL) for i in range(4)}

    async def scenario(swarm: Swarm) -> Dict[int, AllReduceResult]:
        return await swarm.average(3, vectors)

    results = averaged(scenario, spec=spec)
    assert all(r.averaged_fraction == 1.0 and len(r.contributors) == 4 for r in results.values())
    for result in results.values():
        np.testing.assert_array_equal(result.vector, results[0].vector)
    np.testing.assert_array_equal(results[0].vector, expected_result(vectors, spec))
    assert 0 < np.count_nonzero(results[0].vector) <= 4 * 64 * -(-NUMEL // 4096)  # the union of what was sent


def test_what_a_member_does_not_send_it_sends_later_error_feedback() -> None:
    """Over rounds, what a member sent plus what it still holds is everything it had to send (decayed by
    ``error_feedback``): nothing is lost, and most of a constant vector has gone out after a few rounds."""
    constant = make_vector(0, 0, NUMEL)

    async def scenario(swarm: Swarm) -> List[Tuple[np.ndarray, np.ndarray]]:
        out = []
        for round_number in range(6):
            vectors = {i: constant if i == 0 else make_vector(round_number, i, NUMEL) for i in range(2)}
            memory = swarm.averagers[0].memory("trunk")
            before = np.zeros(NUMEL, np.float32) if memory.residual is None else memory.residual.copy()
            await swarm.average(round_number, vectors)
            assert memory.residual is not None
            out.append((before, memory.residual.copy()))
        return out

    history = averaged(scenario, count=2)
    layout = chunked_bounds(NUMEL, 2, slice_values(SPEC.chunk_elements, "topk2"))
    per_round = 64 * sum(sparse.block_count(hi - lo) for lo, hi in layout)  # topk per block of each slice
    sent_total = np.zeros(NUMEL, np.float64)
    for before, after in history:
        owed = constant + np.float32(0.95) * before  # what this round had to send
        sent = owed - after
        assert 0 < np.count_nonzero(np.abs(sent) > 1e-6) <= per_round
        np.testing.assert_allclose(sent + after, owed, rtol=0, atol=1e-5)
        sent_total += sent
    # the positions sent move from round to round: what was sent is no longer owed, and the rest grows
    assert np.count_nonzero(sent_total) > 3 * per_round


Attacked = Tuple[Dict[int, np.ndarray], Dict[int, AllReduceResult], Dict[str, int]]


def attacked(round_number: int, count: int, attack: str) -> Attacked:
    """One round of ``count`` peers whose last one attacks as ``attack``: (vectors, results, peer 0's rejections)."""
    vectors = {i: make_vector(round_number, i, NUMEL) for i in range(count)}

    async def scenario(swarm: Swarm) -> Tuple[Dict[int, AllReduceResult], Dict[str, int]]:
        attacker = swarm.averagers[count - 1]
        assert isinstance(attacker, Attacker)
        attacker.attack = attack
        results = await swarm.average(round_number, vectors)
        return results, dict(swarm.averagers[0].stats.parts_rejected)

    results, rejected = averaged(scenario, count=count, attacker=count - 1)
    return vectors, results, rejected


def test_a_scaled_sparse_part_is_screened_out_and_the_honest_result_stands() -> None:
    vectors, results, rejected = attacked(5, 4, "scale_1e30")
    assert rejected.get("outlier", 0) >= 1
    honest = expected_result({i: vectors[i] for i in range(3)}, SPEC)
    for i in range(3):
        assert results[i].averaged_fraction == 1.0
        assert np.abs(results[i].vector).max() < 100  # nothing of the x1e30 part got in
        # slices the attacker reduced were redone by backups without it; the rest were reduced by honest peers
        assert np.corrcoef(results[i].vector, honest)[0, 1] > 0.9


def test_a_part_in_another_format_is_refused_as_malformed() -> None:
    """A member of this swarm sends its parts in the manifest's format (or float32 in a re-sync), nothing else: an
    int8 part in a sparse swarm is refused, its sender is out of the round, and the others average without it."""
    _, results, rejected = attacked(7, 3, "int8_in_sparse")
    assert rejected.get("malformed", 0) >= 1
    assert RESULT_DTYPE_OF["topk2"] == "topk8"
    for i in range(2):
        assert results[i].dropped == ("peer-2",) and "malformed" in results[i].excluded["peer-2"]
    np.testing.assert_array_equal(results[0].vector, results[1].vector)
