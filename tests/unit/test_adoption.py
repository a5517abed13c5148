"""A member whose state differs from its group's majority adopts that state; the group averages a normal round.

Three in-process peers in virtual time, each with the production RoundAverager, Matchmaker, Averager and
StateServer: two hold one state, the third another. The round is a normal (compressed) one for all three, the
third downloads the majority's state from its holders (StateDownloader.exact) while it runs, and after the outer
step all three hold the same state. Two halves of four adopt the state with the smaller hash the same way.
Without standing for the holders a member keeps its own; with no majority and no two halves the group re-syncs
as before.
"""

from __future__ import annotations

import types
from typing import Dict, List, Optional

import numpy as np
import torch

from node.averaging import Averager, Matchmaker
from node.net import InProcessNetwork, VirtualClock, run_virtual
from node.runtime.rounds import Averaged, RoundAverager, adoption_target, apply, majority_state, prepare
from node.swarm import StateServer, exact_fetcher
from node.training import ModuleState
from protocol.manifest import AveragingSpec, OuterOptimizerSpec

SWARM_ID = "d" * 16
NUMEL = 30_000
SPEC = AveragingSpec(gather_seconds=1.0, part_timeout_seconds=5.0, round_timeout_seconds=30.0, compression="sparse")
OUTER = OuterOptimizerSpec(lr=0.7, momentum=0.9)


class View:
    def __init__(self, peers: List[str]) -> None:
        self.peers, self.seen_at = peers, {}

    def hosts_of(self, module: str, exclude: Optional[str] = None, round_number: Optional[int] = None) -> List[str]:
        return [p for p in self.peers if p != exclude]


def state_of(seed: int) -> ModuleState:
    values = torch.from_numpy(np.random.default_rng(seed).standard_normal(NUMEL).astype(np.float32))
    return ModuleState("trunk", [torch.nn.Parameter(values)], OUTER)


def one_round(seeds: List[int], trust: bool = True) -> Dict[int, tuple]:
    """Each peer ``i`` starts from ``state_of(seeds[i])``, takes local steps, and averages one round; returns
    {peer: (Averaged, its state hash after the outer step)}."""
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)
    states = [state_of(seed) for seed in seeds]
    ids = [f"peer-{i}" for i in range(len(seeds))]

    async def main() -> Dict[int, tuple]:
        rounds = []
        for i, state in enumerate(states):
            port = network.join(ids[i])
            averager = Averager(port, SWARM_ID, hosted=lambda: {"trunk"}, spec=SPEC, clock=clock.monotonic)
            server = StateServer(port, SWARM_ID, lambda state=state: {"trunk": state}, lambda: 0)
            await averager.start()
            await server.start()
            matchmaker = Matchmaker(port, SWARM_ID, SPEC.gather_seconds, smallest_message=SPEC.message_bytes)
            membership = types.SimpleNamespace(view=View(ids))
            averaging = RoundAverager(ids[i], matchmaker, averager, membership, SPEC)  # type: ignore[arg-type]
            averaging.fetch_state = exact_fetcher(port, SWARM_ID, SPEC.part_timeout_seconds)
            if trust:
                averaging.standing.trust(p for p in ids if p != ids[i])
            rounds.append(averaging)
        try:
            prepared = []
            for i, state in enumerate(states):
                with torch.no_grad():
                    state.params[0].sub_(0.01 * (i + 1))  # local steps, different on every peer
                prepared.append(prepare({"trunk": state}))

            async def go(i: int) -> Averaged:
                return (await rounds[i].average(prepared[i], 0))[0]

            done = await __import__("asyncio").gather(*(network.join(f"runner-{i}").spawn(go(i))
                                                        for i in range(len(seeds))))  # fmt: skip
            out = {}
            for i, averaged in enumerate(done):
                apply(types.SimpleNamespace(prepared=prepared[i]), [averaged], overlap=False)  # type: ignore[arg-type]
                out[i] = (averaged, states[i].params_hash())
            return out
        finally:
            await network.close()

    return run_virtual(main(), clock=clock)


def test_the_member_off_the_majority_adopts_its_state_and_the_round_is_a_normal_one() -> None:
    out = one_round([1, 1, 2])
    assert all(not averaged.resync and averaged.step for averaged, _ in out.values())
    assert out[0][0].adopted is None and out[1][0].adopted is None and out[2][0].adopted is not None
    assert out[0][1] == out[1][1] == out[2][1], "after the outer step all three hold one state"
    assert all(averaged.outcome.averaged_fraction == 1.0 for averaged, _ in out.values())


def test_without_standing_for_the_holders_a_member_keeps_its_own_state() -> None:
    out = one_round([1, 1, 2], trust=False)
    assert not out[2][0].resync and out[2][0].adopted is None
    assert out[0][1] == out[1][1] != out[2][1]


def test_with_no_majority_state_the_group_re_syncs_as_before() -> None:
    out = one_round([1, 2, 3])
    assert all(averaged.resync and averaged.adopted is None for averaged, _ in out.values())


def test_two_halves_adopt_the_state_with_the_smaller_hash_and_the_round_is_a_normal_one() -> None:
    out = one_round([1, 1, 2, 2])
    hashes = [state_of(seed).params_hash() for seed in (1, 2)]
    losers = {0, 1} if hashes[0] > hashes[1] else {2, 3}
    assert all(not averaged.resync and averaged.step for averaged, _ in out.values())
    assert {i for i, (averaged, _) in out.items() if averaged.adopted is not None} == losers
    assert len({h for _, h in out.values()}) == 1, "after the outer step all four hold one state"
    assert all(averaged.outcome.averaged_fraction == 1.0 for averaged, _ in out.values())


def test_a_pair_or_three_states_re_sync_as_before() -> None:
    for seeds in ([1, 2], [1, 1, 2, 3]):
        out = one_round(seeds)
        assert all(averaged.resync and averaged.adopted is None for averaged, _ in out.values()), seeds


def test_adoption_target_is_a_majority_or_two_equal_halves() -> None:
    assert adoption_target(["b", "a", "b"]) == "b" and adoption_target(["b", "b", "a", "a"]) == "a"
    assert adoption_target(["c", "c", "c", "b", "b", "b"]) == "b"
    assert adoption_target(["a", "b"]) is None  # a pair: either could be anyone's
    assert adoption_target(["a", "a", "b", "c"]) is None and adoption_target(["a", "a", "b", "b", "c", "c"]) is None
    assert adoption_target([]) is None


def test_majority_state_is_a_strict_majority() -> None:
    assert majority_state(["a", "a", "b"]) == "a"
    assert majority_state(["a", "b"]) is None and majority_state(["a", "a", "b", "b"]) is None
    assert majority_state([]) is None and majority_state(["a"]) == "a"


def test_a_state_server_still_serves_the_state_before_its_last_step() -> None:
    """A holder may step before the adopter's download is done: the state before its last step is kept."""
    state = state_of(4)
    before = state.params_hash()
    old_global = state.global_flat.clone()
    state.apply(np.full(NUMEL, 0.1, dtype=np.float32), resync=False)
    assert state.params_hash() != before
    found = state.snapshot(before)
    assert found is not None and torch.equal(found[0], old_global) and not found[1].any()
    assert state.snapshot(state.params_hash()) is not None and state.snapshot("0" * 32) is None
