"""A node's identity key: the libp2p private key p2pd runs with, read here too so the node can sign its records.

Key files are libp2p's protobuf ``PrivateKey`` (field 1: key type, field 2: key bytes), as p2pd reads them:
RSA in DER (hivemind writes those) or Ed25519 (64 bytes: seed, then public key; what this module writes). A
peer id is the multihash of the protobuf ``PublicKey``: the key itself ("identity" multihash) when that is at
most 42 bytes (Ed25519: ``12D3KooW…``), else its SHA-256 (RSA: ``Qm…``). So a record's signature can be
checked against the peer id that names its owner, with the public key carried beside the signature.

No hivemind here: `node doctor`, the config checks and the record validator (node/net/hivemind.py) share it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from node.errors import ConfigError
from protocol.keys import ED25519, RSA, KeyFormatError, decode_key, encode_key, peer_id_of_public_key
from protocol.typed import read_small_file

MAX_IDENTITY_BYTES = 64 << 10  # an RSA-4096 key in DER is under 3 KB
_FIX = "give --identity a key file written by a node (or a path where a new one may be created)"
PrivateKey = Union[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]


# --- keys ----------------------------------------------------------------------------------------------------------
def private_key_from(raw: bytes) -> PrivateKey:
    key_type, data = decode_key(raw)
    if key_type == RSA:
        try:
            key = serialization.load_der_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise KeyFormatError(f"not an RSA key in DER ({str(e).split('.')[0]})") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KeyFormatError("the DER key is not RSA")
        return key
    if key_type == ED25519:
        if len(data) not in (32, 64):
            raise KeyFormatError(f"an Ed25519 key has 32 or 64 bytes, not {len(data)}")
        return ed25519.Ed25519PrivateKey.from_private_bytes(data[:32])
    raise KeyFormatError(f"key type {key_type} is not supported here (RSA or Ed25519)")


def public_key_proto(key: PrivateKey) -> bytes:
    """The protobuf ``PublicKey`` of ``key``, the bytes its peer id is the multihash of."""
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return encode_key(RSA, der)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return encode_key(ED25519, raw)


def sign(key: PrivateKey, message: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return bytes(key.sign(message, padding.PKCS1v15(), hashes.SHA256()))
    return bytes(key.sign(message))


def verify(proto: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``message`` was made by the private half of the protobuf ``PublicKey``."""
    try:
        key_type, data = decode_key(proto)
        if key_type == RSA:
            public = serialization.load_der_public_key(data)
            if not isinstance(public, rsa.RSAPublicKey) or public.key_size > 8192:
                return False
            public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        elif key_type == ED25519 and len(data) == 32:
            ed25519.Ed25519PublicKey.from_public_bytes(data).verify(signature, message)
        else:
            return False
    except (InvalidSignature, KeyFormatError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A node's key, its public half as peers see it, and its peer id."""

    key: PrivateKey
    public: bytes
    peer_id: str

    def sign(self, message: bytes) -> bytes:
        return sign(self.key, message)


def read_identity(path: str, what: str = "identity file", fix: str = _FIX) -> Identity:
    """The identity in ``path``; ConfigError (one line, exit 2) if it is not a key file a node can use."""
    if not os.path.exists(path):
        raise ConfigError(f"{what} {path} does not exist; {fix}")
    check_identity_file(path, what, fix)
    with open(path, "rb") as f:
        key = private_key_from(f.read(MAX_IDENTITY_BYTES + 1))
    public = public_key_proto(key)
    return Identity(key, public, peer_id_of_public_key(public))


def write_new_identity(path: str) -> Identity:
    """A new Ed25519 key in ``path`` (mode 0600, written to a temporary file and renamed into place)."""
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    public_raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    write_atomically(path, encode_key(ED25519, seed + public_raw), 0o600)
    public = public_key_proto(key)
    return Identity(key, public, peer_id_of_public_key(public))


def write_atomically(path: str, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode``, all or nothing: a temporary file beside it, synced and renamed."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".commons-", suffix=".tmp")
    try:
        os.fchmod(handle, mode)
        os.write(handle, data)
        os.fsync(handle)
        os.close(handle)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def check_identity_file(path: str, what: str = "identity file", fix: str = _FIX) -> None:
    """Refuse, before any daemon starts, an identity file p2pd could not use (ConfigError, one line): an
    existing one must be a regular file, readable by its owner alone (a private key others can read is no
    longer private), holding a libp2p private key; a missing one must be creatable (its directory exists and
    is writable). ``what`` and ``fix`` word the message (a founder's key: `node invite`, `node revoke`)."""
    if not os.path.lexists(path):
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {path} does not exist and cannot be created in {directory}; {fix}")
        return
    try:
        raw = read_small_file(path, what, fix, MAX_IDENTITY_BYTES)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(
            f"{what} {path} can be read by {'others' if mode & 0o007 else 'its group'} (mode {mode:04o}); a private "
            f"key must be its owner's alone: chmod 600 {path}"
        )
    if not raw:
        raise ConfigError(f"{what} {path} is empty; {fix}")
    try:
        private_key_from(raw)
    except KeyFormatError as e:
        raise ConfigError(f"{what} {path} does not hold a libp2p private key ({e}); {fix}") from None
