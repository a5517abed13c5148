"""Who a node serves in a members-only swarm, and the invite it presents to others (protocol/membership.py).

Every request a node serves is admitted or refused here: the streams of our own handlers (hello, dial-back,
averaging, state; node/net/hivemind.py reads an invite at the start of each stream) and the DHT's requests
(ping, store, find: hivemind's authorizer hook, in the DHT process). A peer is admitted when it is a founder, or
presents an invite that names it, this swarm and the founders' signatures, has not expired and is not revoked.
The libp2p connection has already proven the peer id (its secure channel), and the DHT's requests are signed
with the peer's key besides, so an invite cannot be replayed by another peer.

Signatures are checked once per invite (the bytes are cached); expiry and revocations on every request.
An open swarm (no founders) has no ``Admission`` at all. ``Admission(founders=None, …)`` only presents an invite
(`node status`: it serves nobody).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import multiprocessing
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from node.net.streams import STREAM_IDLE_SECONDS, read_frame, write_frame
from protocol.frames import FrameError
from protocol.membership import (
    NO_INVITE_MESSAGE,
    REASONS,
    Founders,
    Invite,
    MembershipError,
    Revocation,
    revoked_message,
    revokes,
)

logger = logging.getLogger(__name__)

# What starts every stream to a members-only node (then the invite, or nothing from a founder), and every
# refusal in place of a response. A message frame starts with a 4-byte header length of at most 4096, so
# 0x00: no response or request of ours starts with 0xff.
INVITE_MARK = b"\xffcommons-invite\n"
REFUSAL_MARK = b"\xffcommons-refused\n"
_CACHE = 1024  # invites whose signatures we checked
INVITE_MARK_LIMIT = len(INVITE_MARK) + 8192  # the first frame of a stream to a members-only node: an invite
REFUSAL_LINGER_SECONDS = 5.0  # how long a refused stream waits for its caller to close it
_LOG_EVERY = 60.0  # seconds between two log lines about the same refused peer


@dataclass(frozen=True)
class Refusal:
    """Why a peer was refused: ``reason`` (one of protocol.membership.REASONS) and the line it is told; a
    revocation travels with its refusal, so the revoked peer can check it offline and stop."""

    reason: str
    message: str
    revocation: Optional[bytes] = None


def refusal_frame(refusal: Refusal) -> bytes:
    """What a refused peer receives in place of a response."""
    revocation = base64.b64encode(refusal.revocation).decode() if refusal.revocation else None
    body = {"reason": refusal.reason, "message": refusal.message, "revocation": revocation}
    return REFUSAL_MARK + json.dumps(body).encode()


def read_refusal(frame: bytes) -> Optional[Refusal]:
    """The refusal a response is, or None for a response; a garbled refusal still refuses ("malformed")."""
    if not frame.startswith(REFUSAL_MARK):
        return None
    try:
        body = json.loads(frame[len(REFUSAL_MARK) : len(REFUSAL_MARK) + 16384].decode())
        reason = body["reason"] if body["reason"] in REASONS else "malformed"
        message = "".join(c if c.isprintable() else "?" for c in str(body["message"])[:1000])  # a terminal line
        revocation = base64.b64decode(body["revocation"]) if body.get("revocation") else None
        return Refusal(reason, message, revocation)
    except (ValueError, KeyError, TypeError, RecursionError):
        return Refusal("malformed", "the peer refused us and said nothing we could read")


class Admission:
    """One node's membership checks: founders, swarm id, its own invite, the revocations it knows."""

    def __init__(
        self,
        founders: Optional[Founders],
        swarm_id: str,
        own_invite: Optional[bytes],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.founders = founders
        self.swarm_id = swarm_id
        self.own_invite = own_invite
        self._clock = clock
        self._founder_peers = founders.founder_peer_ids() if founders is not None else {}
        self._checked: "OrderedDict[bytes, Tuple[Optional[Invite], Optional[MembershipError]]]" = OrderedDict()
        self._invites: Dict[str, Invite] = {}  # the latest admitted invite of each peer
        self._revocations: Dict[str, Revocation] = {}
        self._logged: Dict[str, float] = {}
        # Refusals by reason; shared with the DHT process (forked with this object), which refuses DHT requests.
        self.dht_refused = multiprocessing.get_context("fork").Array("Q", len(REASONS), lock=True)
        self.refused: Dict[Tuple[str, str], int] = {}  # (request, reason) -> count, in this process

    @property
    def serves(self) -> bool:
        """Whether this node checks the peers it serves (not just presents its own invite)."""
        return self.founders is not None

    def preamble(self) -> bytes:
        return INVITE_MARK + (self.own_invite or b"")

    # --- checking ---------------------------------------------------------------------------------------------
    def check(self, peer_id: str, blob: Optional[bytes]) -> Optional[Refusal]:
        """None if ``peer_id``, presenting ``blob`` (an invite, or None), is admitted now; else why not."""
        if self.founders is None or peer_id in self._founder_peers:
            return None
        if not blob:
            return Refusal("no_invite", NO_INVITE_MESSAGE)
        invite, error = self._verified(blob)
        if invite is None:
            assert error is not None
            return Refusal(error.reason, str(error))
        try:
            self.founders.check_invite(invite, self.swarm_id, peer_id, self._clock(), signatures=False)  # _verified
        except MembershipError as e:
            return Refusal(e.reason, str(e))
        refusal = self._revoked(invite)
        if refusal is None:
            known = self._invites.get(peer_id)
            if known is None or known.issued <= invite.issued:
                self._invites[peer_id] = invite
        return refusal

    def still_admitted(self, peer_id: str) -> Optional[Refusal]:
        """For a peer admitted earlier on a stream: None while its invite holds, else why not (cheap)."""
        if self.founders is None or peer_id in self._founder_peers:
            return None
        invite = self._invites.get(peer_id)
        if invite is None:
            return Refusal("no_invite", NO_INVITE_MESSAGE)
        if self._clock() > invite.expires:
            return Refusal("expired", f"the invite of peer {peer_id} expired")
        return self._revoked(invite)

    def known_refusal(self, peer_id: str) -> Optional[Refusal]:
        """Why a peer we know of would be refused now (revoked, or its known invite expired); None for a peer we
        have nothing against, known or not. Groups and state donors leave out the peers this refuses."""
        if self.founders is None or peer_id in self._founder_peers:
            return None
        revocation = self._revocations.get(peer_id)
        invite = self._invites.get(peer_id)
        if invite is not None:
            return self.still_admitted(peer_id)
        if revocation is not None:
            return Refusal("revoked", revoked_message(revocation), revocation.to_bytes())
        return None

    def is_founder(self, peer_id: str) -> bool:
        return peer_id in self._founder_peers

    def invite_of(self, peer_id: str) -> Optional[str]:
        """The invite (JSON) a member we know of was admitted with."""
        invite = self._invites.get(peer_id)
        return invite.to_bytes().decode() if invite is not None else None

    def organisation(self, peer_id: str) -> Optional[str]:
        invite = self._invites.get(peer_id)
        return invite.org if invite is not None else None

    def _verified(self, blob: bytes) -> Tuple[Optional[Invite], Optional[MembershipError]]:
        cached = self._checked.get(blob)
        if cached is not None:
            self._checked.move_to_end(blob)
            return cached
        result: Tuple[Optional[Invite], Optional[MembershipError]]
        try:
            invite = Invite.from_bytes(blob)
            assert self.founders is not None
            self.founders.check_signed(invite.body(), invite.signatures, "invite")
            result = (invite, None)
        except MembershipError as e:
            result = (None, e)
        self._checked[blob] = result
        if len(self._checked) > _CACHE:
            self._checked.popitem(last=False)
        return result

    def _revoked(self, invite: Invite) -> Optional[Refusal]:
        revocation = self._revocations.get(invite.peer_id)
        if revocation is not None and revokes(revocation, invite):
            return Refusal("revoked", revoked_message(revocation), revocation.to_bytes())
        return None

    # --- revocations ------------------------------------------------------------------------------------------
    def add_revocation(self, blob: bytes) -> Optional[Revocation]:
        """Take a revocation (checked against the founders); the new one, or None when it is not new or not
        valid (MembershipError for a malformed or unsigned one)."""
        if self.founders is None:
            return None
        revocation = Revocation.from_bytes(blob)
        self.founders.check_revocation(revocation, self.swarm_id)
        known = self._revocations.get(revocation.peer_id)
        if known is not None and known.issued >= revocation.issued:
            return None
        self._revocations[revocation.peer_id] = revocation
        return revocation

    def revocations(self) -> List[bytes]:
        return [r.to_bytes() for r in self._revocations.values()]

    def revokes_me(self, peer_id: str) -> Optional[Revocation]:
        """The revocation that voids our own invite, if one is known."""
        revocation = self._revocations.get(peer_id)
        if revocation is None or self.own_invite is None:
            return None
        try:
            own = Invite.from_bytes(self.own_invite)
        except MembershipError:
            return None
        return revocation if revokes(revocation, own) else None

    # --- counting ---------------------------------------------------------------------------------------------
    def count(self, request: str, peer_id: str, refusal: Refusal) -> None:
        """Count a refusal (main process) and log it, at most once a minute per peer."""
        key = (request, refusal.reason)
        self.refused[key] = self.refused.get(key, 0) + 1
        now = time.monotonic()
        if now - self._logged.get(peer_id, -_LOG_EVERY) >= _LOG_EVERY:
            self._logged[peer_id] = now
            if len(self._logged) > 4 * _CACHE:
                self._logged.clear()
            logger.warning(
                "refused a %s request from peer %s: %s", request, peer_id[-8:], refusal.reason,
                extra={"event": "refused", "request": request, "reason": refusal.reason},
            )  # fmt: skip

    def count_dht(self, reason: str) -> None:
        """Count a refused DHT request (in the DHT process; the array is shared)."""
        index = REASONS.index(reason)
        with self.dht_refused.get_lock():
            self.dht_refused[index] += 1

    def refusals(self) -> Dict[Tuple[str, str], int]:
        """Every refusal so far, by (request, reason): the streams' and the DHT's."""
        out = dict(self.refused)
        for index, reason in enumerate(REASONS):
            if self.dht_refused[index]:
                out[("dht", reason)] = int(self.dht_refused[index])
        return out


# --- the stream side: the invite that opens a stream, the refusal that closes it -------------------------------
async def admit_stream(
    admission: Admission, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request_kind: str
) -> bool:
    """Read the invite that starts a stream to a members-only node; answer a refusal and return False when it
    does not admit ``peer``."""
    try:
        first = await read_frame(reader, idle_timeout=STREAM_IDLE_SECONDS, limit=INVITE_MARK_LIMIT)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, FrameError):
        return False
    blob = first[len(INVITE_MARK) :] if first.startswith(INVITE_MARK) else None
    refusal = admission.check(peer, blob)
    if refusal is None:
        return True
    admission.count(request_kind, peer, refusal)
    await refuse_stream(reader, writer, refusal)
    return False


async def refuse_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, refusal: Refusal) -> None:
    """Answer a refusal, then wait for the caller to close the stream (reading what it still sends, a little and
    briefly): a stream closed while the caller's request is still arriving is reset, and the reset can
    overtake the refusal."""
    try:
        await write_frame(writer, refusal_frame(refusal))
        taken, deadline = 0, time.monotonic() + REFUSAL_LINGER_SECONDS
        while taken < (1 << 20) and (left := deadline - time.monotonic()) > 0:
            chunk = await asyncio.wait_for(reader.read(1 << 16), left)
            if not chunk:
                return
            taken += len(chunk)
    except (ConnectionError, asyncio.TimeoutError):
        return
