"""Our request/response streams on two real Swarms (two DHT processes, two p2pd daemons) in this process."""

from __future__ import annotations

import logging
import os

import pytest

from node.procs import children_of
from node.swarm import Swarm

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

    server.run(server.add_handler("commons/test/echo", handler), timeout=10)
    answer = client.run(client.call(server.peer_id, "commons/test/echo", b"hello", timeout=10), timeout=15)
    assert answer == client.peer_id.encode() + b":hello"
    with caplog.at_level(logging.INFO, logger="node.swarm"):
        with pytest.raises(ConnectionError, match="closed"):
            client.run(client.call(server.peer_id, "commons/test/echo", b"bug", timeout=10), timeout=15)
    assert any("handler commons/test/echo failed" in r.getMessage() and r.exc_info for r in caplog.records)
    # the next request on a fresh stream is served as usual
    again = client.run(client.call(server.peer_id, "commons/test/echo", b"again", timeout=10), timeout=15)
    assert again.endswith(b":again")
