"""What a node takes from its peers at once is bounded: frame sizes from the manifest, a deadline on every frame
body, streams, requests and frame bytes per peer (node/net/streams.py: Limits), averaging mail for rounds that
have not started here (node/averaging/averager.py: early mail), and state ranges per peer (node/swarm/statesync.py).
The real-stream side: tests/swarm/test_streams.py."""

from __future__ import annotations

import asyncio
from typing import List, Tuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from node.averaging import Averager, Matchmaker, largest_message_bytes
from node.averaging.averager import EARLY_SHARE, EARLY_SHARE_PER_SENDER, PENALTY_BURST, PENALTY_RATE
from node.averaging.matchmaking import MAX_MESSAGE_GROWTH
from node.averaging.slices import chunked_bounds, region_bounds
from node.net import InProcessNetwork, VirtualClock, run_virtual
from node.net.streams import Bucket, Buckets, Limits, body_deadline, read_body, read_frame, read_size
from node.runtime.joined import frame_limit
from node.swarm import StateServer
from node.swarm.statesync import STATE_SHARE
from node.training import ModuleState, state_hash
from protocol import handlers
from protocol.frames import FrameError, stream_prefix
from protocol.manifest import AveragingSpec, OuterOptimizerSpec, load_manifest
from protocol.wire import Ack, Refusal, StateReply, StateRequest, TensorPart, decode, encode, tensor_payload

SWARM_ID = "b" * 16
SPEC = AveragingSpec(gather_seconds=1.0, part_timeout_seconds=5.0, round_timeout_seconds=30.0, chunk_elements=2_500)
AVG = handlers.averaging(SWARM_ID)


# --- frame sizes ---------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(1, 3_000_000_000),
    chunk=st.integers(16, 1 << 22),
    size=st.integers(2, 2000),
    growth=st.integers(1, MAX_MESSAGE_GROWTH),
)
def test_no_slice_of_any_group_is_larger_than_the_largest_message(numel: int, chunk: int, size: int, growth: int):
    """largest_message_bytes bounds every slice a group of any size cuts, plain or re-sync (three regions), at any
    agreed message size: the frame limit never refuses an honest peer's message."""
    limit = largest_message_bytes(chunk, numel)
    plain = chunked_bounds(numel, size, growth * chunk)
    resync = region_bounds([numel] * 3, size, growth * chunk)
    largest = max(hi - lo for lo, hi in plain + resync)
    assert 4 * largest <= limit, (largest, limit)


def test_the_shipped_manifests_frames_are_a_few_mib_not_a_gib():
    manifest = load_manifest(None)
    sizes = manifest.model.parameter_count()  # the whole model: more than its largest module
    limit = frame_limit(manifest.averaging.chunk_elements, sizes)
    assert 4 << 20 < limit < 8 << 20, limit  # a 4 MiB state range, its header; nowhere near 1 GiB


# --- Limits ------------------------------------------------------------------------------------------------------
def test_streams_per_peer_are_capped_and_closing_one_makes_room():
    limits = Limits(streams_per_peer=3)
    assert all(limits.open_stream("a") for _ in range(3))
    assert not limits.open_stream("a")
    assert limits.open_stream("b"), "another peer is not held back by the first one's streams"
    limits.close_stream("a")
    assert limits.open_stream("a") and not limits.open_stream("a")


def test_frame_bytes_are_budgeted_per_peer_and_for_the_node():
    limits = Limits(peer_budget=100, node_budget=150)
    assert limits.reserve("a", 60) and limits.reserve("a", 40)
    assert not limits.reserve("a", 1), "over the peer's budget"
    assert limits.reserve("b", 50)
    assert not limits.reserve("c", 1), "over the node's budget"
    limits.release("a", 60)
    assert limits.held == 90 and limits.reserve("c", 60)
    for peer, size in (("a", 40), ("b", 50), ("c", 60)):
        limits.release(peer, size)
    assert limits.held == 0 and limits.reserve("a", 100)


def test_refusals_are_counted_by_request_and_reason(caplog):
    limits = Limits()
    for _ in range(3):
        limits.refuse("avg", "peer-x", "frame_too_large", "frame of 9 bytes is over the 8 limit")
    limits.refuse("state", "peer-x", "slow_frame", "took too long")
    assert limits.refused == {("avg", "frame_too_large"): 3, ("state", "slow_frame"): 1}
    logged = [r for r in caplog.records if "refused a" in r.getMessage()]
    assert len(logged) == 1, "one line a minute per peer, not one per refusal"


def _reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_a_frame_over_the_limit_is_refused_from_its_prefix_alone():
    async def scenario() -> None:
        reader = _reader(stream_prefix(1 << 30), eof=False)  # a 1 GiB claim, and nothing after it
        with pytest.raises(FrameError, match="over the 4096 limit"):
            await read_size(reader, limit=4096)
        assert await read_frame(_reader(stream_prefix(3) + b"abc"), limit=4096) == b"abc"

    asyncio.run(scenario())


def test_a_body_that_stalls_ends_at_its_deadline_in_virtual_time():
    clock = VirtualClock()

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        reader = _reader(stream_prefix(1 << 20) + b"x" * 1000, eof=False)  # 1 MiB promised, 1000 bytes sent
        size = await read_size(reader)
        started = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await read_body(reader, size, body_deadline(size))
        return loop.time() - started

    waited = run_virtual(scenario(), clock=clock)
    assert waited == pytest.approx(body_deadline(1 << 20)) and 40 < waited < 60


# --- early averaging mail --------------------------------------------------------------------------------------------
def _part(round_number: int, sender: str, slice_index: int, numel: int, group: str = "0" * 16) -> bytes:
    header = TensorPart(type="part", swarm_id=SWARM_ID, module="trunk", round=round_number, group_id=group,
                        slice_index=slice_index, sender=sender, numel=numel, dtype="float32")  # fmt: skip
    return encode(header, tensor_payload(np.ones(numel, dtype=np.float32)))


def _answer(reply: bytes) -> Ack:
    ack, _ = decode(reply)
    assert isinstance(ack, Ack)
    return ack


def test_mail_for_a_round_this_node_has_not_posted_for_is_refused_and_not_kept():
    """A peer's parts for rounds far ahead (10^9) used to be acknowledged and kept: hundreds of MB."""
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)

    async def scenario() -> None:
        node, stranger = network.join("node"), network.join("stranger")
        averager = Averager(node, SWARM_ID, hosted=lambda: {"trunk"}, spec=SPEC, clock=clock.monotonic)
        await averager.start()
        for round_number in (10**9, 5, 0):
            ack = _answer(await stranger.call("node", AVG, _part(round_number, "stranger", 0, 1000), 5.0))
            assert ack.code == Refusal.TOO_EARLY and ack.code.benign, ack
        assert averager._early.items == {} and averager.stats.parts_rejected == {"too_early": 3}
        averager.expect("trunk", 5, numel=1000)  # posted for round 5: its mail is kept, other rounds' still not
        assert _answer(await stranger.call("node", AVG, _part(5, "stranger", 0, 1000), 5.0)).ok
        assert _answer(await stranger.call("node", AVG, _part(6, "stranger", 0, 1000), 5.0)).code == Refusal.TOO_EARLY
        await network.close()

    run_virtual(scenario(), clock=clock)


def test_early_mail_for_the_posted_round_is_bounded_per_sender_and_in_all():
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)
    numel, slice_numel = 10_000, 1_000
    whole = 3 * 4 * numel  # bytes of the module's re-sync vector: the unit of the shares

    async def flood(port, averager: Averager) -> int:  # type: ignore[no-untyped-def]
        kept = 0
        for index in range(200):  # distinct slices and groups: nothing is ever overwritten
            frame = _part(7, port.peer_id, index, slice_numel, group=f"{index:016x}")
            ack = _answer(await port.call("node", AVG, frame, 5.0))
            if not ack.ok:
                assert ack.code == Refusal.TOO_EARLY, ack
                break
            kept += 4 * slice_numel
        return kept

    async def scenario() -> List[int]:
        node = network.join("node")
        averager = Averager(node, SWARM_ID, hosted=lambda: {"trunk"}, spec=SPEC, clock=clock.monotonic)
        await averager.start()
        averager.expect("trunk", 7, numel=numel)
        kept = [await flood(network.join(f"flooder-{i}"), averager) for i in range(4)]
        held = sum(v.nbytes for items in averager._early.items.values() for _, v in items.values())
        assert held == sum(kept)
        await network.close()
        return kept

    kept = run_virtual(scenario(), clock=clock)
    assert kept[0] == EARLY_SHARE_PER_SENDER * whole, kept  # one sender: its share, then refused
    assert sum(kept) <= EARLY_SHARE * whole and kept[-1] == 0, kept  # all senders: the round's share


def test_a_member_that_posts_late_still_gets_every_part_the_others_sent_early():
    """Parts sent before their receiver posted are answered too_early and sent again: the round is whole."""
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)
    numel = 20_000

    async def scenario() -> List[float]:
        ports = [network.join(f"peer-{i}") for i in range(3)]
        averagers = [Averager(p, SWARM_ID, hosted=lambda: {"trunk"}, spec=SPEC, clock=clock.monotonic) for p in ports]
        for averager in averagers:
            await averager.start()
        makers = [Matchmaker(p, SWARM_ID, SPEC.gather_seconds, smallest_message=SPEC.message_bytes) for p in ports]
        ids = [p.peer_id for p in ports]

        async def one(i: int, late: float) -> float:
            await asyncio.sleep(late)
            others = [p for p in ids if p != ids[i]]
            averagers[i].expect("trunk", 3, numel) if late == 0 else None  # the late one posts without warning
            group = await makers[i].form_group("trunk", 3, "0" * 32, numel, others, SPEC.round_timeout_seconds)
            if late:
                await asyncio.sleep(late)  # its all-reduce starts long after the others sent their parts
            result = await averagers[i].all_reduce(group, np.full(numel, float(i), dtype=np.float32))
            np.testing.assert_allclose(result.vector, 1.0)
            return result.averaged_fraction

        fractions = await asyncio.gather(one(0, 0.0), one(1, 0.0), one(2, 0.6))
        assert sum(a.stats.parts_rejected.get("too_early", 0) for a in averagers) > 0, "the late one refused some"
        await network.close()
        return list(fractions)

    assert run_virtual(scenario(), clock=clock) == [1.0, 1.0, 1.0]


# --- rates: requests per peer, and state ranges per peer's share -----------------------------------------------------
def test_a_bucket_refills_at_its_rate_up_to_its_burst_per_peer():
    now = [0.0]
    buckets = Buckets(rate=2.0, burst=4.0, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(5)] == [True] * 4 + [False]
    assert buckets.take("b"), "each peer has its own bucket"
    now[0] += 1.0  # two more
    assert [buckets.take("a") for _ in range(3)] == [True, True, False]
    now[0] += 100.0  # never more than the burst
    assert [buckets.take("a") for _ in range(5)] == [True] * 4 + [False]
    assert not buckets.take("a", 0.5) and Bucket(1.0, 10.0).take(10.0)
    queue = Bucket(rate=2.0, burst=1.0, clock=lambda: now[0])  # waiters line up: 0, then 0.5 s, 1 s, ...
    assert [queue.reserve() for _ in range(3)] == [0.0, 0.5, 1.0]
    assert queue.reserve(longest=1.0) is None and queue.reserve() == 1.5, "a refused reservation takes nothing"


def test_limits_rate_hellos_and_dialbacks_per_peer_but_not_averaging():
    limits = Limits()
    hellos = [limits.turn("peer", "hello", 0.0) == 0.0 for _ in range(100)]
    assert 15 <= sum(hellos) <= 25 and not hellos[-1]
    assert sum(limits.turn("peer", "dialback", 0.0) == 0.0 for _ in range(100)) <= 6
    assert all(limits.turn("peer", "avg", 0.0) == 0.0 for _ in range(10_000))
    assert limits.turn("another", "hello", 0.0) == 0.0


def test_the_state_digest_is_hashed_once_until_the_state_changes_even_in_place():
    state = ModuleState("trunk", [torch.nn.Parameter(torch.randn(1000))], OuterOptimizerSpec())
    first = state.params_hash()
    assert state._hash_cache[1] == first and state.params_hash() is first  # the cached string itself
    state.momentum.add_(1.0)  # in place: torch counts it
    changed = state.params_hash()
    assert changed != first and changed == state_hash(state.global_flat.numpy(), state.momentum.numpy())
    state.global_flat = state.global_flat.clone()  # replaced by an equal tensor: hashed again, same value
    assert state.params_hash() == changed and state._hash_cache[0][0] is state.global_flat


def test_a_peer_downloads_its_share_of_our_state_then_is_refused_while_others_are_served():
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)
    state = ModuleState("trunk", [torch.nn.Parameter(torch.randn(4096))], OuterOptimizerSpec())
    server_states = {"trunk": state}

    async def ranges(port, count: int) -> int:  # type: ignore[no-untyped-def]
        served = 0
        for _ in range(count):
            request = StateRequest(swarm_id=SWARM_ID, module="trunk", offset=0, count=2 * 4096,
                                   expected_hash=state.params_hash())  # fmt: skip
            reply, payload = decode(await port.call("donor", handlers.state(SWARM_ID), encode(request), 5.0))
            assert isinstance(reply, StateReply)
            served += reply.ok and len(payload) == 8 * 4096
        return served

    async def scenario() -> Tuple[int, int, int]:
        server = StateServer(network.join("donor"), SWARM_ID, lambda: server_states, lambda: 3)
        await server.start()
        greedy = await ranges(network.join("greedy"), 10_000)
        other = await ranges(network.join("newcomer"), 3)
        await network.close()
        return greedy, other, server.refused

    greedy, other, refused = run_virtual(scenario(), clock=clock)
    share = STATE_SHARE * 8 * 4096 + (64 << 20)
    base = int(share // (8 * 4096))  # its share at once; a little more refills while it asks (share / 600 s)
    assert base <= greedy <= base + 20 and refused == 10_000 - greedy
    assert other == 3


def test_a_peer_flooding_parts_for_rounds_far_ahead_is_answered_at_the_penalty_pace():
    """A flood of parts for round 10^9 used to be answered as fast as it came (and kept); now past a burst of
    refusals, each answer waits for the peer's allowance: the flood comes in at a part a second."""
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)

    async def scenario() -> List[float]:
        node, flooder = network.join("node"), network.join("flooder")
        # A node alone has posted for nothing: its own round (round_now) says what is far ahead.
        averager = Averager(node, SWARM_ID, hosted=lambda: {"trunk"}, spec=SPEC, clock=clock.monotonic,
                            round_now=lambda: 5)  # fmt: skip
        await averager.start()
        loop, took = asyncio.get_running_loop(), []
        for _ in range(int(PENALTY_BURST) + 5):
            started = loop.time()
            ack = _answer(await flooder.call("node", AVG, _part(10**9, "flooder", 0, 1000), 30.0))
            assert ack.code == Refusal.TOO_EARLY
            took.append(loop.time() - started)
        assert _answer(await flooder.call("node", AVG, _part(6, "flooder", 0, 1000), 30.0)).code == Refusal.TOO_EARLY
        await network.close()
        return took

    took = run_virtual(scenario(), clock=clock)
    burst = int(PENALTY_BURST)
    assert max(took[: burst - 1]) < 0.1 and all(0.5 < t <= 1.0 / PENALTY_RATE + 0.1 for t in took[burst + 1 :]), took
