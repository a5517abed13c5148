"""The averaging engine under attack and faults, in one process: the fast, deterministic tier.

Four peers (three honest, one attacker) on an InProcessNetwork in virtual time (node/net/inprocess.py,
node/net/virtualtime.py), each with the production Matchmaker and Averager; the attacker runs modified
averaging code (tests/attacks.py), exactly as in the real-process tier (tests/swarm/test_robust_averaging.py,
which keeps checking the same classes over real p2pd streams). Waits cost no wall time here, so a slow
reducer, a dead member and every deadline run in milliseconds, and the same scenario always gives the
same bytes. Network faults (a dropped, delayed, corrupted, truncated message, a closed stream) are
injected by the network, which the real tier cannot do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest

from node.averaging import AllReduceResult, Averager, Matchmaker
from node.averaging.slices import chunked_bounds, owner_of
from node.net import InProcessNetwork, InProcessSwarm, VirtualClock, run_virtual
from protocol import handlers
from protocol.manifest import AveragingSpec
from tests.attacks import CLASSES, Attacker, honest_aggregate, make_vector

SWARM_ID = "a" * 16
NUMEL = 40_000
CHUNK = 2_500  # 4 chunks of 4 slices in a group of 4: the pipelined path big modules take
SPEC = AveragingSpec(gather_seconds=1.0, part_timeout_seconds=5.0, round_timeout_seconds=30.0, chunk_elements=CHUNK)
HONEST, ATTACKER = [0, 1, 2], 3
AVG = handlers.averaging(SWARM_ID)


class Swarm:
    """Peers 0..n-1 on one in-process network; peer ``i`` contributes ``make_vector(round, i, NUMEL)``."""

    def __init__(self, network: InProcessNetwork, clock: VirtualClock, count: int = 4, attacker: bool = True):
        self.network = network
        self.ports: List[InProcessSwarm] = [network.join(f"peer-{i}") for i in range(count)]
        self.ids = [port.peer_id for port in self.ports]
        self.averagers: List[Averager] = []
        for i, port in enumerate(self.ports):
            kind = Attacker if attacker and i == ATTACKER else Averager
            averager = kind(port, SWARM_ID, hosted=lambda: {"trunk"}, spec=SPEC, clock=clock.monotonic)
            if isinstance(averager, Attacker):
                averager.crash = lambda port=port: network.kill(port.peer_id)
            self.averagers.append(averager)
        self.matchmakers = [Matchmaker(p, SWARM_ID, SPEC.gather_seconds, smallest_message=SPEC.message_bytes)
                            for p in self.ports]  # fmt: skip

    async def start(self) -> None:
        for averager in self.averagers:
            await averager.start()

    async def average(
        self, round_number: int, attacks: Optional[Dict[int, str]] = None, who: Optional[Sequence[int]] = None,
        expected: Optional[Sequence[int]] = None,
    ) -> Dict[int, Tuple[List[str], AllReduceResult]]:  # fmt: skip
        """One round of every peer in ``who`` (default: all alive); {peer: (group members, result)}."""
        attacks = attacks or {}
        who = list(range(len(self.ports))) if who is None else list(who)
        expected_ids = [self.ids[i] for i in (expected if expected is not None else who)]
        for i in who:
            averager = self.averagers[i]
            if isinstance(averager, Attacker):
                averager.attack = attacks.get(i, "none")

        async def one(i: int) -> Tuple[List[str], AllReduceResult]:
            others = [p for p in expected_ids if p != self.ids[i]]
            group = await self.matchmakers[i].form_group("trunk", round_number, "0" * 32, NUMEL, others,
                                                         SPEC.round_timeout_seconds)  # fmt: skip
            return list(group.members), await self.averagers[i].all_reduce(group, make_vector(round_number, i, NUMEL))

        tasks = {i: self.ports[i].spawn(one(i)) for i in who}
        done = await asyncio.gather(*tasks.values(), return_exceptions=True)
        out = {}
        for i, result in zip(tasks, done, strict=True):
            if isinstance(result, BaseException):
                assert isinstance(result, asyncio.CancelledError) and attacks.get(i) == "crash_after_parts", result
                continue
            out[i] = result
        return out

    def rejected(self, i: int) -> Dict[str, int]:
        return dict(self.averagers[i].stats.parts_rejected)


def run(scenario, count: int = 4, attacker: bool = True):  # type: ignore[no-untyped-def]
    """``scenario(swarm)`` on a fresh network of ``count`` peers after two clean warm-up rounds (the deadlines
    are learned from them, as in a running swarm); returns what it returns, and the wall time it took."""
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)

    async def main():  # type: ignore[no-untyped-def]
        swarm = Swarm(network, clock, count, attacker)
        await swarm.start()
        for warmup in range(2):
            await swarm.average(warmup)
        try:
            return await scenario(swarm)
        finally:
            await network.close()

    started = time.perf_counter()
    result = run_virtual(main(), clock=clock)
    return result, time.perf_counter() - started


def aggregate(round_number: int, peers: Sequence[int], group_size: int = 4) -> np.ndarray:
    return honest_aggregate(round_number, list(peers), group_size, NUMEL, CHUNK, SPEC)


def slices_of(reducer: int, group_size: int = 4) -> List[Tuple[int, int]]:
    """Bounds of the slices peer ``reducer`` reduces in a group of all (ids sort as peer-0 < peer-1 < ...)."""
    layout = chunked_bounds(NUMEL, group_size, CHUNK)
    return [b for i, b in enumerate(layout) if owner_of(i, range(group_size)) == reducer]


def failed_reducer_aggregate(round_number: int, reducer: int) -> np.ndarray:
    """Honest peers' vector when ``reducer``'s parts were good but its results were not taken: everyone's
    aggregate where the others reduced, the backups' aggregate without it in its own slices."""
    expected = aggregate(round_number, [0, 1, 2, 3])
    without = aggregate(round_number, [p for p in range(4) if p != reducer])
    for lo, hi in slices_of(reducer):
        expected[lo:hi] = without[lo:hi]
    return expected




def test_a_clean_round_is_bit_identical_on_all_peers_and_is_the_aggregate() -> None:
    async def scenario(swarm: Swarm) -> Dict[int, Tuple[List[str], AllReduceResult]]:
        return await swarm.average(10)

    replies, _ = run(scenario)
    assert all(len(members) == 4 and r.averaged_fraction == 1.0 for members, r in replies.values())
    for _, result in replies.values():
        np.testing.assert_array_equal(result.vector, replies[0][1].vector)
    np.testing.assert_allclose(replies[0][1].vector, aggregate(10, [0, 1, 2, 3]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("attack", list(CLASSES))
def test_a_corrupt_peer_is_excluded_and_honest_peers_get_the_honest_aggregate(attack: str) -> None:
    async def scenario(swarm: Swarm):  # type: ignore[no-untyped-def]
        await swarm.average(9)  # a clean round just before, as in a running swarm (and the real tier)
        before = [swarm.rejected(i) for i in HONEST]
        replies = await swarm.average(10, {ATTACKER: attack})
        return before, replies, [swarm.rejected(i) for i in HONEST]

    (before, replies, after), _ = run(scenario)
    expected = failed_reducer_aggregate(10, ATTACKER) if attack == "lying_reducer" else aggregate(10, HONEST)
    for i in HONEST:
        _, result = replies[i]
        np.testing.assert_allclose(result.vector, expected, rtol=0, atol=1e-4, err_msg=f"peer {i}")
        assert result.averaged_fraction == 1.0, result
        if attack != "lying_reducer":
            assert f"peer-{ATTACKER}" in result.dropped and f"peer-{ATTACKER}" in result.excluded, result
    reason = CLASSES[attack]
    moved = [after[n].get(reason, 0) - before[n].get(reason, 0) for n in range(len(HONEST))]
    assert sum(moved) > 0, f"counter {reason} did not move: {after}"
    # Honest peers do not wait for an excluded member: the round ends before any deadline could.
    assert max(replies[i][1].seconds for i in HONEST) < SPEC.part_timeout_seconds


def test_a_reducer_whose_results_come_too_late_is_replaced_by_backups_and_says_its_slices_were_not_averaged():
    async def scenario(swarm: Swarm):  # type: ignore[no-untyped-def]
        slow = await swarm.average(10, {ATTACKER: "slow_reducer"})
        after = await swarm.average(11)  # the late results reach peers that finished round 10
        return slow, after, [swarm.rejected(i) for i in HONEST]

    (slow, after, rejected), _ = run(scenario)
    for i in HONEST:
        np.testing.assert_allclose(slow[i][1].vector, failed_reducer_aggregate(10, ATTACKER), rtol=0, atol=1e-4)
        assert slow[i][1].averaged_fraction == 1.0
    own_share = sum(hi - lo for lo, hi in slices_of(ATTACKER)) / NUMEL
    assert slow[ATTACKER][1].averaged_fraction == pytest.approx(1.0 - own_share)
    assert all(r.averaged_fraction == 1.0 for _, r in after.values())
    assert sum(r.get("too_late", 0) + r.get("round_over", 0) for r in rejected) > 0, rejected


def test_a_member_that_dies_after_sending_its_parts_still_counts_and_the_others_finish() -> None:
    async def scenario(swarm: Swarm):  # type: ignore[no-untyped-def]
        crashed = await swarm.average(10, {ATTACKER: "crash_after_parts"})
        survivors = await swarm.average(11, who=HONEST)
        return crashed, survivors

    (crashed, survivors), _ = run(scenario)
    assert ATTACKER not in crashed  # its task was cancelled with the peer
    for i in HONEST:
        members, result = crashed[i]
        # Its parts arrived before it died, so they count; its own slices were reduced again by the
        # backups among the survivors, so the whole vector was averaged, and says so.
        assert len(members) == 4 and result.averaged_fraction == 1.0, result
        np.testing.assert_array_equal(result.vector, crashed[0][1].vector)
        members, result = survivors[i]
        assert len(members) == 3 and result.averaged_fraction == 1.0
    np.testing.assert_allclose(crashed[0][1].vector, failed_reducer_aggregate(10, ATTACKER), rtol=0, atol=1e-4)
    np.testing.assert_allclose(survivors[0][1].vector, aggregate(11, HONEST, group_size=3), rtol=0, atol=1e-4)


# --- network faults, which only the in-process network can inject --------------------------------------
def clean_round(round_number: int = 10) -> Dict[int, np.ndarray]:
    async def scenario(swarm: Swarm) -> Dict[int, np.ndarray]:
        return {i: r.vector for i, (_, r) in (await swarm.average(round_number)).items()}

    return run(scenario, attacker=False)[0]


def assert_partial_rounds_say_so(replies: Dict[int, Tuple[List[str], AllReduceResult]], round_number: int) -> None:
    """A partial round is never reported as a full one: what a member reports as not averaged holds its own
    values (the round leaves it unstepped), and the fraction says how much was averaged."""
    for i, (_, result) in replies.items():
        own = make_vector(round_number, i, NUMEL)
        for lo, hi in result.unaveraged:
            np.testing.assert_array_equal(result.vector[lo:hi], own[lo:hi])
        left = sum(hi - lo for lo, hi in result.unaveraged)
        assert result.averaged_fraction == pytest.approx(1.0 - left / NUMEL)


@pytest.mark.parametrize("fault", ["close", "delay"])
def test_a_closed_stream_or_a_late_message_changes_nothing(fault: str) -> None:
    """A stream closed under a part is opened again; a part late by less than the deadline learned from
    the warm-up rounds (here its 1 s floor) is waited for: the round ends exactly as a clean one, bit for bit."""

    async def scenario(swarm: Swarm):  # type: ignore[no-untyped-def]
        on = swarm.network.faults.on(sender="peer-0", receiver="peer-1", handler=AVG, nth=2)
        rule = on.close() if fault == "close" else on.delay(0.5)
        replies = await swarm.average(10)
        return rule.fired, replies

    (fired, replies), _ = run(scenario, attacker=False)
    assert fired == 1
    clean = clean_round()
    for i, (_, result) in replies.items():
        assert result.averaged_fraction == 1.0
        np.testing.assert_array_equal(result.vector, clean[i])


def test_a_part_later_than_the_deadline_leaves_both_sides_partial_and_saying_so() -> None:
    """Peer 0's second part to peer 1 arrives after peer 1's deadline: peer 1 goes on without peer 0 (so
    it neither applies peer 0's results nor sends peer 0 its own), and the backups for those slices have
    already finished their round. Both report exactly what they could not average; the others are whole."""

    async def scenario(swarm: Swarm):  # type: ignore[no-untyped-def]
        swarm.network.faults.on(sender="peer-0", receiver="peer-1", handler=AVG, nth=2).delay(1.25)
        return await swarm.average(10)

    replies, _ = run(scenario, attacker=False)
    assert replies[1][1].excluded == {"peer-0": "no_part"}
    assert replies[0][1].averaged_fraction < 1.0 and replies[1][1].averaged_fraction < 1.0
    assert replies[2][1].averaged_fraction == replies[3][1].averaged_fraction == 1.0
    assert_partial_rounds_say_so(replies, 10)


def test_a_result_lost_to_one_member_leaves_that_slice_unaveraged_there_only() -> None:
    """Peer 1's result for one slice never reaches peer 0. Peer 0 turns to that slice's backup, which has
    finished its round (it lost nothing) and refuses (round_over): peer 0 keeps its own values there and
    says so. The backup path recovers a reducer that failed everyone (the tests above), not a single loss."""

    async def scenario(swarm: Swarm):  # type: ignore[no-untyped-def]
        is_result = lambda frame: b"result" in frame[:200]  # noqa: E731 (the header names the message type)
        rule = swarm.network.faults.on(sender="peer-1", receiver="peer-0", handler=AVG, match=is_result).drop()
        replies = await swarm.average(10)
        return rule.fired, replies, swarm.rejected(2)

    (fired, replies, backup_rejected), _ = run(scenario, attacker=False)
    assert fired == 1 and backup_rejected.get("round_over", 0) >= 1
    lost = replies[0][1].unaveraged
    assert len(lost) == 1 and lost[0] in slices_of(1)
    assert all(r.averaged_fraction == 1.0 for i, (_, r) in replies.items() if i != 0)
    assert_partial_rounds_say_so(replies, 10)
    expected = aggregate(10, [0, 1, 2, 3])
    kept = np.ones(NUMEL, dtype=bool)
    kept[slice(*lost[0])] = False
    np.testing.assert_allclose(replies[0][1].vector[kept], expected[kept], rtol=0, atol=1e-4)


def test_a_truncated_part_excludes_its_sender_at_that_reducer_only() -> None:
    """The reducer refuses the truncated part as malformed and excludes its sender; the sender reads the
    refusal and leaves that reducer out in turn. Neither waits for the other past the learned deadline;
    the other two members average everything."""

    async def scenario(swarm: Swarm):  # type: ignore[no-untyped-def]
        swarm.network.faults.on(sender="peer-0", receiver="peer-1", handler=AVG, nth=1).truncate(100)
        return await swarm.average(10), swarm.rejected(1)

    (replies, rejected), _ = run(scenario, attacker=False)
    assert rejected.get("malformed") == 1
    assert replies[1][1].excluded == {"peer-0": "malformed"}
    assert replies[0][1].excluded == {"peer-1": "refused_ours:malformed"}
    assert replies[0][1].averaged_fraction == replies[1][1].averaged_fraction == 0.75
    assert replies[2][1].averaged_fraction == replies[3][1].averaged_fraction == 1.0
    assert all(r.seconds < SPEC.part_timeout_seconds for _, r in replies.values())
    assert_partial_rounds_say_so(replies, 10)


def test_a_part_with_one_flipped_bit_is_bounded_by_the_robust_aggregate() -> None:
    """One flipped bit leaves a well-formed part (the sign of its last value): the reducer cannot tell it
    from an honest one, and CenteredClip bounds its pull; every member ends within the honest spread."""

    async def scenario(swarm: Swarm):  # type: ignore[no-untyped-def]
        rule = swarm.network.faults.on(sender="peer-0", receiver="peer-1", handler=AVG, nth=1).flip_bit(-1)
        replies = await swarm.average(10)
        return rule.fired, replies

    (fired, replies), _ = run(scenario, attacker=False)
    assert fired == 1
    clean = clean_round()[2]
    spread = np.median([np.linalg.norm(make_vector(10, i, NUMEL) - clean) for i in range(4)])
    for i, (_, result) in replies.items():
        assert result.averaged_fraction == 1.0
        assert np.linalg.norm(result.vector - clean) < 0.01 * spread, i


def test_the_fault_tier_takes_no_wall_time_for_its_timeouts() -> None:
    """A slow reducer keeps everyone waiting for 2 x part_timeout in virtual time, not on the wall clock."""

    async def scenario(swarm: Swarm):  # type: ignore[no-untyped-def]
        started = asyncio.get_running_loop().time()
        await swarm.average(10, {ATTACKER: "slow_reducer"})
        return asyncio.get_running_loop().time() - started

    virtual_seconds, wall_seconds = run(scenario)
    assert virtual_seconds > SPEC.part_timeout_seconds  # it really waited, in virtual time
    assert wall_seconds < virtual_seconds / 2


def test_the_same_faulty_round_gives_the_same_bytes_every_time() -> None:
    async def scenario(swarm: Swarm) -> Tuple[bytes, ...]:
        swarm.network.faults.on(sender="peer-2", receiver="peer-0", handler=AVG, nth=3).flip_bit(-1)
        replies = await swarm.average(10, {ATTACKER: "sign_flip"})
        return tuple(r.vector.tobytes() for _, (_, r) in sorted(replies.items()))

    first, _ = run(scenario)
    second, _ = run(scenario)
    assert first == second


def test_spec_is_the_real_tiers_spec() -> None:
    """This tier checks what the real-process tier checks, with the same settings."""
    from tests.swarm.averaging_peer import SPEC as REAL

    assert dataclasses.replace(REAL, chunk_elements=CHUNK) == SPEC
