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


def test_a_group_of_members_nobody_can_dial_is_flagged_and_said_once(caplog) -> None:  # type: ignore[no-untyped-def]
    from node.runtime.rounds import RoundAverager

    stranded = make_group("expert.0.1", 3, {p: _ready(False) for p in "ab"})
    assert stranded.nobody_dialable
    assert not make_group("expert.0.1", 3, {"a": _ready(False), "b": _ready(True)}).nobody_dialable
    assert not make_group("expert.0.1", 3, {"a": _ready(False)}).nobody_dialable  # alone: nothing to reduce anyway
    rounds = RoundAverager("a", None, None, None, SPEC)  # type: ignore[arg-type]
    caplog.set_level("INFO", logger="node")
    for flag in (True, True, False, False, True):
        rounds._say_if_nobody_dialable("expert.0.1", flag)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3 and "behind NAT" in said[0] and "public member" in said[1] and "behind NAT" in said[2]


def test_a_node_found_private_is_asked_again_and_reduces_once_reachable() -> None:
    """Joined.recheck_reachability on the attributes it uses: the re-check runs in the background, its answer
    switches the matchmaker's flag, the metric and the record's reachability."""
    import concurrent.futures
    import types

    from node.ops import NodeMetrics
    from node.runtime.joined import Joined
    from node.swarm import Verdict
    from protocol.records import PeerRecord

    asked: List[List[str]] = []
    answer: "concurrent.futures.Future[Verdict]" = concurrent.futures.Future()

    def submit(coro):  # type: ignore[no-untyped-def]
        asked.append(list(coro.cr_frame.f_locals["peers"]))  # the probe, not started: whom it would ask
        coro.close()
        return answer

    async def _never(*_):  # type: ignore[no-untyped-def]
        raise AssertionError

    metrics = NodeMetrics(version="t", protocol_version=2)
    view = types.SimpleNamespace(peers={p: PeerRecord(peer_id=p, modules=["trunk"], outer_round=0, local_steps=0,
                                                      reachability=r) for p, r in (("me", "private"), ("pub", "public"),
                                                                                   ("nat", "private"))})  # fmt: skip
    node = types.SimpleNamespace(
        reachability=Verdict("private", {"pub": "reached port(s) [] of [1]"}), _recheck=None, _recheck_at=0.0,
        membership=types.SimpleNamespace(view=view), peer_id="me", maddrs=["/ip4/10.0.0.2/tcp/4001"],
        context=types.SimpleNamespace(config=types.SimpleNamespace(announce_maddrs=()), metrics=metrics,
                                      manifest=types.SimpleNamespace(averaging=SPEC)),
        swarm=types.SimpleNamespace(submit=submit, run=_never),
        matchmaker=types.SimpleNamespace(reduces=False),
    )  # fmt: skip
    node._set_reachability = lambda verdict: Joined._set_reachability(node, verdict)  # type: ignore[arg-type]
    Joined.recheck_reachability(node)  # type: ignore[arg-type]
    assert asked == [["pub"]] and node._recheck is answer  # only peers that can be dialed are asked
    Joined.recheck_reachability(node)  # type: ignore[arg-type]
    assert len(asked) == 1  # still in flight: not asked twice
    answer.set_result(Verdict("public", {"pub": "reached port(s) [4001] of [4001]"}))
    Joined.recheck_reachability(node)  # type: ignore[arg-type]
    assert node.reachability.reachability == "public" and node.matchmaker.reduces is True
    assert metrics.registry.get_sample_value("commons_reachability", {"state": "public"}) == 1.0
    Joined.recheck_reachability(node)  # type: ignore[arg-type]
    assert len(asked) == 1  # public now: no more asking
