"""What a peer claims about its progress moves nobody on its own: a node jumps only to a round a majority of the
others reached (SwarmView.swarm_round); a ready post cuts our round short only when it parses and comes from a
live trunk host that has been giving to our groups (Membership; node/runtime/rounds.py: NoShows); a read of the
peer records that fails or misses our own record keeps the last view and is counted, not taken for "everyone
left". Majorities that decide state (the state a newcomer adopts, a re-sync's verdict) count only peers with
standing. In one process, on the in-process swarm."""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import pytest
import torch

from node.net import InProcessNetwork, VirtualClock, run_virtual
from node.runtime.rounds import NO_SHOW_ROUNDS, STANDING_ROUNDS, NoShows, Standing, majority_check
from node.swarm import Membership, StateServer, SwarmView
from node.swarm.membership import READ_FAILURES_UNHEALTHY
from node.swarm.statesync import StateDownloader
from node.training import ModuleState, state_hash
from protocol.manifest import OuterOptimizerSpec
from protocol.records import PeerRecord, ReadyRecord, peers_key, ready_key

SWARM_ID = "c" * 16


def _record(peer: str, round_number: int, modules: List[str] = ["trunk"]) -> PeerRecord:  # noqa: B006
    return PeerRecord(peer_id=peer, modules=modules, outer_round=round_number, local_steps=0)


def _view(rounds: Dict[str, int]) -> SwarmView:
    return SwarmView(peers={p: _record(p, r) for p, r in rounds.items()})


def test_one_fake_round_moves_nobody_once_two_others_are_in_view():
    assert _view({"me": 3, "a": 40, "b": 40, "liar": 10**9}).swarm_round(exclude="me") == 40
    assert _view({"me": 3, "a": 40, "liar": 10**9}).swarm_round(exclude="me") == 40  # the lower of two
    assert _view({"me": 3, "a": 40, "b": 41, "c": 41, "liar": 10**9}).swarm_round(exclude="me") == 41
    assert _view({"me": 3, "a": 40}).swarm_round(exclude="me") == 40  # one other: the only word there is
    assert _view({"me": 3}).swarm_round(exclude="me") == 0
    # Liars must outnumber the honest others to move the swarm's round.
    assert _view({"a": 40, "b": 40, "l1": 10**9, "l2": 10**9}).swarm_round() == 40
    assert _view({"a": 40, "l1": 10**9, "l2": 10**9}).swarm_round() == 10**9


def test_a_member_that_gives_nothing_to_two_groups_in_a_row_is_a_no_show_until_it_gives_again():
    no_shows = NoShows()
    for _ in range(NO_SHOW_ROUNDS - 1):
        no_shows.observe(["honest", "poster"], {"me", "honest"})
    assert "poster" not in no_shows
    no_shows.observe(["honest", "poster"], {"me", "honest"})
    assert "poster" in no_shows and "honest" not in no_shows and "stranger" not in no_shows
    no_shows.observe(["honest", "poster"], {"me", "honest", "poster"})  # it sent its parts this time
    assert "poster" not in no_shows


def test_a_ready_post_cuts_our_round_short_only_if_it_parses_and_its_writer_is_a_live_trunk_host_that_gives():
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)
    no_shows = {"no-show"}

    async def scenario() -> List[bool]:
        me = network.join("me")
        members = {name: network.join(name) for name in ("host", "expert-only", "junk", "no-show", "stranger")}
        now = network.now()
        for name, port in members.items():
            if name != "stranger":  # the stranger has no peer record: not a live host
                modules = ["expert.0.0"] if name == "expert-only" else ["trunk"]
                await port.store(peers_key(SWARM_ID), name, _record(name, 5, modules).dict(), now + 60)
        membership = Membership(me, SWARM_ID, lambda: _record("me", 5))
        membership.ignores = lambda peer: peer in no_shows
        membership.watch_round = 6
        ready = ReadyRecord(posted_at=now, params_hash="0" * 32, numel=100).dict()
        seen = []
        for name in ("junk", "stranger", "expert-only", "no-show", "host"):
            value = {"numel": "junk", "posted_at": 1e300} if name == "junk" else ready
            await members[name].store(ready_key(SWARM_ID, "trunk", 6), name, value, now + 60)
            await membership.refresh()
            seen.append(membership.others_ready_round == 6)
        await network.close()
        return seen

    assert run_virtual(scenario(), clock=clock) == [False, False, False, False, True]


def test_a_failed_or_incomplete_read_of_the_peer_records_is_not_taken_for_everyone_gone():
    """1,000 junk subkeys once made two nodes read each other as gone, silently: an empty read looked like alone."""
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)

    async def scenario() -> None:
        me, other = network.join("me"), network.join("other")
        await other.store(peers_key(SWARM_ID), "other", _record("other", 2).dict(), network.now() + 60)
        membership = Membership(me, SWARM_ID, lambda: _record("me", 2))
        await membership.start()
        assert set(membership.view.peers) == {"me", "other"} and membership.reads_failed == 0
        real_read = me.read

        async def empty(key: str):  # type: ignore[no-untyped-def]
            return {}

        me.read = empty  # type: ignore[method-assign]
        for count in range(1, READ_FAILURES_UNHEALTHY + 1):
            assert set((await membership.refresh()).peers) == {"me", "other"}, "the last view stays"
            assert membership.reads_failed == count
            assert (membership.read_error is None) == (count < READ_FAILURES_UNHEALTHY)
        assert "without this node's own record" in (membership.read_error or "")

        async def broken(key: str):  # type: ignore[no-untyped-def]
            raise TimeoutError("the DHT did not answer")

        me.read = broken  # type: ignore[method-assign]
        with pytest.raises(TimeoutError):
            await membership.refresh()
        assert membership.reads_failed == READ_FAILURES_UNHEALTHY + 1
        me.read = real_read  # type: ignore[method-assign]
        await membership.refresh()
        assert membership.read_error is None and set(membership.view.peers) == {"me", "other"}
        await membership.stop()
        await network.close()

    run_virtual(scenario(), clock=clock)


# --- majorities that decide state count only peers with standing ------------------------------------------------
def _state(seed: int, numel: int = 300) -> ModuleState:
    torch.manual_seed(seed)
    state = ModuleState("trunk", [torch.nn.Parameter(torch.randn(numel))], OuterOptimizerSpec())
    state.momentum = torch.randn(numel)
    return state


def test_standing_comes_from_the_operators_bootstrap_peers_or_rounds_of_contributions():
    standing = Standing(["bootstrap"])
    for round_number in range(STANDING_ROUNDS - 1):
        standing.observe(round_number, ["member"])
        standing.observe(round_number, ["member"])  # another module of the same round: counted once
    assert standing.has("bootstrap") and not standing.has("member") and not standing.has("fresh")
    standing.observe(STANDING_ROUNDS, ["member"])
    assert standing.has("member") and standing.peers() == {"bootstrap", "member"}


def test_a_newcomer_adopts_its_bootstrap_peers_state_however_many_fresh_identities_serve_another():
    """Two attacker identities serving a poisoned trunk used to outvote the one honest donor (2:1)."""
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)
    honest, poisoned = _state(1), _state(2)

    async def scenario() -> List[str]:
        donors = {"honest": honest, "sybil-1": poisoned, "sybil-2": poisoned, "sybil-3": poisoned}
        for name, state in donors.items():
            await StateServer(network.join(name), SWARM_ID, lambda s=state: {"trunk": s}, lambda: 7).start()
        adopted = []
        for trusted in (["honest"], []):
            downloader = StateDownloader(network.join(f"newcomer-{len(adopted)}"), SWARM_ID, 5.0, trusted=trusted)
            got = await downloader.download("trunk", sorted(donors), honest.numel)
            assert got is not None
            adopted.append(state_hash(got[0][: honest.numel], got[0][honest.numel :]))
        await network.close()
        return adopted

    with_standing, without = run_virtual(scenario(), clock=clock)
    assert with_standing == honest.params_hash()
    assert without == poisoned.params_hash(), "with nobody trusted, identities decide (what standing prevents)"


def test_a_resync_majority_of_fresh_identities_cannot_replace_our_state():
    ours, theirs = "a" * 32, "b" * 32
    hashes = [ours, theirs, theirs]  # us, and two members holding another state
    numel = 4
    vector_ours = np.zeros(3 * numel, dtype=np.float32)
    verify = majority_check(hashes, numel, "centered_clip", [False, False, False], own=ours)
    assert verify is not None
    their_state = np.ones(3 * numel, dtype=np.float32)
    assert not verify(their_state), "fresh identities' state is not the majority's"
    assert verify(vector_ours) == (state_hash(vector_ours[numel : 2 * numel], vector_ours[2 * numel :]) == ours)
    # Members with standing decide, whatever we hold (a straggler takes the swarm's state)...
    right = state_hash(their_state[numel : 2 * numel], their_state[2 * numel :])
    verify = majority_check([ours, right, right], numel, "centered_clip", [False, True, True], own=ours)
    assert verify is not None and verify(their_state)
    # ...and without standing flags, every member counts (as before).
    assert majority_check([ours, right, right], numel, "centered_clip") is not None
    assert majority_check([ours, right], numel, "centered_clip", [False, True], own=ours) is not None
    assert majority_check([ours, right], numel, "centered_clip") is None  # 1:1, no majority
