"""Messages exchanged over p2p streams: a small msgpack header, optionally a raw tensor payload.

Frame layout (protocol/frames.py): 4-byte big-endian header length, msgpack header, payload bytes.
Headers are validated against strict schemas (unknown fields refused); a tensor payload
must match the header's dtype and element count exactly, and hold only finite values,
before anyone uses it.

A refused message is answered with an ``Ack`` that carries a ``Refusal`` code: what the sender
acts on. The text beside it is for logs only.

Tensor encodings: ``float32`` and ``float16`` are little-endian values; ``int8`` is
blockwise absmax quantization: one little-endian float32 scale per block of
``INT8_BLOCK`` elements, then one signed byte per element (value = byte * scale / 127);
``topk2`` and ``topk8`` send a few values of each block with their positions (protocol/sparse.py).
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Type, Union

import msgpack
import numpy as np
from pydantic.v1 import (
    BaseModel,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    conint,
    conlist,
    constr,
    root_validator,
)

from protocol import sparse
from protocol.frames import FrameError, message_frame, split_message
from protocol.records import MAX_MODULES_PER_PEER, MODULE_PATTERN
from protocol.version import PROTOCOL_VERSION

DTYPES = {"float32": np.float32, "float16": np.float16}
WireDtype = Literal["float32", "float16", "int8", "topk2", "topk8"]
WIRE_DTYPES: Tuple[WireDtype, ...] = ("float32", "float16", "int8", "topk2", "topk8")
INT8_BLOCK = 1024


class WireError(ValueError):
    """A message from a peer is malformed; the sender is refused, nothing is applied.

    ``header`` holds the raw header when it parsed as a msgpack map but failed validation,
    so a receiver can tell which round the bad message claimed to belong to.
    """

    def __init__(self, message: str, header: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.header = header


class Hello(BaseModel):
    """First words between peers: refuse anyone training another manifest or protocol."""

    type: Literal["hello"] = "hello"
    swarm_id: constr(max_length=64, strict=True)  # type: ignore[valid-type]
    protocol_version: StrictInt = PROTOCOL_VERSION
    peer_id: constr(max_length=128, strict=True)  # type: ignore[valid-type]


class HelloReply(BaseModel):
    """The answer to a hello: who we are, whether we train together, and (as the payload, msgpack) the names
    of every module of our swarm, ``modules`` of them: what `node status` lists, hosted or not."""

    type: Literal["hello_reply"] = "hello_reply"
    swarm_id: constr(max_length=64, strict=True)  # type: ignore[valid-type]
    protocol_version: StrictInt = PROTOCOL_VERSION
    manifest_name: constr(max_length=64, strict=True)  # type: ignore[valid-type]
    accepted: StrictBool
    reason: constr(max_length=512, strict=True) = ""  # type: ignore[valid-type]
    modules: conint(ge=0, le=MAX_MODULES_PER_PEER, strict=True) = 0  # type: ignore[valid-type]


class TensorPart(BaseModel):
    """One slice of a module's vector: a contribution ("part") or a reduced slice ("result").

    ``weight`` is not chosen by the sender: a part must carry 1.0 (every member counts once);
    a result carries the number of parts its reducer combined. ``attempt`` 1 marks a slice
    sent again to a backup reducer after its first reducer failed or lied.
    """

    class Config:
        extra = "forbid"

    type: Literal["part", "result"]
    swarm_id: constr(max_length=64, strict=True)  # type: ignore[valid-type]
    module: constr(regex=MODULE_PATTERN, strict=True)  # type: ignore[valid-type]
    round: conint(ge=0, strict=True)  # type: ignore[valid-type]
    group_id: constr(regex=r"^[0-9a-f]{16}\Z", strict=True)  # type: ignore[valid-type]
    slice_index: conint(ge=0, lt=4096, strict=True)  # type: ignore[valid-type]
    sender: constr(min_length=1, max_length=128, strict=True)  # type: ignore[valid-type]
    weight: StrictFloat = 1.0
    numel: conint(ge=0, strict=True)  # type: ignore[valid-type]
    dtype: WireDtype
    attempt: conint(ge=0, le=1, strict=True) = 0  # type: ignore[valid-type]


class StateRequest(BaseModel):
    """Ask a peer for one module's state: its digest, or a range of [global copy; momentum]."""

    type: Literal["state_request"] = "state_request"
    swarm_id: constr(max_length=64, strict=True)  # type: ignore[valid-type]
    module: constr(regex=MODULE_PATTERN, strict=True)  # type: ignore[valid-type]
    offset: conint(ge=0, strict=True) = 0  # type: ignore[valid-type]
    count: conint(ge=0, strict=True) = 0  # type: ignore[valid-type]
    expected_hash: constr(max_length=64, strict=True) = ""  # type: ignore[valid-type]


class StateReply(BaseModel):
    """A module's digest (round, hash, size) and, for a range request, the values as float32 payload."""

    type: Literal["state_reply"] = "state_reply"
    ok: StrictBool
    reason: constr(max_length=512, strict=True) = ""  # type: ignore[valid-type]
    outer_round: conint(ge=0, strict=True) = 0  # type: ignore[valid-type]
    numel: conint(ge=0, strict=True) = 0  # type: ignore[valid-type]
    params_hash: constr(max_length=64, strict=True) = ""  # type: ignore[valid-type]
    offset: conint(ge=0, strict=True) = 0  # type: ignore[valid-type]
    count: conint(ge=0, strict=True) = 0  # type: ignore[valid-type]


class DialBack(BaseModel):
    """Ask a peer to open a TCP connection to us, at the address our stream to it came from, on each of
    ``ports``: whether others can dial us (node/swarm/reachability.py). Only that address is ever dialed,
    so nobody can aim a peer's connections at a third party."""

    class Config:
        extra = "forbid"

    type: Literal["dialback"] = "dialback"
    ports: conlist(conint(ge=1, le=65535, strict=True), min_items=1, max_items=4)  # type: ignore[valid-type]


class DialBackReply(BaseModel):
    """What a dial-back found: the address our stream came from (as the peer saw it) and which ports took a
    connection; ``observed`` is "" when the peer could not tell where we are (it then dialed nothing)."""

    class Config:
        extra = "forbid"

    type: Literal["dialback_reply"] = "dialback_reply"
    observed: constr(max_length=64, strict=True) = ""  # type: ignore[valid-type]
    reachable: conlist(conint(ge=1, le=65535, strict=True), max_items=4) = []  # type: ignore[valid-type]
    tried: conlist(conint(ge=1, le=65535, strict=True), max_items=4) = []  # type: ignore[valid-type]
    reason: constr(max_length=256, strict=True) = ""  # type: ignore[valid-type]
    now: Optional[StrictFloat] = None  # the answering peer's wall clock (`node doctor` measures skew with it)


class Refusal(str, Enum):
    """Why a peer refused an averaging message; the sender acts on the code, never on the text."""

    MALFORMED = "malformed"  # not a valid part or result (schema, size, dtype, non-finite values)
    WRONG_SWARM = "wrong_swarm"  # the receiver trains another manifest
    SPOOFED_SENDER = "spoofed_sender"  # the header names another peer than the stream's
    NOT_HOSTED = "not_hosted"  # the receiver does not host that module (placement changed)
    ROUND_OVER = "round_over"  # the receiver already finished that round
    WRONG_ROUND = "wrong_round"  # a member of the receiver's group sent a part for a round that is over
    BAD_WEIGHT = "bad_weight"  # a part must weigh 1; a result, the count of parts it combines
    WRONG_GROUP = "wrong_group"  # the receiver formed another group, or the sender or slice is not in it
    TOO_LATE = "too_late"  # the receiver stopped waiting for that result
    WRONG_SIZE = "wrong_size"  # the slice has another number of elements in the receiver's layout
    # The receiver has not posted for that round yet, or holds as much early mail as it takes: send it again
    # shortly (a receiver keeps mail only for the round it is about to average, within a bound of bytes).
    TOO_EARLY = "too_early"

    @property
    def benign(self) -> bool:
        """Says nothing bad about the sender (placement changed, or it is late or early): it is not excluded."""
        return self in (Refusal.ROUND_OVER, Refusal.NOT_HOSTED, Refusal.TOO_LATE, Refusal.TOO_EARLY)


class Ack(BaseModel):
    """The answer to a part or result: taken, or refused with a code (``reason``: text for logs)."""

    class Config:
        extra = "forbid"

    type: Literal["ack"] = "ack"
    ok: StrictBool
    code: Optional[Refusal] = None
    reason: constr(max_length=512, strict=True) = ""  # type: ignore[valid-type]

    @root_validator(skip_on_failure=True)
    def _code_iff_refused(cls, values: Dict[str, Any]) -> Dict[str, Any]:
        if values["ok"] == (values.get("code") is not None):
            raise ValueError("a refusal carries a code, an acceptance none")
        return values

    @classmethod
    def refuse(cls, code: Refusal, reason: str) -> "Ack":
        return cls(ok=False, code=code, reason=reason[:512])


Message = Union[Hello, HelloReply, TensorPart, StateRequest, StateReply, Ack, DialBack, DialBackReply]
_TYPES: Dict[str, Type[Message]] = {
    "dialback": DialBack,
    "dialback_reply": DialBackReply,
    "state_request": StateRequest,
    "state_reply": StateReply,
    "hello": Hello,
    "hello_reply": HelloReply,
    "part": TensorPart,
    "result": TensorPart,
    "ack": Ack,
}


def encode(message: Message, payload: bytes = b"") -> bytes:
    fields = {k: (v.value if isinstance(v, Enum) else v) for k, v in message.dict().items()}
    return message_frame(msgpack.packb(fields, use_bin_type=True), payload)


def decode(frame: bytes) -> Tuple[Message, memoryview]:
    """Split and validate a frame; raise WireError with a one-line reason."""
    try:
        header, payload = split_message(frame)
    except FrameError as e:
        raise WireError(str(e)) from None
    try:
        raw = msgpack.unpackb(header, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types for garbage
        raise WireError(f"header is not msgpack: {type(e).__name__}") from None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if not isinstance(kind, str) or kind not in _TYPES:
        raise WireError("header has no known message type")
    if not all(isinstance(key, str) for key in raw):  # msgpack also gives bytes keys; field names are str
        raise WireError(f"{kind} header has a key that is not a string")
    try:
        message = _TYPES[kind].parse_obj(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise WireError(f"{raw['type']}.{'.'.join(map(str, first['loc']))}: {first['msg']}", raw) from None
    return message, payload


def tensor_payload(array: np.ndarray, dtype: str = "", topk: int = sparse.BLOCK) -> bytes:
    """Encode a float vector as ``dtype`` (default: the array's own float32/float16); ``topk``: values per block
    that ``topk2`` sends."""
    if dtype in sparse.SPARSE_DTYPES:
        return sparse.encode(np.asarray(array, dtype=np.float32), dtype, topk)
    if dtype == "int8":
        scales, codes = quantize_int8(np.asarray(array, dtype=np.float32))
        return scales.astype("<f4").tobytes() + codes.tobytes()
    if dtype:
        array = np.asarray(array, dtype=DTYPES[dtype])
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def quantize_int8(values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax int8: (float32 scale per block, int8 code per element)."""
    count = values.size
    blocks = -(-count // INT8_BLOCK)
    padded = np.zeros(blocks * INT8_BLOCK, dtype=np.float32)
    padded[:count] = values
    shaped = padded.reshape(blocks, INT8_BLOCK)
    scales = np.abs(shaped).max(axis=1)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # in blocks written again just below
        factor = (127.0 / safe).astype(np.float32)
        codes = np.rint(shaped * factor[:, None])
    tiny = ~np.isfinite(factor)  # a block whose largest value is subnormal: 127 / scale overflows float32
    if tiny.any():
        codes[tiny] = np.rint(shaped[tiny] / safe[tiny, None] * 127.0)
    codes = codes.astype(np.int8)
    return scales.astype(np.float32), codes.reshape(-1)[:count]


def dequantize_int8(scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    count = codes.size
    padded = np.zeros(scales.size * INT8_BLOCK, dtype=np.float32)
    padded[:count] = codes
    out = padded.reshape(scales.size, INT8_BLOCK) * (scales.astype(np.float32) / 127.0)[:, None]
    return out.reshape(-1)[:count]


def wire_round_trip(values: np.ndarray, dtype: str, topk: int = sparse.BLOCK) -> np.ndarray:
    """What a receiver decodes from ``values`` sent as ``dtype`` (float32 out)."""
    if dtype in sparse.SPARSE_DTYPES:
        return sparse.decode(sparse.encode(np.asarray(values, dtype=np.float32), dtype, topk), values.size, dtype)
    if dtype == "int8":
        return dequantize_int8(*quantize_int8(np.asarray(values, dtype=np.float32)))
    return np.asarray(values, dtype=DTYPES[dtype]).astype(np.float32)


def payload_bytes(numel: int, dtype: str) -> int:
    """Bytes of ``numel`` values as ``dtype``; for a sparse dtype, with every value sent (the most it takes)."""
    if dtype in sparse.SPARSE_DTYPES:
        return sparse.payload_size(numel, numel, dtype)
    if dtype == "int8":
        return 4 * (-(-numel // INT8_BLOCK)) + numel
    return numel * np.dtype(DTYPES[dtype]).itemsize


def read_tensor(part: TensorPart, payload: memoryview, expected_numel: Optional[int] = None) -> np.ndarray:
    """The payload as a float32 vector, after checking length, expected size and finiteness."""
    if expected_numel is not None and part.numel != expected_numel:
        raise WireError(f"part has {part.numel} elements, expected {expected_numel}")
    if part.dtype in sparse.SPARSE_DTYPES:
        if len(payload) > payload_bytes(part.numel, part.dtype):
            raise WireError(f"payload has {len(payload)} bytes, more than {part.numel} x {part.dtype} takes")
        try:
            return sparse.decode(payload, part.numel, part.dtype)
        except sparse.SparseError as e:
            raise WireError(str(e)) from None
    if len(payload) != payload_bytes(part.numel, part.dtype):
        raise WireError(f"payload has {len(payload)} bytes, header promises {part.numel} x {part.dtype}")
    if part.dtype == "int8":
        blocks = -(-part.numel // INT8_BLOCK)
        scales = np.frombuffer(payload[: 4 * blocks], dtype="<f4")
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise WireError("int8 payload has a negative or non-finite scale")
        with np.errstate(over="ignore"):  # a hostile scale near the float32 maximum: inf, refused below
            values = dequantize_int8(scales, np.frombuffer(payload[4 * blocks :], dtype=np.int8))
    else:
        values = np.frombuffer(payload, dtype=np.dtype(DTYPES[part.dtype]).newbyteorder("<")).astype(np.float32)
    if not np.isfinite(values).all():
        raise WireError("payload holds NaN or infinite values")
    return values


def module_names_payload(modules: Sequence[str]) -> bytes:
    """The payload of a HelloReply: the swarm's module names (as many as its ``modules`` field says)."""
    return bytes(msgpack.packb(list(modules), use_bin_type=True))


def read_module_names(reply: HelloReply, payload: memoryview) -> List[str]:
    """The module names a HelloReply's payload carries; WireError unless it is a list of exactly
    ``reply.modules`` distinct valid module names."""
    if reply.modules == 0 and len(payload) == 0:
        return []
    try:
        names = msgpack.unpackb(payload, raw=False)
    except Exception as e:  # msgpack raises many types for garbage
        raise WireError(f"hello_reply payload is not msgpack: {type(e).__name__}") from None
    if not isinstance(names, list) or len(names) != reply.modules:
        raise WireError(f"hello_reply payload must list {reply.modules} module name(s)")
    pattern = re.compile(MODULE_PATTERN)
    if not all(isinstance(n, str) and pattern.match(n) for n in names) or len(set(names)) != len(names):
        raise WireError("hello_reply payload holds an invalid or repeated module name")
    return names
