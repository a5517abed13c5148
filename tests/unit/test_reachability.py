"""The reachability verdict and the dial-back messages (node/swarm/reachability.py, protocol/wire.py); the real
dial-back over p2pd is in tests/swarm/test_dialback.py, behind NAT in tests/system/test_nat.py."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.net import InProcessNetwork
from node.swarm.reachability import ask_dialback, decide, listen_ports, probe
from protocol import handlers
from protocol.frames import message_frame
from protocol.wire import DialBack, DialBackReply, WireError, decode, encode


def reply(tried, reachable, observed="10.0.0.1"):  # type: ignore[no-untyped-def]
    return DialBackReply(observed=observed, tried=tried, reachable=reachable)


def test_the_verdict_is_public_if_anyone_got_through_private_if_all_who_dialed_failed_else_unknown() -> None:
    assert decide([reply([4001], [4001])]) == "public"
    assert decide([reply([4001], []), reply([4001], [4001])]) == "public"  # one peer's path may be broken
    assert decide([reply([4001], []), reply([4001], [])]) == "private"
    assert decide([reply([], [], observed="")]) == "unknown"  # a peer that dialed nothing says nothing
    assert decide([None, None]) == decide([]) == "unknown"


def test_listen_ports_are_the_tcp_ports_of_our_addresses_without_repeats() -> None:
    peer = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"
    maddrs = [f"/ip4/10.0.0.2/tcp/4001/p2p/{peer}", f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}", "/ip4/10.0.0.2/udp/9/quic",
              "/ip6/::1/tcp/4002", "/dns4/example.org/tcp/4003", "not an address"]  # fmt: skip
    assert listen_ports(maddrs) == [4001, 4002, 4003]
    assert listen_ports([f"/ip4/10.0.0.2/tcp/{p}" for p in range(1, 10)]) == [1, 2, 3, 4]


@given(st.lists(st.integers(1, 65535), min_size=1, max_size=4))
def test_dialback_round_trips(ports) -> None:  # type: ignore[no-untyped-def]
    message, _ = decode(encode(DialBack(ports=ports)))
    assert isinstance(message, DialBack) and message.ports == ports
    answer = DialBackReply(observed="192.0.2.1", reachable=ports[:1], tried=ports, now=1.5)
    assert decode(encode(answer))[0] == answer


@pytest.mark.parametrize(
    "header",
    [{"type": "dialback", "ports": []}, {"type": "dialback", "ports": [0]}, {"type": "dialback", "ports": [70000]},
     {"type": "dialback", "ports": [1, 2, 3, 4, 5]}, {"type": "dialback", "ports": ["80"]},
     {"type": "dialback", "ports": [80], "target": "198.51.100.7"},  # no field to aim the dial elsewhere
     {"type": "dialback_reply", "observed": "x" * 65}, {"type": "dialback_reply", "reachable": [1] * 5}],
)  # fmt: skip
def test_malformed_dialback_messages_are_refused(header) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WireError):
        decode(message_frame(msgpack.packb(header), b""))


VALUES = st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=8), st.none(), st.lists(st.integers(0, 70000)))


@given(st.dictionaries(st.text(max_size=8), VALUES, max_size=4))
def test_arbitrary_headers_never_escape_as_anything_but_wire_errors(fields) -> None:  # type: ignore[no-untyped-def]
    for kind in ("dialback", "dialback_reply"):
        try:
            decode(message_frame(msgpack.packb({**fields, "type": kind}), b""))
        except WireError:
            pass


def test_a_peer_that_cannot_tell_where_we_are_dials_nothing_and_the_verdict_stays_unknown() -> None:
    """On the in-process network there is no address to dial back: the server says so instead of guessing."""
    from node.swarm.reachability import DialBackServer

    async def main() -> object:
        network = InProcessNetwork()
        server, client = network.join("server"), network.join("client")
        await DialBackServer(server).start()
        answer = await ask_dialback(client, "server", [4001], timeout=5)
        verdict = await probe(client, ["server", "nobody"], [4001], timeout=1)
        await network.close()
        return answer, verdict

    answer, verdict = asyncio.run(main())  # type: ignore[misc]
    assert answer.tried == [] and "cannot tell" in answer.reason
    assert verdict.reachability == "unknown" and set(verdict.answers) == {"server", "nobody"}
    assert "no answer" in verdict.answers["nobody"]


def test_the_dialback_handler_name_is_not_namespaced() -> None:
    assert handlers.DIALBACK == "commons/dialback"
