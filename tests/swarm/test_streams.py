"""Our request/response streams on two real Swarms (two DHT processes, two p2pd daemons) in this process."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest

import node.net.hivemind as swarm_module
import node.net.streams as streams_module
from node.net import HivemindSwarm as Swarm
from node.ops.procs import children_of

pytestmark = pytest.mark.swarm


@pytest.fixture
def two_swarms():
    before = set(children_of(os.getpid()))
    first = Swarm.open()
    second = Swarm.open(initial_peers=first.visible_maddrs())
    try:
        yield first, second
    finally:
        second.close()
        first.close()
        assert set(children_of(os.getpid())) <= before  # DHT processes and their p2pd are gone


def test_a_handler_that_raises_is_logged_and_its_caller_sees_a_closed_stream(two_swarms, caplog):
    """A handler bug that raises ValueError (or ConnectionError) used to be taken for a bad frame from the
    peer and dropped without a word; the caller only saw its stream closed."""
    server, client = two_swarms

    async def handler(peer: str, request: bytes) -> bytes:
        if request == b"bug":
            raise ValueError("a bug in the handler")
        return peer.encode() + b":" + request

    server.run(server.serve("commons/test/echo", handler), timeout=10)
    answer = client.run(client.call(server.peer_id, "commons/test/echo", b"hello", timeout=10), timeout=15)
    assert answer == client.peer_id.encode() + b":hello"
    with caplog.at_level(logging.INFO, logger="node.net.hivemind"):
        with pytest.raises(ConnectionError, match="closed"):
            client.run(client.call(server.peer_id, "commons/test/echo", b"bug", timeout=10), timeout=15)
    assert any("handler commons/test/echo failed" in r.getMessage() and r.exc_info for r in caplog.records)
    # the next request on a fresh stream is served as usual
    again = client.run(client.call(server.peer_id, "commons/test/echo", b"again", timeout=10), timeout=15)
    assert again.endswith(b":again")


def test_a_stream_carries_later_requests_and_is_dropped_once_the_server_closes_it(two_swarms, monkeypatch):
    """Requests to one peer reuse an idle stream; one the server closed (idle too long) is never written to."""
    server, client = two_swarms
    served = []

    async def handler(peer: str, request: bytes) -> bytes:
        served.append(request)
        return request[::-1]

    server.run(server.serve("commons/test/rev", handler), timeout=10)

    def call(request: bytes) -> bytes:
        return client.run(client.call(server.peer_id, "commons/test/rev", request, timeout=10), timeout=15)

    assert call(b"abc") == b"cba"
    (pooled,) = client._streams._idle[(server.peer_id, "commons/test/rev")]
    assert call(b"xyz") == b"zyx"
    assert client._streams._idle[(server.peer_id, "commons/test/rev")] == [pooled]  # the same stream again

    async def concurrently() -> list:
        calls = [client.call(server.peer_id, "commons/test/rev", bytes([i]) * 1000, timeout=10) for i in range(12)]
        return await asyncio.gather(*calls)

    answers = client.run(concurrently(), timeout=30)
    assert answers == [bytes([i]) * 1000 for i in range(12)]
    assert len(client._streams) <= streams_module.STREAMS_PER_PEER

    # The server closes streams left idle; the caller notices and opens a fresh one.
    monkeypatch.setattr(swarm_module, "STREAM_IDLE_SECONDS", 0.5)
    client.run(client._close_streams(), timeout=5)
    call(b"short")  # on a fresh stream, which the server now closes after 0.5 s without a request
    (short,) = client._streams._idle[(server.peer_id, "commons/test/rev")]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and short.usable(time.monotonic()):
        time.sleep(0.1)
    assert not short.usable(time.monotonic()), "the caller did not see the server close its stream"
    assert call(b"after") == b"retfa"
    assert short not in client._streams._idle[(server.peer_id, "commons/test/rev")]
    assert served[-1] == b"after"
