"""The membership watch: whether someone is averaging our round, every WATCH_SECONDS; every peer record, only
every PEERS_READ_SECONDS (reading every record from every DHT node was most of an idle node's traffic)."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from node.net import InProcessNetwork, VirtualClock, run_virtual
from node.swarm import Membership
from node.swarm.membership import PEERS_READ_SECONDS, WATCH_SECONDS
from protocol.records import PeerRecord, ReadyRecord, peers_key, ready_key

SWARM_ID = "e" * 16


def record(peer: str) -> PeerRecord:
    return PeerRecord(peer_id=peer, modules=["trunk"], outer_round=3, local_steps=0)


def test_the_watch_reads_readiness_every_time_and_peer_records_every_few_seconds() -> None:
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)
    now = [0.0]

    async def scenario() -> Tuple[List[List[str]], List[int], List[str]]:
        me, other = network.join("me"), network.join("other")
        await other.store(peers_key(SWARM_ID), "other", record("other").dict(), network.now() + 60)
        membership = Membership(me, SWARM_ID, lambda: record("me"), monotonic=lambda: now[0])
        membership.watch_round = 3
        reads: List[str] = []
        real_read = me.read

        async def counted(key: str) -> Dict[str, Tuple[Any, float]]:
            reads.append("peers" if key == peers_key(SWARM_ID) else "ready")
            return await real_read(key)

        me.read = counted  # type: ignore[method-assign]
        per_watch, ready_rounds = [], []
        for tick in range(int(2 * PEERS_READ_SECONDS / WATCH_SECONDS) + 1):
            now[0] = tick * WATCH_SECONDS
            if tick == 2:  # another trunk host posts for our round between two peer-record reads
                ready = ReadyRecord(posted_at=network.now(), params_hash="0" * 32, numel=10).dict()
                await other.store(ready_key(SWARM_ID, "trunk", 3), "other", ready, network.now() + 60)
            start = len(reads)
            await membership.watch()
            per_watch.append(reads[start:])
            ready_rounds.append(membership.others_ready_round)
        await network.close()
        return per_watch, ready_rounds, sorted(membership.view.peers)

    per_watch, ready_rounds, peers = run_virtual(scenario(), clock=clock)
    every = int(PEERS_READ_SECONDS / WATCH_SECONDS)
    assert [i for i, r in enumerate(per_watch) if "peers" in r] == [0, every, 2 * every]
    assert all(r[-1] == "ready" for r in per_watch), "readiness is read at every watch"
    assert ready_rounds[1] == -1 and ready_rounds[2] == 3, "a post is seen at the next watch, not the next record read"
    assert peers == ["me", "other"]
