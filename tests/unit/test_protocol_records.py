"""Unit tests for DHT record schemas and keys."""

from __future__ import annotations

import pytest

from protocol.records import (
    MAX_MODULES_PER_PEER,
    PeerRecord,
    ReadyRecord,
    RecordError,
    parse_record,
    peers_key,
    ready_key,
)
from protocol.version import PROTOCOL_VERSION

PEER_ID = "12D3KooWKVT8rzJo9rUEyVZAWiqSjRoDDhEU738oJjeskTykUhvz"


def _peer(**overrides) -> dict:
    value = PeerRecord(
        peer_id=PEER_ID,
        modules=["trunk", "expert.0.1", "expert.1.3"],
        outer_round=4,
        local_steps=200,
        loss=3.25,
        samples_per_second=120.5,
        maddrs=[f"/ip4/127.0.0.1/tcp/4000/p2p/{PEER_ID}"],
        device="cpu",
        version="0.1.0",
    ).dict()
    value.update(overrides)
    return value


def _ready(**overrides) -> dict:
    value = ReadyRecord(posted_at=1700000000.25, params_hash="0123456789abcdef" * 2, numel=1234).dict()
    value.update(overrides)
    return value


def _rejected(model: type, value: object) -> str:
    with pytest.raises(RecordError) as info:
        parse_record(model, value)
    message = str(info.value)
    assert "\n" not in message and model.__name__ in message
    return message


def test_peer_record_round_trip() -> None:
    value = _peer()
    record = parse_record(PeerRecord, value)
    assert isinstance(record, PeerRecord)
    assert record.dict() == value
    assert record.protocol_version == PROTOCOL_VERSION


def test_peer_record_optional_fields() -> None:
    minimal = {"peer_id": PEER_ID, "modules": ["trunk"], "outer_round": 0, "local_steps": 0}
    record = parse_record(PeerRecord, minimal)
    assert record.loss is None and record.samples_per_second is None and record.maddrs == []
    assert parse_record(PeerRecord, record.dict()) == record
    assert parse_record(PeerRecord, _peer(loss=None)).loss is None


def test_ready_record_round_trip() -> None:
    value = _ready()
    record = parse_record(ReadyRecord, value)
    assert isinstance(record, ReadyRecord) and record.dict() == value


def test_unknown_fields_are_ignored() -> None:
    # Newer peers may add fields; older peers read what they know.
    assert parse_record(PeerRecord, _peer(future_field=[1, 2])) == parse_record(PeerRecord, _peer())
    assert parse_record(ReadyRecord, _ready(extra="x")) == parse_record(ReadyRecord, _ready())


@pytest.mark.parametrize("value", [None, "peer", 3, [("peer_id", PEER_ID)], (1, 2)])
def test_non_dict_is_rejected(value: object) -> None:
    assert "mapping" in _rejected(PeerRecord, value)
    assert "mapping" in _rejected(ReadyRecord, value)


@pytest.mark.parametrize("field", ["peer_id", "modules", "outer_round", "local_steps"])
def test_peer_record_missing_field(field: str) -> None:
    value = _peer()
    del value[field]
    assert field in _rejected(PeerRecord, value)


@pytest.mark.parametrize("field", ["posted_at", "params_hash", "numel"])
def test_ready_record_missing_field(field: str) -> None:
    value = _ready()
    del value[field]
    assert field in _rejected(ReadyRecord, value)


@pytest.mark.parametrize(
    "field, bad",
    [
        ("outer_round", "4"),
        ("outer_round", 4.0),
        ("outer_round", True),
        ("local_steps", "200"),
        ("local_steps", 1.5),
        ("loss", "3.2"),
        ("loss", 3),
        ("peer_id", 123),
        ("modules", "trunk"),
        ("modules", [1]),
        ("maddrs", "/ip4/1.2.3.4/tcp/1"),
        ("device", 0),
        ("protocol_version", "1"),
        ("protocol_version", 1.0),
    ],
)
def test_peer_record_wrong_types(field: str, bad: object) -> None:
    assert field in _rejected(PeerRecord, _peer(**{field: bad}))


@pytest.mark.parametrize(
    "field, bad",
    [("posted_at", "1.0"), ("posted_at", 17), ("numel", "12"), ("numel", 12.0), ("params_hash", 123),
     ("message_bytes", "262144"), ("message_bytes", 2.5e5)],  # fmt: skip
)
def test_ready_record_wrong_types(field: str, bad: object) -> None:
    assert field in _rejected(ReadyRecord, _ready(**{field: bad}))


@pytest.mark.parametrize("field", ["outer_round", "local_steps"])
def test_negative_counters(field: str) -> None:
    assert field in _rejected(PeerRecord, _peer(**{field: -1}))


@pytest.mark.parametrize("field", ["loss", "samples_per_second"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats(field: str, bad: float) -> None:
    assert field in _rejected(PeerRecord, _peer(**{field: bad}))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_posted_at(bad: float) -> None:
    assert "posted_at" in _rejected(ReadyRecord, _ready(posted_at=bad))


@pytest.mark.parametrize("numel", [0, -5])
def test_non_positive_numel(numel: int) -> None:
    assert "numel" in _rejected(ReadyRecord, _ready(numel=numel))


@pytest.mark.parametrize("bad", ["0123abc", "0123456789ABCDEF", "g" * 16, "0" * 65, ""])
def test_bad_params_hash(bad: str) -> None:
    assert "params_hash" in _rejected(ReadyRecord, _ready(params_hash=bad))


@pytest.mark.parametrize(
    "module", ["Trunk", "expert.0", "expert.a.1", "expert.0.1.2", "expert.00000.1", "trunk ", " trunk", "", "../x"]
)
def test_bad_module_name(module: str) -> None:
    assert "modules" in _rejected(PeerRecord, _peer(modules=["trunk", module]))


def test_module_name_with_trailing_newline_is_rejected() -> None:
    assert "modules" in _rejected(PeerRecord, _peer(modules=["trunk\n"]))


def test_too_many_modules() -> None:
    modules = [f"expert.{i // 1000}.{i % 1000}" for i in range(MAX_MODULES_PER_PEER + 1)]
    assert "modules" in _rejected(PeerRecord, _peer(modules=modules))


def test_wrong_protocol_version() -> None:
    message = _rejected(PeerRecord, _peer(protocol_version=PROTOCOL_VERSION + 1))
    assert str(PROTOCOL_VERSION + 1) in message
    assert str(PROTOCOL_VERSION + 1) in _rejected(ReadyRecord, _ready(protocol_version=PROTOCOL_VERSION + 1))


def test_peer_id_length() -> None:
    assert parse_record(PeerRecord, _peer(peer_id="p" * 128)).peer_id == "p" * 128
    assert "peer_id" in _rejected(PeerRecord, _peer(peer_id="p" * 129))
    assert "peer_id" in _rejected(PeerRecord, _peer(peer_id=""))


def test_too_long_maddr_and_too_many_maddrs() -> None:
    assert "maddrs" in _rejected(PeerRecord, _peer(maddrs=["/ip4/1.2.3.4/tcp/1" + "0" * 600]))
    assert "maddrs" in _rejected(PeerRecord, _peer(maddrs=["/ip4/1.2.3.4/tcp/1"] * 17))


def test_keys_are_namespaced_by_swarm_id() -> None:
    a, b = "46547b345c5ba589", "4df4ac56f497f37a"
    assert peers_key(a) != peers_key(b)
    assert a in peers_key(a)
    assert ready_key(a, "trunk", 0) != ready_key(b, "trunk", 0)
    keys = {ready_key(a, m, r) for m in ("trunk", "expert.0.0", "expert.0.1") for r in (0, 1, 10)}
    assert len(keys) == 9
    assert peers_key(a) not in keys
