"""The swarm port: what every user of the network needs from it, and nothing else.

Averaging, matchmaking, membership, the hello and state transfer depend on this protocol, never on a
concrete network. Two implementations: ``HivemindSwarm`` (node/net/hivemind.py: hivemind's DHT and p2p
streams, the real thing) and ``InProcessSwarm`` (node/net/inprocess.py: several peers in one event loop,
with injectable faults and clock, for fast deterministic tests).

Contract (tests/port_contract.py: the same checks, run against both):
- ``call`` sends one request to a handler a peer serves and returns its response. It raises
  ``TimeoutError`` when no response came within ``timeout`` seconds and ``ConnectionError`` when the peer
  cannot be reached, went away, or closed the stream (a message containing "closed"), never anything else
  for a peer's failure. Requests are idempotent for every handler we serve, so a caller may retry.
- ``serve`` registers ``handler(peer_id, request) -> response`` under ``name``; a handler that raises
  closes the caller's stream (the caller sees ConnectionError) and is logged, never crashes the node.
- ``store`` / ``read`` are the DHT: under a key, one value per subkey with an expiration time (on the
  ``now()`` clock); ``read`` returns the live ones as {subkey: (value, expiration)}. A subkey is a peer id,
  and only that peer can write under it: a store under another subkey returns False and changes nothing
  (the real swarm signs every record: node/net/hivemind.py, SignedRecords).
- In a members-only swarm a peer that is not a member is refused every request: ``call`` raises ``Refused``
  (a ConnectionError) with the reason it was given (node/net/admission.py).
- ``now()`` is the clock DHT records are stamped with: wall time, shared by every peer of the swarm.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Awaitable, Callable, Dict, Optional, Protocol, Tuple

Handler = Callable[[str, bytes], Awaitable[bytes]]
# While a handler runs: the multiaddr the caller's connection comes from, as this node sees it (a peer behind
# NAT shows its router's address); None where the network cannot tell (the in-process swarm).
REMOTE_ADDRESS: ContextVar[Optional[str]] = ContextVar("remote_address", default=None)
# A monotonic clock in seconds (time.monotonic, or an event loop's time() under a virtual clock).
Clock = Callable[[], float]


class Refused(ConnectionError):
    """A peer refused our request: we are not a member of its swarm (no invite, expired, wrong signer, revoked…).
    ``revocation``: the founders' revocation the peer holds against us, when that is the reason."""

    def __init__(self, peer_id: str, reason: str, message: str, revocation: Optional[bytes] = None) -> None:
        super().__init__(f"peer {peer_id[-8:]} refused us ({reason}): {message}")
        self.peer_id, self.reason, self.message, self.revocation = peer_id, reason, message, revocation


class SwarmPort(Protocol):
    """One peer's door to the swarm (see the module docstring for the contract)."""

    @property
    def peer_id(self) -> str: ...

    def now(self) -> float: ...

    async def serve(self, name: str, handler: Handler) -> None: ...

    async def call(self, peer_id: str, name: str, request: bytes, timeout: float) -> bytes: ...

    async def store(self, key: str, subkey: str, value: Any, expiration_time: float) -> bool: ...

    async def read(self, key: str) -> Dict[str, Tuple[Any, float]]: ...
