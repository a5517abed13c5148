"""Members-only swarms, offline: invites and revocations (protocol/membership.py), the checks a node makes of the
peers it serves (node/net/admission.py) and of its own invite (node/swarm/invites.py), founder keys and key files
(protocol/keys.py, node/net/identity.py), and the founders' tools (node/faces/members.py) on files.

Property tests throw arbitrary and mutated bytes at every parser a peer's bytes reach: nothing but a
MembershipError (parsers) or a Refusal (Admission.check) may come out. Real processes: tests/e2e/test_members_cli.py.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.errors import ConfigError, NotAMember
from node.faces import members
from node.net.admission import INVITE_MARK, REFUSAL_MARK, Admission, Refusal, read_refusal, refusal_frame
from node.net.identity import check_identity_file, read_identity, write_new_identity
from node.swarm.invites import admission_for
from protocol.keys import (
    PEER_ID_PATTERN,
    RSA,
    KeyFormatError,
    encode_key,
    founder_key_string,
    parse_founder_key,
    peer_id_of_founder,
    verify_ed25519,
)
from protocol.manifest import Manifest, ManifestError, load_manifest, parse_manifest
from protocol.membership import (
    INVITE_KIND,
    MAX_BLOB_BYTES,
    MAX_ORG_CHARS,
    MAX_TIME,
    REASONS,
    Founders,
    Invite,
    MembershipError,
    Revocation,
    Signature,
    revokes,
)

SHIPPED_SWARM_ID = "0805cf2318cd853f"
SWARM = "0123456789abcdef"
OTHER_SWARM = "fedcba9876543210"
NOW = 1_000_000
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@dataclasses.dataclass(frozen=True)
class Key:
    """An Ed25519 key as a founder or a member holds it: the private half, the founder string, the peer id."""

    private: ed25519.Ed25519PrivateKey
    founder: str
    peer_id: str

    @classmethod
    def new(cls) -> "Key":
        private = ed25519.Ed25519PrivateKey.generate()
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        founder = founder_key_string(raw)
        return cls(private, founder, peer_id_of_founder(founder))

    def sign(self, record: Any) -> Any:
        return record.signed(self.founder, self.private.sign(record.body()))


KEYS = [Key.new() for _ in range(8)]
A, B, C, STRANGER, MEMBER, OTHER_MEMBER = KEYS[:6]


def invite(peer: Key = MEMBER, *signers: Key, issued: int = 100, expires: int = 10**9, swarm: str = SWARM) -> Invite:
    record = Invite(swarm, peer.peer_id, "Example Org", issued, expires)
    for signer in signers or (A,):
        record = signer.sign(record)
    return record


def revocation(peer: Key = MEMBER, *signers: Key, issued: int = 100, swarm: str = SWARM) -> Revocation:
    record = Revocation(swarm, peer.peer_id, issued)
    for signer in signers or (A,):
        record = signer.sign(record)
    return record


def reason_of(call: Any, *args: Any) -> str:
    with pytest.raises(MembershipError) as info:
        call(*args)
    assert info.value.reason in REASONS
    return info.value.reason


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@functools.lru_cache(maxsize=None)
def fuzz_admission() -> Admission:
    """One admission for the property tests (each Admission allocates a shared counter array)."""
    return Admission(Founders((A.founder, B.founder), 1), SWARM, None, clock=lambda: NOW)


# --- strategies ------------------------------------------------------------------------------------------------
SWARM_IDS = st.text("0123456789abcdef", min_size=16, max_size=16)
PEER_IDS = st.sampled_from([k.peer_id for k in KEYS]) | st.text(B58, min_size=40, max_size=128)
PRINTABLE = st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")) | st.just(" ")
ORGS = st.text(PRINTABLE, min_size=1, max_size=MAX_ORG_CHARS).filter(str.isprintable)
TIMES = st.integers(0, MAX_TIME - 1)
SIGNATURES = st.lists(
    st.builds(Signature, st.sampled_from([k.founder for k in KEYS]), st.binary(min_size=64, max_size=64)), max_size=4
).map(tuple)
INVITES = st.builds(Invite, SWARM_IDS, PEER_IDS, ORGS, TIMES, TIMES, SIGNATURES)
REVOCATIONS = st.builds(Revocation, SWARM_IDS, PEER_IDS, TIMES, SIGNATURES)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
WRONG = JSON | st.sampled_from([True, False, -1, 2**40, 2**63, 10**100, 1.5, "", "x" * 5000, [], {}])


def parsed_or_malformed(blob: Any) -> None:
    """Both parsers: a record or a MembershipError("malformed"), never another exception."""
    for kind in (Invite, Revocation):
        try:
            kind.from_bytes(blob)
        except MembershipError as e:
            assert e.reason == "malformed", e
            assert "\n" not in str(e)


def checked(peer_id: str, blob: Optional[bytes]) -> Optional[Refusal]:
    refusal = fuzz_admission().check(peer_id, blob)
    assert refusal is None or (isinstance(refusal, Refusal) and refusal.reason in REASONS), refusal
    return refusal


# --- round trips -------------------------------------------------------------------------------------------------
@PROPERTY
@given(INVITES)
def test_any_valid_invite_round_trips(record: Invite) -> None:
    blob = record.to_bytes()
    assert len(blob) <= MAX_BLOB_BYTES
    assert Invite.from_bytes(blob) == record
    assert Invite.from_bytes(blob).to_bytes() == blob  # canonical
    assert reason_of(Revocation.from_bytes, blob) == "malformed"  # one kind is never read as the other


@PROPERTY
@given(REVOCATIONS)
def test_any_valid_revocation_round_trips(record: Revocation) -> None:
    blob = record.to_bytes()
    assert Revocation.from_bytes(blob) == record
    assert Revocation.from_bytes(blob).to_bytes() == blob
    assert reason_of(Invite.from_bytes, blob) == "malformed"


def test_real_signatures_survive_the_round_trip() -> None:
    record = invite(MEMBER, A, B)
    again = Invite.from_bytes(record.to_bytes())
    assert Founders((A.founder, B.founder), 2).signers(again.body(), again.signatures) == (A.founder, B.founder)


# --- hostile bytes ----------------------------------------------------------------------------------------------
@PROPERTY
@given(st.binary(max_size=600))
def test_arbitrary_bytes_are_malformed_or_refused(blob: bytes) -> None:
    parsed_or_malformed(blob)
    parsed_or_malformed(INVITE_MARK + blob)
    assert checked(MEMBER.peer_id, blob) is not None


@PROPERTY
@given(JSON)
def test_arbitrary_json_is_malformed_or_refused(value: Any) -> None:
    blob = json.dumps(value).encode()
    parsed_or_malformed(blob)
    assert checked(MEMBER.peer_id, blob) is not None


def _field(valid: Any) -> Any:
    return st.one_of(st.just(valid), WRONG)


@PROPERTY
@given(
    st.fixed_dictionaries(
        {
            "kind": _field(INVITE_KIND),
            "format": _field(1),
            "swarm_id": _field(SWARM),
            "peer_id": _field(MEMBER.peer_id),
            "org": _field("org"),
            "issued": _field(1),
            "expires": _field(10**9),
            "signatures": st.one_of(
                st.just([]),
                WRONG,
                st.lists(
                    st.fixed_dictionaries({"founder": _field(A.founder), "signature": _field("A" * 86 + "==")}),
                    max_size=3,
                ),
            ),
        },
        optional={"extra": JSON, "issued ": JSON},
    )
)
def test_invite_shaped_json_with_wrong_values_never_escapes(data: Dict[str, Any]) -> None:
    blob = json.dumps(data).encode()
    parsed_or_malformed(blob)
    assert checked(MEMBER.peer_id, blob) is not None  # no valid signature anywhere


def _mutations(original: bytes) -> st.SearchStrategy[bytes]:
    tree = json.loads(original)
    fields = sorted(tree)

    def replaced(name_value: Tuple[str, Any]) -> bytes:
        name, value = name_value
        return json.dumps({**tree, name: value}).encode()

    def signature_replaced(name_value: Tuple[str, Any]) -> bytes:
        name, value = name_value
        signatures = [dict(item) for item in tree["signatures"]]
        signatures[0][name] = value
        return json.dumps({**tree, "signatures": signatures}).encode()

    return st.one_of(
        st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(0, 7)), min_size=1, max_size=8).map(
            lambda flips: functools.reduce(_flip, flips, original)
        ),
        st.integers(0, len(original) - 1).map(lambda n: original[:n]),
        st.sampled_from(fields).map(lambda name: json.dumps({k: v for k, v in tree.items() if k != name}).encode()),
        st.tuples(st.sampled_from(fields), WRONG).map(replaced),
        st.tuples(
            st.sampled_from(["issued", "expires"]),
            st.sampled_from([True, False, -1, MAX_TIME, 2**64, 10**300, 1.0, 1e308, "1", None]),
        ).map(replaced),
        st.tuples(st.text(min_size=1, max_size=10), JSON).map(replaced),  # an extra field, or a field replaced
        st.tuples(st.sampled_from(["founder", "signature"]), WRONG).map(signature_replaced),
        st.binary(min_size=1, max_size=64).map(lambda tail: original + tail),
        st.just(original + b" " * MAX_BLOB_BYTES),  # too large
    )


def _flip(blob: bytes, at_bit: Tuple[int, int]) -> bytes:
    out = bytearray(blob)
    out[at_bit[0] % len(out)] ^= 1 << at_bit[1]
    return bytes(out)


VALID = invite(MEMBER, A)


@PROPERTY
@given(_mutations(VALID.to_bytes()))
def test_a_mutated_invite_is_malformed_or_refused_unless_what_was_signed_is_intact(blob: bytes) -> None:
    parsed_or_malformed(blob)
    refusal = checked(MEMBER.peer_id, blob)
    if refusal is None:  # e.g. a flipped bit in base64 padding that decodes to the same signature
        assert Invite.from_bytes(blob).body() == VALID.body()


@PROPERTY
@given(_mutations(revocation(MEMBER, A).to_bytes()))
def test_a_mutated_revocation_is_malformed_or_refused_by_add_revocation(blob: bytes) -> None:
    parsed_or_malformed(blob)
    admission = fuzz_admission()
    try:
        added = admission.add_revocation(blob)
    except MembershipError as e:
        assert e.reason in REASONS
    else:
        assert added is None or added.body() == revocation(MEMBER, A).body()


def test_deeply_nested_json_is_malformed_at_every_depth() -> None:
    """json and repr both recurse: no nesting depth (within MAX_BLOB_BYTES) may escape as RecursionError."""
    for depth in range(0, MAX_BLOB_BYTES // 2 - 20, 7):
        nested = "[" * depth + "]" * depth
        for blob in (nested, f'{{"kind":{nested}}}', f'{{"kind":"{INVITE_KIND}","format":{nested}}}'):
            parsed_or_malformed(blob.encode())
            assert checked(MEMBER.peer_id, blob.encode()) is not None


@PROPERTY
@given(INVITES, st.sampled_from(Invite.FIELDS), st.data())
def test_any_field_changed_after_signing_is_wrong_signer(record: Invite, name: str, data: st.DataObject) -> None:
    founders = Founders((A.founder, B.founder), 1)
    signed = A.sign(dataclasses.replace(record, signatures=()))
    strategy = {"swarm_id": SWARM_IDS, "peer_id": PEER_IDS, "org": ORGS, "issued": TIMES, "expires": TIMES}[name]
    value = data.draw(strategy.filter(lambda v: v != getattr(record, name)))
    tampered = Invite.from_bytes(dataclasses.replace(signed, **{name: value}).to_bytes())
    now = min(tampered.expires, signed.expires)  # never expired, for both
    founders.check_invite(signed, signed.swarm_id, signed.peer_id, now)
    assert reason_of(founders.check_invite, tampered, tampered.swarm_id, tampered.peer_id, now) == "wrong_signer"


def test_a_tampered_signature_or_a_signature_moved_to_another_founder_is_wrong_signer() -> None:
    founders = Founders((A.founder, B.founder), 1)
    (good,) = VALID.signatures
    flipped = bytes([good.signature[0] ^ 1]) + good.signature[1:]
    for signatures in [(Signature(A.founder, flipped),), (Signature(B.founder, good.signature),), ()]:
        record = dataclasses.replace(VALID, signatures=signatures)
        assert reason_of(founders.check_invite, record, SWARM, MEMBER.peer_id, NOW) == "wrong_signer"


# --- founders ---------------------------------------------------------------------------------------------------
THREE = Founders((A.founder, B.founder, C.founder), 2)


def test_two_of_three_needs_two_distinct_founders() -> None:
    THREE.check_invite(invite(MEMBER, A, B), SWARM, MEMBER.peer_id, NOW)
    THREE.check_invite(invite(MEMBER, C, A), SWARM, MEMBER.peer_id, NOW)
    assert reason_of(THREE.check_invite, invite(MEMBER, A), SWARM, MEMBER.peer_id, NOW) == "wrong_signer"
    (only,) = invite(MEMBER, A).signatures
    twice = dataclasses.replace(invite(MEMBER, A), signatures=(only, only))
    assert THREE.signers(twice.body(), twice.signatures) == (A.founder,)  # one founder counts once
    assert reason_of(THREE.check_invite, twice, SWARM, MEMBER.peer_id, NOW) == "wrong_signer"
    with_stranger = invite(MEMBER, A, STRANGER)  # a key the manifest does not list counts zero
    assert THREE.signers(with_stranger.body(), with_stranger.signatures) == (A.founder,)
    assert reason_of(THREE.check_invite, with_stranger, SWARM, MEMBER.peer_id, NOW) == "wrong_signer"
    assert reason_of(THREE.check_revocation, revocation(MEMBER, A), SWARM) == "wrong_signer"
    THREE.check_revocation(revocation(MEMBER, A, B), SWARM)


def test_signing_again_replaces_a_founders_signature() -> None:
    record = A.sign(A.sign(Invite(SWARM, MEMBER.peer_id, "org", 1, 2)))
    assert [s.founder for s in record.signatures] == [A.founder]


def test_invite_checks_name_the_problem() -> None:
    founders = Founders((A.founder,), 1)
    record = invite(MEMBER, A, expires=NOW)
    founders.check_invite(record, SWARM, MEMBER.peer_id, NOW)  # the last second still admits
    assert reason_of(founders.check_invite, record, SWARM, MEMBER.peer_id, NOW + 1) == "expired"
    assert reason_of(founders.check_invite, record, SWARM, MEMBER.peer_id, float("nan")) == "expired"
    assert reason_of(founders.check_invite, record, OTHER_SWARM, MEMBER.peer_id, NOW) == "wrong_swarm"
    assert reason_of(founders.check_invite, record, SWARM, OTHER_MEMBER.peer_id, NOW) == "wrong_peer"
    assert reason_of(founders.check_revocation, revocation(swarm=OTHER_SWARM), SWARM) == "wrong_swarm"
    assert reason_of(Founders((B.founder,), 1).check_invite, record, SWARM, MEMBER.peer_id, NOW) == "wrong_signer"


def test_revokes_invites_issued_at_or_before_it() -> None:
    assert revokes(revocation(issued=100), invite(issued=99))
    assert revokes(revocation(issued=100), invite(issued=100))
    assert not revokes(revocation(issued=100), invite(issued=101))
    assert not revokes(revocation(OTHER_MEMBER, issued=100), invite(MEMBER, issued=1))


def test_founder_keys_and_peer_ids() -> None:
    assert parse_founder_key(A.founder) == bytes.fromhex(A.founder[len("ed25519:") :])
    assert PEER_ID_PATTERN.match(A.peer_id) and A.peer_id.startswith("12D3KooW")
    for bad in ["", "ed25519:", "ed25519:" + "A" * 64, "ed25519:" + "a" * 63, "rsa:" + "a" * 64, A.founder + "0", None]:
        with pytest.raises(KeyFormatError):
            parse_founder_key(bad)  # type: ignore[arg-type]
    raw = parse_founder_key(A.founder)
    assert verify_ed25519(raw, b"m", A.private.sign(b"m"))
    assert not verify_ed25519(raw, b"n", A.private.sign(b"m"))
    assert not verify_ed25519(raw, b"m", b"short")
    assert not verify_ed25519(b"\x00" * 3, b"m", A.private.sign(b"m"))


@pytest.mark.parametrize(
    "membership, expected",
    [
        ("{founders: [ed25519:xyz]}", "founder key"),
        (f"{{founders: [{A.founder.upper()}]}}", "founder key"),
        (f"{{founders: [{A.founder}, {A.founder}]}}", "distinct"),
        (f"{{founders: [{A.founder}], threshold: 0}}", "threshold"),
        (f"{{founders: [{A.founder}, {B.founder}], threshold: 3}}", "threshold"),
        (f"{{founders: [{A.founder}], threshold: true}}", "threshold"),
        (f"{{founders: {A.founder}}}", "founders"),
        ("{founders: [1]}", "founders"),
        (f"{{founders: [{A.founder}], members: 2}}", "membership.members"),
    ],
)
def test_founders_list_is_checked_when_the_manifest_is_parsed(membership: str, expected: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(f"name: members\nmembership: {membership}\n")
    assert "membership" in str(info.value) and expected in str(info.value)
    assert "\n" not in str(info.value)


def test_founders_refuse_bad_rules_directly() -> None:
    with pytest.raises(KeyFormatError):
        Founders((A.founder, A.founder), 1)
    with pytest.raises(KeyFormatError):
        Founders((A.founder,), 2)
    assert not Founders().members_only and Founders((A.founder,)).members_only
    assert Founders((A.founder, B.founder)).founder_peer_ids() == {A.peer_id: A.founder, B.peer_id: B.founder}


# --- manifest -------------------------------------------------------------------------------------------------
def test_founders_change_the_swarm_id_and_a_default_membership_does_not() -> None:
    assert load_manifest().swarm_id == Manifest().swarm_id == SHIPPED_SWARM_ID
    for default in ("membership: {}", "membership: {founders: []}", "membership: {founders: [], threshold: 1}"):
        assert parse_manifest(default).swarm_id == SHIPPED_SWARM_ID, default
    one = parse_manifest(f"membership: {{founders: [{A.founder}]}}")
    two = parse_manifest(f"membership: {{founders: [{A.founder}, {B.founder}]}}")
    two_of_two = parse_manifest(f"membership: {{founders: [{A.founder}, {B.founder}], threshold: 2}}")
    other = parse_manifest(f"membership: {{founders: [{B.founder}]}}")
    ids = {SHIPPED_SWARM_ID, one.swarm_id, two.swarm_id, two_of_two.swarm_id, other.swarm_id}
    assert len(ids) == 5
    assert one.membership.rules() == Founders((A.founder,), 1)
    assert two_of_two.membership.rules().threshold == 2


# --- admission ------------------------------------------------------------------------------------------------
def _admission(clock: Optional[FakeClock] = None, own: Optional[bytes] = None, threshold: int = 1) -> Admission:
    return Admission(Founders((A.founder, B.founder), threshold), SWARM, own, clock or FakeClock())


def test_a_founder_is_admitted_without_an_invite_and_others_need_one() -> None:
    admission = _admission()
    assert admission.serves
    for founder in (A, B):
        assert admission.check(founder.peer_id, None) is None
        assert admission.still_admitted(founder.peer_id) is None
        assert admission.known_refusal(founder.peer_id) is None
    for nothing in (None, b""):
        refusal = admission.check(MEMBER.peer_id, nothing)
        assert refusal is not None and refusal.reason == "no_invite" and "invite" in refusal.message
    assert admission.still_admitted(MEMBER.peer_id).reason == "no_invite"  # type: ignore[union-attr]
    assert admission.known_refusal(MEMBER.peer_id) is None  # nothing against a peer we do not know


def test_admission_refusals_name_the_reason() -> None:
    admission = _admission()
    cases = {
        "wrong_peer": (OTHER_MEMBER, invite(MEMBER, A)),
        "expired": (MEMBER, invite(MEMBER, A, expires=NOW - 1)),
        "wrong_signer": (MEMBER, invite(MEMBER, STRANGER)),
        "malformed": (MEMBER, b"{not json"),
    }
    for reason, (peer, record) in cases.items():
        blob = record if isinstance(record, bytes) else record.to_bytes()
        refusal = admission.check(peer.peer_id, blob)
        assert refusal is not None and refusal.reason == reason, (reason, refusal)
    # Another swarm's invite, signed by this swarm's founders, is told apart from a forgery.
    refusal = admission.check(MEMBER.peer_id, invite(MEMBER, A, swarm=OTHER_SWARM).to_bytes())
    assert refusal is not None and refusal.reason == "wrong_swarm"


def test_admitted_then_expired_with_the_clock() -> None:
    clock = FakeClock(NOW)
    admission = _admission(clock)
    record = invite(MEMBER, A, expires=NOW + 60)
    assert admission.check(MEMBER.peer_id, record.to_bytes()) is None
    assert admission.still_admitted(MEMBER.peer_id) is None
    assert admission.known_refusal(MEMBER.peer_id) is None
    assert admission.organisation(MEMBER.peer_id) == "Example Org"
    clock.now = NOW + 60
    assert admission.still_admitted(MEMBER.peer_id) is None
    clock.now = NOW + 61
    assert admission.still_admitted(MEMBER.peer_id).reason == "expired"  # type: ignore[union-attr]
    assert admission.known_refusal(MEMBER.peer_id).reason == "expired"  # type: ignore[union-attr]
    assert admission.check(MEMBER.peer_id, record.to_bytes()).reason == "expired"  # type: ignore[union-attr]


def test_a_revocation_voids_invites_issued_at_or_before_it_but_not_a_later_one() -> None:
    admission = _admission()
    old, same, later = (invite(MEMBER, A, issued=t) for t in (50, 100, 101))
    assert admission.check(MEMBER.peer_id, old.to_bytes()) is None
    revoked = revocation(MEMBER, B, issued=100)
    assert admission.add_revocation(revoked.to_bytes()) == revoked
    assert admission.add_revocation(revoked.to_bytes()) is None  # not new
    assert admission.add_revocation(revocation(MEMBER, A, issued=99).to_bytes()) is None  # older
    assert admission.revocations() == [revoked.to_bytes()]
    for record in (old, same):
        refusal = admission.check(MEMBER.peer_id, record.to_bytes())
        assert refusal is not None and refusal.reason == "revoked" and refusal.revocation == revoked.to_bytes()
    assert admission.still_admitted(MEMBER.peer_id).reason == "revoked"  # type: ignore[union-attr]
    assert admission.known_refusal(MEMBER.peer_id).reason == "revoked"  # type: ignore[union-attr]
    assert admission.check(MEMBER.peer_id, later.to_bytes()) is None  # invited again
    assert admission.still_admitted(MEMBER.peer_id) is None
    assert admission.known_refusal(MEMBER.peer_id) is None
    assert admission.check(OTHER_MEMBER.peer_id, invite(OTHER_MEMBER, A).to_bytes()) is None  # others unaffected


def test_known_refusal_of_a_revoked_peer_never_seen() -> None:
    admission = _admission()
    revoked = revocation(MEMBER, A)
    admission.add_revocation(revoked.to_bytes())
    refusal = admission.known_refusal(MEMBER.peer_id)
    assert refusal is not None and refusal.reason == "revoked" and Revocation.from_bytes(refusal.revocation) == revoked


def test_add_revocation_refuses_what_the_founders_did_not_sign() -> None:
    admission = _admission(threshold=2)
    assert reason_of(admission.add_revocation, revocation(MEMBER, STRANGER).to_bytes()) == "wrong_signer"
    assert reason_of(admission.add_revocation, revocation(MEMBER, A).to_bytes()) == "wrong_signer"  # one of two
    assert reason_of(admission.add_revocation, revocation(MEMBER, A, B, swarm=OTHER_SWARM).to_bytes()) == "wrong_swarm"
    assert reason_of(admission.add_revocation, b"garbage") == "malformed"
    assert admission.revocations() == []
    assert admission.add_revocation(revocation(MEMBER, A, B).to_bytes()) is not None


def test_revokes_me() -> None:
    own = invite(MEMBER, A, issued=100).to_bytes()
    admission = _admission(own=own)
    assert admission.preamble() == INVITE_MARK + own
    admission.add_revocation(revocation(MEMBER, A, issued=99).to_bytes())
    assert admission.revokes_me(MEMBER.peer_id) is None
    admission.add_revocation(revocation(MEMBER, A, issued=100).to_bytes())
    assert admission.revokes_me(MEMBER.peer_id) is not None
    assert admission.revokes_me(OTHER_MEMBER.peer_id) is None
    assert _admission().revokes_me(MEMBER.peer_id) is None  # a founder has no invite to lose


def test_an_admission_without_founders_only_presents_an_invite() -> None:
    own = invite().to_bytes()
    admission = Admission(None, SWARM, own)
    assert not admission.serves and admission.preamble() == INVITE_MARK + own
    assert admission.check(STRANGER.peer_id, None) is None
    assert admission.add_revocation(b"anything") is None


def test_signatures_are_checked_once_per_invite(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: List[int] = []
    signers = Founders.signers

    def counting(self: Founders, body: bytes, signatures: Any) -> Tuple[str, ...]:
        calls.append(1)
        return signers(self, body, signatures)

    monkeypatch.setattr(Founders, "signers", counting)
    clock = FakeClock()
    admission = _admission(clock)
    blob = invite(MEMBER, A, expires=NOW + 10).to_bytes()
    for _ in range(20):
        assert admission.check(MEMBER.peer_id, blob) is None
    assert len(calls) == 1, f"{len(calls)} signature checks for 20 requests with one invite"
    forged = invite(MEMBER, STRANGER).to_bytes()
    for _ in range(5):
        assert admission.check(MEMBER.peer_id, forged).reason == "wrong_signer"  # type: ignore[union-attr]
    assert len(calls) == 2
    clock.now = NOW + 11  # expiry is still checked on every request
    assert admission.check(MEMBER.peer_id, blob).reason == "expired"  # type: ignore[union-attr]


def test_refusals_are_counted_by_request_and_reason() -> None:
    admission = _admission()
    refusal = admission.check(MEMBER.peer_id, None)
    assert refusal is not None
    admission.count("hello", MEMBER.peer_id, refusal)
    admission.count("hello", MEMBER.peer_id, refusal)
    admission.count_dht("expired")
    assert admission.refusals() == {("hello", "no_invite"): 2, ("dht", "expired"): 1}


# --- refusal frames ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attached", [None, revocation().to_bytes()])
def test_refusal_frames_round_trip(attached: Optional[bytes]) -> None:
    for reason in REASONS:
        refusal = Refusal(reason, f"because {reason}", attached)
        frame = refusal_frame(refusal)
        assert frame.startswith(REFUSAL_MARK)
        assert read_refusal(frame) == refusal
    assert read_refusal(b"\x00\x00\x00\x10an ordinary response") is None
    assert read_refusal(b"") is None


@PROPERTY
@given(st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
def test_garbage_after_the_refusal_mark_is_a_malformed_refusal(tail: bytes) -> None:
    refusal = read_refusal(REFUSAL_MARK + tail)
    assert refusal is not None and refusal.reason in REASONS
    assert isinstance(refusal.message, str) and len(refusal.message) <= 1000 and refusal.message.isprintable()


def test_a_refusal_message_from_a_peer_is_one_printable_line() -> None:
    """It ends up in `node: error: the swarm refused this node (…): <message>` on the refused node's terminal."""
    refusal = read_refusal(refusal_frame(Refusal("revoked", "line one\nline two \x1b[2J\x07 ok")))
    assert refusal is not None and refusal.reason == "revoked"
    assert refusal.message == "line one?line two ?[2J? ok"


@pytest.mark.parametrize(
    "tail",
    [
        b"garbage",
        b"\xff\xfe",
        b"[]",
        b'"text"',
        b"null",
        b'{"reason": "no_invite"}',
        b'{"reason": "because", "message": "m"}',
        b'{"reason": ["no_invite"], "message": "m"}',
        b'{"reason": "revoked", "message": "m", "revocation": "not base64!"}',
        b'{"reason": "revoked", "message": "m", "revocation": 12}',
        b"[" * 20000,
        b'{"reason": "revoked", "message": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
def test_an_unreadable_refusal_still_refuses_as_malformed(tail: bytes) -> None:
    refusal = read_refusal(REFUSAL_MARK + tail)
    assert refusal is not None and refusal.reason == "malformed", refusal


# --- key files --------------------------------------------------------------------------------------------------
def test_a_new_identity_is_its_owners_alone(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    old = os.umask(0)
    try:
        identity = write_new_identity(str(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_identity(str(path)).peer_id == identity.peer_id
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]  # no temporary file left behind
    check_identity_file(str(path))


@pytest.mark.parametrize("mode, who", [(0o644, "others"), (0o640, "its group"), (0o604, "others"), (0o660, "group")])
def test_a_key_others_can_read_is_refused(tmp_path: Path, mode: int, who: str) -> None:
    original = tmp_path / "node.key"
    write_new_identity(str(original))
    copy = tmp_path / "copy.key"
    shutil.copyfile(original, copy)
    os.chmod(copy, mode)
    for call in (check_identity_file, read_identity):
        with pytest.raises(ConfigError) as info:
            call(str(copy))
        message = str(info.value)
        assert "chmod 600" in message and str(copy) in message and who in message and "\n" not in message


def test_keygen_writes_a_private_key_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "founder.key"
    made = members.keygen(str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert made["path"] == str(out) and PEER_ID_PATTERN.match(made["peer_id"])
    assert peer_id_of_founder(made["public_key"]) == made["peer_id"] == read_identity(str(out)).peer_id
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        members.keygen(str(out))
    assert out.read_bytes() == before
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="already exists"):
        members.keygen(str(tmp_path / "dangling"))
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        members.keygen(str(tmp_path / "no-such-dir" / "k.key"))


# --- a node's own invite, offline ---------------------------------------------------------------------------------
class Swarm:
    """A members-only manifest on disk, its founders' key files, and a member's key file."""

    def __init__(self, root: Path, founders: int = 1, threshold: int = 1) -> None:
        self.root = root
        self.founder_keys = [str(root / f"founder{i}.key") for i in range(founders)]
        self.founders = [members.keygen(path)["public_key"] for path in self.founder_keys]
        self.manifest_path = str(root / "manifest.yaml")
        Path(self.manifest_path).write_text(
            f"name: members-test\nmembership: {{founders: [{', '.join(self.founders)}], threshold: {threshold}}}\n"
        )
        self.manifest = load_manifest(self.manifest_path)
        self.member_key = str(root / "member.key")
        self.member = members.keygen(self.member_key)["peer_id"]

    def invite(self, name: str = "invite.json", founder: int = 0, **kwargs: Any) -> Dict[str, Any]:
        args: Dict[str, Any] = {"peer_id": self.member, "org": "Org", "expires": "30d", "now": NOW}
        args.update(kwargs)
        return members.invite(self.manifest_path, self.founder_keys[founder], args.pop("peer_id"), args.pop("org"),
                              args.pop("expires"), str(self.root / name), **args)  # fmt: skip

    def admission(self, invite_path: Optional[str], identity: Optional[str] = None, now: float = NOW) -> Any:
        identity = self.member_key if identity is None else identity
        return admission_for(self.manifest, self.manifest.swarm_id, identity, invite_path, clock=lambda: now)


def _not_a_member(call: Any) -> str:
    with pytest.raises(NotAMember) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 7
    return message


def test_admission_for_accepts_a_valid_invite_and_a_founder(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path)
    swarm.invite()
    path = str(tmp_path / "invite.json")
    admission = swarm.admission(path)
    assert isinstance(admission, Admission) and admission.serves
    assert admission.own_invite == Path(path).read_bytes()
    founder = swarm.admission(None, identity=swarm.founder_keys[0])
    assert isinstance(founder, Admission) and founder.own_invite is None and founder.serves
    assert founder.check(swarm.member, admission.own_invite) is None  # the founder admits the member


def test_admission_for_an_open_swarm_is_none(tmp_path: Path) -> None:
    manifest = Manifest()
    assert admission_for(manifest, manifest.swarm_id, None, None) is None
    assert admission_for(manifest, manifest.swarm_id, str(tmp_path / "nothing.key"), str(tmp_path / "x")) is None


def test_admission_for_names_each_problem_in_one_line(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path)
    assert "--identity" in _not_a_member(lambda: swarm.admission(None, identity=""))
    assert "--identity" in _not_a_member(lambda: swarm.admission(None, identity=str(tmp_path / "missing.key")))
    message = _not_a_member(lambda: swarm.admission(None))
    assert "no invite" in message and swarm.member in message

    swarm.invite("good.json", expires="1h")
    expired = _not_a_member(lambda: swarm.admission(str(tmp_path / "good.json"), now=NOW + 3601))
    assert "expired" in expired and "good.json" in expired

    other = members.keygen(str(tmp_path / "other.key"))["peer_id"]
    swarm.invite("other.json", peer_id=other)
    assert "admits peer " + other in _not_a_member(lambda: swarm.admission(str(tmp_path / "other.json")))

    (tmp_path / "elsewhere").mkdir()
    elsewhere = Swarm(tmp_path / "elsewhere")
    record = Invite(elsewhere.manifest.swarm_id, swarm.member, "Org", NOW, NOW + 100)
    (tmp_path / "elsewhere.json").write_bytes(_sign_with_file(record, elsewhere.founder_keys[0]).to_bytes())
    assert "is for swarm" in _not_a_member(lambda: swarm.admission(str(tmp_path / "elsewhere.json")))

    forged = Invite(swarm.manifest.swarm_id, swarm.member, "Org", NOW, NOW + 100)
    (tmp_path / "forged.json").write_bytes(_sign_with_file(forged, elsewhere.founder_keys[0]).to_bytes())
    assert "signed by 0 founder(s)" in _not_a_member(lambda: swarm.admission(str(tmp_path / "forged.json")))

    (tmp_path / "garbage.json").write_bytes(b"not an invite")
    assert "malformed" in _not_a_member(lambda: swarm.admission(str(tmp_path / "garbage.json")))
    with pytest.raises(ConfigError, match="does not exist"):
        swarm.admission(str(tmp_path / "missing.json"))


def _sign_with_file(record: Any, key_path: str) -> Any:
    identity = read_identity(key_path)
    return record.signed(members.public_key_of(identity), identity.sign(record.body()))


# --- the founders' tools, offline -------------------------------------------------------------------------------
def test_invite_writes_a_signed_invite(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path)
    result = swarm.invite(expires="2w")
    out = tmp_path / "invite.json"
    assert result == {"invite": str(out), "swarm_id": swarm.manifest.swarm_id, "peer_id": swarm.member, "org": "Org",
                      "expires": NOW + 14 * 86400, "signatures": 1, "threshold": 1, "complete": True}  # fmt: skip
    record = Invite.from_bytes(out.read_bytes().strip())
    assert record.issued == NOW and record.peer_id == swarm.member
    swarm.manifest.membership.rules().check_invite(record, swarm.manifest.swarm_id, swarm.member, NOW)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_countersigning_completes_an_invite_at_the_threshold(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path, founders=3, threshold=2)
    first = swarm.invite("one.json", founder=0)
    assert first["signatures"] == 1 and first["threshold"] == 2 and first["complete"] is False
    one = str(tmp_path / "one.json")
    assert "signed by 1 founder(s)" in _not_a_member(lambda: swarm.admission(one))
    again = swarm.invite("one.json", founder=0, countersign=one)  # the same founder counts once
    assert again["signatures"] == 1 and again["complete"] is False
    second = swarm.invite("two.json", founder=2, countersign=one, peer_id=None, org=None, expires=None)
    assert second["signatures"] == 2 and second["complete"] is True and second["peer_id"] == swarm.member
    assert swarm.admission(str(tmp_path / "two.json")) is not None


def test_invite_refuses_what_it_cannot_sign(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path)
    stranger_key = str(tmp_path / "stranger.key")
    members.keygen(stranger_key)
    with pytest.raises(ConfigError, match="not one of the manifest's founders"):
        members.invite(swarm.manifest_path, stranger_key, swarm.member, "Org", "30d", str(tmp_path / "x.json"))
    open_manifest = tmp_path / "open.yaml"
    open_manifest.write_text("name: open\n")
    with pytest.raises(ConfigError, match="names no founders"):
        members.invite(str(open_manifest), swarm.founder_keys[0], swarm.member, "Org", "30d", str(tmp_path / "x.json"))
    with pytest.raises(ConfigError, match="names no founders"):
        members.invite(None, swarm.founder_keys[0], swarm.member, "Org", "30d", str(tmp_path / "x.json"))
    for kwargs, expected in [
        ({"peer_id": "not-a-peer-id"}, "--peer-id"),
        ({"org": ""}, "--peer-id, --org and --expires"),
        ({"org": "x" * (MAX_ORG_CHARS + 1)}, "--org"),
        ({"org": "line\nbreak"}, "--org"),
        ({"expires": "forever"}, "--expires"),
        ({"expires": None}, "--peer-id, --org and --expires"),
        ({"countersign": str(tmp_path / "missing.json")}, "does not exist"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            swarm.invite("x.json", **kwargs)
    assert not (tmp_path / "x.json").exists()
    readable = tmp_path / "readable.key"
    shutil.copyfile(swarm.founder_keys[0], readable)
    os.chmod(readable, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        members.invite(swarm.manifest_path, str(readable), swarm.member, "Org", "30d", str(tmp_path / "x.json"))


def test_countersign_refuses_another_swarms_invite_and_garbage(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    elsewhere = Swarm(tmp_path / "elsewhere")
    elsewhere.invite("theirs.json")
    with pytest.raises(ConfigError, match="is for swarm"):
        swarm.invite("x.json", countersign=str(tmp_path / "elsewhere" / "theirs.json"))
    (tmp_path / "garbage.json").write_text("{}")
    with pytest.raises(ConfigError, match="malformed"):
        swarm.invite("x.json", countersign=str(tmp_path / "garbage.json"))


def test_an_rsa_key_cannot_be_a_founders(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())  # fmt: skip
    path = tmp_path / "rsa.key"
    path.write_bytes(encode_key(RSA, der))
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="Ed25519"):
        members.public_key_of(read_identity(str(path)))


def test_revoke_offline_writes_a_signed_revocation(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path, founders=2, threshold=2)
    out = tmp_path / "revocation.json"
    result = members.revoke(swarm.manifest_path, swarm.founder_keys[0], swarm.member, str(out), [], 5.0)
    assert set(result) == {"revoked", "swarm_id", "issued", "signatures", "threshold", "revocation", "published"}
    assert result["revoked"] == swarm.member and result["swarm_id"] == swarm.manifest.swarm_id
    assert result["signatures"] == 1 and result["threshold"] == 2 and result["published"] is False
    assert result["revocation"] == str(out)
    record = Revocation.from_bytes(out.read_bytes().strip())
    assert record.issued == result["issued"]
    rules = swarm.manifest.membership.rules()
    with pytest.raises(MembershipError):
        rules.check_revocation(record, swarm.manifest.swarm_id)
    done = members.revoke(swarm.manifest_path, swarm.founder_keys[1], None, str(out), [], 5.0, countersign=str(out))
    assert done["signatures"] == 2 and done["published"] is False  # no --initial-peers: nothing to publish to
    rules.check_revocation(Revocation.from_bytes(out.read_bytes().strip()), swarm.manifest.swarm_id)
    unsaved = members.revoke(swarm.manifest_path, swarm.founder_keys[0], swarm.member, None, [], 5.0)
    assert unsaved["revocation"] is None
    with pytest.raises(ConfigError, match="--peer-id"):
        members.revoke(swarm.manifest_path, swarm.founder_keys[0], None, None, [], 5.0)


@pytest.mark.parametrize(
    "text, seconds",
    [("30d", 30 * 86400), ("12h", 12 * 3600), ("90m", 90 * 60), ("3600s", 3600), ("2w", 14 * 86400), ("3600", 3600),
     (" 1d ", 86400), ("1.5h", 5400), ("3650d", 3650 * 86400)],
)  # fmt: skip
def test_parse_duration_accepts(text: str, seconds: int) -> None:
    assert members.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0d", "-1", "-1d", "abc", "", "1y", "4016d", "11wx", "0.1s",
                                  "3651d", "99999999999999999999999d", "9" * 400, "1e9"])  # fmt: skip
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="--expires"):
        members.parse_duration(text)


def test_b64_signature_shape_is_checked() -> None:
    tree = json.loads(VALID.to_bytes())
    tree["signatures"][0]["signature"] = base64.b64encode(b"x" * 63).decode()
    assert reason_of(Invite.from_bytes, json.dumps(tree).encode()) == "malformed"
    tree["signatures"] = [{"founder": A.founder, "signature": base64.b64encode(b"x" * 64).decode()}] * 17
    assert reason_of(Invite.from_bytes, json.dumps(tree).encode()) == "malformed"  # more than 16


@pytest.mark.parametrize(
    "change",
    [{"extra\nline": 1}, {"\x1b[2J": 1}, {"format": "1\nrm -rf"}, {"format": ["\n"]}, {"kind": "a\nb"}],
)
def test_a_malformed_message_is_one_line_whatever_the_file_holds(change: Dict[str, Any]) -> None:
    """The message reaches a terminal as `node: error: …` (one line) and a refused peer's log."""
    blob = json.dumps({**json.loads(VALID.to_bytes()), **change}).encode()
    with pytest.raises(MembershipError) as info:
        Invite.from_bytes(blob)
    assert info.value.reason == "malformed" and str(info.value).isprintable(), str(info.value)


def test_founders_in_any_order_are_one_swarm_and_a_threshold_needs_founders() -> None:
    first, second = "ed25519:" + "ab" * 32, "ed25519:" + "cd" * 32
    one = parse_manifest(f"membership: {{founders: [{first}, {second}], threshold: 2}}\n")
    other = parse_manifest(f"membership: {{founders: [{second}, {first}], threshold: 2}}\n")
    assert one.swarm_id == other.swarm_id
    with pytest.raises(ManifestError, match="membership.threshold needs membership.founders"):
        parse_manifest("membership: {threshold: 5}\n")
