"""Property tests of every schema in protocol/ that crosses the wire or the DHT, and of the manifest peers hash.

For each: any valid value round-trips exactly, and arbitrary bytes, arbitrary msgpack or YAML structures, shapes
with wrong values (wrong types, extra fields, huge ints, NaN, deep nesting) and mutations of valid encodings
(truncated, bits flipped, bytes appended) are either read as a valid value or refused with the module's own error
(WireError, FrameError, RecordError, ManifestError, KeyFormatError); nothing else may escape. Warnings are errors
here (setup.cfg), so a numpy overflow counts as an escape too.

Example tests of the same schemas: test_wire.py, test_protocol_records.py, test_manifest.py, test_signed_records.py.
Invites, revocations, receipts and vouches have their own property tests (test_membership.py, test_contributions.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from importlib import resources
from typing import Any, Dict, List, Optional, Tuple, Type

import msgpack
import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ed25519
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from node.net.hivemind import SignedRecords
from node.net.identity import Identity, public_key_proto
from protocol.frames import (
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    STREAM_PREFIX_BYTES,
    FrameError,
    message_frame,
    split_message,
    stream_frame_size,
    stream_prefix,
)
from protocol.keys import (
    KeyFormatError,
    decode_key,
    encode_key,
    founder_key_string,
    parse_founder_key,
    peer_id_of_public_key,
)
from protocol.manifest import (
    AGGREGATORS,
    COMPRESSIONS,
    DEFAULT_MANIFEST_NAME,
    PLACEMENT_POLICIES,
    AveragingSpec,
    InnerOptimizerSpec,
    Manifest,
    ManifestError,
    MembershipSpec,
    ModelSpec,
    OuterOptimizerSpec,
    PlacementSpec,
    TrainingSpec,
    parse_manifest,
)
from protocol.records import MAX_MODULES_PER_PEER, PeerRecord, ReadyRecord, RecordError, parse_record
from protocol.wire import (
    INT8_BLOCK,
    Ack,
    DialBack,
    DialBackReply,
    Hello,
    HelloReply,
    Message,
    Refusal,
    StateReply,
    StateRequest,
    TensorPart,
    WireError,
    decode,
    encode,
    module_names_payload,
    payload_bytes,
    read_module_names,
    read_tensor,
    tensor_payload,
    wire_round_trip,
)

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U64 = 2**64 - 1  # the largest int msgpack carries
I64 = 2**63

# --- strategies: valid values -------------------------------------------------------------------------------------
CHARS = st.characters(codec="utf-8")  # any code point msgpack can encode (no lone surrogates)


def text(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    """Short text mostly, and now and then text at its limit (4-byte characters: the largest header)."""
    at_limit = st.sampled_from(["x", "\U0001f600"]).map(lambda c: c * max_size)
    return st.text(CHARS, min_size=min_size, max_size=min(max_size, 24)) | at_limit


HEX = "0123456789abcdef"
MODULES = st.just("trunk") | st.builds("expert.{}.{}".format, st.integers(0, 9999), st.integers(0, 9999))
GROUP_IDS = st.text(HEX, min_size=16, max_size=16)
COUNTS = st.integers(0, U64)
INTS = st.integers(-I64, U64)
FLOATS = st.floats(allow_nan=False)  # infinities included: StrictFloat takes them, and they round-trip
FINITE = st.floats(allow_nan=False, allow_infinity=False)
PORTS = st.integers(1, 65535)

HELLOS = st.builds(Hello, swarm_id=text(64), protocol_version=INTS, peer_id=text(128))
HELLO_REPLIES = st.builds(
    HelloReply,
    swarm_id=text(64),
    protocol_version=INTS,
    manifest_name=text(64),
    accepted=st.booleans(),
    reason=text(512),
    modules=st.integers(0, MAX_MODULES_PER_PEER),
)
TENSOR_PARTS = st.builds(
    TensorPart,
    type=st.sampled_from(["part", "result"]),
    swarm_id=text(64),
    module=MODULES,
    round=COUNTS,
    group_id=GROUP_IDS,
    slice_index=st.integers(0, 4095),
    sender=text(128, min_size=1),
    weight=FLOATS,
    numel=COUNTS,
    dtype=st.sampled_from(["float32", "float16", "int8"]),
    attempt=st.integers(0, 1),
)
STATE_REQUESTS = st.builds(
    StateRequest, swarm_id=text(64), module=MODULES, offset=COUNTS, count=COUNTS, expected_hash=text(64)
)
STATE_REPLIES = st.builds(
    StateReply,
    ok=st.booleans(),
    reason=text(512),
    outer_round=COUNTS,
    numel=COUNTS,
    params_hash=text(64),
    offset=COUNTS,
    count=COUNTS,
)
DIALBACKS = st.builds(DialBack, ports=st.lists(PORTS, min_size=1, max_size=4))
DIALBACK_REPLIES = st.builds(
    DialBackReply,
    observed=text(64),
    reachable=st.lists(PORTS, max_size=4),
    tried=st.lists(PORTS, max_size=4),
    reason=text(256),
    now=st.none() | FLOATS,
)
ACKS = st.builds(Ack, ok=st.just(True), reason=text(512)) | st.builds(
    Ack, ok=st.just(False), code=st.sampled_from(Refusal), reason=text(512)
)
MESSAGES = st.one_of(
    HELLOS, HELLO_REPLIES, TENSOR_PARTS, STATE_REQUESTS, STATE_REPLIES, DIALBACKS, DIALBACK_REPLIES, ACKS
)

# --- strategies: hostile values -----------------------------------------------------------------------------------
EDGES = st.sampled_from(
    [None, True, False, 0, -1, 1, 2**31, 2**53 + 1, I64 - 1, -I64, U64, 1.0, -0.0, 1e308, 5e-324, math.inf, -math.inf,
     math.nan, "", "\x00", "trunk\n", "x" * 5000, b"", b"\xff" * 64, [], {}, [[[[[]]]]]]
)  # fmt: skip
LEAVES = st.none() | st.booleans() | INTS | st.floats() | st.text(CHARS, max_size=12) | st.binary(max_size=12) | EDGES
# What msgpack carries: maps keyed by str (or bytes, which msgpack's strict_map_key also lets through).
PACKABLE = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(CHARS, max_size=10) | st.binary(max_size=4), inner, max_size=4)
    ),
    max_leaves=16,
)
# What YAML and JSON carry: maps keyed by str, no bytes.
PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers(-I64, I64 - 1) | st.floats() | st.text(CHARS, max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(CHARS, max_size=10), inner, max_size=4),
    max_leaves=16,
)


def flip(blob: bytes, at_bit: Tuple[int, int]) -> bytes:
    out = bytearray(blob)
    out[at_bit[0] % len(out)] ^= 1 << at_bit[1]
    return bytes(out)


def mutations(original: bytes) -> st.SearchStrategy[bytes]:
    """Truncated, bits flipped, bytes appended, spliced: what a broken or hostile peer might send instead."""
    size = len(original)
    return st.one_of(
        st.integers(0, size - 1).map(lambda n: original[:n]),
        st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 7)), min_size=1, max_size=6).map(
            lambda flips: functools.reduce(flip, flips, original)
        ),
        st.binary(min_size=1, max_size=32).map(lambda tail: original + tail),
        st.tuples(st.integers(0, size), st.integers(0, size), st.binary(max_size=16)).map(
            lambda cut: original[: min(cut[:2])] + cut[2] + original[max(cut[:2]) :]
        ),
    )


def shaped(valid: Dict[str, st.SearchStrategy[Any]], wrong: st.SearchStrategy[Any]) -> st.SearchStrategy[Dict]:
    """Dicts with every field of a schema, each valid or wrong, some missing, maybe with extra fields."""
    fields = {name: strategy | wrong for name, strategy in valid.items()}
    return st.tuples(
        st.fixed_dictionaries(fields),
        st.sets(st.sampled_from(sorted(valid))),
        st.dictionaries(st.text(max_size=8), wrong, max_size=2),
    ).map(lambda t: {**{k: v for k, v in t[0].items() if k not in t[1]}, **t[2]})


# --- protocol/wire.py: headers ------------------------------------------------------------------------------------
def decoded_or_refused(frame: bytes) -> Optional[Message]:
    """decode's answer: a message (that encodes and decodes again) or a one-line WireError, nothing else."""
    try:
        message, payload = decode(frame)
    except WireError as e:
        assert "\n" not in str(e), str(e)
        return None
    assert type(message) in (Hello, HelloReply, TensorPart, StateRequest, StateReply, DialBack, DialBackReply, Ack)
    assert bytes(payload) == frame[len(frame) - len(payload) :]
    again, _ = decode(encode(message))
    assert type(again) is type(message)
    return message


@PROPERTY
@given(MESSAGES, st.binary(max_size=64))
def test_every_valid_message_round_trips(message: Message, payload: bytes) -> None:
    frame = encode(message, payload)
    decoded, rest = decode(frame)
    assert type(decoded) is type(message) and decoded == message
    assert bytes(rest) == payload
    assert encode(decoded, payload) == frame  # one encoding per message


def test_the_largest_header_of_every_message_fits_its_frame() -> None:
    """Every string at its length limit, in 4-byte characters, and the largest ints: still under MAX_HEADER_BYTES."""
    wide = "\U0001f600"
    largest = [
        Hello(swarm_id=wide * 64, protocol_version=-I64, peer_id=wide * 128),
        HelloReply(swarm_id=wide * 64, protocol_version=U64, manifest_name=wide * 64, accepted=False,
                   reason=wide * 512, modules=MAX_MODULES_PER_PEER),
        TensorPart(type="result", swarm_id=wide * 64, module="expert.9999.9999", round=U64, group_id="f" * 16,
                   slice_index=4095, sender=wide * 128, weight=-math.inf, numel=U64, dtype="float16", attempt=1),
        StateRequest(swarm_id=wide * 64, module="expert.9999.9999", offset=U64, count=U64, expected_hash=wide * 64),
        StateReply(ok=False, reason=wide * 512, outer_round=U64, numel=U64, params_hash=wide * 64, offset=U64,
                   count=U64),
        DialBack(ports=[65535] * 4),
        DialBackReply(observed=wide * 64, reachable=[65535] * 4, tried=[65535] * 4, reason=wide * 256, now=-1e308),
        Ack(ok=False, code=Refusal.WRONG_GROUP, reason=wide * 512),
    ]  # fmt: skip
    for message in largest:
        header = split_message(encode(message))[0]
        assert len(header) <= MAX_HEADER_BYTES
        assert decode(encode(message))[0] == message


@PROPERTY
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_a_message_or_a_wire_error(blob: bytes) -> None:
    decoded_or_refused(blob)
    decoded_or_refused(len(blob).to_bytes(4, "big") + blob)  # a well-framed header of garbage


@PROPERTY
@given(PACKABLE)
@example({"type": "ack", b"ok": True})  # a bytes key used to escape as TypeError
def test_arbitrary_msgpack_headers_are_a_message_or_a_wire_error(header: Any) -> None:
    decoded_or_refused(message_frame(msgpack.packb(header, use_bin_type=True)))


# One valid header of each type, field by field; the tests below replace, drop and add fields.
SHAPES: Dict[str, Dict[str, Any]] = {
    "hello": Hello(swarm_id="s", peer_id="p").dict(),
    "hello_reply": HelloReply(swarm_id="s", manifest_name="m", accepted=True, modules=2).dict(),
    "part": TensorPart(type="part", swarm_id="s", module="trunk", round=1, group_id="0" * 16, slice_index=0,
                       sender="p", numel=4, dtype="float32").dict(),
    "result": TensorPart(type="result", swarm_id="s", module="expert.0.1", round=1, group_id="0" * 16,
                         slice_index=0, sender="p", weight=2.0, numel=4, dtype="int8").dict(),
    "state_request": StateRequest(swarm_id="s", module="trunk", count=4).dict(),
    "state_reply": StateReply(ok=True, numel=4, params_hash="ab" * 8).dict(),
    "dialback": DialBack(ports=[4000]).dict(),
    "dialback_reply": DialBackReply(observed="1.2.3.4", reachable=[4000], tried=[4000], now=1.5).dict(),
    "ack": {"type": "ack", "ok": False, "code": "bad_weight", "reason": "r"},
}  # fmt: skip
WRONG = PACKABLE | EDGES
HEADER_SHAPES = st.sampled_from(sorted(SHAPES)).flatmap(
    lambda kind: shaped({name: st.just(value) for name, value in SHAPES[kind].items()}, WRONG)
)
VALID_FRAMES = st.sampled_from([message_frame(msgpack.packb(header)) for header in SHAPES.values()])


@PROPERTY
@given(HEADER_SHAPES)
def test_headers_with_wrong_missing_or_extra_fields_are_a_message_or_a_wire_error(header: Dict[Any, Any]) -> None:
    message = decoded_or_refused(message_frame(msgpack.packb(header, use_bin_type=True)))
    if message is not None and not any(isinstance(v, float) and math.isnan(v) for v in header.values()):
        # What was accepted is what was sent, field by field: nothing coerced (a NaN is equal to nothing).
        sent = {name: value for name, value in header.items() if name in type(message).__fields__}
        got = {name: value for name, value in json.loads(message.json()).items() if name in sent}
        assert got == {name: json.loads(json.dumps(value)) for name, value in sent.items()}


@PROPERTY
@given(VALID_FRAMES.flatmap(mutations))
def test_mutated_frames_are_a_message_or_a_wire_error(frame: bytes) -> None:
    decoded_or_refused(frame)


def test_deeply_nested_and_bytes_keyed_headers_are_wire_errors() -> None:
    for size in (1, 10, 100, 1000, 2000, MAX_HEADER_BYTES - 1):
        for opener in (b"\x91", b"\x81\xa1a"):  # arrays of one item, maps of one key: nested to fill the header
            header = opener * (size // len(opener)) + b"\xc0"
            if len(header) <= MAX_HEADER_BYTES:
                assert decoded_or_refused(message_frame(header)) is None
    nested: Any = "x"
    for _ in range(500):
        nested = [nested]
    assert decoded_or_refused(message_frame(msgpack.packb({"type": "hello", "swarm_id": nested}))) is None
    # msgpack's strict_map_key lets bytes keys through: they used to escape as TypeError (pydantic's **kwargs).
    for header in ({"type": "ack", b"ok": True}, {"type": "hello", "swarm_id": "s", "peer_id": "p", b"x": 1}):
        with pytest.raises(WireError, match="not a string"):
            decode(message_frame(msgpack.packb(header, use_bin_type=True)))


# --- protocol/wire.py: tensor payloads and module lists -----------------------------------------------------------
FLT_MAX = float(np.finfo(np.float32).max)
# int8 cannot carry exactly +-FLT_MAX: its step (FLT_MAX / 127) times 127 rounds past the float32 range.
INT8_MAX = float(np.nextafter(np.float32(FLT_MAX), np.float32(0)))


def part(numel: int, dtype: str) -> TensorPart:
    return TensorPart(type="part", swarm_id="s", module="trunk", round=0, group_id="0" * 16, slice_index=0,
                      sender="p", numel=numel, dtype=dtype)  # fmt: skip


def sent(values: np.ndarray, dtype: str) -> np.ndarray:
    """What a receiver reads of ``values`` sent as ``dtype``: encoded, framed, decoded, checked."""
    message, payload = decode(encode(part(values.size, dtype), tensor_payload(values, dtype)))
    assert isinstance(message, TensorPart) and len(payload) == payload_bytes(values.size, dtype)
    return read_tensor(message, payload, expected_numel=values.size)


@st.composite
def large_vectors(draw: st.DrawFn) -> np.ndarray:
    """Several int8 blocks of one magnitude (subnormal to huge), with a few drawn values and zero blocks in them."""
    size = draw(st.integers(1, 3 * INT8_BLOCK + 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    values = (rng.standard_normal(size) * 2.0 ** draw(st.integers(-150, 120))).astype(np.float32)
    for _ in range(draw(st.integers(0, 3))):
        values[draw(st.integers(0, size - 1))] = draw(st.floats(width=32, min_value=-INT8_MAX, max_value=INT8_MAX))
    if draw(st.booleans()):
        values[: draw(st.integers(0, size))] = 0.0
    return values


def vectors(width: int) -> st.SearchStrategy[np.ndarray]:
    elements = st.floats(width=width, allow_nan=False, allow_infinity=False)
    return hnp.arrays(np.float32 if width == 32 else np.float16, st.integers(0, 40), elements=elements)


@PROPERTY
@given(vectors(32) | large_vectors())
def test_float32_payloads_round_trip_exactly(values: np.ndarray) -> None:
    assert np.array_equal(sent(values, "float32"), values)


@PROPERTY
@given(vectors(16))
def test_float16_payloads_round_trip_exactly(values: np.ndarray) -> None:
    out = sent(values, "float16")
    assert out.dtype == np.float32 and np.array_equal(out, values.astype(np.float32))


@PROPERTY
@given(
    large_vectors()
    | hnp.arrays(np.float32, st.integers(0, 40), elements=st.floats(width=32, min_value=-INT8_MAX, max_value=INT8_MAX))
)
@example(np.array([1e-40, 0.0, -3e-41], dtype=np.float32))  # a subnormal block: 127 / scale used to overflow
def test_int8_payloads_decode_to_what_the_sender_computed_within_half_a_step(values: np.ndarray) -> None:
    out = sent(values, "int8")
    assert np.array_equal(out, wire_round_trip(values, "int8"))  # bit for bit: reducers rely on it
    for start in range(0, values.size, INT8_BLOCK):
        block = slice(start, start + INT8_BLOCK)
        step = float(np.abs(values[block]).max()) / 127
        error = np.abs(out[block].astype(np.float64) - values[block].astype(np.float64)).max()
        # + 127 half-subnormals: dequantizing rounds scale / 127 to float32 first, which a tiny scale underflows
        assert error <= step * (0.5 + 1e-5) + 127 * 2.0**-150, (start, step, error)


@PROPERTY
@given(st.sampled_from(["float32", "float16", "int8"]), st.integers(0, 2 * INT8_BLOCK + 1), st.data())
def test_arbitrary_payloads_are_finite_vectors_or_wire_errors(dtype: str, numel: int, data: st.DataObject) -> None:
    size = payload_bytes(numel, dtype)
    exact = st.binary(min_size=size, max_size=size) if size <= 2048 else st.just(bytes(size))
    payload = data.draw(
        exact.flatmap(lambda b: (st.just(b) | mutations(b)) if b else st.just(b)) | st.binary(max_size=64)
    )
    expected = data.draw(st.none() | st.just(numel) | st.integers(0, 2 * INT8_BLOCK + 1))
    try:
        out = read_tensor(part(numel, dtype), memoryview(payload), expected_numel=expected)
    except WireError as e:
        assert "\n" not in str(e)
    else:
        assert out.dtype == np.float32 and out.shape == (numel,) and np.isfinite(out).all()
        assert len(payload) == size and expected in (None, numel)


def test_an_int8_scale_at_the_float32_limit_is_a_wire_error_not_an_overflow() -> None:
    for code in (127, -127, -128):
        payload = np.array([FLT_MAX], dtype="<f4").tobytes() + np.array([code], dtype=np.int8).tobytes()
        try:
            out = read_tensor(part(1, "int8"), memoryview(payload))
        except WireError:
            continue
        assert np.isfinite(out).all()


@PROPERTY
@given(st.lists(MODULES, unique=True, max_size=40))
def test_module_lists_round_trip(modules: List[str]) -> None:
    reply = HelloReply(swarm_id="s", manifest_name="m", accepted=True, modules=len(modules))
    message, payload = decode(encode(reply, module_names_payload(modules)))
    assert isinstance(message, HelloReply) and read_module_names(message, payload) == modules


@PROPERTY
@given(st.integers(0, 8), PACKABLE | st.lists(MODULES | WRONG, max_size=8) | st.binary(max_size=40))
def test_arbitrary_module_lists_are_valid_names_or_wire_errors(count: int, names: Any) -> None:
    payload = names if isinstance(names, bytes) else msgpack.packb(names, use_bin_type=True)
    reply = HelloReply(swarm_id="s", manifest_name="m", accepted=True, modules=count)
    try:
        read = read_module_names(reply, memoryview(payload))
    except WireError as e:
        assert "\n" not in str(e)
    else:
        assert len(read) == count == len(set(read)) and all(m == "trunk" or m.startswith("expert.") for m in read)


# --- protocol/frames.py -------------------------------------------------------------------------------------------
@PROPERTY
@given(st.integers(0, MAX_FRAME_BYTES), st.integers(MAX_FRAME_BYTES + 1, U64), st.binary(min_size=8, max_size=8))
def test_stream_prefixes_round_trip_and_oversized_frames_are_frame_errors(size: int, over: int, raw: bytes) -> None:
    prefix = stream_prefix(size)
    assert len(prefix) == STREAM_PREFIX_BYTES and stream_frame_size(prefix) == size
    with pytest.raises(FrameError):
        stream_frame_size(stream_prefix(over))
    try:
        announced = stream_frame_size(raw)
    except FrameError:
        assert int.from_bytes(raw, "big") > MAX_FRAME_BYTES
    else:
        assert 0 <= announced <= MAX_FRAME_BYTES and stream_prefix(announced) == raw


@PROPERTY
@given(st.binary(max_size=64) | st.integers(0, MAX_HEADER_BYTES).map(b"h".__mul__), st.binary(max_size=64))
def test_message_frames_round_trip(header: bytes, payload: bytes) -> None:
    got_header, got_payload = split_message(message_frame(header, payload))
    assert got_header == header and bytes(got_payload) == payload


@PROPERTY
@given(st.binary(max_size=80) | VALID_FRAMES.flatmap(mutations))
def test_any_bytes_split_into_the_frame_they_are_or_a_frame_error(frame: bytes) -> None:
    try:
        header, payload = split_message(frame)
    except FrameError as e:
        assert "\n" not in str(e)
    else:
        assert len(header) <= MAX_HEADER_BYTES and message_frame(header, bytes(payload)) == frame


# --- protocol/records.py ------------------------------------------------------------------------------------------
PEER_RECORDS = st.builds(
    PeerRecord,
    peer_id=text(128, min_size=1),
    modules=st.lists(MODULES, max_size=6),
    outer_round=COUNTS,
    local_steps=COUNTS,
    loss=st.none() | FINITE,
    samples_per_second=st.none() | FINITE,
    maddrs=st.lists(text(512), max_size=16),
    device=st.text(CHARS, max_size=12),
    version=st.text(CHARS, max_size=12),
    leaving=st.booleans(),
    data=st.none() | st.text(HEX, min_size=64, max_size=64).map("sha256:".__add__),
    reachability=st.sampled_from([None, "public", "private", "unknown"]),
    invite=st.none() | text(4096),
    dropping=st.lists(MODULES, max_size=3),
)
READY_RECORDS = st.builds(
    ReadyRecord,
    posted_at=FINITE,
    params_hash=st.text(HEX, min_size=16, max_size=64),
    numel=st.integers(1, U64),
    window_seconds=st.none() | FINITE,
    message_bytes=st.none() | INTS,
    reduces=st.none() | st.booleans(),
    samples=st.none() | st.integers(0, 2**53 - 1),
)
RECORD_SHAPES = {
    PeerRecord: PeerRecord(peer_id="p", modules=["trunk"], outer_round=1, local_steps=2, loss=1.5, maddrs=["/a"],
                           data="sha256:" + "0" * 64, reachability="public", invite="{}",
                           dropping=["expert.0.1"]).dict(),
    ReadyRecord: ReadyRecord(posted_at=1.5, params_hash="0" * 16, numel=4, window_seconds=2.0, message_bytes=64,
                             reduces=True, samples=3).dict(),
}  # fmt: skip


def recorded(model: Type[Any], value: Any) -> Optional[Any]:
    """parse_record's answer: a record that reads back as itself, or a one-line RecordError, nothing else."""
    try:
        record = parse_record(model, value)
    except RecordError as e:
        assert "\n" not in str(e) and model.__name__ in str(e)
        return None
    assert isinstance(record, model) and parse_record(model, record.dict()) == record
    if isinstance(value, dict):  # what was accepted is what was sent, field by field: nothing coerced
        sent = {name: field for name, field in value.items() if name in model.__fields__}
        got = {name: field for name, field in json.loads(record.json()).items() if name in sent}
        assert got == json.loads(json.dumps(sent))
    return record


@PROPERTY
@given(PEER_RECORDS | READY_RECORDS)
def test_every_valid_record_round_trips_through_the_dht_encoding(record: Any) -> None:
    value = MSGPackSerializer.loads(MSGPackSerializer.dumps(record.dict()))  # what a reader gets from the DHT
    again = parse_record(type(record), value)
    assert again == record and again.dict() == record.dict()


@PROPERTY
@given(st.sampled_from([PeerRecord, ReadyRecord]), PACKABLE)
def test_arbitrary_values_are_records_or_record_errors(model: Type[Any], value: Any) -> None:
    recorded(model, value)


@PROPERTY
@given(
    st.sampled_from([PeerRecord, ReadyRecord]).flatmap(
        lambda model: st.tuples(st.just(model), shaped({k: st.just(v) for k, v in RECORD_SHAPES[model].items()}, WRONG))
    )
)
def test_records_with_wrong_missing_or_extra_fields_are_records_or_record_errors(model_value: Tuple[Any, Dict]) -> None:
    recorded(*model_value)


@PROPERTY
@given(st.sampled_from([PeerRecord, ReadyRecord]).flatmap(
    lambda model: st.tuples(st.just(model), mutations(MSGPackSerializer.dumps(RECORD_SHAPES[model])))
))  # fmt: skip
def test_mutated_dht_values_are_records_or_record_errors(model_blob: Tuple[Any, bytes]) -> None:
    model, blob = model_blob
    try:
        value = MSGPackSerializer.loads(blob)
    except Exception:  # not msgpack: hivemind drops it before any schema sees it
        return
    recorded(model, value)


# hivemind's MSGPackSerializer hands bytes keys over as they are: a member's own signed record {b"x": 1} made every
# reader's read_peers/read_ready raise (pydantic: "keywords must be strings") instead of counting a rejected record.
@pytest.mark.parametrize("model", [PeerRecord, ReadyRecord])
def test_a_record_with_a_bytes_key_is_a_record_error(model: Type[Any]) -> None:
    value = MSGPackSerializer.loads(MSGPackSerializer.dumps({**RECORD_SHAPES[model], b"x": 1}))
    with pytest.raises(RecordError, match="text keys"):
        parse_record(model, value)


# MODULE_PATTERN spelled digits \d, which matches any Unicode decimal digit: "expert.\u0661.\u0662" was a valid module
# name on the wire and in the DHT, and int() read it as layer 1.
def test_module_names_have_ascii_digits_only() -> None:
    with pytest.raises(RecordError):
        parse_record(PeerRecord, {**RECORD_SHAPES[PeerRecord], "modules": ["expert.\u0661.\u0662"]})


# --- node/net/hivemind.py SignedRecords: the signature every DHT record carries -----------------------------------
@functools.lru_cache(maxsize=None)
def signer() -> Identity:
    key = ed25519.Ed25519PrivateKey.generate()
    public = public_key_proto(key)
    return Identity(key, public, peer_id_of_public_key(public))


@functools.lru_cache(maxsize=None)
def reader() -> SignedRecords:
    return SignedRecords(None)  # a node that checks what records carry (one: each allocates a shared counter)


def signed(value: bytes, key: bytes = b"k" * 20, expires_in: float = 60.0) -> DHTRecord:
    """A record of ``value`` signed by its owner, as SignedRecords.sign_value signs it."""
    me = signer()
    plain = DHTRecord(key, MSGPackSerializer.dumps(me.peer_id), value, time.time() + expires_in)
    signature = me.sign(SignedRecords._message(plain, value))
    lengths = len(me.public).to_bytes(2, "big") + len(signature).to_bytes(2, "big")
    return dataclasses.replace(plain, value=value + me.public + signature + lengths + b"CMS1")


def judged(record: DHTRecord) -> bool:
    verdict = reader().validate(record)
    assert isinstance(verdict, bool) and isinstance(reader().strip_value(record), bytes)
    return verdict


@FEW
@given(st.binary(max_size=200), st.binary(min_size=1, max_size=32), st.floats(1.0, 3000.0))
def test_a_signed_record_validates_and_strips_to_its_value(value: bytes, key: bytes, expires_in: float) -> None:
    record = signed(value, key, expires_in)
    assert judged(record) and reader().strip_value(record) == value


SIGNED = signed(MSGPackSerializer.dumps(RECORD_SHAPES[PeerRecord]), expires_in=3000.0)


@PROPERTY
@given(mutations(SIGNED.value))
def test_a_mutated_signed_value_is_refused(value: bytes) -> None:
    assert judged(dataclasses.replace(SIGNED, value=value)) == (value == SIGNED.value)


@PROPERTY
@given(st.binary(max_size=200), st.binary(max_size=40) | PACKABLE.map(MSGPackSerializer.dumps))
def test_arbitrary_values_and_subkeys_are_refused(value: bytes, subkey: bytes) -> None:
    assert not judged(DHTRecord(b"k" * 20, subkey, value, time.time() + 60))
    assert not judged(dataclasses.replace(SIGNED, subkey=subkey)) or subkey == SIGNED.subkey


# --- protocol/keys.py: key protobufs and founder keys (not fuzzed in test_membership.py) ---------------------------
@PROPERTY
@given(st.integers(0, U64), st.binary(min_size=1, max_size=80))
def test_key_messages_round_trip(key_type: int, data: bytes) -> None:
    assert decode_key(encode_key(key_type, data)) == (key_type, data)


@PROPERTY
@given(st.binary(max_size=80) | mutations(encode_key(1, bytes(range(32)))))
def test_arbitrary_key_bytes_are_keys_or_key_format_errors(raw: bytes) -> None:
    try:
        key_type, data = decode_key(raw)
    except KeyFormatError:
        return
    assert isinstance(key_type, int) and key_type >= 0 and isinstance(data, bytes) and data


@PROPERTY
@given(st.binary(min_size=32, max_size=32), PLAIN | st.text(HEX + "ed25519:", max_size=80) | EDGES)
@example(bytes(32), 10**5000)  # str() refuses an int of over 4300 digits: it used to escape as ValueError
def test_founder_keys_round_trip_and_anything_else_is_a_key_format_error(raw: bytes, other: Any) -> None:
    assert parse_founder_key(founder_key_string(raw)) == raw
    try:
        parsed = parse_founder_key(other)
    except KeyFormatError as e:
        assert "\n" not in str(e)
    else:
        assert founder_key_string(parsed) == other


# --- protocol/manifest.py -----------------------------------------------------------------------------------------
POSITIVE = st.floats(min_value=0, exclude_min=True, allow_infinity=False)
UNIT = st.floats(min_value=0, max_value=1, exclude_max=True)
OVER_ONE = st.floats(min_value=1, exclude_min=True, allow_infinity=False)
COUNT64 = st.integers(1, I64 - 1)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    heads = draw(st.integers(1, 4))
    experts = draw(st.integers(1, 8))
    model = ModelSpec(
        vocab_size=draw(st.integers(1, 256)),
        seq_len=draw(st.integers(1, 256)),
        d_model=heads * draw(st.integers(1, 16)),
        n_layers=draw(st.integers(1, 4)),
        n_heads=heads,
        n_experts=experts,
        top_k=draw(st.integers(1, experts)),
        expert_hidden=draw(st.integers(1, 64)),
    )
    gather = draw(st.floats(min_value=1e-3, max_value=1e6))
    founders = draw(st.lists(st.binary(min_size=32, max_size=32).map(founder_key_string), unique=True, max_size=4))
    return Manifest(
        name=draw(st.text(CHARS, min_size=1, max_size=64)),
        seed=draw(st.integers(-I64, I64 - 1)),
        model=model,
        training=TrainingSpec(batch_size=draw(COUNT64), inner_steps=draw(COUNT64),
                              eval_batches=draw(st.integers(0, 99))),
        inner_optimizer=InnerOptimizerSpec(lr=draw(POSITIVE), weight_decay=draw(FINITE.map(abs)), beta1=draw(UNIT),
                                           beta2=draw(UNIT), grad_clip_norm=draw(POSITIVE)),
        outer_optimizer=OuterOptimizerSpec(lr=draw(POSITIVE), momentum=draw(UNIT)),
        averaging=AveragingSpec(
            compression=draw(st.sampled_from(COMPRESSIONS)), aggregator=draw(st.sampled_from(AGGREGATORS)),
            clip_multiplier=draw(POSITIVE), outlier_ratio=draw(OVER_ONE), result_tolerance=draw(OVER_ONE),
            overlap=draw(st.booleans()), gather_seconds=gather, part_timeout_seconds=draw(POSITIVE),
            round_timeout_seconds=gather * draw(st.floats(1.01, 100.0)), deadline_multiplier=draw(st.floats(1.0, 1e9)),
            chunk_elements=draw(st.integers(16, I64 - 1)),
        ),
        placement=PlacementSpec(policy=draw(st.sampled_from(PLACEMENT_POLICIES)), check_every_rounds=draw(COUNT64),
                                affinity_batches=draw(COUNT64), swap_margin=draw(st.floats(0, 1, exclude_min=True))),
        membership=MembershipSpec(tuple(founders), draw(st.integers(1, max(1, len(founders))))),
    )  # fmt: skip


def plain(value: Any) -> Any:
    """A manifest's dict as YAML writes it: lists for tuples."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


def manifest_or_refused(text: str) -> Optional[Manifest]:
    """parse_manifest's answer: a manifest whose canonical form reads back as itself, or a one-line ManifestError."""
    try:
        manifest = parse_manifest(text)
    except ManifestError as e:
        assert "\n" not in str(e), str(e)
        return None
    assert len(manifest.swarm_id) == 16 and Manifest.from_dict(json.loads(manifest.canonical_json())) == manifest
    return manifest


@FEW
@given(manifests())
def test_every_valid_manifest_round_trips_through_yaml_and_its_canonical_form(manifest: Manifest) -> None:
    text = yaml.safe_dump(plain(manifest.to_dict()))  # non-ASCII escaped: PyYAML reads a raw NEL as a newline
    again = manifest_or_refused(text)
    assert again == manifest and again.swarm_id == manifest.swarm_id
    assert Manifest.from_dict(json.loads(manifest.canonical_json())) == manifest


@PROPERTY
@given(st.text(CHARS, max_size=200) | PLAIN.map(lambda v: yaml.safe_dump(v, allow_unicode=True)))
@example('"a\\nb": 1')  # an unknown key with a newline in it used to make a two-line error
def test_arbitrary_text_and_yaml_are_manifests_or_manifest_errors(text: str) -> None:
    manifest_or_refused(text)


# Values as YAML spells them, good and bad: every scalar kind YAML 1.1 reads, huge numbers, NaN, nesting, tags.
TOKENS = st.sampled_from([
    "1", "0", "-1", "2", "16", "0.5", "1.0e-3", "1e-3", "'3'", "3.0", "true", "yes", "~", "''", ".nan", ".inf", "-.inf",
    "0x" + "f" * 40, "0x" + "f" * 5000, "1" * 5000, "9223372036854775808", "-9223372036854775809", "1e400",
    "0o777", "0b101", "1_000", "1:30", "2001-12-14", "!!binary aGk=", "!!set {a, b}", "[a, b]", "{a: 1}",
    "[" * 60 + "]" * 60, "'ed25519:" + "0" * 64 + "'", "[ed25519:" + "1" * 64 + "]", "!!python/name:os.system",
    "mean", "int8", "follow_data", "adamw", "sgd_nesterov", '"a\\nb"', "*undefined",
])  # fmt: skip
FIELDS = {name: [f.name for f in dataclasses.fields(spec)] for name, spec in [
    ("model", ModelSpec), ("training", TrainingSpec), ("inner_optimizer", InnerOptimizerSpec),
    ("outer_optimizer", OuterOptimizerSpec), ("averaging", AveragingSpec), ("placement", PlacementSpec),
    ("membership", MembershipSpec),
]}  # fmt: skip
LINES = st.one_of(
    st.tuples(st.sampled_from(["name", "seed", "protocol_version", "colour"]), TOKENS).map(": ".join),
    st.sampled_from(sorted(FIELDS)).flatmap(
        lambda section: st.lists(
            st.tuples(st.sampled_from(FIELDS[section] + ["typo"]), TOKENS), min_size=1, max_size=4
        ).map(lambda items: section + ":\n" + "".join(f"  {k}: {v}\n" for k, v in items))
    ),
)


@PROPERTY
@given(st.lists(LINES, max_size=6).map("\n".join))
def test_manifest_shaped_yaml_with_wrong_values_is_a_manifest_or_a_manifest_error(text: str) -> None:
    manifest_or_refused(text)


DEFAULT_TEXT = resources.files("protocol").joinpath(DEFAULT_MANIFEST_NAME).read_text()


@PROPERTY
@given(st.one_of(
    mutations(DEFAULT_TEXT.encode()).map(lambda b: b.decode("utf-8", "replace")),
    st.tuples(st.integers(0, 80), TOKENS).map(
        lambda at: "\n".join(line.split(":")[0] + ": " + at[1] if i == at[0] and ":" in line else line
                             for i, line in enumerate(DEFAULT_TEXT.splitlines()))
    ),
))  # fmt: skip
def test_a_mutated_default_manifest_is_a_manifest_or_a_manifest_error(text: str) -> None:
    manifest_or_refused(text)


def test_huge_numbers_and_deep_nesting_are_manifest_errors() -> None:
    """Each of these used to escape as ValueError (int() and repr() refuse over 4300 digits, json.dumps too, in the
    swarm id) or RecursionError (PyYAML recurses per level)."""
    huge = "0x" + "f" * 5000
    for text in [f"seed: {huge}", f"name: {huge}", f"training: {{batch_size: {huge}}}",
                 f"outer_optimizer: {{lr: {huge}}}", f"membership: {{founders: [{huge}]}}", "seed: " + "1" * 5000,
                 "seed: 9223372036854775808", "[" * 1000, "a: " + "{a: " * 1000, "name: " + "[" * 1000]:  # fmt: skip
        assert manifest_or_refused(text) is None, text[:40]
    assert manifest_or_refused("seed: 9223372036854775807") is not None  # the largest 64-bit seed is fine
