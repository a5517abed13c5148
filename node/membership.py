"""This node's view of the swarm: it announces itself and reads everyone else's records.

A background task on the swarm loop stores our PeerRecord every ANNOUNCE_SECONDS
(expiring after RECORD_TTL_SECONDS, so a dead peer vanishes on its own), reads all
peer records, and watches whether another peer is already ready to average the trunk
in our current round (the training loop then cuts its round short to join them).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from protocol.records import PeerRecord, RecordError, parse_record, peers_key, ready_key

logger = logging.getLogger(__name__)

ANNOUNCE_SECONDS = 2.0
READY_POLL_SECONDS = 0.5  # how soon a peer notices the swarm is averaging; well under gather_seconds
RECORD_TTL_SECONDS = 12.0  # a few missed announcements before a peer is considered gone


@dataclass
class SwarmView:
    """What the last refresh saw; replaced whole on every refresh (read without locks)."""

    peers: Dict[str, PeerRecord] = field(default_factory=dict)
    seen_at: Dict[str, float] = field(default_factory=dict)  # when each record was last stored (unix s)
    rejected_records: int = 0

    def modules_by_peer(self) -> Dict[str, List[str]]:
        return {peer: list(record.modules) for peer, record in self.peers.items()}

    def hosts_of(self, module: str, exclude: Optional[str] = None) -> List[str]:
        return sorted(p for p, r in self.peers.items() if module in r.modules and p != exclude)

    def max_round(self, exclude: Optional[str] = None) -> int:
        return max((r.outer_round for p, r in self.peers.items() if p != exclude), default=0)


async def read_peers(swarm, swarm_id: str) -> SwarmView:
    raw = await swarm.get_subkeys(peers_key(swarm_id))
    view = SwarmView()
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
        view.peers[peer] = record  # type: ignore[assignment]
        view.seen_at[peer] = expiration - RECORD_TTL_SECONDS
    return view


class Membership:
    """Owns the announce/refresh task; ``view`` and ``ready_round`` are read by the trainer."""

    def __init__(self, swarm, swarm_id: str, describe_self: Callable[[], PeerRecord], clock: Callable[[], float]):
        self._swarm = swarm
        self._swarm_id = swarm_id
        self._describe_self = describe_self
        self._clock = clock
        self.view = SwarmView()
        self.watch_round: int = 0
        self.others_ready_round: int = -1  # highest round for which another peer posted trunk readiness
        self._tasks: List[asyncio.Task] = []

    async def refresh(self) -> SwarmView:
        me = self._describe_self()
        await self._swarm.store(
            peers_key(self._swarm_id), me.peer_id, me.dict(), self._clock() + RECORD_TTL_SECONDS
        )
        view = await read_peers(self._swarm, self._swarm_id)
        view.peers[me.peer_id] = me
        view.seen_at[me.peer_id] = self._clock()
        self.view = view
        return view

    async def poll_ready(self) -> None:
        round_number = self.watch_round
        posted = await self._swarm.get_subkeys(ready_key(self._swarm_id, "trunk", round_number))
        if any(peer != self._swarm.peer_id for peer in posted):
            self.others_ready_round = max(self.others_ready_round, round_number)

    async def _every(self, seconds: float, action: Callable) -> None:
        while True:
            try:
                await action()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the DHT hiccups; the next attempt tries again
                logger.warning("swarm refresh failed: %s", e)
            await asyncio.sleep(seconds)

    async def start(self) -> None:
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._every(ANNOUNCE_SECONDS, self.refresh), name="announce"),
            asyncio.create_task(self._every(READY_POLL_SECONDS, self.poll_ready), name="ready-watch"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
