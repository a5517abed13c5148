"""Can others dial this node? A dial-back over the swarm, answered by the peers it already reached.

A node asks a peer (``DialBack``, protocol/wire.py) to open a plain TCP connection to it, on its listen
ports, at the address the peer saw our stream come from: what a stranger would dial. A node behind NAT
shows its router's address, where nothing new comes in, so the connection fails: "private". A peer only
ever dials the address the request came from, on at most 4 ports, one dial-back per caller every
``MIN_INTERVAL_SECONDS``, so a dial-back cannot be aimed at a third party or turned into a scan.

The verdict (``decide``): "public" when some peer reached a port of ours; "private" when peers answered
and none reached any; "unknown" when nobody answered (the first node of a swarm has no one to ask). What a
node does with it: a private node reduces no slice (node/averaging/slices.py, ``reducers``), never serves
as a donor while a public host has the state, and is not offered to joiners as a bootstrap peer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple

from node.net import REMOTE_ADDRESS, SwarmPort, ip_and_port
from protocol import handlers
from protocol.wire import DialBack, DialBackReply, WireError, decode, encode

logger = logging.getLogger(__name__)

Reachability = Literal["public", "private", "unknown"]
REACHABILITIES: Tuple[Reachability, ...] = ("public", "private", "unknown")
DIAL_SECONDS = 3.0  # one TCP connect: a router that drops what comes in makes it time out
MIN_INTERVAL_SECONDS = 10.0  # between two dial-backs for the same caller
MAX_CONCURRENT = 4  # dial-backs in flight at once, over all callers


async def tcp_reachable(host: str, port: int, timeout: float = DIAL_SECONDS) -> bool:
    """A TCP connection to ``host:port`` opens within ``timeout`` (it is closed again at once)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


class DialBackServer:
    """Answers dial-back requests (``handlers.DIALBACK``): dials the caller back where its stream came from."""

    def __init__(self, swarm: SwarmPort, clock: Callable[[], float] = time.monotonic) -> None:
        self._swarm = swarm
        self._clock = clock
        self._last: Dict[str, float] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self.served = 0
        self.refused = 0

    async def start(self) -> None:
        await self._swarm.serve(handlers.DIALBACK, self._handle)

    async def _handle(self, remote_peer: str, frame: bytes) -> bytes:
        try:
            request, _ = decode(frame)
            if not isinstance(request, DialBack):
                raise WireError("expected dialback")
        except WireError as e:
            self.refused += 1
            return encode(DialBackReply(reason=f"malformed request: {e}"[:256]))
        host, _ = ip_and_port(REMOTE_ADDRESS.get() or "")
        if host is None:
            return encode(DialBackReply(reason="cannot tell where your connection comes from"))
        now = self._clock()
        if now - self._last.get(remote_peer, -MIN_INTERVAL_SECONDS) < MIN_INTERVAL_SECONDS:
            self.refused += 1
            return encode(DialBackReply(observed=host, reason=f"at most one dial-back per {MIN_INTERVAL_SECONDS:g}s"))
        self._last = {p: t for p, t in self._last.items() if now - t < MIN_INTERVAL_SECONDS}  # bounded
        self._last[remote_peer] = now
        ports = list(dict.fromkeys(request.ports))
        async with self._slots:
            results = await asyncio.gather(*(tcp_reachable(host, port) for port in ports))
        self.served += 1
        reachable = [port for port, ok in zip(ports, results, strict=True) if ok]
        logger.debug("dial-back for %s at %s: %s of ports %s", remote_peer[-8:], host, reachable, ports)
        return encode(DialBackReply(observed=host, reachable=reachable, tried=ports, now=time.time()))


@dataclass(frozen=True)
class Verdict:
    """Whether others can dial us, and what each peer we asked said (peer -> reply or error)."""

    reachability: Reachability
    answers: Dict[str, str] = field(default_factory=dict)
    observed: Optional[str] = None  # the address peers saw us come from
    forced: bool = False

    def describe(self) -> str:
        if self.forced:
            return f"{self.reachability} (set by --reachability)"
        said = "; ".join(f"{peer[-8:]}: {text}" for peer, text in self.answers.items()) or "no peer to ask"
        return f"{self.reachability} ({said})"


def decide(replies: Sequence[Optional[DialBackReply]]) -> Reachability:
    """public: some peer reached a port of ours; private: some peer dialed and reached none; else unknown."""
    dialed = [r for r in replies if r is not None and r.tried]
    if any(r.reachable for r in dialed):
        return "public"
    return "private" if dialed else "unknown"


def listen_ports(maddrs: Sequence[str]) -> List[int]:
    """The TCP ports of our addresses (announced ones first when given), at most 4, without repeats."""
    ports = [port for _, port in map(ip_and_port, maddrs) if port]
    return list(dict.fromkeys(ports))[:4]


async def ask_dialback(swarm: SwarmPort, peer: str, ports: Sequence[int], timeout: float) -> DialBackReply:
    """One dial-back request; TimeoutError/ConnectionError if the peer did not answer, WireError if garbled."""
    frame = await swarm.call(peer, handlers.DIALBACK, encode(DialBack(ports=list(ports)[:4])), timeout)
    reply, _ = decode(frame)
    if not isinstance(reply, DialBackReply):
        raise WireError("expected dialback_reply")
    return reply


async def probe(swarm: SwarmPort, peers: Sequence[str], ports: Sequence[int], timeout: float = 10.0,
                enough: int = 2) -> Verdict:  # fmt: skip
    """Ask ``peers`` in turn to dial us back on ``ports`` until ``enough`` have dialed; the verdict of their
    answers (``decide``). A peer that reached us settles it at once."""
    replies: List[Optional[DialBackReply]] = []
    answers: Dict[str, str] = {}
    observed = None
    if not ports:
        return Verdict("unknown", {"-": "this node listens on no TCP port"})
    for peer in dict.fromkeys(peers):
        try:
            reply = await ask_dialback(swarm, peer, ports, timeout)
        except (TimeoutError, ConnectionError, WireError) as e:
            answers[peer] = f"no answer ({e})"
            continue
        replies.append(reply)
        observed = observed or reply.observed or None
        if reply.tried:
            answers[peer] = f"reached port(s) {reply.reachable} of {reply.tried} at {reply.observed}"
        else:
            answers[peer] = f"did not dial ({reply.reason})"
        if reply.reachable or sum(1 for r in replies if r is not None and r.tried) >= enough:
            break
    return Verdict(decide(replies), answers, observed)
