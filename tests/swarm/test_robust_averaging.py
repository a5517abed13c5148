"""Averaging under attack and crashes: real peers (DHT, p2pd, production Averager) on loopback.

Three honest peers and one attacker, each its own process (tests/swarm/averaging_peer.py).
The attacker runs modified averaging code; one round per corruption class. Honest peers
must end with the honest-only aggregate, the round must not stall past one sender
timeout, and the matching rejection counter must move.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from node.averaging.slices import chunked_bounds, owner_of, region_bounds
from tests.attacks import CLASSES, make_vector
from tests.attacks import honest_aggregate as aggregate_of
from tests.procs import NodeProcess
from tests.swarm.averaging_peer import SPEC

pytestmark = pytest.mark.swarm
NUMEL = 40_000
CHUNK = 2_500  # 4 chunks of 4 slices in a group of 4: the pipelined path big modules take
# The layout the tests compute must be the group's: the manifest's message size, whatever the rate.
CHUNKED = ["--chunk-elements", str(CHUNK), "--message-ask", "0"]


class AveragingSwarm:
    def __init__(self, tmp: Path, count: int, extra_args: List[str] = ()) -> None:
        self.peers: List[NodeProcess] = []
        self.dirs: List[Path] = []
        for index in range(count):
            out = tmp / f"peer{index}"
            out.mkdir(parents=True)
            argv = [sys.executable, "-m", "tests.swarm.averaging_peer", "--out", str(out), *extra_args]
            if self.peers:
                argv += ["--initial-peers", self.peers[0].maddr]
            peer = NodeProcess(argv, out, f"peer{index}", interactive=True)
            self.peers.append(peer)
            self.dirs.append(out)
            peer.wait_ready(60)
        self.ids = [p.ready["peer_id"] for p in self.peers]  # type: ignore[index]

    def run(self, command: dict, attacks: Dict[int, str], who=None, timeout: float = 90) -> List[dict]:
        """Send ``command`` to the peers in ``who`` (default: all) and to every attacker; return ``who``'s replies."""
        who = list(range(len(self.peers))) if who is None else who
        for index in sorted(set(who) | set(attacks)):
            self.peers[index].send({**command, "seed": index, "attack": attacks.get(index, "none")})
        return [self.peers[index].next_event(timeout) for index in who]

    def average(self, round_number: int, attacks: Dict[int, str], expected=None, who=None) -> List[dict]:
        command = {"cmd": "average", "round": round_number, "numel": NUMEL, "expected": expected or self.ids}
        return self.run(command, attacks, who)

    def result(self, index: int, round_number: int) -> np.ndarray:
        return np.load(self.dirs[index] / f"result_{round_number}.npy")

    def close(self) -> Dict[str, List[int]]:
        for peer in self.peers:
            if peer.proc.poll() is None:
                try:
                    peer.send({"cmd": "quit"})
                    peer.proc.wait(15)
                except (OSError, ValueError, Exception):
                    pass
        return {p.name: p.cleanup() for p in self.peers}


def honest_aggregate(
    round_number: int, honest: List[int], group_size: int = 4, numel: int = NUMEL, chunk: int = CHUNK
) -> np.ndarray:
    """What the reducers compute from the honest parts: each slice of the group's layout on its own."""
    return aggregate_of(round_number, honest, group_size, numel, chunk, SPEC)


def attacker_slices(swarm: AveragingSwarm) -> List[Tuple[int, int]]:
    """Bounds of the slices the attacker reduces in a group of all four."""
    members = sorted(swarm.ids)
    layout = chunked_bounds(NUMEL, 4, CHUNK)
    return [b for i, b in enumerate(layout) if members[owner_of(i, range(4))] == swarm.ids[ATTACKER]]


def failed_reducer_aggregate(swarm: AveragingSwarm, round_number: int) -> np.ndarray:
    """What honest peers end with when the attacker's parts were honest but its results were not
    taken: everyone's aggregate in the slices honest peers reduced, the backups' honest-only one in its own."""
    expected = honest_aggregate(round_number, HONEST + [ATTACKER])
    honest_only = honest_aggregate(round_number, HONEST)
    for lo, hi in attacker_slices(swarm):
        expected[lo:hi] = honest_only[lo:hi]
    return expected


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    swarm = AveragingSwarm(tmp_path_factory.mktemp("robust"), 4, CHUNKED)
    try:
        for warmup in range(2):  # learn the deadlines from clean rounds, as a running swarm has
            swarm.average(warmup, {})
        yield swarm
    finally:
        leaks = swarm.close()
        assert not any(leaks.values()), f"processes leaked: {leaks}"


ATTACKER = 3
HONEST = [0, 1, 2]
_round = iter(range(10, 1000))


def test_a_clean_round_is_bit_identical_on_all_peers_and_near_the_mean(four):
    r = next(_round)
    replies = four.average(r, {})
    assert all(reply["fraction"] == 1.0 and reply["group_size"] == 4 for reply in replies), replies
    results = [four.result(i, r) for i in range(4)]
    for result in results:
        np.testing.assert_array_equal(result, results[0])
    np.testing.assert_allclose(results[0], honest_aggregate(r, [0, 1, 2, 3]), rtol=0, atol=1e-4)
    # With no attacker the robust center sits next to the plain mean (clip radius = median distance).
    mean = np.mean([make_vector(r, i, NUMEL) for i in range(4)], axis=0)
    spread = np.median([np.linalg.norm(make_vector(r, i, NUMEL) - mean) for i in range(4)])
    assert np.linalg.norm(results[0] - mean) < 0.1 * spread


@pytest.mark.parametrize("attack", list(CLASSES))
def test_a_corrupt_peer_is_excluded_and_honest_peers_get_the_honest_aggregate(four, attack):
    clean = four.average(next(_round), {})
    clean_seconds = max(reply["seconds"] for reply in clean)
    before = [dict(reply["rejected"]) for reply in clean]
    r = next(_round)
    replies = four.average(r, {ATTACKER: attack})
    expected = failed_reducer_aggregate(four, r) if attack == "lying_reducer" else honest_aggregate(r, HONEST)
    for index in HONEST:
        np.testing.assert_allclose(four.result(index, r), expected, rtol=0, atol=1e-4, err_msg=f"peer{index}")
        assert replies[index]["fraction"] == 1.0, replies[index]
        if attack != "lying_reducer":
            assert four.ids[ATTACKER] in replies[index]["dropped"], replies[index]
    reason = CLASSES[attack]
    moved = [replies[i]["rejected"].get(reason, 0) - before[i].get(reason, 0) for i in HONEST]
    assert sum(moved) > 0, f"counter {reason} did not move: {[replies[i]['rejected'] for i in HONEST]}"
    took = max(replies[i]["seconds"] for i in HONEST)
    assert took <= clean_seconds + SPEC.part_timeout_seconds, (took, clean_seconds)


def test_a_reducer_whose_results_come_too_late_says_its_slices_were_not_averaged(four):
    """The others give up on it and take its slices from the backups; its late results are refused, so
    it knows nobody applied them and reports those slices as not averaged instead of a full round."""
    clean = four.average(next(_round), {})
    before = [dict(clean[i]["rejected"]) for i in HONEST]
    r = next(_round)
    replies = four.average(r, {ATTACKER: "slow_reducer"})
    for index in HONEST:
        np.testing.assert_allclose(four.result(index, r), failed_reducer_aggregate(four, r), rtol=0, atol=1e-4)
        assert replies[index]["fraction"] == 1.0, replies[index]
    own_share = sum(hi - lo for lo, hi in attacker_slices(four)) / NUMEL
    assert replies[ATTACKER]["fraction"] == pytest.approx(1.0 - own_share), replies[ATTACKER]
    after = four.average(next(_round), {})  # honest peers answered before the late results came
    assert all(reply["fraction"] == 1.0 for reply in after), after
    late = [sum(after[i]["rejected"].get(k, 0) - before[n].get(k, 0) for k in ("too_late", "round_over"))
            for n, i in enumerate(HONEST)]  # fmt: skip
    assert sum(late) > 0, [after[i]["rejected"] for i in HONEST]


@pytest.mark.parametrize("attack", ["none", "lying_reducer"])
def test_a_resync_completes_when_a_peer_diverged_in_one_reducers_slices_only(four, attack):
    """After a partial round one member's copy differs only in the slices one reducer failed: the
    distance check alone refused those honest results; the majority's state hash accepts them, and
    still refuses a lying reducer's (the diverged member lies too: honest peers recover its slices)."""
    r = next(_round)
    reducer = sorted(four.ids).index(four.ids[1])
    layout = region_bounds([NUMEL] * 3, 4, CHUNK)
    diverge = [[lo - NUMEL, hi - NUMEL] for i, (lo, hi) in enumerate(layout)
               if owner_of(i, range(4)) == reducer and NUMEL <= lo < 2 * NUMEL]  # fmt: skip
    for index, peer in enumerate(four.peers):
        peer.send({"cmd": "resync", "round": r, "numel": NUMEL, "seed": index, "expected": four.ids,
                   "diverge": diverge if index == ATTACKER else [], "attack": attack if index == ATTACKER else "none"})
    replies = [peer.next_event(90) for peer in four.peers]
    checked = replies if attack == "none" else [replies[i] for i in HONEST]
    for reply in checked:
        assert reply["resync"] and reply["group_size"] == 4 and reply["fraction"] == 1.0, reply
    assert len({reply["hash"] for reply in checked}) == 1, [str(r) for r in replies]
    if attack != "none":
        assert all(replies[i]["rejected"].get("bad_result", 0) > 0 for i in HONEST), [str(r) for r in replies]


def test_sigkill_of_one_of_four_mid_round(tmp_path):
    swarm = AveragingSwarm(tmp_path, 4, CHUNKED)
    try:
        for warmup in range(2):
            swarm.average(warmup, {})
        clean = max(reply["seconds"] for reply in swarm.average(2, {}))
        started = time.monotonic()
        replies = swarm.average(3, {ATTACKER: "crash_after_parts"}, who=HONEST)
        took = time.monotonic() - started
        assert swarm.peers[ATTACKER].proc.wait(10) == -9
        for reply in replies:
            # Its parts arrived before it died, so they count; its own slice was reduced again by
            # its backup among the survivors, so the whole vector was averaged, and says so.
            assert reply["fraction"] == 1.0 and reply["group_size"] == 4, reply
        assert took <= clean + 2 * SPEC.part_timeout_seconds + SPEC.gather_seconds, (took, clean)
        results = [swarm.result(i, 3) for i in HONEST]
        for result in results[1:]:
            np.testing.assert_array_equal(result, results[0])
        nxt = swarm.average(4, {}, expected=[swarm.ids[i] for i in HONEST], who=HONEST)
        for reply in nxt:
            assert reply["group_size"] == 3 and reply["fraction"] == 1.0, reply
        np.testing.assert_allclose(swarm.result(0, 4), honest_aggregate(4, HONEST, group_size=3), rtol=0, atol=1e-4)
    finally:
        leaks = swarm.close()
        assert not any(leaks.values()), f"processes leaked: {leaks}"


def test_convergence_under_attack_stays_within_5_percent_of_a_clean_run(tmp_path):
    """5 peers train least squares DiLoCo-style; one of them attacks every round."""
    swarm = AveragingSwarm(tmp_path, 5)
    attacker, honest = 4, [0, 1, 2, 3]
    try:

        def train(base: int, attacks: Dict[int, str], aggregator: str = "centered_clip") -> float:
            command = {"cmd": "train", "rounds": 20, "inner_steps": 10, "expected": swarm.ids,
                       "aggregator": aggregator, "round_base": base}  # fmt: skip
            replies = swarm.run(command, attacks, timeout=180)
            return float(np.mean([replies[i]["losses"][-5:] for i in honest]))  # the last 5 rounds

        clean = train(0, {})
        for base, attack in ((100, "sign_flip"), (200, "noise")):
            attacked = train(base, {attacker: attack})
            assert attacked <= 1.05 * clean, (attack, attacked, clean)
        # The same attack against the plain mean is not survivable: this test can fail.
        unprotected = train(300, {attacker: "sign_flip"}, aggregator="mean")
        assert unprotected > 2 * clean, (unprotected, clean)
    finally:
        leaks = swarm.close()
        assert not any(leaks.values()), f"processes leaked: {leaks}"


def test_groups_on_fast_links_agree_on_larger_messages_and_an_older_peer_keeps_the_manifests(tmp_path):
    """Each peer asks for the message size its last round moved in MESSAGE_SECONDS; a group uses the
    smallest ask, within 1-4x the manifest's. On loopback every ask exceeds the manifest's 16 KB."""
    numel, chunk = 1 << 20, 4096
    smallest = 4 * chunk
    swarm = AveragingSwarm(tmp_path, 3, ["--chunk-elements", str(chunk)])
    try:

        def average(round_number: int, asks: Dict[int, int]) -> List[dict]:
            command = {"cmd": "average", "round": round_number, "numel": numel, "expected": swarm.ids}
            for index, peer in enumerate(swarm.peers):
                peer.send({**command, "seed": index, **({"message_ask": asks[index]} if index in asks else {})})
            replies = [peer.next_event(90) for peer in swarm.peers]
            assert all(r["fraction"] == 1.0 and r["group_size"] == 3 for r in replies), replies
            assert len({r["group_id"] for r in replies}) == 1, replies
            layout = {r["message_bytes"] for r in replies}
            assert len(layout) == 1, replies
            results = [swarm.result(i, round_number) for i in range(3)]
            for result in results[1:]:
                np.testing.assert_array_equal(result, results[0])
            expected = honest_aggregate(round_number, [0, 1, 2], 3, numel, layout.pop() // 4)
            np.testing.assert_allclose(results[0], expected, rtol=0, atol=1e-4)
            return replies

        first = average(0, {})  # nobody has measured a round yet
        assert all(r["asked"] is None and r["message_bytes"] == smallest for r in first), first
        grown = average(1, {})
        asks = [min(max(r["asked"], smallest), 4 * smallest) for r in grown]
        assert all(r["asked"] > smallest for r in grown), grown
        assert grown[0]["message_bytes"] == min(asks) > smallest
        older = average(2, {0: 0})  # peer 0 posts no ask, as a peer from before asks
        assert older[0]["asked"] is None and all(r["message_bytes"] == smallest for r in older), older
        greedy = average(3, {0: 10**12})  # a huge ask is capped, and the others' asks still count
        asks = [min(max(r["asked"], smallest), 4 * smallest) for r in greedy]
        assert greedy[0]["message_bytes"] == min(asks) and max(asks) == 4 * smallest, greedy
    finally:
        leaks = swarm.close()
        assert not any(leaks.values()), f"processes leaked: {leaks}"
