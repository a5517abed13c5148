"""Contributions in members-only swarms, offline: receipts and vouches (protocol/contributions.py), their
arithmetic, the ledger that signs, publishes and collects them over an in-process swarm, the receipt log
(node/swarm/contributions.py), and the evidence a member exports and anyone verifies with the founders' keys
(node/faces/members.py).

Property tests throw arbitrary and mutated bytes at both parsers: nothing but a ContributionError may come out,
and nothing whose signed fields changed may pass ``check``.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.averaging.run import Received
from node.errors import ConfigError, EvidenceInvalid
from node.faces import members
from node.net.admission import Admission
from node.net.identity import Identity, public_key_proto, read_identity, verify, write_new_identity
from node.net.inprocess import InProcessNetwork
from node.swarm.contributions import LOG_NAME, Ledger, ReceiptLog, by_organisation, chain_head, vouches_in
from protocol.contributions import (
    MAX_BLOB_BYTES,
    MAX_COUNT,
    RECEIPT_KIND,
    VOUCH_KIND,
    ContributionError,
    Receipt,
    Totals,
    Vouch,
    add,
    receipts_totals,
    totals,
)
from protocol.keys import peer_id_of_public_key
from protocol.manifest import load_manifest
from protocol.membership import Invite
from protocol.records import contributions_key, receipts_key

SWARM = "0123456789abcdef"
OTHER_SWARM = "fedcba9876543210"
NOW = 1_000_000
HASH = "ab" * 32
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def new_identity() -> Identity:
    key = ed25519.Ed25519PrivateKey.generate()
    public = public_key_proto(key)
    return Identity(key, public, peer_id_of_public_key(public))


@functools.lru_cache(maxsize=None)
def rsa_identity() -> Identity:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = public_key_proto(key)
    return Identity(key, public, peer_id_of_public_key(public))


IDS = [new_identity() for _ in range(5)]
A, B, C, D, E = IDS
VOUCHERS = [new_identity() for _ in range(8)]


def receipt(
    voucher: Identity = A, peer: Identity = B, module: str = "trunk", round_number: int = 1, elements: int = 100,
    total: int = 100, samples: int = 10, wire_bytes: int = 400, swarm: str = SWARM, signer: Optional[Identity] = None,
) -> Receipt:  # fmt: skip
    """A receipt ``voucher`` signed (or ``signer``, when given) for ``peer``."""
    record = Receipt(swarm, module, round_number, peer.peer_id, voucher.peer_id, HASH, wire_bytes, elements, total,
                     samples)  # fmt: skip
    key = signer or voucher
    return record.signed(key.public, key.sign)


def vouch(voucher: Identity = A, peer: Identity = B, through: int = 1, receipts: int = 1, rounds_milli: int = 1000,
          samples: int = 10, swarm: str = SWARM, signer: Optional[Identity] = None) -> Vouch:  # fmt: skip
    record = Vouch(swarm, peer.peer_id, voucher.peer_id, through, rounds_milli, ("trunk",), samples, 400, receipts)
    key = signer or voucher
    return record.signed(key.public, key.sign)


def one_line(call: Any, *args: Any, error: type = EvidenceInvalid) -> str:
    with pytest.raises(error) as info:
        call(*args)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


# --- strategies ------------------------------------------------------------------------------------------------
SWARM_IDS = st.text("0123456789abcdef", min_size=16, max_size=16)
PEER_IDS = st.sampled_from([i.peer_id for i in IDS]) | st.text(B58, min_size=40, max_size=128)
COUNTS = st.integers(0, MAX_COUNT - 1)
MODULES = st.just("trunk") | st.builds("expert.{}.{}".format, st.integers(0, 9999), st.integers(0, 9999))
HASHES = st.text("0123456789abcdef", min_size=64, max_size=64)
MODULE_LISTS = st.lists(MODULES, max_size=16).map(tuple)
RECEIPT_FIELDS = {"swarm_id": SWARM_IDS, "module": MODULES, "round": COUNTS, "peer": PEER_IDS, "voucher": PEER_IDS,
                  "part_hash": HASHES, "wire_bytes": COUNTS, "elements": COUNTS, "total": COUNTS,
                  "samples": COUNTS}  # fmt: skip
VOUCH_FIELDS = {"swarm_id": SWARM_IDS, "peer": PEER_IDS, "voucher": PEER_IDS, "through_round": COUNTS,
                "rounds_milli": COUNTS, "modules": MODULE_LISTS, "samples": COUNTS, "wire_bytes": COUNTS,
                "receipts": COUNTS}  # fmt: skip
KEY_BYTES = {"signer": st.binary(max_size=80), "signature": st.binary(max_size=300)}
RECEIPTS = st.builds(Receipt, **RECEIPT_FIELDS, **KEY_BYTES)
VOUCHES = st.builds(Vouch, **VOUCH_FIELDS, **KEY_BYTES)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
WRONG = JSON | st.sampled_from([True, False, -1, MAX_COUNT, 2**63, 10**100, 1.5, "", "x" * 9000, [], {}, ["x"]])
VALID_RECEIPT = receipt()
VALID_VOUCH = vouch()


def parsed_or_refused(blob: Any, intact: Sequence[bytes] = ()) -> None:
    """Both parsers: a record or a one-line ContributionError, never another exception; a record that passes
    ``check`` must have the signed body of one of ``intact``."""
    for kind in (Receipt, Vouch):
        try:
            record = kind.from_bytes(blob)
        except ContributionError as e:
            assert "\n" not in str(e), e
            continue
        try:
            record.check(verify)
        except ContributionError as e:
            assert "\n" not in str(e), e
            continue
        assert record.body() in intact


# --- formats -------------------------------------------------------------------------------------------------
@PROPERTY
@given(RECEIPTS)
def test_any_valid_receipt_round_trips(record: Receipt) -> None:
    blob = record.to_bytes()
    assert len(blob) <= MAX_BLOB_BYTES
    again = Receipt.from_bytes(blob)
    assert again == record and again.to_bytes() == blob and again.body() == record.body()
    with pytest.raises(ContributionError):
        Vouch.from_bytes(blob)


@PROPERTY
@given(VOUCHES)
def test_any_valid_vouch_round_trips(record: Vouch) -> None:
    blob = record.to_bytes()
    again = Vouch.from_bytes(bytearray(blob))
    assert again == record and again.to_bytes() == blob and isinstance(again.modules, tuple)
    with pytest.raises(ContributionError):
        Receipt.from_bytes(blob)


@pytest.mark.parametrize("signer", ["ed25519", "rsa"])
def test_real_signatures_survive_the_round_trip(signer: str) -> None:
    key = rsa_identity() if signer == "rsa" else C
    assert key.peer_id.startswith("Qm" if signer == "rsa" else "12D3KooW")
    for record in (receipt(voucher=key), vouch(voucher=key)):
        again = type(record).from_bytes(record.to_bytes())
        again.check(verify)
        assert again == record
        assert json.loads(record.to_bytes())["kind"] in (RECEIPT_KIND, VOUCH_KIND)


@PROPERTY
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_refused(blob: bytes) -> None:
    parsed_or_refused(blob)


@PROPERTY
@given(JSON)
def test_arbitrary_json_is_refused(value: Any) -> None:
    parsed_or_refused(json.dumps(value).encode())


def _field(valid: Any) -> Any:
    return st.one_of(st.just(valid), WRONG)


@PROPERTY
@given(
    st.fixed_dictionaries(
        {
            "kind": _field(RECEIPT_KIND),
            "format": _field(1),
            "swarm_id": _field(SWARM),
            "module": _field("trunk"),
            "round": _field(1),
            "peer": _field(B.peer_id),
            "voucher": _field(A.peer_id),
            "part_hash": _field(HASH),
            "wire_bytes": _field(1),
            "elements": _field(1),
            "total": _field(1),
            "samples": _field(1),
            "signer": _field("AAAA"),
            "signature": _field("AAAA"),
        },
        optional={"extra": JSON, "round ": JSON},
    )
)
def test_receipt_shaped_json_with_wrong_values_never_escapes(data: Dict[str, Any]) -> None:
    parsed_or_refused(json.dumps(data).encode())  # no valid signature anywhere: nothing passes check


def _flip(blob: bytes, at_bit: Tuple[int, int]) -> bytes:
    out = bytearray(blob)
    out[at_bit[0] % len(out)] ^= 1 << at_bit[1]
    return bytes(out)


def _mutations(original: bytes) -> st.SearchStrategy[bytes]:
    tree = json.loads(original)
    names = sorted(tree)

    def replaced(name_value: Tuple[str, Any]) -> bytes:
        name, value = name_value
        return json.dumps({**tree, name: value}).encode()

    return st.one_of(
        st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(0, 7)), min_size=1, max_size=8).map(
            lambda flips: functools.reduce(_flip, flips, original)
        ),
        st.integers(0, len(original) - 1).map(lambda n: original[:n]),
        st.sampled_from(names).map(lambda name: json.dumps({k: v for k, v in tree.items() if k != name}).encode()),
        st.tuples(st.sampled_from(names), WRONG).map(replaced),
        st.tuples(st.text(min_size=1, max_size=10), JSON).map(replaced),  # an extra field, or a field replaced
        st.binary(min_size=1, max_size=64).map(lambda tail: original + tail),
        st.just(original + b" " * MAX_BLOB_BYTES),  # too large
    )


@PROPERTY
@given(_mutations(VALID_RECEIPT.to_bytes()) | _mutations(VALID_VOUCH.to_bytes()))
def test_a_mutated_blob_is_refused_unless_what_was_signed_is_intact(blob: bytes) -> None:
    # e.g. a flipped bit in base64 padding that decodes to the same signature
    parsed_or_refused(blob, intact=(VALID_RECEIPT.body(), VALID_VOUCH.body()))


def test_deeply_nested_json_and_non_bytes_are_refused() -> None:
    for depth in range(0, MAX_BLOB_BYTES // 2 + 1, 97):
        parsed_or_refused(b"[" * depth + b"]" * depth)
        parsed_or_refused(b'{"a":' * depth + b"1" + b"}" * depth)
    for blob in ("a string", None, 5, [b"{}"]):
        parsed_or_refused(blob)


@PROPERTY
@given(st.data())
def test_any_field_changed_after_signing_fails_the_check(data: st.DataObject) -> None:
    original, strategies = data.draw(st.sampled_from([(VALID_RECEIPT, RECEIPT_FIELDS), (VALID_VOUCH, VOUCH_FIELDS)]))
    original.check(verify)
    name = data.draw(st.sampled_from(sorted(strategies)))
    value = data.draw(strategies[name].filter(lambda v: v != getattr(original, name)))
    changed = dataclasses.replace(original, **{name: value})
    with pytest.raises(ContributionError):
        changed.check(verify)
    with pytest.raises(ContributionError):
        type(original).from_bytes(changed.to_bytes()).check(verify)


def test_check_names_a_signer_that_is_not_the_voucher_a_self_vouch_and_a_bad_signature() -> None:
    def refused(record: Any) -> str:
        return one_line(record.check, verify, error=ContributionError)

    for make in (receipt, vouch):
        assert "another key than the voucher's" in refused(make(voucher=A, signer=C))
        assert "another key than the voucher's" in refused(make().signed(b"\x08\x01\x12\x03abc", A.sign))
        assert "another key than the voucher's" in refused(make().signed(b"", A.sign))
        assert "cannot vouch for itself" in refused(make(voucher=A, peer=A))
        assert "signature does not hold" in refused(dataclasses.replace(make(), signature=b"\x00" * 64))
        assert "signature does not hold" in refused(dataclasses.replace(make(), signature=b""))
        other = make(samples=11)
        assert "signature does not hold" in refused(dataclasses.replace(make(), signature=other.signature))


# --- arithmetic ----------------------------------------------------------------------------------------------
def _vouches_of(receipts: List[Receipt]) -> List[Vouch]:
    """What each voucher's Ledger holds: add() over its receipts, in the order given."""
    running: Dict[str, Vouch] = {}
    for r in receipts:
        running[r.voucher] = add(running.get(r.voucher), r)
    return list(running.values())


def test_a_trunk_split_in_whole_thousandths_between_three_reducers_is_one_round_and_all_its_samples() -> None:
    claimed = 90
    receipts = [receipt(voucher=v, elements=e, total=1000, samples=claimed) for v, e in ((A, 300), (C, 300), (D, 400))]
    vouches = _vouches_of(receipts)
    assert [v.rounds_milli for v in vouches] == [300, 300, 400]
    got = totals(vouches)
    assert got.rounds == 1.0 and got.samples == claimed and got.vouchers == 3 and got.receipts == 3
    assert got.as_dict() == {"rounds": 1.0, "modules": ["trunk"], "samples": claimed, "bytes": 1200, "receipts": 3,
                             "vouchers": 3}  # fmt: skip


def test_a_trunk_split_in_thirds_is_one_round_to_the_thousandth_and_all_samples_when_they_divide() -> None:
    claimed = 99
    vouches = _vouches_of([receipt(voucher=v, elements=100, total=300, samples=claimed) for v in (A, C, D)])
    got = totals(vouches)
    # Each voucher rounds its own third to 333 thousandths: three of them add up to 0.999, not 1.0.
    assert abs(got.rounds - 1.0) <= 3 * 0.0005
    assert got.samples == claimed  # 99 * 100 // 300 = 33, three times


def test_samples_are_counted_exactly_not_one_short_by_float_rounding() -> None:
    """90 * (7 / 10) is 62.99999999999999 in floats: int() of it gave 62, and the member lost a sample per round."""
    vouches = _vouches_of([receipt(voucher=A, elements=7, total=10, samples=90),
                           receipt(voucher=C, elements=3, total=10, samples=90)])  # fmt: skip
    assert sorted(v.samples for v in vouches) == [27, 63] and totals(vouches).samples == 90
    assert add(None, receipt(elements=1, total=49, samples=49)).samples == 1


@PROPERTY
@given(st.lists(st.integers(1, 10**6), min_size=1, max_size=8), st.integers(0, 10**6))
def test_any_split_of_the_trunk_adds_up_to_one_round_and_the_claim(parts: List[int], claimed: int) -> None:
    total = sum(parts)
    vouches = _vouches_of([receipt(voucher=v, elements=e, total=total, samples=claimed)
                           for v, e in zip(VOUCHERS, parts, strict=False)])  # fmt: skip
    got = totals(vouches)
    assert abs(got.rounds - 1.0) <= len(parts) * 0.0005
    assert got.samples == sum(claimed * e // total for e in parts)
    assert claimed - len(parts) < got.samples <= claimed
    if all(claimed * e % total == 0 for e in parts):
        assert got.samples == claimed


def test_expert_receipts_add_modules_and_bytes_but_no_rounds_or_samples() -> None:
    trunk = add(None, receipt(round_number=3, elements=50, total=100, samples=40, wire_bytes=200))
    assert (trunk.rounds_milli, trunk.samples, trunk.modules, trunk.through_round) == (500, 20, ("trunk",), 3)
    both = add(trunk, receipt(module="expert.0.3", round_number=2, samples=40, wire_bytes=1000))
    assert both.rounds_milli == 500 and both.samples == 20
    assert both.modules == ("expert.0.3", "trunk") and both.wire_bytes == 1200 and both.receipts == 2
    assert both.through_round == 3  # the latest round, whatever the order
    assert (both.voucher, both.peer, both.swarm_id) == (A.peer_id, B.peer_id, SWARM)
    assert both.signer == b"" and both.signature == b""  # add() leaves the vouch to be signed again
    expert_only = add(None, receipt(module="expert.1.0", samples=10**9))
    assert expert_only.rounds_milli == 0 and expert_only.samples == 0 and expert_only.wire_bytes == 400


def test_totals_keep_only_the_latest_vouch_of_each_voucher() -> None:
    old = vouch(A, through=1, receipts=1, rounds_milli=1000, samples=10)
    new = vouch(A, through=2, receipts=2, rounds_milli=2000, samples=20)
    other = vouch(C, through=1, receipts=1, rounds_milli=500, samples=5)
    expected = Totals(rounds=2.5, modules=("trunk",), samples=25, wire_bytes=800, receipts=3, vouchers=2)
    for order in ([old, new, other], [new, old, other], [other, new, old], [new, other, old, old, new]):
        assert totals(order) == expected, order
    same_round = vouch(A, through=2, receipts=3, rounds_milli=2100, samples=21)  # more receipts in the same round
    assert totals([same_round, new]).samples == 21 == totals([new, same_round]).samples
    assert totals([]) == Totals() and totals([]).as_dict()["rounds"] == 0.0


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from([A, C, D]), MODULES, st.integers(0, 50), st.integers(0, 1000),
                          st.integers(1, 1000), st.integers(0, 10**6)), max_size=20))  # fmt: skip
def test_receipts_totals_recomputes_what_successive_adds_made(items: List[Tuple[Any, str, int, int, int, int]]) -> None:
    receipts = [receipt(voucher=v, module=m, round_number=n, elements=min(e, t), total=t, samples=s)
                for v, m, n, e, t, s in items]  # fmt: skip
    by_add = sorted(_vouches_of(receipts), key=lambda v: v.voucher)
    recomputed = sorted(receipts_totals(reversed(receipts)), key=lambda v: v.voucher)
    assert recomputed == by_add
    assert totals(recomputed).as_dict() == totals(by_add).as_dict()
    assert totals(recomputed).receipts == len(receipts)


def test_by_organisation_sums_members_and_names_founders() -> None:
    per_peer = {
        A.peer_id: Totals(1.5, ("trunk",), 10, 100, 2, 1),
        C.peer_id: Totals(0.25, ("expert.0.1",), 5, 50, 1, 1),
        D.peer_id: Totals(1.0, ("trunk",), 1, 1, 1, 1),
    }
    orgs = by_organisation(per_peer, {A.peer_id: "Org", C.peer_id: "Org"}.get)
    assert orgs == {
        "Org": {"members": 2, "rounds": 1.75, "samples": 15, "bytes": 150, "receipts": 3,
                "modules": ["expert.0.1", "trunk"]},
        "(founder)": {"members": 1, "rounds": 1.0, "samples": 1, "bytes": 1, "receipts": 1, "modules": ["trunk"]},
    }  # fmt: skip


# --- vouches_in: what a swarm's contribution records say -------------------------------------------------------
def test_vouches_in_takes_only_what_each_record_owner_may_say() -> None:
    found = {
        A.peer_id: ({"vouches": [vouch(A, B).to_bytes().decode()]}, NOW),  # not a summary's field: not read
        B.peer_id: ({"vouched": [vouch(B, B, signer=B).to_bytes().decode(),  # about itself, by itself: dropped
                                 vouch(D, B, through=5, receipts=5).to_bytes().decode(),
                                 vouch(A, B).to_bytes().decode(),
                                 vouch(D, C, through=9).to_bytes().decode(),  # about another peer: dropped
                                 dataclasses.replace(vouch(E, B), signature=b"\x01" * 64).to_bytes().decode(),
                                 vouch(E, B, swarm=OTHER_SWARM).to_bytes().decode()]}, NOW),
        C.peer_id: ({"vouched": [42, None, "garbage", {"x": 1}]}, NOW),
        D.peer_id: ("not a dict", NOW),
    }  # fmt: skip
    seen = vouches_in(found, SWARM, verify)
    assert set(seen) == {B.peer_id}
    assert set(seen[B.peer_id]) == {A.peer_id, D.peer_id}
    assert seen[B.peer_id][D.peer_id].through_round == 5 and seen[B.peer_id][A.peer_id] == vouch(A, B)
    elsewhere = vouches_in(found, OTHER_SWARM, verify)  # the one vouch of the other swarm, and nothing else
    assert elsewhere == {B.peer_id: {E.peer_id: vouch(E, B, swarm=OTHER_SWARM)}}


def test_vouches_in_keeps_the_latest_vouch_of_each_voucher() -> None:
    old, new = vouch(A, B, through=1, receipts=1), vouch(A, B, through=4, receipts=6)
    for ordered in ([old, new], [new, old]):
        found = {B.peer_id: ({"vouched": [v.to_bytes().decode() for v in ordered]}, NOW)}
        assert vouches_in(found, SWARM, verify) == {B.peer_id: {A.peer_id: new}}


# --- the receipt log -----------------------------------------------------------------------------------------
def test_receipt_log_chains_and_reloads(tmp_path: Path) -> None:
    path = str(tmp_path / LOG_NAME)
    items = [(receipt(round_number=n).to_bytes().decode(), '{"invite": %d}' % n if n % 2 else None) for n in range(5)]
    log = ReceiptLog(path)
    assert log.entries == [] and log.head == "0" * 64 == chain_head([])
    log.append(items[:2])
    log.append([])
    log.append(items[2:])
    assert log.head == chain_head(items) and [e["hash"] for e in log.entries][-1] == log.head
    assert len({e["hash"] for e in log.entries}) == 5
    again = ReceiptLog(path)
    assert again.head == log.head and again.entries == log.entries
    assert chain_head(items[::-1]) != log.head and chain_head(items[1:]) != log.head
    memory = ReceiptLog(None)
    memory.append(items)
    assert memory.head == log.head and not (tmp_path / "None").exists()


@pytest.mark.parametrize("damage", ["torn", "torn-at-newline", "garbage-line"])
def test_receipt_log_survives_a_torn_or_unreadable_line_and_keeps_later_appends(tmp_path: Path, damage: str) -> None:
    """A crash mid-append leaves half a line: it is cut off, and what is appended after the restart is still there
    at the next one (it used to follow the torn line and be lost with it). A damaged line inside the log is
    skipped: the receipts around it still count."""
    path = tmp_path / LOG_NAME
    items = [(receipt(round_number=n).to_bytes().decode(), None) for n in range(4)]
    ReceiptLog(str(path)).append(items[:2])
    text = path.read_bytes()
    if damage == "torn":
        path.write_bytes(text[:-25])
    elif damage == "torn-at-newline":
        path.write_bytes(text[:-1])
    else:
        path.write_bytes(text + b"{not json\n" + text)
    kept = items[:2] + items[:2] if damage == "garbage-line" else items[:1]
    log = ReceiptLog(str(path))
    assert len(log.entries) == len(kept) and log.head == chain_head(kept)
    log.append(items[2:])
    again = ReceiptLog(str(path))
    assert again.head == log.head == chain_head(kept + items[2:])
    assert len(again.entries) == len(kept) + 2


# --- the ledger, over an in-process swarm --------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


class World:
    """A members-only manifest on disk, its founder's key, members A and B invited (real key files), and a stranger."""

    def __init__(self, root: Path, name: str = "contributions-test") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.founder_key = str(root / "founder.key")
        self.founder_public = members.keygen(self.founder_key)["public_key"]
        self.founder = read_identity(self.founder_key)
        self.manifest_path = str(root / "manifest.yaml")
        Path(self.manifest_path).write_text(f"name: {name}\nmembership: {{founders: [{self.founder_public}]}}\n")
        manifest = load_manifest(self.manifest_path)
        self.swarm_id, self.founders = manifest.swarm_id, manifest.membership.rules()
        self.a = write_new_identity(str(root / "a.key"))
        self.b = write_new_identity(str(root / "b.key"))
        self.stranger = write_new_identity(str(root / "stranger.key"))
        self.invites = {self.a.peer_id: self.invite(self.a, "Org A"), self.b.peer_id: self.invite(self.b, "Org B")}

    def invite(self, who: Identity, org: str, now: int = NOW) -> bytes:
        out = self.root / f"invite-{who.peer_id[-8:]}-{now}.json"
        members.invite(self.manifest_path, self.founder_key, who.peer_id, org, "30d", str(out), now=now)
        return out.read_bytes().strip()

    def admission(self, who: Identity) -> Admission:
        return Admission(self.founders, self.swarm_id, self.invites.get(who.peer_id), clock=lambda: NOW)

    def receipt(self, voucher: Identity, peer: Optional[Identity] = None, **kwargs: Any) -> Receipt:
        return receipt(voucher=voucher, peer=peer or self.b, swarm=kwargs.pop("swarm", self.swarm_id), **kwargs)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "world")


def test_the_ledger_signs_publishes_collects_and_logs(world: World, tmp_path: Path) -> None:
    a, b, founder = world.a, world.b, world.founder
    log_b = str(tmp_path / LOG_NAME)
    clock = Clock()

    async def scenario(network: InProcessNetwork) -> None:
        admission_b = world.admission(b)
        assert admission_b.check(a.peer_id, world.invites[a.peer_id]) is None  # B admitted A once: knows its invite
        ledger_a = Ledger(network.join(a.peer_id), world.swarm_id, a, world.admission(a), verify, None, max_samples=64)
        ledger_f = Ledger(network.join(founder.peer_id), world.swarm_id, founder,
                          Admission(world.founders, world.swarm_id, None), verify, None, max_samples=64)  # fmt: skip
        swarm_b = network.join(b.peer_id)
        ledger_b = Ledger(swarm_b, world.swarm_id, b, admission_b, verify, log_b, max_samples=64)

        got = Received(elements=100, bytes=400, part_hash=HASH, total=100)
        assert ledger_a.vouch("trunk", 1, {b.peer_id: got}, {b.peer_id: 10**9}) == 1  # claims far more than a round
        assert ledger_f.vouch("trunk", 1, {b.peer_id: Received(50, 200, HASH, 100)}, {}) == 1  # half; no claim
        assert await ledger_a.publish() == 1 and await ledger_f.publish() == 1
        assert await ledger_a.publish() == 0  # nothing new, stored a moment ago

        record = (await swarm_b.read(receipts_key(world.swarm_id, b.peer_id)))[a.peer_id][0]
        stored = Receipt.from_bytes(record["receipts"][0].encode())
        assert stored.samples == 64 and stored.voucher == a.peer_id and stored.peer == b.peer_id
        assert stored.total == 100 and stored.elements == 100 and stored.wire_bytes == 400
        stored.check(verify)

        assert await ledger_b.collect() == 2
        entries = {Receipt.from_bytes(e["receipt"].encode()).voucher: e for e in ledger_b.log.entries}
        assert entries[a.peer_id]["invite"] == world.invites[a.peer_id].decode()
        assert entries[founder.peer_id]["invite"] is None  # a founder is a member by its key
        assert Receipt.from_bytes(entries[founder.peer_id]["receipt"].encode()).samples == 0
        assert await ledger_b.collect() == 0 and len(ledger_b.log.entries) == 2  # nothing twice

        assert set(ledger_b.vouched) == {a.peer_id, founder.peer_id}
        from_a = ledger_b.vouched[a.peer_id]
        assert (from_a.rounds_milli, from_a.samples, from_a.receipts, from_a.through_round) == (1000, 64, 1, 1)
        from_a.check(verify)
        summary = ledger_b.summary()
        assert summary["log"] == {"receipts": 2, "head": ledger_b.log.head}
        assert {Vouch.from_bytes(v.encode()) for v in summary["vouched"]} == set(ledger_b.vouched.values())
        assert Vouch.from_bytes(summary["vouched"][0].encode()).voucher == a.peer_id  # the most-vouching first

        # B's summary: anyone reading the swarm's contribution records sees what A and the founder vouched for B.
        assert await ledger_b.publish() == 1
        seen = vouches_in(await swarm_b.read(contributions_key(world.swarm_id)), world.swarm_id, verify)
        assert seen == {b.peer_id: ledger_b.vouched}

        # A newer round: A's record is stored again and B's view of A's vouch moves on.
        clock.now += 1  # a later record of A's replaces its first one
        assert ledger_a.vouch("expert.0.1", 2, {b.peer_id: got}, {b.peer_id: 5}) == 1
        assert await ledger_a.publish() == 1
        assert await ledger_b.collect() == 1
        latest = ledger_b.vouched[a.peer_id]
        assert latest.receipts == 2 and latest.modules == ("expert.0.1", "trunk")
        assert latest.samples == 64  # experts add no samples

        # B restarts: the log comes back from disk, and what it logged before is not logged again.
        reloaded = Ledger(swarm_b, world.swarm_id, b, admission_b, verify, log_b, max_samples=64)
        assert reloaded.log.head == ledger_b.log.head == ReceiptLog(log_b).head
        assert reloaded.log.entries == ledger_b.log.entries
        assert await reloaded.collect() == 0 and len(ReceiptLog(log_b).entries) == 3

    run_network(scenario, clock)


def run_network(scenario: Any, clock: Any) -> None:
    async def main() -> None:
        network = InProcessNetwork(clock=clock)
        try:
            await scenario(network)
        finally:
            await network.close()

    asyncio.run(main())


def test_the_ledger_logs_nothing_from_strangers_or_about_others(world: World, tmp_path: Path) -> None:
    a, b, stranger = world.a, world.b, world.stranger
    log_b = str(tmp_path / LOG_NAME)

    async def scenario(network: InProcessNetwork) -> None:
        admission_b = world.admission(b)
        assert admission_b.check(a.peer_id, world.invites[a.peer_id]) is None
        swarm_a, swarm_s = network.join(a.peer_id), network.join(stranger.peer_id)
        ledger_b = Ledger(network.join(b.peer_id), world.swarm_id, b, admission_b, verify, log_b, max_samples=64)
        key = receipts_key(world.swarm_id, b.peer_id)

        # A stranger (no invite B knows of) signs a perfectly valid receipt and vouch for B.
        own = world.receipt(stranger)
        value = {"receipts": [own.to_bytes().decode()], "vouch": add(None, own).signed(stranger.public, stranger.sign)
                 .to_bytes().decode()}  # fmt: skip
        assert await swarm_s.store(key, stranger.peer_id, value, NOW + 60)
        assert await ledger_b.collect() == 0 and ledger_b.vouched == {}

        # A member's record with everything it may not put there: receipts by others, about others, elsewhere.
        forged = [
            world.receipt(stranger),  # signed by the stranger, stored by A
            world.receipt(a, signer=stranger),  # "by A", signed by the stranger
            world.receipt(a, peer=stranger),  # about someone else
            world.receipt(a, swarm=OTHER_SWARM),  # another swarm
            world.receipt(b, peer=b),  # B about itself
            dataclasses.replace(world.receipt(a), signature=b"\x00" * 64),
        ]
        value = {"receipts": [r.to_bytes().decode() for r in forged] + ["garbage", 42, None],
                 "vouch": vouch(stranger, b, swarm=world.swarm_id).to_bytes().decode()}  # fmt: skip
        assert await swarm_a.store(key, a.peer_id, value, NOW + 60)
        assert await ledger_b.collect() == 0 and ledger_b.vouched == {}
        assert not Path(log_b).exists() or ReceiptLog(log_b).entries == []

        # Garbage values under the key change nothing either.
        for n, junk in enumerate(["text", [1, 2], {"receipts": "x", "vouch": 5}, {"receipts": [{"a": 1}]}]):
            assert await swarm_a.store(key, a.peer_id, junk, NOW + 61 + n)
            assert await ledger_b.collect() == 0

        # The same record with one honest receipt: only that one is logged.
        value["receipts"].append(world.receipt(a).to_bytes().decode())
        assert await swarm_a.store(key, a.peer_id, value, NOW + 70)
        assert await ledger_b.collect() == 1
        assert [Receipt.from_bytes(e["receipt"].encode()).voucher for e in ReceiptLog(log_b).entries] == [a.peer_id]

    run_network(scenario, Clock())


# --- evidence: export and verify -------------------------------------------------------------------------------
def make_evidence(world: World, checkpoint: Path) -> Dict[str, Any]:
    """A log of receipts for B by A (two rounds of the trunk, one expert) and by the founder; its export."""
    checkpoint.mkdir(parents=True, exist_ok=True)
    invite_a = world.invites[world.a.peer_id].decode()
    log = ReceiptLog(str(checkpoint / LOG_NAME))
    log.append([
        (world.receipt(world.a, round_number=1, elements=50, total=100, samples=64).to_bytes().decode(), invite_a),
        (world.receipt(world.founder, round_number=1, elements=50, total=100, samples=64).to_bytes().decode(), None),
        (world.receipt(world.a, round_number=2, elements=100, total=100, samples=32).to_bytes().decode(), invite_a),
        (world.receipt(world.a, module="expert.0.2", round_number=2, wire_bytes=1000).to_bytes().decode(), invite_a),
    ])  # fmt: skip
    return members.export_evidence(str(checkpoint), world.manifest_path)


def write(path: Path, evidence: Dict[str, Any]) -> str:
    path.write_text(json.dumps(evidence))
    return str(path)


def test_an_export_verifies_with_the_founders_keys_alone(world: World, tmp_path: Path) -> None:
    evidence = make_evidence(world, tmp_path / "checkpoint")
    assert evidence["peer"] == world.b.peer_id and evidence["swarm_id"] == world.swarm_id
    assert evidence["founders"] == [world.founder_public] and len(evidence["entries"]) == 4
    assert evidence["log_head"] == ReceiptLog(str(tmp_path / "checkpoint" / LOG_NAME)).head
    expected = {"rounds": 2.0, "modules": ["expert.0.2", "trunk"], "samples": 96, "bytes": 2200, "receipts": 4,
                "vouchers": 2}  # fmt: skip
    assert evidence["totals"] == expected
    result = members.verify_evidence(write(tmp_path / "evidence.json", evidence), world.manifest_path)
    vouchers = {world.a.peer_id: "Org A", world.founder.peer_id: "(founder)"}
    assert result == {"ok": True, "peer": world.b.peer_id, "swarm_id": world.swarm_id, "totals": expected,
                      "vouchers": vouchers}  # fmt: skip


def test_an_empty_log_exports_and_verifies_as_nothing(world: World, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / LOG_NAME).write_text("")
    evidence = members.export_evidence(str(tmp_path / "empty"), world.manifest_path)
    assert evidence["peer"] is None and evidence["entries"] == []
    result = members.verify_evidence(write(tmp_path / "e.json", evidence), world.manifest_path)
    assert result["totals"] == Totals().as_dict() and result["vouchers"] == {}


def test_export_refuses_an_open_swarm_a_missing_log_and_a_log_of_two_peers(world: World, tmp_path: Path) -> None:
    make_evidence(world, tmp_path / "checkpoint")
    open_manifest = tmp_path / "open.yaml"
    open_manifest.write_text("name: open\n")
    assert "no founders" in one_line(members.export_evidence, str(tmp_path / "checkpoint"), str(open_manifest),
                                     error=ConfigError)  # fmt: skip
    assert "does not exist" in one_line(members.export_evidence, str(tmp_path), world.manifest_path, error=ConfigError)
    ReceiptLog(str(tmp_path / "checkpoint" / LOG_NAME)).append(
        [(world.receipt(world.a, peer=world.stranger).to_bytes().decode(), None)]
    )
    assert "2 peers" in one_line(members.export_evidence, str(tmp_path / "checkpoint"), world.manifest_path,
                                 error=ConfigError)  # fmt: skip


def _receipt_at(evidence: Dict[str, Any], index: int) -> Dict[str, Any]:
    return json.loads(evidence["entries"][index]["receipt"])


def _tamper_samples(world: World, e: Dict[str, Any]) -> None:
    data = _receipt_at(e, 0)
    data["samples"] += 1
    e["entries"][0]["receipt"] = json.dumps(data, sort_keys=True, separators=(",", ":"))


def _tamper_signature(world: World, e: Dict[str, Any]) -> None:
    data = _receipt_at(e, 2)
    data["signature"] = json.loads(e["entries"][0]["receipt"])["signature"]
    e["entries"][2]["receipt"] = json.dumps(data)


def _forged_invite(world: World, e: Dict[str, Any]) -> None:
    elsewhere = World(world.root / "elsewhere")  # another founder signs an invite for A into this swarm
    record = Invite(world.swarm_id, world.a.peer_id, "Org A", NOW, NOW + 100)
    key = read_identity(elsewhere.founder_key)
    e["entries"][0]["invite"] = record.signed(members.public_key_of(key), key.sign(record.body())).to_bytes().decode()


def _restated(change: Any) -> Any:
    """Tamper, then restate the log head as if the log had been written that way: the entry check must catch it."""

    def tamper(world: World, e: Dict[str, Any]) -> None:
        change(world, e)
        e["log_head"] = chain_head((x["receipt"], x.get("invite")) for x in e["entries"])

    return tamper


def _set_entry(index: int, make: Any) -> Any:
    def tamper(world: World, e: Dict[str, Any]) -> None:
        e["entries"][index] = make(world, e)

    return tamper


TAMPERINGS = {
    "samples raised": (_tamper_samples, "entry 1: the commons-receipt's signature does not hold"),
    "signature from another receipt": (_tamper_signature, "entry 3: the commons-receipt's signature does not hold"),
    "receipt for another peer": (
        _set_entry(
            1,
            lambda w, e: {
                "receipt": w.receipt(w.a, peer=w.stranger, round_number=7).to_bytes().decode(),
                "invite": e["entries"][0]["invite"],
            },
        ),
        "entry 2: a receipt for another peer or swarm",
    ),
    "receipt for another swarm": (
        _set_entry(
            1,
            lambda w, e: {
                "receipt": w.receipt(w.a, swarm=OTHER_SWARM, round_number=7).to_bytes().decode(),
                "invite": e["entries"][0]["invite"],
            },
        ),
        "entry 2: a receipt for another peer or swarm",
    ),
    "self-vouch": (
        _set_entry(
            1,
            lambda w, e: {
                "receipt": w.receipt(w.b, round_number=7).to_bytes().decode(),
                "invite": w.invites[w.b.peer_id].decode(),
            },
        ),
        "entry 2: a member cannot vouch for itself",
    ),
    "signed by another key": (
        _set_entry(
            1,
            lambda w, e: {
                "receipt": w.receipt(w.a, signer=w.stranger, round_number=7).to_bytes().decode(),
                "invite": e["entries"][0]["invite"],
            },
        ),
        "entry 2: signed by another key than the voucher's",
    ),
    "voucher invited by other founders": (_forged_invite, "is not a member: the invite is signed by 0 founder(s)"),
    "voucher without invite": (_set_entry(0, lambda w, e: {"receipt": e["entries"][0]["receipt"]}), "is not a member"),
    "someone else's invite": (
        _set_entry(0, lambda w, e: {"receipt": e["entries"][0]["receipt"], "invite": w.invites[w.b.peer_id].decode()}),
        "entry 1: voucher {a} is not a member: the invite is not the voucher's",
    ),
    "stranger's receipt": (
        _restated(
            lambda w, e: e["entries"].append(
                {"receipt": w.receipt(w.stranger, round_number=9).to_bytes().decode(), "invite": None}
            )
        ),
        "entry 5: voucher {stranger} is not a member",
    ),
    "duplicate receipt": (
        lambda w, e: e["entries"].append(e["entries"][0]),
        "entry 5: {a} vouched for trunk round 1 twice",
    ),
    "duplicate restated": (
        _restated(lambda w, e: e["entries"].append(e["entries"][2])),
        "entry 5: {a} vouched for trunk round 2 twice",
    ),
    "entry removed": (lambda w, e: e["entries"].pop(1), "do not chain to the stated log head"),
    "last entry removed": (lambda w, e: e["entries"].pop(), "do not chain to the stated log head"),
    "entries moved": (lambda w, e: e["entries"].reverse(), "do not chain to the stated log head"),
    "invite swapped for a newer valid one": (
        lambda w, e: e["entries"][0].update(invite=w.invite(w.a, "Org A", now=NOW + 5).decode()),
        "do not chain to the stated log head",
    ),
    "head changed": (lambda w, e: e.update(log_head="0" * 64), "do not chain to the stated log head"),
    "samples total": (lambda w, e: e["totals"].update(samples=e["totals"]["samples"] + 1), "stated totals differ"),
    "rounds total": (lambda w, e: e["totals"].update(rounds=e["totals"]["rounds"] + 0.001), "stated totals differ"),
    "totals left out": (lambda w, e: e.pop("totals"), "stated totals differ"),
    "entry not an object": (_set_entry(2, lambda w, e: 5), "entry 3: "),
    "receipt field missing": (_set_entry(2, lambda w, e: {"invite": None}), "entry 3: "),
    "receipt not a receipt": (_set_entry(2, lambda w, e: {"receipt": {"x": [1]}}), "entry 3: not JSON"),
    "swarm id": (lambda w, e: e.update(swarm_id=OTHER_SWARM), "the evidence is for swarm 'fedcba9876543210'"),
    "kind": (lambda w, e: e.update(kind="commons-receipt"), "is not a commons-evidence file"),
    "entries not a list": (lambda w, e: e.update(entries={"0": e["entries"][0]}), "is not a commons-evidence file"),
}


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
def test_each_tampering_fails_verification_with_one_line(name: str, world: World, tmp_path: Path) -> None:
    evidence = make_evidence(world, tmp_path / "checkpoint")
    tamper, expected = TAMPERINGS[name]
    changed = copy.deepcopy(evidence)
    tamper(world, changed)
    assert changed != evidence
    message = one_line(members.verify_evidence, write(tmp_path / "evidence.json", changed), world.manifest_path)
    assert expected.format(a=world.a.peer_id, stranger=world.stranger.peer_id) in message, message


def test_another_manifests_founders_do_not_verify_it(world: World, tmp_path: Path) -> None:
    path = write(tmp_path / "evidence.json", make_evidence(world, tmp_path / "checkpoint"))
    other = World(tmp_path / "other")  # the same name, another founder: another swarm
    message = one_line(members.verify_evidence, path, other.manifest_path)
    assert f"the evidence is for swarm '{world.swarm_id}', the manifest's is {other.swarm_id}" in message


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b"\xff\xfe", b"[]", b"null", b'{"kind": "commons-evidence"}', b"[" * 100_000 + b"]" * 100_000],
    ids=["empty", "text", "not-utf8", "list", "null", "no-entries", "deeply-nested"],
)
def test_a_file_that_is_no_evidence_fails_with_one_line(content: bytes, world: World, tmp_path: Path) -> None:
    path = tmp_path / "evidence.json"
    path.write_bytes(content)
    assert "evidence" in one_line(members.verify_evidence, str(path), world.manifest_path)
    assert "does not exist" in one_line(members.verify_evidence, str(tmp_path / "missing.json"), world.manifest_path)
    assert "is a directory" in one_line(members.verify_evidence, str(tmp_path), world.manifest_path)
