"""The hello exchange: a node refuses to train with peers on another manifest or protocol."""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

from node.errors import NotAMember, PeerUnreachable, SwarmMismatch
from node.net import Refused, SwarmPort, peer_id_of
from protocol import handlers
from protocol.version import PROTOCOL_VERSION
from protocol.wire import Hello, HelloReply, WireError, decode, encode, module_names_payload, read_module_names

logger = logging.getLogger(__name__)


class Greeter:
    """Answers hellos for this node and checks the bootstrap peers' answers."""

    def __init__(self, swarm: SwarmPort, swarm_id: str, manifest_name: str, modules: Sequence[str] = ()) -> None:
        """``modules``: every module of our swarm, told to whoever asks (`node status` lists them all)."""
        self._swarm = swarm
        self._swarm_id = swarm_id
        self._manifest_name = manifest_name
        self._modules = list(modules)

    async def start(self) -> None:
        await self._swarm.serve(handlers.HELLO, self._handle)

    def _verdict(self, swarm_id: str, protocol_version: int) -> str:
        if protocol_version != PROTOCOL_VERSION:
            return f"protocol version {protocol_version} differs from ours ({PROTOCOL_VERSION}); upgrade the older node"
        if swarm_id and swarm_id != self._swarm_id:
            return (
                f"swarm id {swarm_id} differs from ours ({self._swarm_id}): the manifests (or models) differ; "
                "start with the same --manifest as the swarm you join"
            )
        return ""

    async def _handle(self, remote_peer: str, frame: bytes) -> bytes:
        try:
            hello, _ = decode(frame)
            if not isinstance(hello, Hello):
                raise WireError("expected hello")
            reason = self._verdict(hello.swarm_id, hello.protocol_version)
        except WireError as e:
            reason = f"malformed hello: {e}"
        if reason:
            logger.warning("refused peer %s: %s", remote_peer[-8:], reason)
        reply = HelloReply(
            swarm_id=self._swarm_id,
            manifest_name=self._manifest_name,
            accepted=not reason,
            reason=reason,
            modules=len(self._modules),
        )
        return encode(reply, module_names_payload(self._modules))


async def ask(swarm: SwarmPort, peer_id: str, swarm_id: str, timeout: float) -> Tuple[HelloReply, List[str]]:
    """Send a hello; return the reply and the module names of the peer's swarm. swarm_id "" asks without
    committing to a swarm (used by `node status`). WireError for a malformed reply."""
    frame = await swarm.call(peer_id, handlers.HELLO, encode(Hello(swarm_id=swarm_id, peer_id=swarm.peer_id)), timeout)
    reply, payload = decode(frame)
    if not isinstance(reply, HelloReply):
        raise WireError("expected hello_reply")
    return reply, read_module_names(reply, payload)


async def check_admitted(swarm: SwarmPort, initial_peers: Sequence[str], timeout: float) -> None:
    """Members-only swarms, at start: raise NotAMember (one line: which check failed) when the bootstrap peers
    refuse us; return once one admits us, or when none answers (check_bootstrap_peers says so later)."""
    refusals: List[Refused] = []
    for maddr in initial_peers:
        try:
            await ask(swarm, peer_id_of(maddr), "", timeout)
            return
        except Refused as e:
            refusals.append(e)
        except (TimeoutError, ConnectionError, WireError):
            continue
    if refusals:
        first = refusals[0]
        raise NotAMember(f"the swarm refused this node ({first.reason}): {first.message}")


async def check_bootstrap_peers(
    swarm: SwarmPort, swarm_id: str, manifest_name: str, initial_peers: Sequence[str], timeout: float
) -> None:
    """Raise SwarmMismatch when the bootstrap peers train something else, PeerUnreachable when none answers."""
    mismatch: Optional[str] = None
    errors = []
    for maddr in initial_peers:
        peer = peer_id_of(maddr)
        try:
            reply, _ = await ask(swarm, peer, swarm_id, timeout)
        except Refused as e:
            raise NotAMember(f"the swarm refused this node ({e.reason}): {e.message}") from None
        except (TimeoutError, ConnectionError, WireError) as e:
            errors.append(f"{peer[-8:]}: {e}")
            continue
        if reply.accepted:
            return
        mismatch = (
            f"bootstrap peer {peer[-8:]} trains manifest {reply.manifest_name!r} (swarm id {reply.swarm_id}), "
            f"this node has {manifest_name!r} (swarm id {swarm_id}): {reply.reason}"
        )
    if mismatch:
        raise SwarmMismatch(mismatch)
    raise PeerUnreachable(
        "no bootstrap peer answered as a Commons node (" + "; ".join(errors) + "); check --initial-peers"
    )
