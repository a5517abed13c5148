"""Members-only swarms: invites and revocations, signed by the swarm's founders and checked offline.

A manifest may list founder keys (``membership: {founders: [ed25519:<hex>, …], threshold: k}``); they are part
of the swarm id. A founder admits a peer by signing an **invite** (swarm id, peer id, organisation, when issued,
when it expires) and takes the admission back by signing a **revocation** (swarm id, peer id, when issued),
which voids every invite of that peer issued at or before it (a later invite admits the peer again). Each needs
the signatures of ``threshold`` distinct founders. A node running with a founder's own key is a member.

Both are JSON objects (files operators copy around, and the bytes nodes present on the wire): the fields, and
``signatures``, a list of {founder, signature (base64)} over the canonical JSON of the other fields. Anything
else, or more than ``MAX_BLOB_BYTES``, is refused with a ``MembershipError`` whose ``reason`` is one of
``REASONS`` (counted by that name on the refusing node) and whose message says what to do.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterable, Sequence, Tuple

from protocol.keys import PEER_ID_PATTERN, KeyFormatError, parse_founder_key, peer_id_of_founder, verify_ed25519

FORMAT = 1
INVITE_KIND, REVOCATION_KIND = "commons-invite", "commons-revocation"
MAX_BLOB_BYTES = 4096  # an invite with 16 signatures is under 2.5 KB
MAX_SIGNATURES = 16
MAX_FOUNDERS = 64
MAX_ORG_CHARS = 64
MAX_TIME = 1 << 40  # seconds since 1970: year 36812
SWARM_ID_PATTERN = re.compile(r"[0-9a-f]{16}\Z")
# Why a peer was refused: stable names (metric labels, log events, the refused peer's own message).
REASONS = ("no_invite", "malformed", "wrong_swarm", "wrong_peer", "wrong_signer", "expired", "revoked")
_ASK = "ask a founder of the swarm for an invite (node invite) and start with --invite FILE"


class MembershipError(ValueError):
    """An invite or revocation that does not admit (or revoke): ``reason`` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Signature:
    founder: str  # ed25519:<hex>
    signature: bytes


def _canonical(data: Dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _signatures_json(signatures: Iterable[Signature]) -> list:  # type: ignore[type-arg]
    return [{"founder": s.founder, "signature": base64.b64encode(s.signature).decode()} for s in signatures]


def _malformed(what: str, detail: str) -> MembershipError:
    return MembershipError("malformed", f"the {what} is malformed ({detail}); {_ASK}")


def _load(blob: bytes, kind: str, fields: Tuple[str, ...], what: str) -> Tuple[Dict[str, Any], Tuple[Signature, ...]]:
    """The fields and signatures of a JSON invite or revocation; MembershipError("malformed") for anything else."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) > MAX_BLOB_BYTES:
        raise _malformed(what, f"more than {MAX_BLOB_BYTES} bytes")
    try:
        data = json.loads(bytes(blob).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _malformed(what, "not JSON") from None
    if not isinstance(data, dict):
        raise _malformed(what, "not a JSON object")
    if data.get("kind") != kind:
        raise _malformed(what, f"kind is {str(data.get('kind'))[:40]!r}, not {kind!r}")
    if data.get("format") != FORMAT or isinstance(data.get("format"), bool):
        raise _malformed(what, f"format {str(data.get('format'))[:20]!r} is not {FORMAT}; upgrade the node")
    expected = set(fields) | {"kind", "format", "signatures"}
    if set(data) != expected:
        raise _malformed(what, "fields " + ", ".join(sorted(map(repr, set(data) ^ expected)))[:200])
    values: Dict[str, Any] = {}
    for name in fields:
        value = data[name]
        if name in ("issued", "expires"):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_TIME:
                raise _malformed(what, f"{name} must be whole seconds since 1970")
        elif name == "swarm_id":
            if not isinstance(value, str) or not SWARM_ID_PATTERN.match(value):
                raise _malformed(what, "swarm_id must be 16 hex digits")
        elif name == "peer_id":
            if not isinstance(value, str) or not PEER_ID_PATTERN.match(value):
                raise _malformed(what, "peer_id is not a base58 peer id")
        elif name == "org":
            if not isinstance(value, str) or not 0 < len(value) <= MAX_ORG_CHARS or not value.isprintable():
                raise _malformed(what, f"org must be 1 to {MAX_ORG_CHARS} printable characters")
        values[name] = value
    raw = data["signatures"]
    if not isinstance(raw, list) or len(raw) > MAX_SIGNATURES:
        raise _malformed(what, f"signatures must be a list of at most {MAX_SIGNATURES}")
    signatures = []
    for item in raw:
        if not isinstance(item, dict) or set(item) != {"founder", "signature"}:
            raise _malformed(what, "a signature must be {founder, signature}")
        try:
            parse_founder_key(item["founder"])
            signature = base64.b64decode(str(item["signature"]), validate=True)
        except (KeyFormatError, binascii.Error, ValueError):
            raise _malformed(what, "a signature names no founder key or is not base64") from None
        if len(signature) != 64:
            raise _malformed(what, "an Ed25519 signature has 64 bytes")
        signatures.append(Signature(item["founder"], signature))
    return values, tuple(signatures)


@dataclass(frozen=True)
class Invite:
    """A founder-signed admission of one peer to one swarm, until ``expires``."""

    swarm_id: str
    peer_id: str
    org: str
    issued: int
    expires: int
    signatures: Tuple[Signature, ...] = ()

    FIELDS = ("swarm_id", "peer_id", "org", "issued", "expires")

    def body(self) -> bytes:
        """The bytes each founder signs."""
        fields = {name: getattr(self, name) for name in self.FIELDS}
        return b"commons-invite|" + _canonical({"kind": INVITE_KIND, "format": FORMAT, **fields})

    def signed(self, founder: str, signature: bytes) -> "Invite":
        others = tuple(s for s in self.signatures if s.founder != founder)
        return replace(self, signatures=others + (Signature(founder, signature),))

    def to_bytes(self) -> bytes:
        fields = {name: getattr(self, name) for name in self.FIELDS}
        return _canonical({"kind": INVITE_KIND, "format": FORMAT, **fields,
                           "signatures": _signatures_json(self.signatures)})  # fmt: skip

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Invite":
        values, signatures = _load(blob, INVITE_KIND, cls.FIELDS, "invite")
        return cls(signatures=signatures, **values)


@dataclass(frozen=True)
class Revocation:
    """A founder-signed withdrawal of every invite of ``peer_id`` issued at or before ``issued``."""

    swarm_id: str
    peer_id: str
    issued: int
    signatures: Tuple[Signature, ...] = ()

    FIELDS = ("swarm_id", "peer_id", "issued")

    def body(self) -> bytes:
        fields = {name: getattr(self, name) for name in self.FIELDS}
        return b"commons-revocation|" + _canonical({"kind": REVOCATION_KIND, "format": FORMAT, **fields})

    def signed(self, founder: str, signature: bytes) -> "Revocation":
        others = tuple(s for s in self.signatures if s.founder != founder)
        return replace(self, signatures=others + (Signature(founder, signature),))

    def to_bytes(self) -> bytes:
        fields = {name: getattr(self, name) for name in self.FIELDS}
        return _canonical({"kind": REVOCATION_KIND, "format": FORMAT, **fields,
                           "signatures": _signatures_json(self.signatures)})  # fmt: skip

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Revocation":
        values, signatures = _load(blob, REVOCATION_KIND, cls.FIELDS, "revocation")
        return cls(signatures=signatures, **values)


@dataclass(frozen=True)
class Founders:
    """The founder keys a manifest lists, and how many of them must sign; an empty list: an open swarm."""

    keys: Tuple[str, ...] = ()
    threshold: int = 1

    def __post_init__(self) -> None:
        for key in self.keys:
            parse_founder_key(key)  # KeyFormatError
        if len(set(self.keys)) != len(self.keys) or len(self.keys) > MAX_FOUNDERS:
            raise KeyFormatError(f"founders must be at most {MAX_FOUNDERS} distinct keys")
        if self.keys and not 1 <= self.threshold <= len(self.keys):
            raise KeyFormatError(f"threshold must be between 1 and the number of founders ({len(self.keys)})")

    @property
    def members_only(self) -> bool:
        return bool(self.keys)

    def founder_peer_ids(self) -> Dict[str, str]:
        return {peer_id_of_founder(key): key for key in self.keys}

    def signers(self, body: bytes, signatures: Sequence[Signature]) -> Tuple[str, ...]:
        """The distinct founders of this swarm whose signature over ``body`` is valid."""
        valid = []
        for item in signatures:
            if item.founder in self.keys and item.founder not in valid:
                if verify_ed25519(parse_founder_key(item.founder), body, item.signature):
                    valid.append(item.founder)
        return tuple(valid)

    def check_signed(self, body: bytes, signatures: Sequence[Signature], what: str) -> None:
        found = len(self.signers(body, signatures))
        if found < self.threshold:
            raise MembershipError(
                "wrong_signer",
                f"the {what} is signed by {found} founder(s) of this swarm, and {self.threshold} must sign it "
                f"(signed with another key, or for another manifest's founders); {_ASK}",
            )

    def check_invite(self, invite: Invite, swarm_id: str, peer_id: str, now: float, signatures: bool = True) -> None:
        """Raise MembershipError unless ``invite`` admits ``peer_id`` to ``swarm_id`` at ``now`` (revocations aside);
        ``signatures=False``: the caller has checked them already (node/net/admission.py, once per invite)."""
        if invite.swarm_id != swarm_id:
            raise MembershipError(
                "wrong_swarm", f"the invite is for swarm {invite.swarm_id}, not {swarm_id}: use the manifest it was "
                               f"issued for, or {_ASK}")  # fmt: skip
        if invite.peer_id != peer_id:
            raise MembershipError(
                "wrong_peer", f"the invite admits peer {invite.peer_id}, not {peer_id}: start with the --identity key "
                              "it was issued for")  # fmt: skip
        if not math.isfinite(now) or now > invite.expires:
            raise MembershipError("expired", f"the invite expired at {_when(invite.expires)}; {_ASK}")
        if signatures:
            self.check_signed(invite.body(), invite.signatures, "invite")

    def check_revocation(self, revocation: Revocation, swarm_id: str) -> None:
        if revocation.swarm_id != swarm_id:
            raise MembershipError("wrong_swarm", f"the revocation is for swarm {revocation.swarm_id}, not {swarm_id}")
        self.check_signed(revocation.body(), revocation.signatures, "revocation")


def revokes(revocation: Revocation, invite: Invite) -> bool:
    return revocation.peer_id == invite.peer_id and invite.issued <= revocation.issued


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def revoked_message(revocation: Revocation) -> str:
    return f"the invite was revoked by the swarm's founders at {_when(revocation.issued)}; {_ASK}"


NO_INVITE_MESSAGE = f"this swarm admits members only and no invite was given; {_ASK}"
