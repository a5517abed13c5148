"""Public keys as peers see them: libp2p's key protobuf, peer ids, and the founder key strings manifests list.

A libp2p ``PrivateKey`` / ``PublicKey`` message is {1: key type, 2: key bytes}. A peer id is the multihash of
the ``PublicKey`` message: the message itself ("identity" multihash) when it is at most 42 bytes (Ed25519:
``12D3KooW…``), else its SHA-256 (RSA: ``Qm…``). A founder key, as a manifest lists it and `node keygen`
prints it, is ``ed25519:`` and the 32-byte public key in hex.
"""

from __future__ import annotations

import hashlib
import re
from typing import Optional, Tuple

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

RSA, ED25519 = 0, 1  # libp2p KeyType values
FOUNDER_KEY_PATTERN = re.compile(r"ed25519:[0-9a-f]{64}\Z")
PEER_ID_PATTERN = re.compile(r"[1-9A-HJ-NP-Za-km-z]{40,128}\Z")  # base58


class KeyFormatError(ValueError):
    """Bytes that are not a libp2p key of a type we can use."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, at: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while at < len(data) and shift < 64:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at
    raise KeyFormatError("truncated varint")


def encode_key(key_type: int, data: bytes) -> bytes:
    """libp2p's ``PrivateKey`` / ``PublicKey`` message: {1: type, 2: data}."""
    return b"\x08" + _varint(key_type) + b"\x12" + _varint(len(data)) + data


def decode_key(raw: bytes) -> Tuple[int, bytes]:
    """(type, data) of a ``PrivateKey`` / ``PublicKey`` message; KeyFormatError for anything else."""
    key_type: Optional[int] = None
    data = b""
    at = 0
    while at < len(raw):
        tag, at = _read_varint(raw, at)
        number, wire = tag >> 3, tag & 7
        if number == 1 and wire == 0:
            key_type, at = _read_varint(raw, at)
        elif number == 2 and wire == 2:
            length, at = _read_varint(raw, at)
            if at + length > len(raw):
                raise KeyFormatError("key bytes run past the end")
            data, at = raw[at : at + length], at + length
        else:
            raise KeyFormatError(f"unexpected field {number} (wire type {wire})")
    if key_type is None or not data:
        raise KeyFormatError("no key type or no key bytes")
    return key_type, bytes(data)


def peer_id_of_public_key(proto: bytes) -> str:
    """The base58 peer id of a protobuf ``PublicKey``."""
    if len(proto) <= 42:
        multihash = b"\x00" + _varint(len(proto)) + proto
    else:
        multihash = b"\x12\x20" + hashlib.sha256(proto).digest()
    return str(base58.b58encode(multihash).decode())


# --- founder keys: Ed25519 only ---------------------------------------------------------------------------------
def founder_key_string(raw_public: bytes) -> str:
    """``ed25519:<hex>`` of a 32-byte Ed25519 public key."""
    return "ed25519:" + raw_public.hex()


def parse_founder_key(text: str) -> bytes:
    """The 32 raw bytes of a founder key string; KeyFormatError naming the expected form."""
    if not isinstance(text, str) or not FOUNDER_KEY_PATTERN.match(text):
        shown = text[:80] if isinstance(text, str) else type(text).__name__  # str() refuses an int of 4300+ digits
        raise KeyFormatError(f"{shown!r} is not a founder key (ed25519: and 64 hex digits, as `node keygen` prints)")
    return bytes.fromhex(text[len("ed25519:") :])


def peer_id_of_founder(text: str) -> str:
    """The peer id a node running with that founder's key has."""
    return peer_id_of_public_key(encode_key(ED25519, parse_founder_key(text)))


def verify_ed25519(raw_public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(raw_public).verify(signature, message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
