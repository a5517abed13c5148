"""Our request/response streams: frame I/O over a p2p stream, and the pool of idle streams we reuse.

A stream carries framed requests, each answered by one framed response, in turn (protocol/frames.py).
Opening a stream costs both daemons and both peers more than a small message, so a stream whose exchange
completed goes back to a small pool for the next request to the same peer and handler.
"""

from __future__ import annotations

import asyncio
import time
from typing import Dict, List, Optional, Tuple

from protocol.frames import STREAM_PREFIX_BYTES, FrameError, stream_frame_size, stream_prefix

# A served stream waits this long for the next request, then closes; a caller reuses an idle
# stream only well within that, so it never writes into a stream the other side is closing.
STREAM_IDLE_SECONDS = 60.0
STREAM_REUSE_SECONDS = 20.0
STREAMS_PER_PEER = 8  # idle streams kept per (peer, handler)


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
    head = reader.readexactly(STREAM_PREFIX_BYTES)
    size = stream_frame_size(await (asyncio.wait_for(head, idle_timeout) if idle_timeout else head))
    if limit is not None and size > limit:
        raise FrameError(f"frame of {size} bytes is over the {limit} limit here")
    return await reader.readexactly(size)
