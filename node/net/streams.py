"""Our request/response streams: frame I/O over a p2p stream, and the pool of idle streams we reuse.

A stream carries framed requests, each answered by one framed response, in turn (protocol/frames.py).
Opening a stream costs both daemons and both peers more than a small message, so a stream whose exchange
completed goes back to a small pool for the next request to the same peer and handler.

What a node takes from its peers at once is bounded (``Limits``): frames no larger than the largest message
its manifest lets a peer send, each frame's body within a deadline (``body_deadline``), at most
``SERVED_STREAMS_PER_PEER`` streams served to one peer, requests of each kind within a rate per peer
(``REQUEST_RATES``), and the frame bytes it holds (read or being handled) within a budget per peer and per
node. What goes over is refused, counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Dict, List, Optional, Tuple

from protocol.frames import MAX_FRAME_BYTES, STREAM_PREFIX_BYTES, FrameError, stream_frame_size, stream_prefix

logger = logging.getLogger(__name__)

# A served stream waits this long for the next request, then closes; a caller reuses an idle
# stream only well within that, so it never writes into a stream the other side is closing.
STREAM_IDLE_SECONDS = 60.0
STREAM_REUSE_SECONDS = 20.0
STREAMS_PER_PEER = 8  # idle streams kept per (peer, handler)

# A frame's body arrives within FRAME_BODY_SECONDS plus its size at FRAME_MIN_RATE (a 4 MiB state range: 94 s,
# a volunteer's 1 Mbit/s uplink needs 34 s); a sender slower than that holds our memory for nothing.
FRAME_BODY_SECONDS = 30.0
FRAME_MIN_RATE = 64 << 10  # bytes per second
# Streams one peer may have served at once. A node's own requests to one peer stay far below it: about two
# averaging messages in flight per module, a few state ranges, and STREAMS_PER_PEER idle ones per handler.
SERVED_STREAMS_PER_PEER = 64
# Frame bytes held at once (being read, or in the handler): per peer, and for the whole node. An averaging
# message is at most a few MiB, a state range 4 MiB: an honest peer holds a few of them at a time.
PEER_FRAME_BUDGET = 32 << 20
NODE_FRAME_BUDGET = 256 << 20
_LOG_EVERY = 60.0  # seconds between two log lines about the same peer's refused requests


# Requests one peer may make per second, and in a burst, by request kind: a hello or a digest costs little but not
# nothing, and a dial-back makes us open connections. Averaging messages are bounded by the frame budgets instead
# (a group's transfer runs as fast as the links let it), state ranges also by bytes (node/swarm/statesync.py).
REQUEST_RATES: Dict[str, Tuple[float, float]] = {"hello": (5.0, 20.0), "dialback": (1.0, 4.0), "state": (50.0, 200.0)}
TURN_SECONDS = 10.0  # a request over its rate waits for its turn up to this long; past it, its stream is closed


class Bucket:
    """A token bucket: ``rate`` tokens a second, at most ``burst`` held; ``take`` spends or refuses."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self.tokens, self._at = burst, clock()

    def take(self, amount: float = 1.0) -> bool:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    def reserve(self, amount: float = 1.0, longest: float = float("inf")) -> Optional[float]:
        """Take ``amount`` now or in the future: the seconds until it is there (0: at once; waiters queue up), or
        None (nothing taken) when that is over ``longest``."""
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now
        wait = 0.0 if self.tokens >= amount else (amount - self.tokens) / self.rate
        if wait > longest:
            return None
        self.tokens -= amount
        return wait

    @property
    def full(self) -> bool:
        return self.tokens + (self._clock() - self._at) * self.rate >= self.burst


class Buckets:
    """One Bucket per peer, made on first use; idle (full) ones are dropped when there are many."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: Dict[str, Bucket] = {}

    def take(self, peer: str, amount: float = 1.0) -> bool:
        return self._bucket(peer).take(amount)

    def reserve(self, peer: str, amount: float = 1.0, longest: float = float("inf")) -> Optional[float]:
        """Bucket.reserve of ``peer``'s bucket: the seconds to wait for its turn, or None past ``longest``."""
        return self._bucket(peer).reserve(amount, longest)

    def _bucket(self, peer: str) -> Bucket:
        bucket = self._buckets.get(peer)
        if bucket is None:
            if len(self._buckets) >= 4096:
                self._buckets = {p: b for p, b in self._buckets.items() if not b.full}
            bucket = self._buckets[peer] = Bucket(self.rate, self.burst, self._clock)
        return bucket


def body_deadline(size: int) -> float:
    """Seconds a frame body of ``size`` bytes may take to arrive."""
    return FRAME_BODY_SECONDS + size / FRAME_MIN_RATE


class Limits:
    """What a node takes from its peers at once on the streams it serves; counts what it refused, by (request,
    reason). Reasons: ``frame_too_large``, ``slow_frame``, ``too_many_streams``, ``too_fast``, ``over_budget``.
    Loop thread only (``refused`` is read from others: a dict read whole)."""

    def __init__(
        self,
        max_frame: int = MAX_FRAME_BYTES,
        streams_per_peer: int = SERVED_STREAMS_PER_PEER,
        peer_budget: int = PEER_FRAME_BUDGET,
        node_budget: int = NODE_FRAME_BUDGET,
    ) -> None:
        self.max_frame = max_frame
        self.streams_per_peer = streams_per_peer
        self.peer_budget = peer_budget
        self.node_budget = node_budget
        self.refused: Dict[Tuple[str, str], int] = {}
        self._rates = {kind: Buckets(rate, burst) for kind, (rate, burst) in REQUEST_RATES.items()}
        self._streams: Dict[str, int] = {}
        self._held: Dict[str, int] = {}  # peer -> frame bytes held
        self.held = 0  # frame bytes held, all peers
        self._logged: Dict[str, float] = {}

    def open_stream(self, peer: str) -> bool:
        """A stream from ``peer`` begins: False (and nothing counted as open) when it has too many already."""
        count = self._streams.get(peer, 0)
        if count >= self.streams_per_peer:
            return False
        self._streams[peer] = count + 1
        return True

    def close_stream(self, peer: str) -> None:
        count = self._streams.pop(peer, 0) - 1
        if count > 0:
            self._streams[peer] = count

    def turn(self, peer: str, request: str, longest: float) -> Optional[float]:
        """Seconds until ``peer``'s next ``request`` is within its rate (0: now), or None past ``longest``. Its
        stream waits that long rather than being closed: a peer that opens a new stream for every refused request
        costs us more than one that waits (each new stream passes through p2pd and this process)."""
        buckets = self._rates.get(request)
        return buckets.reserve(peer, 1.0, longest) if buckets is not None else 0.0

    def reserve(self, peer: str, size: int) -> bool:
        """Hold ``size`` frame bytes for ``peer``; False when that would exceed its budget or the node's."""
        held = self._held.get(peer, 0)
        if held + size > self.peer_budget or self.held + size > self.node_budget:
            return False
        self._held[peer] = held + size
        self.held += size
        return True

    def release(self, peer: str, size: int) -> None:
        held = self._held.pop(peer, 0) - size
        if held > 0:
            self._held[peer] = held
        self.held -= size

    def refuse(self, request: str, peer: str, reason: str, detail: str) -> None:
        """Count a refused request; log it (at most once a minute per peer)."""
        key = (request, reason)
        self.refused = {**self.refused, key: self.refused.get(key, 0) + 1}
        now = time.monotonic()
        if now - self._logged.get(peer, -_LOG_EVERY) >= _LOG_EVERY:
            if len(self._logged) > 4096:
                self._logged.clear()
            self._logged[peer] = now
            logger.warning(
                "refused a %s request from peer %s: %s", request, peer[-8:], detail,
                extra={"event": "refused", "request": request, "reason": reason},
            )  # fmt: skip


class Stream:
    """One open p2p stream of ours, as a reader/writer pair, and when it last finished an exchange."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def usable(self, at: float) -> bool:
        """Not closed by the other side and not idle long enough for it to be closing it now."""
        return at - self.idle_since < STREAM_REUSE_SECONDS and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class StreamPool:
    """Idle streams of ours, per (peer, handler), for the next request there. Loop thread only."""

    def __init__(self, per_key: int = STREAMS_PER_PEER) -> None:
        self.per_key = per_key
        self._idle: Dict[Tuple[str, str], List[Stream]] = {}

    def take(self, peer: str, name: str) -> Optional[Stream]:
        self.sweep()
        streams = self._idle.get((peer, name))
        return streams.pop() if streams else None

    def give_back(self, peer: str, name: str, stream: Stream) -> None:
        stream.idle_since = time.monotonic()
        streams = self._idle.setdefault((peer, name), [])
        if len(streams) < self.per_key:
            streams.append(stream)
        else:
            stream.close()

    def sweep(self) -> None:
        """Close what the other side closed or what sat idle too long."""
        at = time.monotonic()
        for key, streams in list(self._idle.items()):
            keep = []
            for stream in streams:
                if stream.usable(at):
                    keep.append(stream)
                else:
                    stream.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def __len__(self) -> int:
        return sum(len(streams) for streams in self._idle.values())

    def close_all(self) -> None:
        for streams in self._idle.values():
            for stream in streams:
                stream.close()
        self._idle.clear()


async def write_frame(writer: asyncio.StreamWriter, data: bytes) -> None:
    """One stream frame (protocol/frames.py), written in 1 MiB pieces so a large one does not sit in memory twice."""
    writer.write(stream_prefix(len(data)))
    view = memoryview(data)
    for offset in range(0, len(view), 1 << 20):
        writer.write(view[offset : offset + (1 << 20)])
        await writer.drain()
    await writer.drain()


async def read_frame(
    reader: asyncio.StreamReader, idle_timeout: Optional[float] = None, limit: Optional[int] = None
) -> bytes:
    """One stream frame; with ``idle_timeout``, asyncio.TimeoutError when none begins within that many
    seconds; FrameError (a ValueError) for a frame over protocol.frames.MAX_FRAME_BYTES (or ``limit``), before
    it is read."""
    return await read_body(reader, await read_size(reader, idle_timeout, limit))


async def read_size(
    reader: asyncio.StreamReader, idle_timeout: Optional[float] = None, limit: Optional[int] = None
) -> int:
    """The size a stream frame's prefix announces (read_frame's first half)."""
    head = reader.readexactly(STREAM_PREFIX_BYTES)
    size = stream_frame_size(await (asyncio.wait_for(head, idle_timeout) if idle_timeout else head))
    if limit is not None and size > limit:
        raise FrameError(f"frame of {size} bytes is over the {limit} limit here")
    return size


async def read_body(reader: asyncio.StreamReader, size: int, deadline: Optional[float] = None) -> bytes:
    """A frame body of ``size`` bytes; with ``deadline`` (seconds), asyncio.TimeoutError when it takes longer."""
    if deadline is None:
        return await reader.readexactly(size)
    if _timeout is None:  # Python 3.10: wait_for runs the read as a task of its own (about 40 us more a frame)
        return await asyncio.wait_for(reader.readexactly(size), deadline)
    async with _timeout(deadline):
        return await reader.readexactly(size)


_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+: a deadline on the current task, no task of its own
