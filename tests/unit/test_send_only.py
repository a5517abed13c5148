"""Members nobody can dial (behind NAT) reduce no slice: the others reduce everything, and everyone still
gets the whole average (node/averaging/matchmaking.py Group.reducers, node/averaging/slices.py).

Four peers on the in-process network of the fault tier (tests/unit/test_averaging_faults.py), peers 2 and 3
marked send-only, as a node that found itself private marks itself in its ready records.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from node.averaging import AllReduceResult
from node.averaging.matchmaking import make_group
from node.averaging.slices import backup_of, owner_of
from protocol.records import ReadyRecord
from tests.attacks import honest_aggregate
from tests.unit.test_averaging_faults import CHUNK, NUMEL, SPEC, Swarm, run

PRIVATE = (2, 3)


def _ready(reduces: bool) -> ReadyRecord:
    return ReadyRecord(posted_at=1.0, params_hash="0" * 32, numel=10, reduces=None if reduces else False)


def test_group_reducers_are_the_members_that_can_be_dialed_and_part_of_the_group_id() -> None:
    everyone = make_group("trunk", 3, {p: _ready(True) for p in "abcd"})
    assert everyone.reducer_indices == () and everyone.reducers == (0, 1, 2, 3)
    mixed = make_group("trunk", 3, {"a": _ready(True), "b": _ready(False), "c": _ready(True), "d": _ready(False)})
    assert mixed.reducers == (0, 2)
    assert mixed.group_id != everyone.group_id  # members that read different flags never mix layouts
    nobody = make_group("trunk", 3, {p: _ready(False) for p in "ab"})
    assert nobody.reducers == (0, 1)
    assert nobody.group_id == make_group("trunk", 3, {p: _ready(True) for p in "ab"}).group_id


def test_slices_go_round_the_reducers_and_the_backup_is_the_next_one() -> None:
    reducers = (0, 2)
    assert [owner_of(i, reducers) for i in range(5)] == [0, 2, 0, 2, 0]
    assert [backup_of(i, reducers) for i in range(4)] == [2, 0, 2, 0]


def _send_only(swarm: Swarm) -> None:
    for i in PRIVATE:
        swarm.matchmakers[i].reduces = False


def test_send_only_members_get_the_whole_average_and_reduce_nothing() -> None:
    async def scenario(swarm: Swarm) -> Tuple[Dict[int, Tuple[List[str], AllReduceResult]], List[int]]:
        _send_only(swarm)
        received_before = [port.bytes_received for port in swarm.ports]
        results = await swarm.average(2)
        ports = zip(swarm.ports, received_before, strict=True)
        return results, [port.bytes_received - before for port, before in ports]

    (results, received), _ = run(scenario, attacker=False)
    expected = honest_aggregate(2, [0, 1, 2, 3], 2, NUMEL, CHUNK, SPEC)  # two reducers cut the vector in two
    for i, (members, result) in results.items():
        assert len(members) == 4 and result.averaged_fraction == 1.0, (i, result)
        np.testing.assert_allclose(result.vector, expected, rtol=0, atol=2e-2)  # int8 on the wire
    assert all(np.array_equal(results[0][1].vector, r.vector) for _, r in results.values())
    # A send-only member receives results only: half the vector from each reducer, no one's parts.
    private_in, public_in = max(received[i] for i in PRIVATE), min(received[i] for i in (0, 1))
    assert private_in < 0.8 * public_in, received


def test_losing_a_public_reducer_leaves_the_other_to_reduce_for_everyone() -> None:
    async def scenario(swarm: Swarm) -> Tuple[Dict[int, Tuple[List[str], AllReduceResult]], ...]:
        _send_only(swarm)
        swarm.network.kill(swarm.ids[0])
        during = await swarm.average(2, who=[1, 2, 3], expected=[0, 1, 2, 3])  # peer 0 is still in the records
        after = await swarm.average(3, who=[1, 2, 3])
        return during, after

    (during, after), _ = run(scenario, attacker=False)
    assert all(r.averaged_fraction > 0 for _, r in during.values())  # partial at worst, never a crash
    expected = honest_aggregate(3, [1, 2, 3], 1, NUMEL, CHUNK, SPEC)
    for i, (members, result) in after.items():
        assert len(members) == 3 and result.averaged_fraction == 1.0, (i, result)
        np.testing.assert_allclose(result.vector, expected, rtol=0, atol=2e-2)
