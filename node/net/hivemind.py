"""The one door to hivemind: its DHT and p2p streams as a SwarmPort (node/net/port.py).

Nothing else in `node/` imports hivemind. Multiaddrs go in and come out as strings;
hivemind's exceptions become ours (`PeerUnreachable`, ConnectionError, TimeoutError). Every
coroutine here runs on the swarm's own event loop thread (node/net/loop.py), so callers on the
training thread never block it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import tempfile
from functools import partial
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import hivemind  # node/__init__.py has chosen hivemind's memory sharing strategy already
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import raise_if_failed, read_pbmsg_safe, write_pbmsg
from hivemind.proto import p2pd_pb2
from hivemind.utils.auth import AuthorizerBase
from hivemind.utils.logging import use_hivemind_log_handler
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from node.errors import PeerUnreachable
from node.net.admission import Admission, Refusal, admit_stream, read_refusal, refuse_stream
from node.net.identity import Identity, read_identity, verify, write_new_identity
from node.net.loop import LoopThread
from node.net.port import REMOTE_ADDRESS, Handler, Refused
from node.net.streams import (
    STREAM_IDLE_SECONDS,
    TURN_SECONDS,
    Limits,
    Stream,
    StreamPool,
    body_deadline,
    read_body,
    read_frame,
    read_size,
    write_frame,
)
from node.ops import children_of, die_with_parent, read_stat
from protocol.frames import FrameError
from protocol.keys import RSA, decode_key, peer_id_of_public_key

T = TypeVar("T")
logger = logging.getLogger(__name__)

_GO_TIMESTAMP = re.compile(r"^\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}(\.\d+)? ")  # how p2pd's log lines begin


def route_hivemind_logs() -> None:
    """Send hivemind's records to the root logger's handler (node/ops/logs.py) instead of its own,
    keeping the level setup_logging gave the "hivemind" logger (hivemind's switch resets it). The DHT
    process, forked later, inherits this."""
    hivemind_logger = logging.getLogger("hivemind")
    level = hivemind_logger.level
    use_hivemind_log_handler("nowhere")
    hivemind_logger.setLevel(level)
    daemon_logger = logging.getLogger("hivemind.p2p.p2p_daemon")
    if not any(isinstance(f, _DaemonShutdownNoise) for f in daemon_logger.filters):
        daemon_logger.addFilter(_DaemonShutdownNoise())
    dht_logger = logging.getLogger("hivemind.dht.node")
    if not any(isinstance(f, _UnansweredPing) for f in dht_logger.filters):
        dht_logger.addFilter(_UnansweredPing())


class _UnansweredPing(logging.Filter):
    """Where a DHT starts without its bootstrap peers' answer (members-only swarms, `node status`), the hello
    that follows says why in one line (refused, or nobody there); hivemind's own warning is debug output."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "DHTNode bootstrap failed" not in record.getMessage():
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


class _DaemonShutdownNoise(logging.Filter):
    """p2pd reports its own listener closing when it stops ("use of closed network connection") as an
    error, and hivemind relays it as ERROR: on a Ctrl+C that reaches p2pd directly, a clean stop looked like
    a failure. That one message is debug output."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "use of closed network connection" not in record.getMessage():
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


RECORD_TRAILER = b"CMS1"  # ends every signed value: ... public key, signature, their lengths (2 bytes each), this
MAX_VALUE_BYTES = 256 << 10  # a peer record naming 4096 modules is under 100 KB
DEFAULT_MAX_RECORD_SECONDS = 3600.0


class SignedRecords(RecordValidatorBase):  # type: ignore[misc]  # hivemind has no type stubs
    """Only a record's owner can write it: every DHT record of ours has a subkey that is a peer id, and its
    value ends in that peer's public key and its signature over (key, subkey, value, expiration). A record
    that fails (unsigned, signed by another key, tampered, too large, or expiring later than
    ``max_record_seconds`` from now) is refused when a peer asks us to store it and dropped when a peer
    returns it to us; ``refused`` counts them (shared with the DHT process, which does the checking).

    The DHT process signs our own records with the key in ``identity_path`` (node/net/identity.py): the
    key p2pd runs with, so the signer is the peer the network knows."""

    def __init__(self, identity_path: Optional[str], max_record_seconds: float = DEFAULT_MAX_RECORD_SECONDS) -> None:
        self._identity_path = identity_path
        self._identity: Optional[Identity] = None
        self._subkey: Optional[bytes] = None
        self.max_record_seconds = max_record_seconds
        self.refused = multiprocessing.get_context("fork").Value("Q", 0, lock=True)

    def _me(self) -> Optional[Identity]:
        if self._identity is None and self._identity_path is not None:
            self._identity = read_identity(self._identity_path)
            self._subkey = MSGPackSerializer.dumps(self._identity.peer_id)
        return self._identity

    @staticmethod
    def _message(record: DHTRecord, value: bytes) -> bytes:
        packed = MSGPackSerializer.dumps((record.key, record.subkey, value, record.expiration_time))
        return b"commons-record|" + bytes(packed)

    def sign_value(self, record: DHTRecord) -> bytes:
        me = self._me()
        if me is None or record.subkey != self._subkey:
            return bytes(record.value)  # not ours to sign: every peer will refuse it
        signature = me.sign(self._message(record, record.value))
        lengths = len(me.public).to_bytes(2, "big") + len(signature).to_bytes(2, "big")
        return bytes(record.value) + me.public + signature + lengths + RECORD_TRAILER

    @staticmethod
    def _split(value: bytes) -> Optional[Tuple[bytes, bytes, bytes]]:
        """(value, public key, signature) of a signed value, or None."""
        if len(value) < 8 or not value.endswith(RECORD_TRAILER):
            return None
        key_length = int.from_bytes(value[-8:-6], "big")
        signature_length = int.from_bytes(value[-6:-4], "big")
        body = len(value) - 8 - key_length - signature_length
        if body < 0:
            return None
        return value[:body], value[body : body + key_length], value[body + key_length : -8]

    def validate(self, record: DHTRecord) -> bool:
        ok = self._valid(record)
        if not ok:
            with self.refused.get_lock():
                self.refused.value += 1
        return ok

    def _valid(self, record: DHTRecord) -> bool:
        if len(record.value) > MAX_VALUE_BYTES or record.expiration_time > now() + self.max_record_seconds:
            return False
        parts = self._split(bytes(record.value))
        if parts is None:
            return False
        value, public, signature = parts
        try:
            owner = MSGPackSerializer.loads(record.subkey)
        except Exception:  # msgpack raises several types for garbage
            return False
        if not isinstance(owner, str) or peer_id_of_public_key(public) != owner:
            return False
        return verify(public, self._message(record, value), signature)

    def strip_value(self, record: DHTRecord) -> bytes:
        parts = self._split(bytes(record.value))
        return parts[0] if parts is not None else bytes(record.value)

    @property
    def priority(self) -> int:
        return 10  # before any validator that reads the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False

    def __getstate__(self) -> Dict[str, Any]:
        """For a copy sent to another process (hivemind's DHT process is forked, so it needs none): without the
        key (read again from its file where it is needed) and counting on its own."""
        state = self.__dict__.copy()
        state["_identity"] = None
        state["refused"] = _Count(int(self.refused.value))
        return state


DHT_SKEW_SECONDS = 120.0  # how far a signed DHT request's time may be from ours
_SEEN_NONCES = 100_000


class InviteAuthorizer(AuthorizerBase):  # type: ignore[misc]  # hivemind has no type stubs
    """Members-only DHT (node/net/admission.py), through hivemind's authorizer hook: each DHT request we send
    carries our public key, our invite and a time and nonce, signed with our identity key; each we serve must
    carry an invite that admits the signer, and a valid, fresh signature. A refused request gets no answer
    (counted by reason, in the Admission's array shared with the main process). Runs in the DHT process.

    hivemind's request field names are kept (``auth.client_access_token``): its ``public_key`` holds our key's
    protobuf, its ``signature`` our invite."""

    def __init__(self, admission: Admission, identity_path: str) -> None:
        self.admission = admission
        self._identity_path = identity_path
        self._identity: Optional[Identity] = None
        self._nonces: Dict[bytes, float] = {}

    def _me(self) -> Identity:
        if self._identity is None:
            self._identity = read_identity(self._identity_path)
        return self._identity

    async def sign_request(self, request: Any, service_public_key: Any) -> None:
        me = self._me()
        auth = request.auth
        auth.client_access_token.username = "commons"
        auth.client_access_token.public_key = me.public
        auth.client_access_token.signature = self.admission.own_invite or b""
        auth.time = now()
        auth.nonce = secrets.token_bytes(12)
        auth.signature = b""
        auth.signature = me.sign(b"commons-dht|" + request.SerializeToString())

    async def validate_request(self, request: Any) -> bool:
        refusal = self._refusal(request)
        if refusal is not None:
            self.admission.count_dht(refusal.reason)
            return False
        return True

    def _refusal(self, request: Any) -> Optional[Refusal]:
        auth = request.auth
        public = bytes(auth.client_access_token.public_key)
        if not public:
            return Refusal("no_invite", "unsigned DHT request")
        try:
            peer = peer_id_of_public_key(public)
        except Exception:  # a key we cannot read at all
            return Refusal("malformed", "unreadable public key")
        refusal = self.admission.check(peer, bytes(auth.client_access_token.signature) or None)
        if refusal is not None:
            return refusal
        stamp, nonce, signature = float(auth.time), bytes(auth.nonce), bytes(auth.signature)
        if not abs(stamp - now()) <= DHT_SKEW_SECONDS or not 8 <= len(nonce) <= 32 or nonce in self._nonces:
            return Refusal("malformed", "stale or replayed DHT request")
        auth.signature = b""
        message = b"commons-dht|" + request.SerializeToString()
        auth.signature = signature
        if not verify(public, message, signature):
            return Refusal("malformed", "bad DHT request signature")
        self._remember(nonce, stamp)
        return None

    def _remember(self, nonce: bytes, stamp: float) -> None:
        self._nonces[nonce] = stamp
        if len(self._nonces) > _SEEN_NONCES:
            cutoff = now() - DHT_SKEW_SECONDS
            self._nonces = {n: t for n, t in self._nonces.items() if t >= cutoff}
            while len(self._nonces) > _SEEN_NONCES:  # a flood within the window: forget the oldest
                self._nonces.pop(next(iter(self._nonces)))

    async def sign_response(self, response: Any, request: Any) -> None:
        return None  # members answer only members (validate_request), so a response needs no proof of its own

    async def validate_response(self, response: Any, request: Any) -> bool:
        return True


async def _take_revocations(blobs: List[bytes], _dht: Any, node: Any) -> int:
    """In the DHT process: give its authorizer the revocations the node knows (DHT.run_coroutine)."""
    authorizer = getattr(node.protocol, "authorizer", None)
    added = 0
    if isinstance(authorizer, InviteAuthorizer):
        for blob in blobs:
            try:
                added += authorizer.admission.add_revocation(blob) is not None
            except ValueError:
                continue
    return added


class _Count:
    """A counter with the interface of a multiprocessing.Value, for one process."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def get_lock(self) -> "contextlib.nullcontext[None]":
        return contextlib.nullcontext()


def now() -> float:
    """The clock every DHT record is stamped with (wall time, shared with hivemind)."""
    return float(get_dht_time())


class _GuardedDHT(hivemind.DHT):  # type: ignore[misc]  # hivemind has no type stubs
    """hivemind's DHT process, made to die with its parent and take its p2pd along.

    hivemind's DHT child ignores SIGINT and outlives a SIGKILLed parent, leaving the
    p2pd daemon running forever. Here the child asks the kernel for SIGTERM when its
    parent dies, and on SIGTERM stops its own p2pd before exiting.
    """

    def run(self) -> None:
        alive = die_with_parent(self._parent_pid)  # not Linux: hivemind's behaviour
        signal.signal(signal.SIGTERM, _terminate_children_and_exit)
        if not alive:  # the parent died before the request took effect
            _terminate_children_and_exit()
        super().run()


def _is_rsa_key(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return decode_key(f.read(1 << 16))[0] == RSA
    except (OSError, ValueError):
        return False


def _daemon_alive(dht_pid: Optional[int]) -> bool:
    """The DHT process still has its p2pd."""
    return dht_pid is not None and any(
        (stat := read_stat(pid)) is not None and stat.name == "p2pd" for pid in children_of(dht_pid)
    )


def _terminate_children_and_exit(*_: Any) -> None:
    for child in children_of(os.getpid()):  # our p2pd
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            pass
    os._exit(0)


class HivemindSwarm:
    """A joined DHT plus a p2p handle for our own stream protocols: the real SwarmPort, and its lifecycle."""

    def __init__(self, dht: hivemind.DHT, loop: LoopThread, p2p: Any) -> None:
        self._dht = dht
        self._loop = loop
        self._p2p = p2p
        self._streams = StreamPool()
        self.limits = Limits()  # what we take from peers at once (node/net/streams.py); set_frame_limit
        self._peer_id = str(p2p.peer_id)
        self._closed = False
        self._validator: Optional[SignedRecords] = None
        self._admission: Optional[Admission] = None
        self.on_refused: Optional[Callable[[Refused], None]] = None  # told of every refusal of our requests
        self._clean_up: Callable[[], None] = lambda: None

    @property
    def peer_id(self) -> str:
        return self._peer_id

    def now(self) -> float:
        return now()

    @classmethod
    def open(
        cls,
        *,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        announce_maddrs: Sequence[str] = (),
        identity_path: Optional[str] = None,
        client_mode: bool = False,
        startup_timeout: float = 20.0,
        max_record_seconds: float = DEFAULT_MAX_RECORD_SECONDS,
        admission: Optional[Admission] = None,
        check_identity_free: bool = True,
        ensure_bootstrap: bool = True,
    ) -> "HivemindSwarm":
        """Start the DHT (and its p2pd) and join through ``initial_peers``; raise PeerUnreachable.

        The node signs its DHT records with its identity key (SignedRecords), so it always has a key file:
        ``identity_path``, created (Ed25519) if missing, or a new one in a temporary directory removed on close.
        ``max_record_seconds``: the longest a record may still live when stored (the manifest's longest TTL).
        ``admission``: a members-only swarm's checks (node/net/admission.py): every request we serve must come
        from a member, and every request we send presents our invite. ``check_identity_free``: False lets a
        short-lived client (`node status`) run with the key of a node that is running. ``ensure_bootstrap`` False: start
        even when no bootstrap peer answers the DHT's ping (the caller's hello then says why: a members-only swarm
        answers an outsider's hello with its refusal, and its DHT nothing)."""
        temporary: Optional[str] = None
        fresh = identity_path is None or not os.path.exists(identity_path)
        if identity_path is None:
            temporary = tempfile.mkdtemp(prefix="commons-identity-")
            identity_path = os.path.join(temporary, "identity.key")
        if fresh:
            write_new_identity(identity_path)
        validator = SignedRecords(identity_path, max_record_seconds)
        kwargs: Dict[str, Any] = dict(
            initial_peers=list(initial_peers),
            host_maddrs=list(host_maddrs),
            client_mode=client_mode,
            identity_path=identity_path,
            startup_timeout=startup_timeout,
            record_validators=[validator],
            # A key made a moment ago is nobody else's: skip hivemind's check (it starts a second daemon). hivemind
            # reads the key file as RSA there, so an Ed25519 key (ours) would fail it: `node doctor` checks those.
            check_if_identity_free=check_identity_free and not fresh and _is_rsa_key(identity_path),
            # Never reach for the LAN gateway (UPnP) or public relays on our own.
            nat_port_map=False,
            use_relay=False,
            auto_nat=False,
        )
        if announce_maddrs:
            kwargs["announce_maddrs"] = list(announce_maddrs)
        if admission is not None:
            kwargs["authorizer"] = InviteAuthorizer(admission, identity_path)
        if admission is not None or not ensure_bootstrap:
            # A peer that refuses us answers no ping: say why with the hello's refusal (node/swarm/hello.py),
            # not with "no bootstrap peer answered".
            kwargs["ensure_bootstrap_success"] = False

        def clean_up() -> None:
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)

        dht = _GuardedDHT(start=False, **kwargs)
        try:
            dht.run_in_background(await_ready=True, timeout=startup_timeout + 10)
        except Exception as e:
            dht_kill(dht, graceful=False)
            clean_up()
            raise PeerUnreachable(_explain_start_failure(e, initial_peers, startup_timeout)) from None
        loop = LoopThread()
        try:
            p2p = loop.run(dht.replicate_p2p(), timeout=startup_timeout)
        except Exception as e:
            loop.stop()
            dht_kill(dht)
            clean_up()
            raise PeerUnreachable(f"cannot attach to the p2p daemon: {e}") from None
        swarm = cls(dht, loop, p2p)
        swarm._validator, swarm._clean_up = validator, clean_up
        swarm._admission = admission
        return swarm

    @property
    def records_refused(self) -> int:
        """DHT records refused or dropped by the signature and bound checks (SignedRecords), so far."""
        return int(self._validator.refused.value) if self._validator is not None else 0

    @property
    def admission(self) -> Optional[Admission]:
        return self._admission

    async def take_revocations(self, blobs: Sequence[bytes]) -> int:
        """Give the DHT process the founders' revocations the node has (it refuses those peers' DHT requests
        from then on); how many were new there."""
        return int(await self._dht.run_coroutine(partial(_take_revocations, list(blobs)), return_future=True))

    # --- running coroutines -------------------------------------------------------
    def run(self, coro: Awaitable[T], timeout: Optional[float] = None) -> T:
        """Run a coroutine on the swarm loop from another thread and wait for it."""
        return self._loop.run(coro, timeout)

    def submit(self, coro: Awaitable[T]) -> "concurrent.futures.Future[T]":
        return self._loop.submit(coro)

    # --- addresses ----------------------------------------------------------------
    def visible_maddrs(self) -> List[str]:
        return [str(m) for m in self._dht.get_visible_maddrs(latest=True)]

    # --- DHT records ----------------------------------------------------------------
    async def store(self, key: str, subkey: str, value: Any, expiration_time: float) -> bool:
        result = await self._dht.store(key, value, expiration_time, subkey=subkey, return_future=True)
        return bool(result)

    async def read(self, key: str) -> Dict[str, Tuple[Any, float]]:
        """All live subkey values under ``key``, as {subkey: (value, expiration_time)}."""
        found = await self._dht.get(key, latest=True, return_future=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        out: Dict[str, Tuple[Any, float]] = {}
        for subkey, item in found.value.items():
            value = getattr(item, "value", None)
            expiration = getattr(item, "expiration_time", 0.0)
            if isinstance(subkey, str) and expiration >= now():
                out[subkey] = (value, expiration)
        return out

    # --- request/response over p2p streams -----------------------------------------
    async def serve(self, name: str, handler: Handler) -> None:
        """Serve ``name``: a stream carries framed requests, each answered by one framed response, in turn,
        until the caller closes it or leaves it idle for ``STREAM_IDLE_SECONDS``."""

        admission = self._admission if self._admission is not None and self._admission.serves else None
        request_kind = name.rsplit("/", 1)[-1]
        limits = self.limits

        async def _serve(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = str(info.peer_id)
            REMOTE_ADDRESS.set(str(info.addr) if getattr(info, "addr", None) is not None else None)
            if not limits.open_stream(peer):  # closed at once: its descriptors (ours and p2pd's) go back
                limits.refuse(request_kind, peer, "too_many_streams", f"over {limits.streams_per_peer} open streams")
                writer.close()
                return
            try:
                if admission is not None and not await admit_stream(admission, peer, reader, writer, request_kind):
                    return
                while True:
                    try:
                        size = await read_size(reader, idle_timeout=STREAM_IDLE_SECONDS, limit=limits.max_frame)
                    except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
                        return  # the caller closed the stream, went away mid-frame, or left it idle
                    except FrameError as e:  # a frame we will not read: the caller sees a closed stream
                        limits.refuse(request_kind, peer, "frame_too_large", str(e))
                        return
                    wait = limits.turn(peer, request_kind, longest=TURN_SECONDS)
                    if wait is None:  # far over its rate: not worth holding a stream for
                        limits.refuse(request_kind, peer, "too_fast", "far over its rate of requests")
                        return
                    if wait > 0:  # over its rate: answered when its turn comes, on this stream
                        limits.refuse(request_kind, peer, "too_fast", f"over its rate of requests: held {wait:.1f} s")
                        await asyncio.sleep(wait)
                    if not limits.reserve(peer, size):
                        limits.refuse(request_kind, peer, "over_budget", f"a frame of {size} bytes is over the budget")
                        return
                    try:
                        if not await self._serve_one(name, handler, peer, reader, writer, size, admission):
                            return
                    finally:
                        limits.release(peer, size)
            except asyncio.CancelledError:
                # The node is leaving (its loop cancels every task). This task was started by asyncio's
                # stream server, whose done-callback calls task.exception(), which on Python 3.11 raises
                # for a cancelled task and logs a traceback per open stream: end the task normally instead.
                return
            finally:
                limits.close_stream(peer)
                writer.close()

        await self._p2p.add_binary_stream_handler(name, _serve)

    async def _serve_one(
        self, name: str, handler: Handler, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        size: int, admission: Optional[Admission],
    ) -> bool:  # fmt: skip
        """Read one request's body, answer it; False when the stream is done."""
        request_kind = name.rsplit("/", 1)[-1]
        try:
            request = await read_body(reader, size, body_deadline(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            return False  # the caller went away mid-frame
        except asyncio.TimeoutError:
            self.limits.refuse(request_kind, peer, "slow_frame", f"a frame of {size} bytes took over "
                               f"{body_deadline(size):.0f} s")  # fmt: skip
            return False
        refusal = admission.still_admitted(peer) if admission is not None else None
        if refusal is not None:  # revoked or expired since the stream began
            admission.count(request_kind, peer, refusal)  # type: ignore[union-attr]
            await refuse_stream(reader, writer, refusal)
            return False
        try:
            response = await handler(peer, request)
        except Exception:  # a bug in our handler, whatever it raised: say so
            logger.exception("handler %s failed on a request from %s", name, peer[-8:])
            return False
        try:
            await write_frame(writer, response)
        except ConnectionError:  # the caller gave up waiting: it times out or retries
            return False
        return True

    def set_frame_limit(self, max_frame: int) -> None:
        """The largest frame we read from a peer (request or response): the largest message the manifest lets
        an honest peer send (node/runtime/joined.py); larger ones are refused before they are read."""
        self.limits.max_frame = max_frame

    async def call(self, peer_id: str, name: str, request: bytes, timeout: float) -> bytes:
        """Send one request to ``peer_id`` and return its response; TimeoutError/ConnectionError on failure.

        A stream whose exchange completed goes back to a small pool and carries a later request to the
        same peer and handler: opening a stream costs both daemons and both peers more than a small message.
        """

        async def _call() -> bytes:
            stream = self._streams.take(peer_id, name)
            fresh = stream is None
            if stream is None:
                reader, writer = await self._open_stream(peer_id, name)
                stream = Stream(reader, writer)
            try:
                if fresh and self._admission is not None:  # members-only: each stream starts with our invite
                    await write_frame(stream.writer, self._admission.preamble())
                await write_frame(stream.writer, request)
                response = await read_frame(stream.reader, limit=self.limits.max_frame)
            except BaseException:
                stream.close()  # half-written or half-read: never reused
                raise
            refusal = read_refusal(response)
            if refusal is not None:  # also from a members-only swarm's node when we present nothing
                stream.close()
                error = Refused(peer_id, refusal.reason, refusal.message, refusal.revocation)
                if self.on_refused is not None:
                    self.on_refused(error)
                raise error
            self._streams.give_back(peer_id, name, stream)
            return response

        try:
            return await asyncio.wait_for(_call(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"peer {peer_id[-8:]} did not answer {name} within {timeout:.1f}s") from None
        except asyncio.IncompleteReadError:
            raise ConnectionError(f"peer {peer_id[-8:]} closed the {name} stream") from None
        except Exception as e:  # p2pd reports dial failures as ControlFailure and friends
            if isinstance(e, (ConnectionError, TimeoutError)):
                raise
            raise ConnectionError(
                f"cannot reach peer {peer_id[-8:]}: {str(e).splitlines()[0] if str(e) else e!r}"
            ) from None

    async def _open_stream(self, peer_id: str, name: str) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new stream to ``peer_id``'s handler ``name``: what hivemind's ``call_binary_stream_handler`` does,
        except that a refused or cancelled opening closes its connection to the daemon (hivemind's leaves it open,
        one descriptor per failed dial until the garbage collector finds it)."""
        control = getattr(getattr(self._p2p, "_client", None), "control", None)
        if control is None:  # another hivemind than the one pinned: its own way
            _, reader, writer = await self._p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), name)
            return reader, writer
        reader, writer = await control.daemon_connector.open_connection()
        try:
            request = p2pd_pb2.Request(
                type=p2pd_pb2.Request.STREAM_OPEN,
                streamOpen=p2pd_pb2.StreamOpenRequest(peer=PeerID.from_base58(peer_id).to_bytes(), proto=[name]),
            )
            await write_pbmsg(writer, request)
            response = p2pd_pb2.Response()
            await read_pbmsg_safe(reader, response)
            raise_if_failed(response)
        except BaseException:
            writer.close()
            raise
        return reader, writer

    async def _close_streams(self) -> None:
        self._streams.close_all()

    # --- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Leave the swarm: stop our loop, the DHT process and its p2pd. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run(self._close_streams(), timeout=5)
            self._loop.run(self._p2p.shutdown(), timeout=5)
        except Exception:
            pass
        self._loop.stop()
        dht_kill(self._dht)
        self._clean_up()


def dht_kill(dht: hivemind.DHT, graceful: bool = True) -> None:
    """Shut the DHT process down, hard if it does not go within its grace period.

    A Ctrl+C on a terminal reaches every process of the node's group, p2pd included, which stops at once
    (hivemind's DHT process ignores SIGINT, but a Go program that listens for it does not). The DHT's
    graceful shutdown then waits its whole grace period for a daemon that is gone: with no p2pd left, it
    is told to stop right away instead (SIGTERM: _GuardedDHT exits at once)."""
    if graceful and dht.is_alive() and not _daemon_alive(dht.pid):
        graceful = False
    if graceful:
        try:
            dht.shutdown()
        except Exception:
            pass
    if dht.is_alive():
        dht.terminate()  # SIGTERM: _GuardedDHT stops its p2pd first
        dht.join(5)
    if dht.is_alive():
        dht.kill()
        dht.join(5)


def _explain_start_failure(error: BaseException, initial_peers: Sequence[str], timeout: float) -> str:
    """One line saying what failed and what to check. hivemind words a daemon that could not reach its
    bootstrap peers as "Daemon failed to start: <p2pd's timestamp> ...": the daemon started fine, so the
    daemon's own words are kept without that prefix and timestamp."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = _GO_TIMESTAMP.sub("", text.removeprefix("Daemon failed to start: "))
    if "bootstrap" in text or initial_peers:
        return (
            f"none of the bootstrap peers answered within {timeout:g}s ({', '.join(initial_peers)}): {text}; check "
            "that the node there is running and the multiaddr is the one it printed"
        )
    return f"the p2p daemon failed to start: {text}; check --host-maddrs and that the port is free"
