"""Unit tests for stream framing and message validation."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from protocol.frames import MAX_HEADER_BYTES
from protocol.version import PROTOCOL_VERSION
from protocol.wire import (
    Ack,
    Hello,
    HelloReply,
    Refusal,
    TensorPart,
    WireError,
    decode,
    encode,
    read_tensor,
    tensor_payload,
)

SWARM = "46547b345c5ba589"
PEER_ID = "12D3KooWKVT8rzJo9rUEyVZAWiqSjRoDDhEU738oJjeskTykUhvz"
GROUP = "0123456789abcdef"


def _part(numel: int, dtype: str = "float32", **overrides) -> TensorPart:
    fields = dict(
        type="part",
        swarm_id=SWARM,
        module="expert.1.2",
        round=3,
        group_id=GROUP,
        slice_index=1,
        sender=PEER_ID,
        weight=50.0,
        numel=numel,
        dtype=dtype,
    )
    fields.update(overrides)
    return TensorPart(**fields)


def _frame(header: object, payload: bytes = b"") -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return len(packed).to_bytes(4, "big") + packed + payload


def _rejected(frame: bytes) -> str:
    with pytest.raises(WireError) as info:
        decode(frame)
    assert "\n" not in str(info.value)
    return str(info.value)


def _part_header(**overrides) -> dict:
    header = _part(4).dict()
    header.update(overrides)
    return header


@pytest.mark.parametrize(
    "message",
    [
        Hello(swarm_id=SWARM, peer_id=PEER_ID),
        HelloReply(swarm_id=SWARM, manifest_name="commons-default", accepted=True),
        HelloReply(swarm_id=SWARM, manifest_name="other", accepted=False, reason="different swarm"),
        Ack(ok=True),
        Ack(ok=False, code=Refusal.BAD_WEIGHT, reason="a part must carry weight 1"),
    ],
)
def test_round_trip_without_payload(message) -> None:
    decoded, payload = decode(encode(message))
    assert type(decoded) is type(message) and decoded == message
    assert len(payload) == 0


def test_hello_defaults_to_our_protocol() -> None:
    decoded, _ = decode(encode(Hello(swarm_id=SWARM, peer_id=PEER_ID)))
    assert decoded.protocol_version == PROTOCOL_VERSION and decoded.type == "hello"


@pytest.mark.parametrize("dtype, np_dtype", [("float32", np.float32), ("float16", np.float16)])
@pytest.mark.parametrize("kind", ["part", "result"])
def test_tensor_part_round_trip(dtype: str, np_dtype: type, kind: str) -> None:
    values = np.random.default_rng(0).standard_normal(37).astype(np_dtype)
    part = _part(values.size, dtype, type=kind)
    decoded, payload = decode(encode(part, tensor_payload(values)))
    assert decoded == part and decoded.type == kind
    out = read_tensor(decoded, payload, expected_numel=37)
    assert out.dtype == np.float32 and out.shape == (37,)
    np.testing.assert_array_equal(out, values.astype(np.float32))


def test_payload_is_little_endian() -> None:
    values = np.arange(3, dtype=">f4")  # big-endian input
    payload = tensor_payload(values)
    assert payload == np.arange(3, dtype="<f4").tobytes()
    np.testing.assert_array_equal(read_tensor(_part(3), memoryview(payload)), [0.0, 1.0, 2.0])


def test_empty_tensor_part() -> None:
    decoded, payload = decode(encode(_part(0)))
    assert read_tensor(decoded, payload).size == 0


@pytest.mark.parametrize("frame", [b"", b"\x00", b"\x00\x00\x00"])
def test_short_frame(frame: bytes) -> None:
    assert "shorter" in _rejected(frame)


def test_header_length_out_of_bounds() -> None:
    header = msgpack.packb(Ack(ok=True).dict())
    assert "out of bounds" in _rejected((len(header) + 1).to_bytes(4, "big") + header)
    assert "out of bounds" in _rejected((MAX_HEADER_BYTES + 1).to_bytes(4, "big") + b"\x80" * (MAX_HEADER_BYTES + 1))
    assert "out of bounds" in _rejected(b"\xff\xff\xff\xff" + header)


@pytest.mark.parametrize("garbage", [b"\xc1", b"\x92\x01", b"\x81\x01\x02", b"\xa3ab", b"\x80\x80"])
def test_garbage_msgpack(garbage: bytes) -> None:
    _rejected(len(garbage).to_bytes(4, "big") + garbage)


@pytest.mark.parametrize("header", [{"type": "goodbye"}, {"kind": "hello"}, [1, 2], "hello", 7, {"type": None}, {}])
def test_unknown_type(header: object) -> None:
    assert "type" in _rejected(_frame(header))


@pytest.mark.parametrize("bad_type", [["hello"], {"a": 1}])
def test_unhashable_type_is_a_wire_error(bad_type: object) -> None:
    _rejected(_frame({"type": bad_type}))


@pytest.mark.parametrize("field", ["swarm_id", "module", "round", "group_id", "sender", "numel", "dtype"])
def test_tensor_part_missing_field(field: str) -> None:
    header = _part_header()
    del header[field]
    assert field in _rejected(_frame(header))


def test_hello_missing_field() -> None:
    assert "peer_id" in _rejected(_frame({"type": "hello", "swarm_id": SWARM}))
    assert "accepted" in _rejected(_frame({"type": "hello_reply", "swarm_id": SWARM, "manifest_name": "x"}))
    assert "ok" in _rejected(_frame({"type": "ack"}))


@pytest.mark.parametrize(
    "field, bad",
    [
        ("round", -1),
        ("round", 1.0),
        ("round", "1"),
        ("slice_index", 4096),
        ("numel", -1),
        ("numel", 3.0),
        ("weight", "1"),
        ("dtype", "float64"),
        ("dtype", "int4"),
        ("attempt", 2),
        ("surprise", 1),
        ("sender", ""),
        ("swarm_id", "s" * 65),
    ],
)
def test_tensor_part_bad_fields(field: str, bad: object) -> None:
    assert field in _rejected(_frame(_part_header(**{field: bad})))


@pytest.mark.parametrize(
    "module", ["Trunk", "expert", "expert.1", "expert.x.1", "expert.1.2.3", "expert.12345.0", "", " trunk"]
)
def test_bad_module_name(module: str) -> None:
    assert "module" in _rejected(_frame(_part_header(module=module)))


@pytest.mark.parametrize("group_id", ["0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "g" * 16, ""])
def test_bad_group_id(group_id: str) -> None:
    assert "group_id" in _rejected(_frame(_part_header(group_id=group_id)))


def test_wrong_payload_length() -> None:
    values = np.ones(4, dtype=np.float32)
    for payload in (tensor_payload(values)[:-1], tensor_payload(values) + b"\x00", b""):
        message, view = decode(encode(_part(4), payload))
        with pytest.raises(WireError, match="bytes"):
            read_tensor(message, view)
    # float16 header with a float32 payload: twice the bytes promised.
    message, view = decode(encode(_part(4, "float16"), tensor_payload(values)))
    with pytest.raises(WireError):
        read_tensor(message, view)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype, np_dtype", [("float32", np.float32), ("float16", np.float16)])
def test_non_finite_payload(bad: float, dtype: str, np_dtype: type) -> None:
    values = np.array([1.0, bad, 2.0], dtype=np_dtype)
    message, view = decode(encode(_part(3, dtype), tensor_payload(values)))
    with pytest.raises(WireError, match="NaN or infinite"):
        read_tensor(message, view)


def test_float16_overflow_is_caught() -> None:
    # 1e5 is finite as float32 but not representable in float16 (inf after the cast by the sender).
    with np.errstate(over="ignore"):
        values = np.array([1e5], dtype=np.float32).astype(np.float16)
    message, view = decode(encode(_part(1, "float16"), tensor_payload(values)))
    with pytest.raises(WireError):
        read_tensor(message, view)


def test_numel_mismatch_with_expected() -> None:
    values = np.ones(4, dtype=np.float32)
    message, view = decode(encode(_part(4), tensor_payload(values)))
    with pytest.raises(WireError, match="expected 5"):
        read_tensor(message, view, expected_numel=5)
    assert read_tensor(message, view, expected_numel=4).size == 4


@pytest.mark.parametrize("field, bad", [("module", "trunk\n"), ("group_id", GROUP + "\n")])
def test_trailing_newline_is_rejected(field: str, bad: str) -> None:
    assert field in _rejected(_frame(_part_header(**{field: bad})))


def test_a_hello_reply_carries_every_module_of_the_swarm_and_refuses_a_bad_list() -> None:
    from protocol.wire import module_names_payload, read_module_names

    modules = ["trunk", "expert.0.0", "expert.0.1", "expert.1.0"]
    reply = HelloReply(swarm_id=SWARM, manifest_name="m", accepted=True, modules=len(modules))
    decoded, payload = decode(encode(reply, module_names_payload(modules)))
    assert isinstance(decoded, HelloReply) and read_module_names(decoded, payload) == modules
    assert read_module_names(HelloReply(swarm_id=SWARM, manifest_name="m", accepted=True), memoryview(b"")) == []
    for bad in (modules[:-1], ["trunk", "expert.0.0", "expert.0.0", "expert.1.0"], ["trunk", "../etc", "x", "y"],
                ["trunk", 5, "expert.0.1", "expert.1.0"]):  # fmt: skip
        with pytest.raises(WireError, match="hello_reply payload"):
            read_module_names(reply, memoryview(msgpack.packb(bad)))
    with pytest.raises(WireError, match="not msgpack"):
        read_module_names(reply, memoryview(b"\xc1"))
    with pytest.raises(WireError):
        decode(encode(reply.copy(update={"modules": 5000})))  # more modules than any peer may host
