"""Only a record's owner can write it (node/net/hivemind.py SignedRecords, node/net/identity.py): signatures made
with the identity key p2pd runs with, checked against the peer id the subkey names, on DHTRecords as hivemind's
DHT builds them. Real DHT processes: tests/swarm/test_signed_records.py."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P
from hivemind.utils.serializer import MSGPackSerializer

from node.net.hivemind import MAX_VALUE_BYTES, SignedRecords
from node.net.identity import read_identity, write_new_identity
from protocol.keys import decode_key, encode_key


def record(owner: str, value: object = None, expires_in: float = 10.0) -> DHTRecord:
    value = value if value is not None else {"peer_id": owner, "leaving": False}
    subkey, packed = MSGPackSerializer.dumps(owner), MSGPackSerializer.dumps(value)
    return DHTRecord(b"k" * 20, subkey, packed, time.time() + expires_in)


@pytest.fixture(params=["ed25519", "rsa"])
def keys(request, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A signer with its own key (Ed25519 as nodes now make them, or RSA as hivemind made them) and a stranger."""
    path = str(tmp_path / "me.key")
    if request.param == "rsa":
        P2P.generate_identity(path)
    else:
        write_new_identity(path)
    stranger = write_new_identity(str(tmp_path / "other.key"))
    return SignedRecords(path), read_identity(path), stranger


def test_the_owner_signs_and_everyone_accepts_and_strips(keys) -> None:  # type: ignore[no-untyped-def]
    validator, me, _ = keys
    plain = record(me.peer_id)
    signed = dataclasses.replace(plain, value=validator.sign_value(plain))
    reader = SignedRecords(None)  # a node without our key checks with what the record carries
    assert reader.validate(signed) and reader.strip_value(signed) == plain.value
    assert reader.refused.value == 0


def test_forgeries_are_refused_and_counted(keys) -> None:  # type: ignore[no-untyped-def]
    validator, me, stranger = keys
    reader = SignedRecords(None)
    honest = record(me.peer_id)
    signed = dataclasses.replace(honest, value=validator.sign_value(honest))
    forged_leaving = record(me.peer_id, {"peer_id": me.peer_id, "leaving": True})
    forgeries = {
        "unsigned": forged_leaving,
        # a valid signature of ours, moved onto another value, another subkey, another expiry
        "tampered value": dataclasses.replace(signed, value=forged_leaving.value + signed.value[len(honest.value) :]),
        "another subkey": dataclasses.replace(signed, subkey=MSGPackSerializer.dumps(stranger.peer_id)),
        "later expiry": dataclasses.replace(signed, expiration_time=signed.expiration_time + 1000),
        # the stranger signs under our subkey with its own key: the key is not the one our peer id names
        "another key": dataclasses.replace(forged_leaving, value=_signed_by(stranger, forged_leaving)),
        "garbage trailer": dataclasses.replace(honest, value=honest.value + b"\xff\xff\xff\xffCMS1"),
        "not a peer id": dataclasses.replace(signed, subkey=MSGPackSerializer.dumps(12345)),
    }
    for name, forgery in forgeries.items():
        assert not reader.validate(forgery), name
    assert reader.refused.value == len(forgeries)


def _signed_by(identity, plain: DHTRecord) -> bytes:  # type: ignore[no-untyped-def]
    message = SignedRecords._message(plain, plain.value)
    signature = identity.sign(message)
    lengths = len(identity.public).to_bytes(2, "big") + len(signature).to_bytes(2, "big")
    return bytes(plain.value) + identity.public + signature + lengths + b"CMS1"


def test_a_record_that_would_outlive_its_ttl_or_is_too_large_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "me.key")
    me = write_new_identity(path)
    validator = SignedRecords(path, max_record_seconds=60)
    for plain in (record(me.peer_id, expires_in=3600), record(me.peer_id, "x" * MAX_VALUE_BYTES)):
        signed = dataclasses.replace(plain, value=validator.sign_value(plain))
        assert not validator.validate(signed)
    fine = record(me.peer_id, expires_in=30)
    assert validator.validate(dataclasses.replace(fine, value=validator.sign_value(fine)))


def test_someone_elses_subkey_is_never_signed(keys) -> None:  # type: ignore[no-untyped-def]
    validator, _, stranger = keys
    theirs = record(stranger.peer_id)
    assert validator.sign_value(theirs) == theirs.value  # left unsigned: every peer refuses it


def test_the_validator_travels_to_the_dht_process_without_its_key(keys) -> None:  # type: ignore[no-untyped-def]
    import pickle

    validator, me, _ = keys
    plain = record(me.peer_id)
    validator.sign_value(plain)  # loads the key
    copy = pickle.loads(pickle.dumps(validator))
    assert copy._identity is None and copy.validate(dataclasses.replace(plain, value=copy.sign_value(plain)))


def test_key_files_round_trip_and_malformed_ones_are_refused() -> None:
    assert decode_key(encode_key(1, b"x" * 64)) == (1, b"x" * 64)
    for raw in (b"", b"\x08", b"\x08\x01", b"\x12\x05abc", b"\x08\x01\x12\x00", b"\x1a\x01x"):
        with pytest.raises(ValueError):
            decode_key(raw)
