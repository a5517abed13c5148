"""This node's view of the swarm: it announces itself and reads everyone else's records.

One task on the swarm loop stores our PeerRecord every ANNOUNCE_SECONDS, or at once
when nudged (records expire after RECORD_TTL_SECONDS, so a dead peer vanishes on its
own). Another watches every WATCH_SECONDS whether another peer is already ready to average the trunk in
our current round (the training loop then cuts its round short to join them), and re-reads all peer records
every PEERS_READ_SECONDS (reading every record from every DHT node is most of an idle node's traffic:
bench/idle_traffic.py). Placement and state downloads read them afresh when they decide (``refresh``).

A read of the peer records that fails, or that misses our own record (stored every few seconds, so any
complete read holds it), is not taken for "everyone left": the last view stays, the failure is counted, and
after READ_FAILURES_UNHEALTHY in a row /healthz says so (``read_error``) until a read succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Dict, List, Optional, Set

from node.net import Admission, SwarmPort
from protocol.contributions import Vouch
from protocol.records import PeerRecord, ReadyRecord, RecordError, parse_record, peers_key, ready_key

logger = logging.getLogger(__name__)

ANNOUNCE_SECONDS = 2.0
WATCH_SECONDS = 0.5  # how soon a peer notices the swarm is averaging our round; well under gather_seconds
# How often the watch re-reads every peer record. 2 s cut an idle node's traffic from 33.6 to 21.3 KB/s
# (bench/RESULTS.md), but a swarm that lost a public node took 13 rounds (28 s) to average whole again in
# tests/system/test_nat.py in one CI run, against its bound of 10; kept at the watch's pace until that is understood.
PEERS_READ_SECONDS = WATCH_SECONDS
RECORD_TTL_SECONDS = 12.0  # a few missed announcements before a peer is considered gone
READ_FAILURES_UNHEALTHY = 6  # reads in a row (3 s) that failed or missed our own record: /healthz says so


@dataclass
class SwarmView:
    """What the last refresh saw; replaced whole on every refresh (read without locks)."""

    peers: Dict[str, PeerRecord] = field(default_factory=dict)
    seen_at: Dict[str, float] = field(default_factory=dict)  # when each record was last stored (unix s)
    rejected_records: int = 0
    # Members-only swarms, `node status`: member -> voucher -> latest vouch (node/swarm/contributions.py)
    vouches: Optional[Dict[str, Dict[str, Vouch]]] = None
    answered: Set[str] = field(default_factory=set)  # every subkey the read returned, valid, leaving or refused
    carried: Set[str] = field(default_factory=set)  # peers this read missed, kept from the last view (Membership)

    def modules_by_peer(self) -> Dict[str, List[str]]:
        return {peer: list(record.modules) for peer, record in self.peers.items()}

    def staying_by_peer(self) -> Dict[str, List[str]]:
        """What each peer hosts and has not announced it will drop (its record's ``dropping``): what placement
        plans with (node/swarm/placement.py, SwapNotice)."""
        return {p: [m for m in r.modules if m not in r.dropping] for p, r in self.peers.items()}

    def covers(self, other: "SwarmView") -> bool:
        """Every peer of ``other`` is here, read (not carried) in a record stored no earlier (each compared by its
        owner's clock): this read is no older than ``other``, nor missing what a DHT node that did not answer held."""
        fresh = {p: t for p, t in self.seen_at.items() if p not in self.carried}
        return all(p in fresh and fresh[p] >= t for p, t in other.seen_at.items())

    def hosts_of(self, module: str, exclude: Optional[str] = None, round_number: Optional[int] = None) -> List[str]:
        """Peers hosting ``module``; with ``round_number``, only those that may still average that round.

        Peers already past it will not come back. Peers behind it will: they jump to the
        swarm's round (swarm_round), so they are worth waiting for (up to the gather window).
        """
        return sorted(
            p
            for p, r in self.peers.items()
            if module in r.modules and p != exclude and (round_number is None or r.outer_round <= round_number)
        )

    def donors_of(self, module: str, exclude: Optional[str] = None) -> List[str]:
        """Hosts of ``module`` to download its state from: those others can dial; hosts behind NAT (who can
        answer only peers they connected to) only when no other host holds it."""
        hosts = self.hosts_of(module, exclude=exclude)
        dialable = [p for p in hosts if self.peers[p].reachability != "private"]
        return dialable or hosts

    def swarm_round(self, exclude: Optional[str] = None) -> int:
        """The highest round a strict majority of the peers (but ``exclude``) claim to have reached: what a node
        that fell behind jumps to. One peer's claim (a fake 10^9) moves nobody once two others are in view."""
        rounds = sorted((r.outer_round for p, r in self.peers.items() if p != exclude), reverse=True)
        return rounds[len(rounds) // 2] if rounds else 0


async def read_peers(swarm: SwarmPort, swarm_id: str, admission: Optional[Admission] = None) -> SwarmView:
    """Every live peer record of the swarm; with ``admission`` (members-only), only peers whose record's invite
    admits them now (its signatures checked once; the rest is checked on every read)."""
    raw = await swarm.read(peers_key(swarm_id))
    view = SwarmView(answered=set(raw))
    for peer, (value, expiration) in raw.items():
        try:
            record = parse_record(PeerRecord, value)
        except RecordError as e:
            view.rejected_records += 1
            logger.debug("ignoring peer record %s: %s", peer[-8:], e)
            continue
        if record.peer_id != peer:  # a record may only describe its own subkey's peer
            view.rejected_records += 1
            continue
        if record.leaving:
            continue
        if admission is not None and admission.check(peer, record.invite.encode() if record.invite else None):
            view.rejected_records += 1
            continue
        view.peers[peer] = record
        view.seen_at[peer] = expiration - RECORD_TTL_SECONDS
    return view


class Membership:
    """Owns the announce/refresh task; ``view`` and ``ready_round`` are read by the trainer."""

    def __init__(
        self,
        swarm: SwarmPort,
        swarm_id: str,
        describe_self: Callable[[], PeerRecord],
        clock: Optional[Callable[[], float]] = None,
        admission: Optional[Admission] = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: what records are stamped with (default: the swarm's ``now``). ``admission``: members-only,
        the view leaves out peers that are not members (read_peers). ``monotonic``: paces the reads."""
        self._monotonic = monotonic
        self._admission = admission
        self._swarm = swarm
        self._swarm_id = swarm_id
        self._describe_self = describe_self
        self._clock = clock or swarm.now
        self.view = SwarmView()
        self.watch_round: int = 0
        self.others_ready_round: int = -1  # highest round for which another trunk host posted readiness
        self.ignores: Callable[[str], bool] = lambda peer: False  # peers whose posts do not count (no-shows)
        self._tasks: List[asyncio.Task[None]] = []
        self._announced = False  # our record was stored once: a complete read of the peer records holds it
        self.reads_failed = 0  # reads of the peer records that failed or came back without our own record
        self.reads_incomplete = 0  # reads that missed a live record of the last view (kept until it expires)
        self._failing = 0  # of them, in a row
        self.read_error: Optional[str] = None  # set after READ_FAILURES_UNHEALTHY in a row, cleared by a good read
        self._nudged: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._peers_read_at = -PEERS_READ_SECONDS  # time.monotonic() of the last read of every peer record
        self.on_stored: Callable[[PeerRecord], None] = lambda record: None  # each record of ours the DHT took

    async def announce(self) -> None:
        me = self._describe_self()
        stored = await self._swarm.store(
            peers_key(self._swarm_id), me.peer_id, me.dict(), self._clock() + RECORD_TTL_SECONDS
        )
        self._announced = self._announced or bool(stored)
        if stored:
            self.on_stored(me)

    async def refresh(self) -> SwarmView:
        """Re-read every peer record, and whether someone is already averaging our round. A read that fails or
        misses our own record keeps the last view (and raises, or returns it)."""
        me = self._describe_self()
        self._peers_read_at = self._monotonic()
        try:
            view = await read_peers(self._swarm, self._swarm_id, self._admission)
        except Exception as e:
            self._read_failed(f"reading the swarm's peer records failed: {e}")
            raise
        if self._announced and me.peer_id not in view.peers:
            self._read_failed("a read of the swarm's peer records came back without this node's own record")
            return self.view
        if self._failing:
            logger.info("reading the swarm's peer records works again (after %d failed reads)", self._failing)
        self._failing, self.read_error = 0, None
        view.peers[me.peer_id] = me
        view.seen_at[me.peer_id] = self._clock()
        self._carry(view, self.view)
        self.view = view
        await self._watch_ready(view)
        return view

    async def watch(self) -> None:
        """Whether someone is already averaging our round; every PEERS_READ_SECONDS, every peer record too."""
        if self._monotonic() - self._peers_read_at >= PEERS_READ_SECONDS:
            await self.refresh()
        else:
            await self._watch_ready(self.view)

    async def _watch_ready(self, view: SwarmView) -> None:
        round_number = self.watch_round
        posted = await self._swarm.read(ready_key(self._swarm_id, "trunk", round_number))
        if any(self._counts_ready(view, peer, value) for peer, (value, _) in posted.items()):
            self.others_ready_round = max(self.others_ready_round, round_number)

    def _carry(self, view: SwarmView, last: SwarmView) -> None:
        """A peer in the last view whose record is missing from this read, neither leaving nor refused, and not
        expired: a DHT node that held it did not answer in time (seen with 2 loaded cores: a read holding only our
        own record). Keep its last record until it expires, as a complete read would: a peer that drops out of
        and back into view is left out of groups meanwhile, and its groups split from ours."""
        now = self._clock()
        missed = [p for p in last.peers if p not in view.answered and p not in view.peers
                  and last.seen_at.get(p, 0.0) + RECORD_TTL_SECONDS > now]  # fmt: skip
        for peer in missed:
            view.peers[peer], view.seen_at[peer] = last.peers[peer], last.seen_at[peer]
        view.carried = set(missed)
        if missed:
            self.reads_incomplete += 1
            logger.debug("a read of the peer records missed %d live record(s): kept from the last view", len(missed))

    def _read_failed(self, why: str) -> None:
        self.reads_failed += 1
        self._failing += 1
        if self._failing == READ_FAILURES_UNHEALTHY:
            self.read_error = f"{why} ({self._failing} times in a row)"
            logger.warning("%s: %d reads in a row; keeping the last view of the swarm", why, self._failing,
                           extra={"event": "swarm_read_failed"})  # fmt: skip

    def _counts_ready(self, view: SwarmView, peer: str, value: object) -> bool:
        """A ready post that may cut our round short: a valid ReadyRecord, parsed before anything is decided, from
        another live host of the trunk that has given something to our recent groups (``ignores``)."""
        record = view.peers.get(peer)
        if peer == self._swarm.peer_id or record is None or "trunk" not in record.modules or self.ignores(peer):
            return False
        try:
            parse_record(ReadyRecord, value)
        except RecordError:
            return False
        return True

    async def say_goodbye(self) -> None:
        """Store a last record marked leaving, so peers stop waiting for us before it expires."""
        me = self._describe_self().copy(update={"leaving": True})
        await self._swarm.store(peers_key(self._swarm_id), me.peer_id, me.dict(), self._clock() + RECORD_TTL_SECONDS)

    def nudge(self) -> None:
        """Ask for an announcement now (thread-safe): our round or modules just changed."""
        if self._nudged is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._nudged.set)

    async def _every(
        self, seconds: float, action: Callable[[], Awaitable[object]], wake: Optional[asyncio.Event] = None
    ) -> None:
        while True:
            try:
                await action()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the DHT hiccups; the next attempt tries again
                logger.warning("swarm refresh failed: %s", e)
            if wake is None:
                await asyncio.sleep(seconds)
                continue
            try:
                await asyncio.wait_for(wake.wait(), seconds)
            except asyncio.TimeoutError:
                pass
            wake.clear()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._nudged = asyncio.Event()
        await self.announce()
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._every(ANNOUNCE_SECONDS, self.announce, self._nudged), name="announce"),
            asyncio.create_task(self._every(WATCH_SECONDS, self.watch), name="watch"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
