"""`node keygen`, `node invite`, `node revoke`: the founders' tools for a members-only swarm (protocol/membership.py).

A founder's key never leaves the founder's machine: `node invite` signs offline and writes a file the new member
starts with; `node revoke` signs offline, writes the revocation, and (with --initial-peers) publishes it to the
swarm as a short-lived client running with the founder's key (a founder is a member by its key), from where the
members pass it on (node/swarm/invites.py).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Dict, Optional, Sequence, Tuple

from node.errors import ConfigError, EvidenceInvalid, PeerUnreachable
from node.net import Admission, Identity, read_identity, write_atomically, write_new_identity
from protocol.contributions import ContributionError, Receipt, receipts_totals, totals
from protocol.keys import ED25519, PEER_ID_PATTERN, decode_key, founder_key_string
from protocol.manifest import Manifest, load_manifest
from protocol.membership import MAX_ORG_CHARS, Invite, MembershipError, Revocation
from protocol.records import revocations_key
from protocol.typed import read_small_file

MAX_EXPIRY_SECONDS = 10 * 365 * 24 * 3600
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_FOUNDER_FIX = "give --founder-key the key file `node keygen` wrote, whose public key the manifest lists as a founder"
PUBLISH_RECORD_SECONDS = 60.0  # members refuse records that live longer than about a round timeout


def keygen(out: str) -> Dict[str, Any]:
    """A new Ed25519 key in ``out`` (0600, written atomically; an existing file is never overwritten)."""
    if os.path.lexists(out):
        raise ConfigError(f"{out} already exists; a key is never overwritten: choose another --out")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise ConfigError(f"directory {directory} does not exist; create it or choose another --out")
    identity = write_new_identity(out)
    return {"peer_id": identity.peer_id, "public_key": public_key_of(identity), "path": os.path.abspath(out)}


def public_key_of(identity: Identity) -> str:
    key_type, raw = decode_key(identity.public)
    if key_type != ED25519:
        raise ConfigError("founder keys are Ed25519; make one with `node keygen --out FILE`")
    return founder_key_string(raw)


def parse_duration(text: str) -> int:
    """Seconds in "30d", "12h", "90m", "3600s", "2w" or a plain number of seconds; ConfigError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text or "")
    if not match:
        raise ConfigError(f"--expires {text!r}: give a duration such as 30d, 12h, 90m or 3600s")
    # min: a number too long for a float reads as infinity, which int() refuses (OverflowError, a traceback)
    seconds = int(min(float(match.group(1)) * _UNITS[match.group(2) or "s"], MAX_EXPIRY_SECONDS + 1))
    if not 0 < seconds <= MAX_EXPIRY_SECONDS:
        raise ConfigError(f"--expires {text!r}: must be more than 0 and at most 10 years")
    return seconds


def _founder(manifest: Manifest, key_path: str) -> Identity:
    founders = manifest.membership.rules()
    if not founders.members_only:
        raise ConfigError("the manifest names no founders (an open swarm needs no invites); add membership: "
                          "{founders: [<public_key of `node keygen`>]} and give it with --manifest")  # fmt: skip
    identity = read_identity(key_path, "founder key", _FOUNDER_FIX)
    public = public_key_of(identity)
    if public not in founders.keys:
        raise ConfigError(f"founder key {key_path} ({public[:20]}…) is not one of the manifest's founders; "
                          f"{_FOUNDER_FIX}")  # fmt: skip
    return identity


def _peer_id(text: str) -> str:
    if not PEER_ID_PATTERN.match(text or ""):
        raise ConfigError(f"--peer-id {text!r} is not a peer id (the peer_id `node keygen` printed for that node)")
    return text


def _write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(f"directory {directory} does not exist; create it or choose another --out")
    write_atomically(path, data + b"\n", 0o644)


def _countersigned(kind: Any, path: str) -> Any:
    """The invite or revocation in ``path`` another founder signed, to add a signature to."""
    from node.swarm import read_invite_file

    try:
        return kind.from_bytes(read_invite_file(path).strip())
    except MembershipError as e:
        raise ConfigError(f"--countersign {path}: {e}") from None


def _swarm(manifest_path: Optional[str], founder_key: str) -> Tuple[Identity, Any, str]:
    """The founder's identity, the founders' rules and the swarm id of a members-only manifest."""
    manifest = load_manifest(manifest_path)
    return _founder(manifest, founder_key), manifest.membership.rules(), manifest.swarm_id


def invite(
    manifest_path: Optional[str], founder_key: str, peer_id: Optional[str], org: Optional[str],
    expires: Optional[str], out: str, countersign: Optional[str] = None, now: Optional[float] = None,
) -> Dict[str, Any]:  # fmt: skip
    """Sign an invite (or add this founder's signature to ``countersign``'s) and write it to ``out``."""
    founder, founders, swarm_id = _swarm(manifest_path, founder_key)
    if countersign:
        base = _countersigned(Invite, countersign)
        if base.swarm_id != swarm_id:
            raise ConfigError(f"--countersign {countersign} is for swarm {base.swarm_id}, not {swarm_id}")
    else:
        if not peer_id or not org or not expires:
            raise ConfigError("node invite needs --peer-id, --org and --expires (or --countersign FILE)")
        if not 0 < len(org) <= MAX_ORG_CHARS or not org.isprintable():
            raise ConfigError(f"--org must be 1 to {MAX_ORG_CHARS} printable characters")
        issued = int(time.time() if now is None else now)
        base = Invite(swarm_id, _peer_id(peer_id), org, issued, issued + parse_duration(expires))
    signed = base.signed(public_key_of(founder), founder.sign(base.body()))
    _write(out, signed.to_bytes())
    have = len(founders.signers(signed.body(), signed.signatures))
    return {"invite": os.path.abspath(out), "swarm_id": swarm_id, "peer_id": signed.peer_id, "org": signed.org,
            "expires": signed.expires, "signatures": have, "threshold": founders.threshold,
            "complete": have >= founders.threshold}  # fmt: skip


def revoke(
    manifest_path: Optional[str], founder_key: str, peer_id: Optional[str], out: Optional[str],
    initial_peers: Sequence[str], timeout: float, countersign: Optional[str] = None,
) -> Dict[str, Any]:  # fmt: skip
    """Sign a revocation (or countersign one), write it to ``out``, and publish it through ``initial_peers`` once
    it has enough signatures."""
    founder, founders, swarm_id = _swarm(manifest_path, founder_key)
    if countersign:
        base = _countersigned(Revocation, countersign)
    else:
        if not peer_id:
            raise ConfigError("node revoke needs --peer-id (or --countersign FILE)")
        base = Revocation(swarm_id, _peer_id(peer_id), int(time.time()))
    signed = base.signed(public_key_of(founder), founder.sign(base.body()))
    blob = signed.to_bytes()
    if out:
        _write(out, blob)
    have = len(founders.signers(signed.body(), signed.signatures))
    result: Dict[str, Any] = {"revoked": signed.peer_id, "swarm_id": swarm_id, "issued": signed.issued,
                              "signatures": have, "threshold": founders.threshold,
                              "revocation": os.path.abspath(out) if out else None, "published": False}  # fmt: skip
    if have < founders.threshold or not initial_peers:
        return result
    _publish(founders, swarm_id, founder_key, blob, initial_peers, timeout)
    result["published"] = True
    return result


def _publish(founders: Any, swarm_id: str, key_path: str, blob: bytes, peers: Sequence[str], timeout: float) -> None:
    """Store the revocation under the founder's subkey of the swarm's revocations key, as a client of the swarm
    running with the founder's key, and read it back."""
    from node.net import HivemindSwarm

    admission = Admission(founders, swarm_id, None)
    swarm = HivemindSwarm.open(initial_peers=peers, client_mode=True, identity_path=key_path,
                               startup_timeout=timeout, admission=admission, check_identity_free=False)  # fmt: skip
    try:
        key = revocations_key(swarm_id)
        stored = swarm.run(swarm.store(key, swarm.peer_id, [blob.decode()], swarm.now() + PUBLISH_RECORD_SECONDS),
                           timeout=timeout)  # fmt: skip
        found = swarm.run(swarm.read(key), timeout=timeout)
    finally:
        swarm.close()
    if not stored or swarm.peer_id not in found:
        raise PeerUnreachable("the revocation was signed (and written with --out) but no peer of the swarm took it; "
                              "check --initial-peers and try again")  # fmt: skip


# --- evidence of contributions ------------------------------------------------------------------------------------
EVIDENCE_KIND = "commons-evidence"


def export_evidence(checkpoint_dir: str, manifest_path: Optional[str]) -> Dict[str, Any]:
    """The receipts other members signed for the node whose --checkpoint-dir this is, with their vouchers'
    invites and the totals they add up to: everything a verifier needs besides the founders' keys."""
    from node.swarm import LOG_NAME, ReceiptLog

    manifest = load_manifest(manifest_path)
    founders = manifest.membership.rules()
    if not founders.members_only:
        raise ConfigError("the manifest names no founders: contributions are kept in members-only swarms only")
    path = os.path.join(checkpoint_dir, LOG_NAME)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} does not exist: give --checkpoint-dir of a node of a members-only swarm")
    log = ReceiptLog(path)
    try:
        receipts = [Receipt.from_bytes(e["receipt"].encode()) for e in log.entries]
    except (ContributionError, AttributeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} holds a line that is not a receipt ({e}); it is not a log a node wrote") from None
    peers = {r.peer for r in receipts}
    if len(peers) > 1:
        raise ConfigError(f"{path} holds receipts for {len(peers)} peers; a log is one node's")
    return {
        "kind": EVIDENCE_KIND, "format": 1, "swarm_id": manifest.swarm_id, "peer": peers.pop() if peers else None,
        "founders": list(founders.keys), "threshold": founders.threshold,
        "entries": [{"receipt": e["receipt"], "invite": e.get("invite")} for e in log.entries],
        "log_head": log.head, "totals": totals(receipts_totals(receipts)).as_dict(),
    }  # fmt: skip


def verify_evidence(path: str, manifest_path: Optional[str], now: Optional[float] = None) -> Dict[str, Any]:
    """Check an export with the founders' keys of ``manifest_path`` alone: every receipt signed by its voucher,
    every voucher a member (its invite signed by the founders) other than the peer, no receipt twice, the chain
    head and the totals as stated. EvidenceInvalid (one line: which entry, what) otherwise."""
    from node.net import verify
    from node.swarm import chain_head

    manifest = load_manifest(manifest_path)
    founders, swarm_id = manifest.membership.rules(), manifest.swarm_id
    try:
        data = json.loads(read_small_file(path, "evidence file", "give --verify the file `node contributions` wrote",
                                          64 << 20))  # fmt: skip
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise EvidenceInvalid(f"{path} is not an evidence file: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or data.get("kind") != EVIDENCE_KIND or not isinstance(data.get("entries"), list):
        raise EvidenceInvalid(f"{path} is not a {EVIDENCE_KIND} file")
    if data.get("swarm_id") != swarm_id:
        shown = str(data.get("swarm_id"))[:20]
        raise EvidenceInvalid(f"the evidence is for swarm {shown!r}, the manifest's is {swarm_id}")
    founder_peers = founders.founder_peer_ids()
    seen, receipts, orgs = set(), [], {}
    for number, entry in enumerate(data["entries"], 1):
        try:
            receipt = Receipt.from_bytes(str(entry["receipt"]).encode())
            receipt.check(verify)
        except (ContributionError, KeyError, TypeError) as e:
            raise EvidenceInvalid(f"entry {number}: {e}") from None
        if receipt.peer != data.get("peer") or receipt.swarm_id != swarm_id:
            raise EvidenceInvalid(f"entry {number}: a receipt for another peer or swarm")
        key = (receipt.voucher, receipt.module, receipt.round)
        if key in seen:
            what = f"{receipt.module} round {receipt.round}"
            raise EvidenceInvalid(f"entry {number}: {receipt.voucher} vouched for {what} twice")
        seen.add(key)
        if receipt.voucher in founder_peers:
            orgs[receipt.voucher] = "(founder)"
        else:
            try:
                invite = Invite.from_bytes(str(entry.get("invite") or "").encode())
                if invite.peer_id != receipt.voucher or invite.swarm_id != swarm_id:
                    raise MembershipError("wrong_peer", "the invite is not the voucher's, or not for this swarm")
                founders.check_signed(invite.body(), invite.signatures, "invite")
            except MembershipError as e:
                raise EvidenceInvalid(f"entry {number}: voucher {receipt.voucher} is not a member: {e}") from None
            orgs[receipt.voucher] = invite.org
        receipts.append(receipt)
    head = chain_head((str(e["receipt"]), e.get("invite")) for e in data["entries"])
    if head != data.get("log_head"):
        raise EvidenceInvalid("the entries do not chain to the stated log head (changed, moved or removed)")
    found = totals(receipts_totals(receipts)).as_dict()
    if found != data.get("totals"):
        raise EvidenceInvalid(f"the stated totals differ from what the receipts add up to: {json.dumps(found)}")
    return {"ok": True, "peer": data.get("peer"), "swarm_id": swarm_id, "totals": found,
            "vouchers": {peer: orgs[peer] for peer in sorted(orgs)}}  # fmt: skip
