"""This node's side of a members-only swarm (protocol/membership.py, node/net/admission.py).

- ``admission_for``: before any daemon starts, the node checks its own invite offline against the manifest's
  founders (no invite, another swarm's, another key's, expired, not signed by the founders: one line, exit 7).
- ``Revocations``: the founders' revocations spread through the DHT: every ``REVOCATION_POLL_SECONDS`` a member reads
  what the others know, takes the new ones (its stream handlers and its DHT process refuse those peers from
  then on), and passes on everything it knows under its own subkey. A revocation therefore reaches every
  member within one poll of reaching any member, and outlives the founder's client that published it.
- A member learns that it is out itself from a revocation it reads, from one a peer shows it with a refusal
  (checked offline: a peer cannot talk it out of the swarm), or from its own invite's expiry; it then says so
  in one line and leaves (exit 7).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Awaitable, Callable, List, Optional

from node.errors import ConfigError, NotAMember
from node.net import Admission, Refused, SwarmPort, read_identity
from protocol.manifest import Manifest
from protocol.membership import MAX_BLOB_BYTES, NO_INVITE_MESSAGE, Invite, MembershipError, revoked_message
from protocol.records import MAX_REVOCATIONS, revocations_key
from protocol.typed import read_small_file

logger = logging.getLogger(__name__)

REVOCATION_POLL_SECONDS = 10.0  # how often a member reads the swarm's revocations
RECORD_SECONDS = 60.0  # how long a revocations record lives (peers refuse longer-lived records); stored again every
REPUBLISH_SECONDS = 30.0  # by each member that knows any
_INVITE_FIX = "give --invite the file `node invite` wrote for this node's peer id"


def read_invite_file(path: str) -> bytes:
    try:
        return read_small_file(path, "invite file", _INVITE_FIX, MAX_BLOB_BYTES)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def admission_for(
    manifest: Manifest, swarm_id: str, identity_path: Optional[str], invite_path: Optional[str],
    clock: Callable[[], float] = time.time,
) -> Optional[Admission]:  # fmt: skip
    """The membership checks of a node of this manifest, after checking its own invite offline (NotAMember, one
    line); None for an open swarm."""
    founders = manifest.membership.rules()
    if not founders.members_only:
        if invite_path:
            logger.warning("--invite is ignored: swarm %s is open to anyone (its manifest names no founders)", swarm_id)
        return None
    if not identity_path or not os.path.exists(identity_path):
        raise NotAMember(
            "this swarm admits members only: start with --identity KEY, the key your invite was issued for (make one "
            "with `node keygen --out KEY` and send its peer id to a founder of the swarm)"
        )
    identity = read_identity(identity_path)
    if identity.peer_id in founders.founder_peer_ids():
        return Admission(founders, swarm_id, None, clock)
    if not invite_path:
        raise NotAMember(f"{NO_INVITE_MESSAGE} (this node's peer id: {identity.peer_id})")
    blob = read_invite_file(invite_path)
    try:
        invite = Invite.from_bytes(blob)
        founders.check_invite(invite, swarm_id, identity.peer_id, clock())
    except MembershipError as e:
        raise NotAMember(f"invite {invite_path}: {e}") from None
    return Admission(founders, swarm_id, blob, clock)


def presenting(identity_path: Optional[str], invite_path: Optional[str]) -> Optional[Admission]:
    """For a client that serves nobody (`node status`): the invite it shows, checked for form only (it does not
    know the founders; the swarm's members check the rest)."""
    if not invite_path:
        return None
    if not identity_path:
        raise ConfigError("--invite needs --identity: the key the invite was issued for")
    identity = read_identity(identity_path)
    blob = read_invite_file(invite_path)
    try:
        invite = Invite.from_bytes(blob)
    except MembershipError as e:
        raise NotAMember(f"invite {invite_path}: {e}") from None
    if invite.peer_id != identity.peer_id:
        raise NotAMember(f"invite {invite_path} admits peer {invite.peer_id}, not this key's {identity.peer_id}")
    return Admission(None, invite.swarm_id, blob)


class Revocations:
    """Reads, takes and passes on the founders' revocations; tells ``on_out`` when one voids our own invite."""

    def __init__(
        self, swarm: SwarmPort, admission: Admission, swarm_id: str, on_out: Callable[[str], None],
        take: Optional[Callable[[List[bytes]], Any]] = None,
    ) -> None:  # fmt: skip
        """``take``: a coroutine function that gives new revocations to the DHT process (HivemindSwarm)."""
        self._swarm = swarm
        self._admission = admission
        self._swarm_id = swarm_id
        self._on_out = on_out
        self._take = take
        self._published_at = -REPUBLISH_SECONDS
        self._task: Optional["asyncio.Task[None]"] = None
        self.out: Optional[str] = None  # why this node is out, once it is

    async def start(self) -> None:
        await self.poll()
        self._task = asyncio.create_task(every(REVOCATION_POLL_SECONDS, self.poll, "revocations"))

    async def stop(self) -> None:
        await stop_task(self._task)

    async def poll(self) -> int:
        """Read the swarm's revocations, take the new ones, pass on ours; how many were new."""
        found = await self._swarm.read(revocations_key(self._swarm_id))
        new = [blob for value, _ in found.values() for blob in _blobs(value) if self._add(blob)]
        self.check_own_expiry()
        await self._pass_on(bool(new))
        return len(new)

    def take(self, blob: bytes) -> bool:
        """A revocation from elsewhere (a refusal, a file); True when it was new and valid."""
        if not self._add(blob):
            return False
        if self._take is not None:
            asyncio.ensure_future(self._take([blob]))
        return True

    def _add(self, blob: bytes) -> bool:
        try:
            revocation = self._admission.add_revocation(blob)
        except MembershipError as e:
            logger.debug("ignoring a revocation: %s", e)
            return False
        if revocation is None:
            return False
        logger.warning(
            "peer %s is no longer a member: its invite was revoked by the founders", revocation.peer_id,
            extra={"event": "revoked", "peer": revocation.peer_id},
        )  # fmt: skip
        mine = self._admission.revokes_me(self._swarm.peer_id)
        if mine is not None:
            self._leave(revoked_message(mine).replace("the invite", "this node's invite"))
        return True

    async def _pass_on(self, changed: bool) -> None:
        known = self._admission.revocations()[-MAX_REVOCATIONS:]
        if self._take is not None and changed:
            await self._take(known)
        if not known or (not changed and time.monotonic() - self._published_at < REPUBLISH_SECONDS):
            return
        value = [blob.decode() for blob in known]
        await self._swarm.store(revocations_key(self._swarm_id), self._swarm.peer_id, value,
                                self._swarm.now() + RECORD_SECONDS)  # fmt: skip
        self._published_at = time.monotonic()

    def check_own_expiry(self) -> None:
        own = self._admission.own_invite
        if own is None or self.out is not None:
            return
        try:
            invite = Invite.from_bytes(own)
        except MembershipError:
            return
        if time.time() > invite.expires:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(invite.expires))
            self._leave(f"this node's invite expired at {when}; ask a founder of the swarm for a new one "
                        "(node invite) and restart with it")  # fmt: skip

    def refused(self, error: Refused) -> None:
        """A peer refused a request of ours: a revocation it shows is checked and taken; anything else is logged."""
        if error.revocation is not None and self.take(error.revocation):
            return
        if error.reason == "expired":
            self.check_own_expiry()

    def _leave(self, why: str) -> None:
        if self.out is None:
            self.out = why
            self._on_out(why)


async def every(seconds: float, step: Callable[[], Awaitable[Any]], what: str) -> None:
    """Run ``step`` every ``seconds`` until cancelled; a step that fails (a DHT read or store) is logged at debug
    level and tried again at the next turn."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await step()
        except Exception as e:
            logger.debug("%s: %s", what, e)


async def stop_task(task: Optional["asyncio.Task[None]"]) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _blobs(value: Any) -> List[bytes]:
    if not isinstance(value, list):
        return []
    return [item.encode() for item in value[:MAX_REVOCATIONS] if isinstance(item, str) and len(item) <= MAX_BLOB_BYTES]
