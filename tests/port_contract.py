"""The SwarmPort contract (node/net/port.py) as checks, written once and run against every implementation:
tests/unit/test_inprocess.py (InProcessSwarm, virtual time) and tests/swarm/test_port_contract.py (two real
HivemindSwarms on loopback).

Each check is a coroutine taking two ports that reach each other and asserts what the contract promises. The
checks use distinct handler names and DHT keys, so one pair of ports can run them all, in any order. They
measure time on the running loop's clock (virtual under run_virtual) and on ``now()``; their handlers await
nothing but ``asyncio.sleep``, because a real port runs them on its own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable, Iterator, List

import pytest

from node.net import SwarmPort

Check = Callable[[SwarmPort, SwarmPort], Awaitable[None]]
TIMEOUT = 0.5  # seconds a call waits in the timeout checks: short, for the real swarm's sake
LIFETIME = 1.0  # seconds a record lives in the expiry check


async def check_call_and_serve(server: SwarmPort, client: SwarmPort) -> None:
    """A call reaches the handler with the caller's id and returns its response, as bytes, whatever its size."""
    seen: List[object] = []

    async def echo(peer: str, request: bytes) -> bytes:
        seen.append(type(request))
        return peer.encode() + b"|" + request

    await server.serve("contract/echo", echo)
    answer = await client.call(server.peer_id, "contract/echo", b"hello", timeout=10)
    assert answer == client.peer_id.encode() + b"|hello" and type(answer) is bytes
    assert await client.call(server.peer_id, "contract/echo", b"", timeout=10) == client.peer_id.encode() + b"|"
    large = bytes(range(256)) * 4096  # 1 MiB
    assert await client.call(server.peer_id, "contract/echo", large, timeout=10) == answer[:-5] + large
    assert seen == [bytes] * 3


async def check_concurrent_calls(server: SwarmPort, client: SwarmPort) -> None:
    """Calls in flight together each get their own response; a slow one holds up no other."""
    finished: List[bytes] = []

    async def slow_or_fast(peer: str, request: bytes) -> bytes:
        await asyncio.sleep(0.5 if request == b"slow" else 0.0)
        return request.upper()

    async def call(request: bytes) -> bytes:
        answer = await client.call(server.peer_id, "contract/slow-or-fast", request, timeout=10)
        finished.append(answer)
        return answer

    await server.serve("contract/slow-or-fast", slow_or_fast)
    requests = [b"slow"] + [b"fast-%d" % i for i in range(8)]
    assert await asyncio.gather(*map(call, requests)) == [r.upper() for r in requests]
    assert finished[-1] == b"SLOW"


async def check_handler_errors_close_the_stream(server: SwarmPort, client: SwarmPort) -> None:
    """A handler that raises, even ConnectionError, is logged; its caller sees a closed stream, then carries on."""

    async def buggy(peer: str, request: bytes) -> bytes:
        if request == b"value":
            raise ValueError("a bug in the handler")
        if request == b"connection":
            raise ConnectionError("a bug that looks like the network")
        return b"fine"

    await server.serve("contract/buggy", buggy)
    for request in (b"value", b"connection"):
        with captured_logs() as records:
            with pytest.raises(ConnectionError, match="closed"):
                await client.call(server.peer_id, "contract/buggy", request, timeout=10)
        assert any("handler contract/buggy failed" in r.getMessage() and r.exc_info for r in records), records
        assert await client.call(server.peer_id, "contract/buggy", b"next", timeout=10) == b"fine"


async def check_timeouts(server: SwarmPort, client: SwarmPort) -> None:
    """No response within ``timeout`` raises TimeoutError, after that long; a slow one within it is answered."""
    finished: List[bytes] = []

    async def sleepy(peer: str, request: bytes) -> bytes:
        await asyncio.sleep(float(request))
        finished.append(request)
        return b"awake"

    await server.serve("contract/sleepy", sleepy)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await client.call(server.peer_id, "contract/sleepy", b"%.2f" % (2 * TIMEOUT), timeout=TIMEOUT)
    assert TIMEOUT * 0.99 <= loop.time() - started < TIMEOUT + 5
    assert await client.call(server.peer_id, "contract/sleepy", b"0.2", timeout=10) == b"awake"
    # The caller gave up, not the handler: it runs to its end (and nothing of this check outlives it).
    while len(finished) < 2 and loop.time() - started < 10:
        await asyncio.sleep(0.05)
    assert sorted(finished) == [b"0.2", b"%.2f" % (2 * TIMEOUT)]


async def check_unknown_handler(server: SwarmPort, client: SwarmPort) -> None:
    """A handler the peer does not serve: ConnectionError at once, not a timeout."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ConnectionError, match="cannot reach"):
        await client.call(server.peer_id, "contract/nobody-serves-this", b"?", timeout=10)
    assert loop.time() - started < 5


async def check_unknown_peer(client: SwarmPort, absent_peer: str) -> None:
    """A peer that is not in the swarm: ConnectionError, not a timeout."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ConnectionError, match="cannot reach"):
        await client.call(absent_peer, "contract/echo", b"?", timeout=10)
    assert loop.time() - started < 5


async def check_store_and_read(server: SwarmPort, client: SwarmPort) -> None:
    """Each subkey (a peer's own id) keeps its own value and expiration; every peer reads them back as stored, as
    copies."""
    expiration = client.now() + 60
    items: List[object] = [1, 2.5, "x"]
    first = {"list": items, "pair": (3, b"\x00\xff"), "none": None, "flag": True}
    assert await client.store("contract/records", client.peer_id, first, expiration)
    assert await server.store("contract/records", server.peer_id, "two", expiration + 1)
    items.append("changed after storing")
    expected = {
        client.peer_id: ({"list": [1, 2.5, "x"], "pair": (3, b"\x00\xff"), "none": None, "flag": True}, expiration),
        server.peer_id: ("two", expiration + 1),
    }
    for port in (server, client):
        found = await port.read("contract/records")
        assert found == expected
        mine = found[client.peer_id][0]
        assert type(mine["pair"]) is tuple and type(mine["list"]) is list
        mine["list"].clear()  # our copy: the next read is unchanged
    assert await server.read("contract/records") == expected
    assert await server.read("contract/no-such-key") == {}


async def check_newest_record_wins(server: SwarmPort, client: SwarmPort) -> None:
    """A record no newer than the one under its subkey, or already expired, is refused; a newer one replaces it."""
    now, me = client.now(), client.peer_id
    assert await client.store("contract/newest", me, "first", now + 30) is True
    assert await client.store("contract/newest", me, "older", now + 20) is False
    assert await client.store("contract/newest", me, "same", now + 30) is False
    assert await client.store("contract/late", me, "expired", now - 1) is False
    assert await server.read("contract/newest") == {me: ("first", now + 30)}
    assert await server.read("contract/late") == {}
    assert await client.store("contract/newest", me, "newer", now + 40) is True
    assert await server.read("contract/newest") == {me: ("newer", now + 40)}


async def check_only_the_owner_writes_its_subkey(server: SwarmPort, client: SwarmPort) -> None:
    """A subkey is a peer id, and only that peer writes under it: another peer's store is refused (False), and the
    owner's record stands for every reader."""
    now = client.now()
    assert await client.store("contract/owned", client.peer_id, {"leaving": False}, now + 30) is True
    assert await server.store("contract/owned", client.peer_id, {"leaving": True}, now + 40) is False
    assert await server.store("contract/owned", "someone-else", "x", now + 40) is False
    for port in (server, client):
        assert await port.read("contract/owned") == {client.peer_id: ({"leaving": False}, now + 30)}


async def check_records_expire(server: SwarmPort, client: SwarmPort) -> None:
    """A record is read until its expiration time on ``now()``, and never after."""
    now = client.now()
    assert await client.store("contract/expiring", client.peer_id, 1, now + LIFETIME)
    assert await server.store("contract/expiring", server.peer_id, 2, now + 60)
    assert set(await server.read("contract/expiring")) == {client.peer_id, server.peer_id}
    await asyncio.sleep(LIFETIME + 0.3)
    assert server.now() > now + LIFETIME
    assert await server.read("contract/expiring") == {server.peer_id: (2, now + 60)}


async def check_now_is_shared_wall_time(server: SwarmPort, client: SwarmPort) -> None:
    """``now()`` is wall time in seconds, the same on every peer, moving with the loop's clock."""
    loop = asyncio.get_running_loop()
    assert server.now() > 1.6e9 and abs(server.now() - client.now()) < 1.0
    before, started = client.now(), loop.time()
    await asyncio.sleep(0.5)
    assert client.now() - before == pytest.approx(loop.time() - started, abs=0.2)


CHECKS: List[Check] = [
    check_call_and_serve,
    check_concurrent_calls,
    check_handler_errors_close_the_stream,
    check_timeouts,
    check_unknown_handler,
    check_store_and_read,
    check_newest_record_wins,
    check_only_the_owner_writes_its_subkey,
    check_records_expire,
    check_now_is_shared_wall_time,
]


@contextlib.contextmanager
def captured_logs() -> Iterator[List[logging.LogRecord]]:
    """The records every logger passes to the root logger meanwhile, whichever thread logs them."""
    records: List[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


def check_name(check: Check) -> str:
    """A check's name for pytest ids: ``check_timeouts`` -> ``timeouts``."""
    return str(getattr(check, "__name__", check)).removeprefix("check_")
