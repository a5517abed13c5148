"""Several peers in one event loop: the in-process SwarmPort (node/net/port.py), with injectable faults and clock.

    clock = VirtualClock()                              # node/net/virtualtime.py
    network = InProcessNetwork(clock=clock.wall)        # now(): virtual wall time (default: time.time)

    async def scenario() -> None:
        a, b = network.join("a"), network.join("b")
        await b.serve("echo", echo)
        network.faults.on(sender="a", handler="echo").drop()      # a's next echo request is lost
        ...

    run_virtual(scenario(), clock=clock)

Delivery. A call hands its request to a task owned by the receiving peer and waits up to ``timeout`` for the
response. The request goes on when the caller stops waiting, as bytes in flight on a real network do: a late
request still runs its handler. Requests and responses travel as fresh ``bytes`` copies, each at most
``max_frame_bytes`` (an oversized one closes the stream, as the real adapter does); the DHT keeps a
msgpack round trip of each value (tuples stay tuples, as in hivemind's DHT) and hands out fresh ones.

Faults: node/net/faults.py; ``network.faults`` holds the rules of this network's traffic.

Killing a peer (``network.kill(peer_id)``): calls to or from it raise ConnectionError from then on, and those
in flight fail at once with a closed stream; the handlers it runs and the tasks it started with ``spawn``
are cancelled. Requests it sent that a delay still holds arrive all the same, as bytes already on the wire
do. Its DHT records stay until they expire, as the copies other peers keep would. ``join`` may reuse its id.

Traffic. ``swarm.bytes_sent`` and ``swarm.bytes_received`` count message bytes at the port (requests and
responses, without framing): a request counts as sent when the port sends it and as received when the
handler gets it; a response likewise.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Callable, Coroutine, Dict, Optional, Set, Tuple, TypeVar

import msgpack

from node.net.faults import Fate, Faults
from node.net.port import Handler
from protocol.frames import MAX_FRAME_BYTES

T = TypeVar("T")
logger = logging.getLogger(__name__)
_TUPLE_EXT = 0x40  # hivemind's MSGPackSerializer code for a tuple


class InProcessNetwork:
    """Peers in one event loop, the DHT they share, the clock it reads, and the fault rules of their traffic."""

    def __init__(self, clock: Callable[[], float] = time.time, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.faults = Faults()
        self.max_frame_bytes = max_frame_bytes
        self._clock = clock
        self._peers: Dict[str, InProcessSwarm] = {}
        self._records: Dict[str, Dict[str, Tuple[bytes, float]]] = {}  # key -> subkey -> (packed value, expiry)
        self._numbers = itertools.count(1)

    def now(self) -> float:
        """Wall time in seconds, as DHT records are stamped: the clock given (time.time by default)."""
        return self._clock()

    def join(self, peer_id: Optional[str] = None) -> InProcessSwarm:
        """A new peer, named ``peer_id`` or ``peer-<n>``; ValueError when a live peer has that id."""
        if peer_id is None:
            peer_id = next(f"peer-{n}" for n in self._numbers if f"peer-{n}" not in self._peers)
        existing = self._peers.get(peer_id)
        if existing is not None and existing.alive:
            raise ValueError(f"peer {peer_id} is already in the network")
        swarm = InProcessSwarm(self, peer_id)
        self._peers[peer_id] = swarm
        return swarm

    def peer(self, peer_id: str) -> InProcessSwarm:
        """The swarm of peer ``peer_id`` (alive or killed); KeyError when it never joined."""
        return self._peers[peer_id]

    def kill(self, peer_id: str) -> None:
        """Kill a peer now (see the module docstring); killing a dead peer does nothing."""
        self._peers[peer_id]._die()

    async def close(self) -> None:
        """Kill every peer and wait until the tasks they ran have stopped."""
        tasks = [task for swarm in self._peers.values() for task in swarm._tasks]
        for swarm in self._peers.values():
            swarm._die()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the DHT -------------------------------------------------------------------
    def _store(self, key: str, subkey: str, value: Any, expiration_time: float) -> bool:
        """hivemind's rule: a record already expired, or not newer than the one under its subkey, is refused."""
        packed = _pack(value)
        if expiration_time < self.now():
            return False
        records = self._records.setdefault(key, {})
        old = records.get(subkey)
        if old is not None and old[1] >= expiration_time:
            return False
        records[subkey] = (packed, expiration_time)
        return True

    def _read(self, key: str) -> Dict[str, Tuple[Any, float]]:
        now = self.now()
        records = self._records.get(key, {})
        for subkey in [s for s, (_, expiration) in records.items() if expiration < now]:
            del records[subkey]
        return {subkey: (_unpack(packed), expiration) for subkey, (packed, expiration) in records.items()}

    def _reachable(self, caller: InProcessSwarm, peer_id: str) -> InProcessSwarm:
        if not caller.alive:
            raise ConnectionError(f"cannot reach peer {peer_id}: this peer ({caller.peer_id}) was killed")
        server = self._peers.get(peer_id)
        if server is None:
            raise ConnectionError(f"cannot reach peer {peer_id}: no such peer")
        if not server.alive:
            raise ConnectionError(f"cannot reach peer {peer_id}: it was killed")
        return server


class InProcessSwarm:
    """One peer's SwarmPort in an ``InProcessNetwork``, and the owner of the tasks that peer runs."""

    def __init__(self, network: InProcessNetwork, peer_id: str) -> None:
        self.network = network
        self.alive = True
        self.bytes_sent = 0
        self.bytes_received = 0
        self._peer_id = peer_id
        self._handlers: Dict[str, Handler] = {}
        self._tasks: Set[asyncio.Task[Any]] = set()  # handler runs and spawned tasks: cancelled when killed
        self._replies: Set[asyncio.Future[bytes]] = set()  # responses awaited by our calls and calls to us

    @property
    def peer_id(self) -> str:
        return self._peer_id

    def now(self) -> float:
        return self.network.now()

    def spawn(self, coro: Coroutine[Any, Any, T], name: Optional[str] = None) -> asyncio.Task[T]:
        """Run ``coro`` as a task of this peer (named ``<peer>:<name>``), cancelled when the peer is killed. The
        caller owns the task: it awaits it, or cancels and awaits it. RuntimeError on a killed peer."""
        if not self.alive:
            coro.close()
            raise RuntimeError(f"peer {self._peer_id} was killed; it starts nothing")
        name = name or getattr(coro, "__qualname__", "task")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._peer_id}:{name}")
        self._own(task)
        return task

    async def serve(self, name: str, handler: Handler) -> None:
        self._check_alive()
        self._handlers[name] = handler

    async def store(self, key: str, subkey: str, value: Any, expiration_time: float) -> bool:
        """Store one subkey's value (msgpack-serializable, else TypeError) until ``expiration_time``."""
        self._check_alive()
        await asyncio.sleep(0)  # a DHT operation is never instantaneous: let the other tasks run
        if subkey != self.peer_id:  # only the owner writes its subkey (the real swarm checks signatures)
            return False
        return self.network._store(key, subkey, value, expiration_time)

    async def read(self, key: str) -> Dict[str, Tuple[Any, float]]:
        self._check_alive()
        await asyncio.sleep(0)
        return self.network._read(key)

    async def call(self, peer_id: str, name: str, request: bytes, timeout: float) -> bytes:
        server = self.network._reachable(self, peer_id)
        request = bytes(memoryview(request))  # our copy: the caller may reuse its buffer at once
        self.bytes_sent += len(request)
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._replies.add(reply)
        server._replies.add(reply)  # its death closes our stream, even one whose request was lost
        try:
            fate = self.network.faults.fate(self._peer_id, peer_id, name, request)
            if fate.end != "drop":
                server._own(asyncio.get_running_loop().create_task(server._answer(self, name, fate, reply)))
            response = await asyncio.wait_for(reply, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"peer {peer_id} did not answer {name} within {timeout:.1f}s") from None
        finally:
            self._replies.discard(reply)
            server._replies.discard(reply)
        self.bytes_received += len(response)
        return response

    async def _answer(self, caller: InProcessSwarm, name: str, fate: Fate, reply: asyncio.Future[bytes]) -> None:
        """Deliver one request (after its delay), run the handler and send back its response, faults applied."""
        closed = ConnectionError(f"peer {self._peer_id} closed the {name} stream")
        await asyncio.sleep(fate.delay)
        if fate.end == "close":
            return _fail(reply, closed)
        handler = self._handlers.get(name)
        if handler is None:
            return _fail(reply, ConnectionError(f"cannot reach peer {self._peer_id}: it serves no {name}"))
        if len(fate.data) > self.network.max_frame_bytes:
            logger.info("refused a %s request from %s: %d bytes is over the frame limit", name, caller.peer_id,
                        len(fate.data))
            return _fail(reply, closed)
        self.bytes_received += len(fate.data)
        try:
            response = await handler(caller.peer_id, fate.data)
            response = bytes(memoryview(response))  # TypeError for what is not bytes-like: a handler bug too
        except Exception:  # a bug in the handler, whatever it raised: say so, as the real adapter does
            logger.exception("handler %s failed on a request from %s", name, caller.peer_id)
            return _fail(reply, closed)
        except asyncio.CancelledError:  # we were killed, or the handler let a cancellation out
            _fail(reply, closed)
            raise
        if len(response) > self.network.max_frame_bytes:
            logger.info("the %s response to %s is %d bytes, over the frame limit", name, caller.peer_id, len(response))
            return _fail(reply, closed)
        self.bytes_sent += len(response)
        try:
            back = self.network.faults.fate(self._peer_id, caller.peer_id, name, response, response=True)
        except Exception as e:  # a broken fault rule, a bug in the test: raise it where the test looks
            return _fail(reply, e)
        await asyncio.sleep(back.delay)
        if back.end == "close":
            _fail(reply, closed)
        elif back.end is None and not reply.done():
            reply.set_result(back.data)

    def _own(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check_alive(self) -> None:
        if not self.alive:
            raise ConnectionError(f"peer {self._peer_id} was killed; it reaches no one")

    def _die(self) -> None:
        self.alive = False
        self._handlers.clear()
        for reply in list(self._replies):
            _fail(reply, ConnectionError(f"the stream closed: peer {self._peer_id} was killed"))
        for task in list(self._tasks):
            task.cancel()


def _fail(reply: asyncio.Future[bytes], error: Exception) -> None:
    if not reply.done():  # the caller may have stopped waiting already
        reply.set_exception(error)


def _pack(value: Any) -> bytes:
    """Serialize as hivemind's DHT does: strict types, binary as bin, tuples as their own extension type."""
    packed: bytes = msgpack.packb(value, use_bin_type=True, strict_types=True, default=_pack_tuple)
    return packed


def _pack_tuple(value: Any) -> msgpack.ExtType:
    if isinstance(value, tuple):
        return msgpack.ExtType(_TUPLE_EXT, _pack(list(value)))
    raise TypeError(f"cannot store a {type(value).__name__} in the DHT: only msgpack types and tuples")


def _unpack(packed: bytes) -> Any:
    return msgpack.unpackb(packed, raw=False, ext_hook=_unpack_tuple)


def _unpack_tuple(code: int, data: bytes) -> Any:
    return tuple(_unpack(data)) if code == _TUPLE_EXT else msgpack.ExtType(code, data)
