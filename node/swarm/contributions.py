"""Contributions others vouch for, in a members-only swarm (protocol/contributions.py).

- After each all-reduce, this node signs a receipt for every other member whose parts it reduced, and adds it to
  its running vouch for that member.
- Every ``PUBLISH_SECONDS``, for each member with new receipts, it stores a small DHT record under that member's
  receipts key (subkey: its own peer id): its newest receipts for the member and its vouch. It reads the records
  under its own key: receipts about itself go into its append-only local log (with the voucher's invite, so the
  evidence can be checked with the founders' keys alone), and the vouches into its summary record (the latest
  vouch from each voucher, and its log's head), which `node status` reads. A vouch counts only if another member
  signed it: a member can leave vouches out of its summary, never add to them.
- ``contributions(view)``: per member, the sum of the latest vouch of each voucher that is a member (its record is
  in the view, or it is a founder); per organisation, the sum of its members.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from node.net import Admission, Identity, SwarmPort
from node.swarm.invites import every, stop_task
from protocol.contributions import ContributionError, Receipt, Totals, Verify, Vouch, add, newer
from protocol.records import contributions_key, receipts_key

logger = logging.getLogger(__name__)

PUBLISH_SECONDS = 5.0
RECORD_SECONDS = 60.0  # peers refuse records that live much longer than a round timeout; stored again before
RECEIPTS_PER_RECORD = 8  # the newest receipts for one member in our record for it (a round of its modules)
RECEIPTS_KEPT = 256  # the newest receipts this node signed, kept to publish
SUMMARY_VOUCHES = 16  # vouches about us in our summary (hivemind passes DHT values through a pipe: keep them small)
LOG_NAME = "receipts.jsonl"
_VERIFIED = 8192  # blobs whose signature we checked, remembered


class ReceiptLog:
    """Receipts about this node, append-only, one JSON line each, chained: each line's hash covers the previous
    line's hash, the receipt and the voucher's invite. ``path`` None: kept in memory only."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self.entries: List[Dict[str, Any]] = []
        self.head = "0" * 64
        if path is not None and os.path.exists(path):
            with open(path, "rb") as f:
                lines = f.read().split(b"\n")
            torn = lines.pop()  # b"" after the last newline; else a write cut short (a crash): cut it off
            skipped = 0
            for line in lines:
                try:
                    entry = json.loads(line)
                    self.head = _chain(self.head, str(entry["receipt"]), entry.get("invite"))
                    self.entries.append(entry)
                except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                    skipped += 1  # a damaged line: the others still count
            if skipped:
                logger.warning("receipt log %s: %d unreadable line(s) skipped", path, skipped)
            if torn:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) - len(torn))

    def append(self, items: List[Tuple[str, Optional[str]]]) -> None:
        """Add (receipt JSON, voucher's invite JSON) pairs, written and synced at once."""
        lines = []
        for receipt, invite in items:
            self.head = _chain(self.head, receipt, invite)
            entry = {"receipt": receipt, "invite": invite, "hash": self.head}
            self.entries.append(entry)
            lines.append(json.dumps(entry) + "\n")
        if self.path is not None and lines:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())


def _chain(previous: str, receipt: str, invite: Optional[str]) -> str:
    return hashlib.sha256(f"{previous}|{receipt}|{invite or ''}".encode()).hexdigest()


def chain_head(entries: Iterable[Tuple[str, Optional[str]]]) -> str:
    """The head a receipt log of these (receipt, invite) entries ends in."""
    head = "0" * 64
    for receipt, invite in entries:
        head = _chain(head, receipt, invite)
    return head


class Ledger:
    """This node's receipts and vouches: signs, publishes, collects; loop thread only."""

    def __init__(
        self, swarm: SwarmPort, swarm_id: str, identity: Identity, admission: Admission, verify: Verify,
        log_path: Optional[str], max_samples: int, clock: Optional[Callable[[], float]] = None,
    ) -> None:  # fmt: skip
        self._swarm = swarm
        self._swarm_id = swarm_id
        self._identity = identity
        self._admission = admission
        self._verify = verify
        self._clock = clock or swarm.now
        self.max_samples = max_samples
        self.me = identity.peer_id
        self.log = ReceiptLog(log_path)
        self._logged: Set[Tuple[str, str, int]] = set()
        for entry in self.log.entries:
            try:
                r = Receipt.from_bytes(entry["receipt"].encode())
                self._logged.add((r.voucher, r.module, r.round))
            except (ContributionError, AttributeError, KeyError, TypeError):  # a line that is no receipt
                continue
        self._given: List[Receipt] = []  # newest last
        self._totals: Dict[str, Vouch] = {}  # member -> our running vouch (unsigned)
        self._signed: Dict[str, Vouch] = {}  # member -> our latest vouch, signed
        self.vouched: Dict[str, Vouch] = {}  # voucher -> its latest vouch about us
        self._checked: "OrderedDict[bytes, bool]" = OrderedDict()
        self._dirty: Set[str] = set()  # members with receipts not yet stored
        self._stored_at: Dict[str, float] = {}  # member -> when its record was last stored (monotonic)
        self._task: Optional["asyncio.Task[None]"] = None

    # --- signing ------------------------------------------------------------------------------------------------
    def vouch(self, module: str, round_number: int, received: Mapping[str, Any], samples: Mapping[str, int]) -> int:
        """Receipts for the members whose parts we reduced in one all-reduce (``received``: member -> run.Received);
        how many."""
        made = 0
        for peer, got in received.items():
            claimed = min(max(0, int(samples.get(peer, 0))), self.max_samples)
            receipt = Receipt(self._swarm_id, module, round_number, peer, self.me, got.part_hash, got.bytes,
                              got.elements, max(got.total, got.elements), claimed)  # fmt: skip
            receipt = receipt.signed(self._identity.public, self._identity.sign)
            self._given.append(receipt)
            self._totals[peer] = add(self._totals.get(peer), receipt)
            self._signed.pop(peer, None)
            self._dirty.add(peer)
            made += 1
        del self._given[:-RECEIPTS_KEPT]
        return made

    # --- the records ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(every(PUBLISH_SECONDS, self.turn, "contributions"))

    async def stop(self) -> None:
        await stop_task(self._task)

    async def turn(self) -> None:
        await self.collect()
        await self.publish()

    def summary(self) -> Dict[str, Any]:
        """Our summary record: the latest vouch about us from each voucher (the most-vouching first), our log."""
        best = sorted(self.vouched.values(), key=lambda v: (v.rounds_milli, v.wire_bytes), reverse=True)
        return {"vouched": [v.to_bytes().decode() for v in best[:SUMMARY_VOUCHES]],
                "log": {"receipts": len(self.log.entries), "head": self.log.head}}  # fmt: skip

    async def publish(self) -> int:
        """Store our receipts and vouch for each member that has new ones (or whose record is getting old), and
        our summary; how many records were stored."""
        now, expires = time.monotonic(), self._clock() + RECORD_SECONDS
        stored = 0
        for peer, vouch in self._totals.items():
            if peer not in self._dirty and now - self._stored_at.get(peer, -RECORD_SECONDS) < RECORD_SECONDS / 2:
                continue
            signed = self._signed.get(peer) or vouch.signed(self._identity.public, self._identity.sign)
            self._signed[peer] = signed
            receipts = [r.to_bytes().decode() for r in self._given if r.peer == peer][-RECEIPTS_PER_RECORD:]
            value = {"receipts": receipts, "vouch": signed.to_bytes().decode()}
            if await self._swarm.store(receipts_key(self._swarm_id, peer), self.me, value, expires):
                stored += 1
                self._stored_at[peer] = now
                self._dirty.discard(peer)
        if self.vouched:
            stored += await self._swarm.store(contributions_key(self._swarm_id), self.me, self.summary(), expires)
        return stored

    async def collect(self) -> int:
        """Read the receipts and vouches the members stored for us; log the receipts that are new; how many were."""
        found = await self._swarm.read(receipts_key(self._swarm_id, self.me))
        new: List[Tuple[str, Optional[str]]] = []
        for owner, (value, _) in found.items():
            if owner == self.me or not isinstance(value, dict):
                continue
            invite = self._admission.invite_of(owner)
            if invite is None and not self._admission.is_founder(owner):
                continue  # not a member we know of (yet): its receipts would be worth nothing to a verifier
            for receipt in self._parse(value.get("receipts"), Receipt):
                key = (receipt.voucher, receipt.module, receipt.round)
                if receipt.peer != self.me or receipt.voucher != owner or key in self._logged:
                    continue
                self._logged.add(key)
                new.append((receipt.to_bytes().decode(), invite))
            for vouch in self._parse([value.get("vouch")], Vouch):
                if vouch.voucher == owner and vouch.peer == self.me:
                    self._keep(vouch)
        self.log.append(new)
        return len(new)

    def _keep(self, vouch: Vouch) -> None:
        if vouch.swarm_id == self._swarm_id and newer(vouch, self.vouched.get(vouch.voucher)):
            self.vouched[vouch.voucher] = vouch

    def _parse(self, items: Any, kind: Any) -> Iterable[Any]:
        """The valid, signed receipts or vouches of a record's list (each signature checked once)."""
        if not isinstance(items, list):
            return []
        out = []
        for item in items[:4096]:
            if not isinstance(item, str):
                continue
            blob = item.encode()
            try:
                parsed = kind.from_bytes(blob)
            except ContributionError:
                continue
            ok = self._checked.get(blob)
            if ok is None:
                try:
                    parsed.check(self._verify)
                    ok = parsed.swarm_id == self._swarm_id
                except ContributionError:
                    ok = False
                self._checked[blob] = ok
                if len(self._checked) > _VERIFIED:
                    self._checked.popitem(last=False)
            if ok:
                out.append(parsed)
        return out


def vouches_in(found: Mapping[str, Tuple[Any, float]], swarm_id: str, verify: Verify) -> Dict[str, Dict[str, Vouch]]:
    """member -> voucher -> latest valid vouch, from the swarm's contribution records (``found``: a DHT read):
    the vouches about each record's owner that it keeps in its summary (each signed by its voucher)."""
    seen: Dict[str, Dict[str, Vouch]] = {}
    for owner, (value, _) in found.items():
        if not isinstance(value, dict):
            continue
        for field, side in (("vouched", "peer"),):  # a summary: the vouches about its owner
            items = value.get(field)
            for item in items[:4096] if isinstance(items, list) else []:
                try:
                    vouch = Vouch.from_bytes(item.encode() if isinstance(item, str) else b"")
                    vouch.check(verify)
                except ContributionError:
                    continue
                if getattr(vouch, side) != owner or vouch.swarm_id != swarm_id:
                    continue
                if newer(vouch, seen.setdefault(vouch.peer, {}).get(vouch.voucher)):
                    seen[vouch.peer][vouch.voucher] = vouch
    return seen


def by_organisation(
    per_peer: Mapping[str, Totals], org_of: Callable[[str], Optional[str]]
) -> Dict[str, Dict[str, Any]]:
    """Per organisation: the sum of its members' vouched contributions (a founder's node: "(founder)")."""
    out: Dict[str, Dict[str, Any]] = {}
    for peer, t in sorted(per_peer.items()):
        org = org_of(peer) or "(founder)"
        entry = out.setdefault(org, {"members": 0, "rounds": 0.0, "samples": 0, "bytes": 0, "receipts": 0,
                                     "modules": set()})  # fmt: skip
        entry["members"] += 1
        entry["rounds"] = round(entry["rounds"] + t.rounds, 3)
        entry["samples"] += t.samples
        entry["bytes"] += t.wire_bytes
        entry["receipts"] += t.receipts
        entry["modules"] |= set(t.modules)
    for entry in out.values():
        entry["modules"] = sorted(entry["modules"])
    return out
