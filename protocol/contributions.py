"""Contributions others vouch for (members-only swarms): receipts and vouches, signed by the member who vouches.

- A **receipt**: after a round, a reducer signs, for each other member whose parts it took into its slices of a
  module, what it received: swarm, module, round, the member, the voucher (itself), a hash of the parts' bytes, the
  bytes (``wire_bytes``), the elements it reduced of what the member sent to reducers (``elements`` of ``total``),
  and the samples the member claimed for that round (capped by the voucher at what one round allows).
- A **vouch**: a voucher's running totals for one member, over every receipt it signed for it: rounds (the trunk's
  share of the vector it received, in thousandths: a member whose whole trunk went to reducers in one round gets
  1000), modules, samples (each trunk receipt's claim times its share: every member trains the trunk on all its
  samples), bytes, receipts, and the last round. A newer vouch
  of the same voucher replaces the older one, so a member's contribution is the sum of its vouchers' latest vouches.

Both are JSON objects with the voucher's public key (libp2p ``PublicKey`` protobuf, base64: its peer id must be
the ``voucher`` field) and its signature over the canonical JSON of the other fields. Nobody signs for itself, so a
peer cannot inflate its own record. Checking a signature needs the key's type (Ed25519 or RSA), which node/net does;
here are the formats, their limits, and the arithmetic.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, Iterable, List, Optional, Set, Tuple, TypeVar

from protocol.keys import PEER_ID_PATTERN, KeyFormatError, peer_id_of_public_key
from protocol.records import MODULE_PATTERN

FORMAT = 1
RECEIPT_KIND, VOUCH_KIND = "commons-receipt", "commons-vouch"
MAX_BLOB_BYTES = 8192
MAX_COUNT = 1 << 53  # JSON integers every reader takes exactly
HASH_PATTERN = re.compile(r"[0-9a-f]{64}\Z")
SWARM_ID_PATTERN = re.compile(r"[0-9a-f]{16}\Z")
_MODULE = re.compile(MODULE_PATTERN)
Verify = Callable[[bytes, bytes, bytes], bool]  # (public key protobuf, message, signature) -> valid


class ContributionError(ValueError):
    """A receipt or vouch that is malformed, or whose signature does not hold."""


def _canonical(data: Dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_COUNT:
        raise ContributionError(f"{name} must be a whole number >= 0")
    return value


def _checked(name: str, value: Any) -> Any:
    """A field's value if it has the field's form; ContributionError naming the field otherwise."""
    if name in ("swarm_id",):
        ok = isinstance(value, str) and bool(SWARM_ID_PATTERN.match(value))
    elif name in ("peer", "voucher"):
        ok = isinstance(value, str) and bool(PEER_ID_PATTERN.match(value))
    elif name == "module":
        ok = isinstance(value, str) and bool(_MODULE.match(value))
    elif name == "part_hash":
        ok = isinstance(value, str) and bool(HASH_PATTERN.match(value))
    elif name == "modules":
        ok = isinstance(value, list) and len(value) <= 4096
        ok = ok and all(isinstance(m, str) and _MODULE.match(m) for m in value)
        value = tuple(value) if ok else value
    else:
        return _count(name, value)
    if not ok:
        raise ContributionError(f"{name} is malformed")
    return value


T = TypeVar("T", bound="_Signed")


class _Signed:
    """Fields, then the voucher's public key and signature (empty until signed); subclasses are dataclasses."""

    KIND: ClassVar[str] = ""
    if TYPE_CHECKING:
        peer: str
        voucher: str
        signer: bytes
        signature: bytes

    def _fields(self) -> Dict[str, Any]:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            if f.name not in ("signer", "signature"):
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def body(self) -> bytes:
        return self.KIND.encode() + b"|" + _canonical({"kind": self.KIND, "format": FORMAT, **self._fields()})

    def signed(self: T, public: bytes, sign: Callable[[bytes], bytes]) -> T:
        return replace(self, signer=public, signature=sign(self.body()))  # type: ignore[type-var]

    def to_bytes(self) -> bytes:
        signer, signature = self.signer, self.signature
        return _canonical({"kind": self.KIND, "format": FORMAT, **self._fields(),
                           "signer": base64.b64encode(signer).decode(),
                           "signature": base64.b64encode(signature).decode()})  # fmt: skip

    @classmethod
    def from_bytes(cls: type[T], blob: bytes) -> T:
        if not isinstance(blob, (bytes, bytearray)) or len(blob) > MAX_BLOB_BYTES:
            raise ContributionError(f"more than {MAX_BLOB_BYTES} bytes")
        try:
            data = json.loads(bytes(blob).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ContributionError("not JSON") from None
        version = data.get("format") if isinstance(data, dict) else None
        if not isinstance(data, dict) or data.get("kind") != cls.KIND or type(version) is not int or version != FORMAT:
            raise ContributionError(f"not a {cls.KIND} of format {FORMAT}")
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        expected = set(names) | {"kind", "format"}
        if set(data) != expected:
            raise ContributionError("fields " + repr(sorted(map(str, set(data) ^ expected)))[:200])
        values: Dict[str, Any] = {}
        for name in names:
            if name in ("signer", "signature"):
                try:
                    values[name] = base64.b64decode(str(data[name]), validate=True)
                except (binascii.Error, ValueError):
                    raise ContributionError(f"{name} is not base64") from None
            else:
                values[name] = _checked(name, data[name])
        return cls(**values)

    def check(self, verify: Verify) -> None:
        """ContributionError unless the voucher's key signed it and the voucher is not the member itself."""
        signer = self.signer
        try:
            owner = peer_id_of_public_key(signer)
        except (KeyFormatError, ValueError):
            raise ContributionError("the signer's key is malformed") from None
        if owner != self.voucher:
            raise ContributionError("signed by another key than the voucher's")
        if self.voucher == self.peer:
            raise ContributionError("a member cannot vouch for itself")
        if not verify(signer, self.body(), self.signature):
            raise ContributionError(f"the {self.KIND}'s signature does not hold (tampered, or not the voucher's)")


@dataclass(frozen=True)
class Receipt(_Signed):
    KIND = RECEIPT_KIND

    swarm_id: str
    module: str
    round: int
    peer: str
    voucher: str
    part_hash: str
    wire_bytes: int
    elements: int
    total: int
    samples: int
    signer: bytes = b""
    signature: bytes = b""


@dataclass(frozen=True)
class Vouch(_Signed):
    KIND = VOUCH_KIND

    swarm_id: str
    peer: str
    voucher: str
    through_round: int
    rounds_milli: int
    modules: Tuple[str, ...]
    samples: int
    wire_bytes: int
    receipts: int
    signer: bytes = b""
    signature: bytes = b""


def add(vouch: Optional[Vouch], receipt: Receipt) -> Vouch:
    """The voucher's totals for ``receipt.peer`` with ``receipt`` added (unsigned)."""
    share = receipt.elements / max(1, receipt.total)
    samples = receipt.samples * receipt.elements // max(1, receipt.total)  # exact: int(samples * share) can be 1 short
    base = vouch or Vouch(receipt.swarm_id, receipt.peer, receipt.voucher, 0, 0, (), 0, 0, 0)
    return replace(
        base,
        through_round=max(base.through_round, receipt.round),
        rounds_milli=base.rounds_milli + (round(1000 * share) if receipt.module == "trunk" else 0),
        modules=tuple(sorted(set(base.modules) | {receipt.module})),
        samples=base.samples + (samples if receipt.module == "trunk" else 0),
        wire_bytes=base.wire_bytes + receipt.wire_bytes,
        receipts=base.receipts + 1,
        signer=b"",
        signature=b"",
    )


@dataclass
class Totals:
    """A member's contribution as its vouchers' latest vouches say."""

    rounds: float = 0.0
    modules: Tuple[str, ...] = ()
    samples: int = 0
    wire_bytes: int = 0
    receipts: int = 0
    vouchers: int = 0

    def as_dict(self) -> Dict[str, Any]:
        return {"rounds": round(self.rounds, 3), "modules": list(self.modules), "samples": self.samples,
                "bytes": self.wire_bytes, "receipts": self.receipts, "vouchers": self.vouchers}  # fmt: skip


def newer(vouch: Vouch, known: Optional[Vouch]) -> bool:
    """Whether ``vouch`` replaces ``known``, the same voucher's vouch for the same member (its totals only grow)."""
    return known is None or (vouch.through_round, vouch.receipts) > (known.through_round, known.receipts)


def totals(vouches: Iterable[Vouch]) -> Totals:
    """Sum the latest vouch of each voucher (one member's)."""
    latest: Dict[str, Vouch] = {}
    for vouch in vouches:
        if newer(vouch, latest.get(vouch.voucher)):
            latest[vouch.voucher] = vouch
    out = Totals(vouchers=len(latest))
    modules: Set[str] = set()
    for vouch in latest.values():
        out.rounds += vouch.rounds_milli / 1000
        out.samples += vouch.samples
        out.wire_bytes += vouch.wire_bytes
        out.receipts += vouch.receipts
        modules |= set(vouch.modules)
    out.modules = tuple(sorted(modules))
    return out


def receipts_totals(receipts: Iterable[Receipt]) -> List[Vouch]:
    """The vouch each voucher's receipts add up to (to recompute an export's vouches from its receipts)."""
    by_voucher: Dict[Tuple[str, str], Optional[Vouch]] = {}
    for receipt in sorted(receipts, key=lambda r: (r.round, r.module)):
        key = (receipt.voucher, receipt.peer)
        by_voucher[key] = add(by_voucher.get(key), receipt)
    return [v for v in by_voucher.values() if v is not None]
