"""Messages exchanged over p2p streams: a small msgpack header, optionally a raw tensor payload.

Frame layout: 4-byte big-endian header length, msgpack header, payload bytes (the rest).
Headers are validated against strict schemas; a tensor payload must match the header's
dtype and element count exactly, and hold only finite values, before anyone uses it.
"""

from __future__ import annotations

from typing import Dict, Literal, Optional, Tuple, Type, Union

import msgpack
import numpy as np
from pydantic.v1 import BaseModel, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, conint, constr

from protocol.records import MODULE_PATTERN
from protocol.version import PROTOCOL_VERSION

MAX_HEADER_BYTES = 4096
DTYPES = {"float32": np.float32, "float16": np.float16}


class WireError(ValueError):
    """A message from a peer is malformed; the sender is refused, nothing is applied."""


class Hello(BaseModel):
    """First words between peers: refuse anyone training another manifest or protocol."""

    type: Literal["hello"] = "hello"
    swarm_id: constr(max_length=64, strict=True)  # type: ignore[valid-type]
    protocol_version: StrictInt = PROTOCOL_VERSION
    peer_id: constr(max_length=128, strict=True)  # type: ignore[valid-type]


class HelloReply(BaseModel):
    type: Literal["hello_reply"] = "hello_reply"
    swarm_id: constr(max_length=64, strict=True)  # type: ignore[valid-type]
    protocol_version: StrictInt = PROTOCOL_VERSION
    manifest_name: constr(max_length=64, strict=True)  # type: ignore[valid-type]
    accepted: StrictBool
    reason: constr(max_length=512, strict=True) = ""  # type: ignore[valid-type]


class TensorPart(BaseModel):
    """One slice of a module's vector: a contribution ("part") or a reduced slice ("result")."""

    type: Literal["part", "result"]
    swarm_id: constr(max_length=64, strict=True)  # type: ignore[valid-type]
    module: constr(regex=MODULE_PATTERN, strict=True)  # type: ignore[valid-type]
    round: conint(ge=0, strict=True)  # type: ignore[valid-type]
    group_id: constr(regex=r"^[0-9a-f]{16}\Z", strict=True)  # type: ignore[valid-type]
    slice_index: conint(ge=0, lt=4096, strict=True)  # type: ignore[valid-type]
    sender: constr(min_length=1, max_length=128, strict=True)  # type: ignore[valid-type]
    weight: StrictFloat = 1.0
    numel: conint(ge=0, strict=True)  # type: ignore[valid-type]
    dtype: Literal["float32", "float16"]


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


class Ack(BaseModel):
    type: Literal["ack"] = "ack"
    ok: StrictBool
    reason: StrictStr = ""


Message = Union[Hello, HelloReply, TensorPart, StateRequest, StateReply, Ack]
_TYPES: Dict[str, Type[Message]] = {
    "state_request": StateRequest,
    "state_reply": StateReply,
    "hello": Hello,
    "hello_reply": HelloReply,
    "part": TensorPart,
    "result": TensorPart,
    "ack": Ack,
}


def encode(message: Message, payload: bytes = b"") -> bytes:
    header = msgpack.packb(message.dict(), use_bin_type=True)
    return len(header).to_bytes(4, "big") + header + payload


def decode(frame: bytes) -> Tuple[Message, memoryview]:
    """Split and validate a frame; raise WireError with a one-line reason."""
    if len(frame) < 4:
        raise WireError("frame shorter than its length prefix")
    size = int.from_bytes(frame[:4], "big")
    if size > MAX_HEADER_BYTES or 4 + size > len(frame):
        raise WireError(f"header length {size} is out of bounds")
    try:
        raw = msgpack.unpackb(frame[4 : 4 + size], raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types for garbage
        raise WireError(f"header is not msgpack: {type(e).__name__}") from None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if not isinstance(kind, str) or kind not in _TYPES:
        raise WireError("header has no known message type")
    try:
        message = _TYPES[kind].parse_obj(raw)  # type: ignore[union-attr]
    except ValidationError as e:
        first = e.errors()[0]
        raise WireError(f"{raw['type']}.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return message, memoryview(frame)[4 + size :]


def tensor_payload(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def read_tensor(part: TensorPart, payload: memoryview, expected_numel: Optional[int] = None) -> np.ndarray:
    """The payload as a float32 vector, after checking length, expected size and finiteness."""
    dtype = np.dtype(DTYPES[part.dtype]).newbyteorder("<")
    if expected_numel is not None and part.numel != expected_numel:
        raise WireError(f"part has {part.numel} elements, expected {expected_numel}")
    if len(payload) != part.numel * dtype.itemsize:
        raise WireError(f"payload has {len(payload)} bytes, header promises {part.numel} x {part.dtype}")
    values = np.frombuffer(payload, dtype=dtype).astype(np.float32)
    if not np.isfinite(values).all():
        raise WireError("payload holds NaN or infinite values")
    return values
