"""Forming an averaging group for one module and round, with no coordinator.

Each ready peer posts a ReadyRecord (stamped with its post time) under the module's
ready key for the round. Records are cut into consecutive *windows*: a window opens
at the earliest post not yet in a window and holds every post within its length of it:
``gather_seconds``, or longer if the opening record asks (a node whose steps take seconds
knows that the others, who notice its post only between two steps, post that much later),
at most ``MAX_WINDOW_FACTOR`` times ``gather_seconds``. A peer's group is its window. Every peer that reads after
its window closed (plus a settle margin for DHT propagation) sees the same records
and so computes the same group, its id, and whether parameters must be re-synced.

The window closes early when every host the peer expects (from peer records) has
posted, in this window or another one (a host that posted in another window will
not join ours, so waiting for it only keeps the two windows apart). Peers with
differing expectations may then disagree, which the all-reduce detects by group id
and turns into a partial round, never into mixed-up sums.

A record also asks for a size of averaging messages (node/averaging/run.py: what the peer's last
round moved in a short time). The group takes the smallest ask, within 1 to ``MAX_MESSAGE_GROWTH``
times the manifest's size: one slow member keeps the manifest's messages for everyone.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Set, Tuple

from node.averaging.slices import MAX_SLICES, slice_values
from node.net import SwarmPort
from protocol.records import ReadyRecord, RecordError, parse_record, ready_key
from protocol.wire import payload_bytes

logger = logging.getLogger(__name__)

SETTLE_SECONDS = 0.5  # DHT stores finish within milliseconds on a LAN; this covers clock jitter too
# How often a module's ready posts are read while its window is open. A gap growing 1.5x to 1 s saved ~8 MB in
# one 4-node sparse run (bench/RESULTS.md, 4102baa); it stays 0.2 s until the recovery seen in
# tests/system/test_nat.py (see node/swarm/membership.py, PEERS_READ_SECONDS) is understood.
POLL_SECONDS = 0.2
MAX_WINDOW_FACTOR = 4.0  # the longest window a record may ask for, in gather_seconds
MAX_MESSAGE_GROWTH = 4  # a group's averaging messages are at most this many times the manifest's size


def largest_message_bytes(chunk_elements: int, numel: int, compression: str = "none") -> int:
    """The largest payload of one averaging message (a slice, in float32) a group averaging a module of
    ``numel`` values may send, whatever its size: a chunk, grown up to MAX_MESSAGE_GROWTH times, unless the
    module is so large that MAX_SLICES caps the count of slices. A re-sync's three regions then have at least
    MAX_SLICES // 3 // 2 slices each (node/averaging/slices.py: region_bounds, chunked_bounds). With ``sparse``
    compression a slice holds more values (slice_values), and a result may send every one of them (a group of
    more than 4096 / topk members leaves no value out): that bound too."""
    capped = MAX_SLICES // 3 // 2
    dense = 4 * max(MAX_MESSAGE_GROWTH * chunk_elements, -(-numel // capped) + 1)
    if compression != "sparse":
        return dense
    values = max(MAX_MESSAGE_GROWTH * slice_values(chunk_elements, "topk2"), -(-numel // capped) + 1)
    return max(dense, payload_bytes(values, "topk8"))


@dataclass(frozen=True)
class Group:
    """The peers averaging one module in one round, sorted by peer id."""

    module: str
    round: int
    members: Tuple[str, ...]
    params_hashes: Tuple[str, ...]
    group_id: str
    posted_at: Tuple[float, ...] = ()  # when each member said it was ready (swarm clock)
    message_bytes: int = 0  # bytes per averaging message the members agreed on; 0: the manifest's size
    # Indices (into members) of the members that reduce slices; () means every member. Members nobody can
    # dial (behind NAT) reduce none: they send parts and take results on streams they open themselves.
    reducer_indices: Tuple[int, ...] = ()
    nobody_dialable: bool = False  # every member said it cannot be dialed: they all try to reduce, as before
    samples: Tuple[int, ...] = ()  # the samples each member claims for this round (members-only swarms; 0: none)

    @property
    def reducers(self) -> Tuple[int, ...]:
        return self.reducer_indices or tuple(range(len(self.members)))

    @property
    def needs_resync(self) -> bool:
        """Members start from different parameters: average the parameters too this round."""
        return len(set(self.params_hashes)) > 1

    def index_of(self, peer_id: str) -> int:
        return self.members.index(peer_id)


def agreed_message_bytes(records: Iterable[ReadyRecord], smallest: int) -> int:
    """The size of a group's averaging messages: the smallest any member asks for, each ask taken
    within [``smallest``, MAX_MESSAGE_GROWTH x ``smallest``]. ``smallest`` is the manifest's size; a
    member that asks nothing (an older peer) counts as asking for it, so it keeps the layout it knows."""
    asks = [min(max(r.message_bytes or smallest, smallest), MAX_MESSAGE_GROWTH * smallest) for r in records]
    return min(asks, default=smallest)


def make_group(
    module: str, round_number: int, records: Dict[str, ReadyRecord], smallest_message: int = 0
) -> Group:
    """The group of ``records``; with ``smallest_message`` (the manifest's message size in bytes),
    also the message size its members agreed on (``agreed_message_bytes``)."""
    members = tuple(sorted(records))
    hashes = tuple(records[m].params_hash for m in members)
    message = agreed_message_bytes(records.values(), smallest_message) if smallest_message else 0
    message = message if message > smallest_message else 0
    # A grown message size is part of the group's identity: members that read different asks form
    # different groups (a partial round) instead of cutting the vector differently. The manifest's
    # size leaves the id as older peers compute it.
    grown = f"|{message}" if message else ""
    # Who reduces is part of the identity too (it changes the layout); a group where every member reduces
    # (or none can: then all try) keeps the id older peers compute.
    reducers = tuple(i for i, m in enumerate(members) if records[m].reduces is not False)
    nobody = len(members) > 1 and not reducers
    reducers = () if len(reducers) in (0, len(members)) else reducers
    senders = f"|r{','.join(map(str, reducers))}" if reducers else ""
    key = f"{module}|{round_number}|{'|'.join(members)}|{'|'.join(hashes)}{grown}{senders}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    posted = tuple(records[m].posted_at for m in members)
    samples = tuple(records[m].samples or 0 for m in members)
    return Group(module, round_number, members, hashes, digest[:16], posted, message, reducers, nobody, samples)


def window_length(opener: ReadyRecord, gather_seconds: float) -> float:
    """How long the window ``opener`` opens lasts: what it asked for, within [1, MAX_WINDOW_FACTOR] x gather."""
    asked = opener.window_seconds if opener.window_seconds is not None else gather_seconds
    return min(max(asked, gather_seconds), MAX_WINDOW_FACTOR * gather_seconds)


def window_of(
    peer_id: str, records: Dict[str, ReadyRecord], gather_seconds: float
) -> Tuple[Dict[str, ReadyRecord], float]:
    """The window (see module doc) holding ``peer_id``'s own record, and when it closes."""
    ordered = sorted(records.items(), key=lambda item: (item[1].posted_at, item[0]))
    window: Dict[str, ReadyRecord] = {}
    closes_at: Optional[float] = None
    for peer, record in ordered:
        if closes_at is None or record.posted_at > closes_at:
            if peer_id in window:
                break
            window, closes_at = {}, record.posted_at + window_length(record, gather_seconds)
        window[peer] = record
    return (window, closes_at or 0.0) if peer_id in window else ({}, 0.0)


class Matchmaker:
    """Posts readiness and waits for the group; one per node, used for every module."""

    def __init__(
        self,
        swarm: SwarmPort,
        swarm_id: str,
        gather_seconds: float,
        clock: Optional[Callable[[], float]] = None,
        smallest_message: int = 0,
        reduces: bool = True,
        refuses: Optional[Callable[[str], bool]] = None,
    ) -> None:
        """``smallest_message``: the manifest's averaging message size in bytes (0: groups keep it, whatever
        their members ask). ``reduces`` False: nobody can dial this node (node/swarm/reachability.py).
        ``refuses``: members-only swarms, the peers known to be out (revoked, expired): never in our groups."""
        self.reduces = reduces
        self._refuses = refuses
        self.samples: Optional[int] = None  # claimed in our ready records (members-only swarms: receipts)
        self._swarm = swarm
        self._swarm_id = swarm_id
        self._gather = gather_seconds
        self._clock = clock or swarm.now
        self._smallest_message = smallest_message

    async def read_ready(self, module: str, round_number: int) -> Dict[str, ReadyRecord]:
        raw = await self._swarm.read(ready_key(self._swarm_id, module, round_number))
        records: Dict[str, ReadyRecord] = {}
        for peer, (value, _) in raw.items():
            if self._refuses is not None and self._refuses(peer):
                continue
            try:
                records[peer] = parse_record(ReadyRecord, value)
            except RecordError as e:
                logger.debug("ignoring ready record from %s: %s", peer[-8:], e)
        return records

    async def form_group(
        self,
        module: str,
        round_number: int,
        params_hash: str,
        numel: int,
        expected_peers: Iterable[str],
        expiration_seconds: float,
        window_seconds: Optional[float] = None,
        message_bytes: Optional[int] = None,
    ) -> Group:
        """Post our ReadyRecord and return our window's group (possibly just ourselves).
        ``window_seconds``: the window we ask for if ours is the first post (see module doc);
        ``message_bytes``: the averaging message size we ask for (``agreed_message_bytes``). A matchmaker
        whose ``reduces`` is False (nobody can dial us) says so: we reduce no slice (Group.reducers)."""
        me = self._swarm.peer_id
        posted_at = self._clock()
        record = ReadyRecord(
            posted_at=posted_at, params_hash=params_hash, numel=numel, window_seconds=window_seconds,
            message_bytes=message_bytes, reduces=None if self.reduces else False, samples=self.samples,
        )  # fmt: skip
        key = ready_key(self._swarm_id, module, round_number)
        await self._swarm.store(key, me, record.dict(), posted_at + expiration_seconds)
        expected: Set[str] = set(expected_peers) | {me}
        while True:
            records = await self.read_ready(module, round_number)
            records[me] = record
            records = {p: r for p, r in records.items() if r.numel == numel}
            window, closes_at = window_of(me, records, self._gather)
            # A host that posted in another window will not join ours: stop waiting for it.
            missing = expected - set(records)
            if not missing or self._clock() >= closes_at + SETTLE_SECONDS:
                return make_group(module, round_number, window, self._smallest_message)
            await asyncio.sleep(min(POLL_SECONDS, max(0.01, closes_at + SETTLE_SECONDS - self._clock())))
