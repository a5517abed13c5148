"""The dial-back over real p2pd streams on loopback (node/swarm/reachability.py): the server dials the address the
caller's stream came from, only there, at most once per caller every 10 s. Behind a real NAT:
tests/system/test_nat.py."""

from __future__ import annotations

import socket
from typing import Iterator, Tuple

import pytest

from node.net import HivemindSwarm
from node.swarm.reachability import DialBackServer, ask_dialback, listen_ports, probe

pytestmark = pytest.mark.swarm


@pytest.fixture(scope="module")
def pair() -> Iterator[Tuple[HivemindSwarm, HivemindSwarm, DialBackServer]]:
    server = HivemindSwarm.open()
    client = HivemindSwarm.open(initial_peers=server.visible_maddrs())
    dialback = DialBackServer(server)
    try:
        server.run(dialback.start())
        yield server, client, dialback
    finally:
        client.close()
        server.close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_peer_reaches_our_listen_port_and_says_public(pair) -> None:  # type: ignore[no-untyped-def]
    server, client, dialback = pair
    ports = listen_ports(client.visible_maddrs())
    verdict = client.run(probe(client, [server.peer_id], ports, timeout=10), timeout=20)
    assert verdict.reachability == "public", verdict.answers
    assert verdict.observed == "127.0.0.1" and dialback.served >= 1
    # Asked again at once, the peer refuses: one dial-back per caller every 10 s, so nobody turns it into a scanner.
    again = client.run(ask_dialback(client, server.peer_id, ports, timeout=10), timeout=20)
    assert again.tried == [] and "at most one" in again.reason and dialback.refused >= 1


def test_a_port_nobody_listens_on_is_not_reached_and_the_verdict_is_private(pair) -> None:  # type: ignore[no-untyped-def]
    server, _, _ = pair
    third = HivemindSwarm.open(initial_peers=server.visible_maddrs())  # a caller the rate limit has not seen
    try:
        port = closed_port()
        verdict = third.run(probe(third, [server.peer_id], [port], timeout=10, enough=1), timeout=20)
    finally:
        third.close()
    assert verdict.reachability == "private", verdict.answers
    assert f"reached port(s) [] of [{port}]" in verdict.answers[server.peer_id]
