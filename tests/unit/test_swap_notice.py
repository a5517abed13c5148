"""SwapNotice: hosts of one expert that all want to drop it, deciding at nearly the same moment on records a
moment old, never leave it without a host, and still drop some of their copies. A discrete-event simulation
(no processes, no clock): every record store takes a random time, reads see what was stored. Dropping at once
on the records read, as placement did before the notice, loses the expert in the same simulation."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from node.swarm.membership import SwarmView
from node.swarm.placement import Swap, SwapNotice
from protocol.records import PeerRecord

EXPERT = "expert.0.0"
OTHER = "expert.0.1"


@dataclass
class Record:
    modules: Tuple[str, ...]
    dropping: Tuple[str, ...]


@dataclass
class SimPeer:
    name: str
    notice: SwapNotice
    modules: List[str] = field(default_factory=lambda: [EXPERT])
    storing: bool = False
    stored: Optional[Record] = None

    def record(self) -> Record:
        return Record(tuple(self.modules), tuple(self.notice.dropping()))


class Sim:
    """Peers whose rounds end together (a few ms apart), each deciding at a round's end with probability
    ``eagerness`` to drop ``EXPERT`` for ``OTHER``; stores take 0 to ``max_store`` seconds."""

    def __init__(self, seed: int, peers: int, notice: bool, eagerness: float = 0.5, max_store: float = 1.5) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.events: List[Tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.use_notice, self.eagerness, self.max_store = notice, eagerness, max_store
        self.dht: Dict[str, Record] = {}
        self.peers = [SimPeer(f"p{i}", SwapNotice(notice=0.5, clock=lambda: self.now)) for i in range(peers)]
        self.fewest_hosts = peers
        self.drops = 0
        for peer in self.peers:
            self.dht[peer.name] = peer.record()

    def at(self, when: float, action: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, action))

    def announce(self, peer: SimPeer) -> None:
        """The announce loop: one store at a time, each of the record as it is when the store starts."""
        if peer.storing or peer.stored == peer.record():
            return
        peer.storing, snapshot = True, peer.record()

        def done() -> None:
            self.dht[peer.name] = peer.stored = snapshot
            peer.storing = False
            peer.notice.stored(snapshot.dropping)
            self.announce(peer)

        self.at(self.now + self.rng.uniform(0.0, self.max_store), done)

    def staying(self) -> Dict[str, List[str]]:
        return {p: [m for m in r.modules if m not in r.dropping] for p, r in self.dht.items()}

    def round_end(self, peer: SimPeer) -> None:
        if self.use_notice and peer.notice.pending is not None:
            if peer.notice.due():
                swap, _ = peer.notice.settle(peer.name, self.staying())
                if swap is not None:
                    self.drop(peer)
        elif EXPERT in peer.modules and self.rng.random() < self.eagerness:
            others = [p for p, mods in self.staying().items() if p != peer.name and EXPERT in mods]
            if others:
                if self.use_notice:
                    peer.notice.propose(Swap(EXPERT, OTHER))
                else:
                    self.drop(peer)
        self.announce(peer)

    def drop(self, peer: SimPeer) -> None:
        peer.modules = [OTHER]
        self.drops += 1
        hosts = sum(EXPERT in p.modules for p in self.peers)
        self.fewest_hosts = min(self.fewest_hosts, hosts)

    def run(self, rounds: int = 60, round_seconds: float = 0.4) -> "Sim":
        for r in range(rounds):
            for peer in self.peers:
                self.at(r * round_seconds + self.rng.uniform(0.0, 0.05), lambda peer=peer: self.round_end(peer))
        while self.events:
            self.now, _, action = heapq.heappop(self.events)
            action()
        return self


@pytest.mark.parametrize("peers", [2, 3, 5])
def test_the_notice_keeps_a_host_and_still_drops(peers: int) -> None:
    sims = [Sim(seed, peers, notice=True).run() for seed in range(40)]
    assert min(s.fewest_hosts for s in sims) >= 1
    assert all(s.drops == peers - 1 for s in sims), [s.drops for s in sims]  # all but one copy go, in time


@pytest.mark.parametrize("peers", [2, 3])
def test_dropping_on_the_records_read_loses_the_expert(peers: int) -> None:
    sims = [Sim(seed, peers, notice=False).run() for seed in range(40)]
    assert min(s.fewest_hosts for s in sims) == 0


def test_a_record_stored_before_the_proposal_does_not_start_the_notice() -> None:
    now = [0.0]
    notice = SwapNotice(notice=2.0, clock=lambda: now[0])
    notice.stored([EXPERT])  # nothing pending
    notice.propose(Swap(EXPERT, OTHER))
    assert notice.dropping() == [EXPERT]
    notice.stored([])  # a store that began before the proposal
    now[0] = 10.0
    assert not notice.due()
    notice.stored([EXPERT])
    now[0] = 11.9
    assert not notice.due()
    now[0] = 12.0
    assert notice.due()


def test_settle_withdraws_when_every_other_host_is_dropping_or_gone() -> None:
    notice = SwapNotice(notice=0.0)
    notice.propose(Swap(EXPERT, OTHER, "replaced", "why"))
    swap, withdrawn = notice.settle("me", {"me": [EXPERT], "b": [OTHER], "c": []})
    assert swap is None and withdrawn == Swap(EXPERT, OTHER, "replaced", "why")
    assert notice.pending is None and notice.dropping() == []
    notice.propose(Swap(EXPERT, OTHER))
    swap, withdrawn = notice.settle("me", {"me": [EXPERT], "b": [EXPERT, OTHER]})
    assert swap == Swap(EXPERT, OTHER) and withdrawn is None
    assert notice.settle("me", {"b": [EXPERT]}) == (None, None)  # nothing pending


def record(peer: str, modules: List[str], dropping: Tuple[str, ...] = ()) -> PeerRecord:
    return PeerRecord(peer_id=peer, modules=modules, outer_round=1, local_steps=1, dropping=list(dropping))


def test_plans_count_only_hosts_that_stay() -> None:
    view = SwarmView(peers={"a": record("a", ["trunk", EXPERT, OTHER], (EXPERT,)), "b": record("b", ["trunk", OTHER])})
    assert view.staying_by_peer() == {"a": ["trunk", OTHER], "b": ["trunk", OTHER]}
    assert view.modules_by_peer()["a"] == ["trunk", EXPERT, OTHER]  # groups and status: it still hosts it


def test_a_settle_read_must_cover_the_last_view() -> None:
    last = SwarmView(peers={"a": record("a", ["trunk"]), "b": record("b", ["trunk"])}, seen_at={"a": 10.0, "b": 20.0})
    newer = SwarmView(peers=dict(last.peers), seen_at={"a": 12.0, "b": 20.0, "c": 1.0})
    assert newer.covers(last) and not last.covers(newer)
    assert not SwarmView(peers={"a": last.peers["a"]}, seen_at={"a": 12.0}).covers(last)  # b did not answer
    assert not SwarmView(peers=dict(last.peers), seen_at={"a": 9.0, "b": 20.0}).covers(last)  # an older copy of a
