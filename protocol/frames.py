"""The two framing layers of everything peers send each other over p2p streams.

1. *Stream frames.* A stream carries requests and responses one after the other; each is an 8-byte
   big-endian length followed by that many bytes. A frame longer than ``MAX_FRAME_BYTES`` is refused
   before it is read: the largest legitimate message is one slice of the largest module, far below it.
2. *Message frames* (the bytes inside a stream frame): a 4-byte big-endian header length, a msgpack
   header of at most ``MAX_HEADER_BYTES``, then the payload (a tensor's raw bytes, or nothing).
   protocol/wire.py defines the headers and validates them.

The byte layouts live here; reading and writing streams is the network adapter's (node/net/).
"""

from __future__ import annotations

from typing import Tuple

STREAM_PREFIX_BYTES = 8
MAX_FRAME_BYTES = 1 << 30
MESSAGE_PREFIX_BYTES = 4
MAX_HEADER_BYTES = 4096


class FrameError(ValueError):
    """A frame's length prefix is out of bounds; nothing of it is used."""


def stream_prefix(size: int) -> bytes:
    """The length prefix of a stream frame of ``size`` bytes."""
    return size.to_bytes(STREAM_PREFIX_BYTES, "big")


def stream_frame_size(prefix: bytes) -> int:
    """The size a stream frame's prefix announces; FrameError past ``MAX_FRAME_BYTES``."""
    size = int.from_bytes(prefix, "big")
    if size > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {size} bytes is over the {MAX_FRAME_BYTES} limit")
    return size


def message_frame(header: bytes, payload: bytes = b"") -> bytes:
    """A message frame: header length, header, payload."""
    return len(header).to_bytes(MESSAGE_PREFIX_BYTES, "big") + header + payload


def split_message(frame: bytes) -> Tuple[bytes, memoryview]:
    """(header, payload) of a message frame; FrameError when the header length is out of bounds."""
    if len(frame) < MESSAGE_PREFIX_BYTES:
        raise FrameError("frame shorter than its length prefix")
    size = int.from_bytes(frame[:MESSAGE_PREFIX_BYTES], "big")
    end = MESSAGE_PREFIX_BYTES + size
    if size > MAX_HEADER_BYTES or end > len(frame):
        raise FrameError(f"header length {size} is out of bounds")
    return bytes(frame[MESSAGE_PREFIX_BYTES:end]), memoryview(frame)[end:]
