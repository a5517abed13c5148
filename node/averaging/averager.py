"""Butterfly all-reduce of one module's vector within its group, over our own p2p streams.

The vector is cut into chunks, and each chunk into one slice per member (sorted peer order):
slice *i* is reduced by member ``i mod n``. A slice, one message, carries about the bytes of
``chunk_elements`` float32 values (fp16 slices hold twice as many values, int8 four times), or up to 4×
more on fast links, where each message's fixed CPU cost counts (``message_ask``, node/matchmaking.py). Every member
sends each reducer its slices ("parts") in order, a few on the wire at once; the reducer
combines a slice's parts as soon as they are in, with the robust aggregator
(node/robust.py), and sends the result back while later chunks still travel, so reducing
and both directions of the transfer overlap. Each member sends and receives about
2·(n−1)/n of the vector.

Checks, in order: every part is validated on arrival (schema, size, dtype, finite
values, weight 1, this round and group); a bad part excludes its sender from the round
at once, so nobody waits for it. A member whose part did not reach us by our deadline
is out of our round too (its result is not applied). The reducer refuses outlier parts and clips the rest.
Every member checks each result it gets against its own part (robust.py); a slice
whose result is missing or fails is sent again, once, to a backup reducer (the next
member), which reduces it without the failed reducer (node/resultcheck.py). What cannot be recovered stays
at the member's own value, and the result reports the fraction of the vector that was
averaged with at least one other peer: a partial round is never reported as a full one.
Deadlines come from the waits observed in earlier rounds (node/deadlines.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Literal, Optional, Sequence, Set, Tuple

import numpy as np

from node.averaging.deadlines import Deadlines
from node.averaging.inbox import Inbox, SliceKey
from node.averaging.matchmaking import Group
from node.averaging.resultcheck import ResultCheck
from node.averaging.robust import aggregate
from node.averaging.slices import backup_of, owner_of, region_bounds, slice_values
from node.net import SwarmPort
from protocol import handlers
from protocol.manifest import AveragingSpec
from protocol.wire import (
    Ack,
    Refusal,
    TensorPart,
    WireError,
    decode,
    encode,
    payload_bytes,
    read_tensor,
    tensor_payload,
    wire_round_trip,
)

logger = logging.getLogger(__name__)

PartKind = Literal["part", "result"]
# Every part a peer sends for a round is acknowledged before it finishes that round, and it
# posts ready for the next one only after that (and, in a node, after the next local steps):
# a part for the earlier round that arrives after the post is a lie about its round. Hosts'
# clocks would have to disagree by more than that gap to blame an honest peer.
CLOCK_SLACK_SECONDS = 0.0
STREAM_ATTEMPTS = 3  # tries of one message whose stream closed under us
SEND_WINDOW = 2  # our messages on the wire at once per peer (measured: 2 beat 4 and 8 over 100 Mbit/s)
# Message size to ask for: what the last round's rate moves in this long. Under the manifest's 256 KB at
# 100 Mbit/s (best there), the 1 MiB cap at 1 Gbit/s and on loopback (tests/bench/RESULTS.md, item 6).
MESSAGE_SECONDS = 0.02


@dataclass
class AveragingStats:
    """Counters the metrics layer reads; owned by the Averager, mutated on its loop only."""

    parts_rejected: Dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0

    def reject(self, reason: str, count: int = 1) -> None:
        if count > 0:
            self.parts_rejected[reason] = self.parts_rejected.get(reason, 0) + count


@dataclass(frozen=True)
class AllReduceResult:
    vector: np.ndarray
    averaged_fraction: float
    contributors: Tuple[str, ...]
    seconds: float
    dropped: Tuple[str, ...] = ()  # members whose part or result we did not get or refused
    unaveraged: Tuple[Tuple[int, int], ...] = ()  # ranges of the vector that kept our own values


@dataclass
class _Round:
    """What this member knows about one all-reduce while it runs."""

    group: Group
    bounds: List[Tuple[int, int]]
    regions: List[int]
    sent: np.ndarray  # our vector as receivers decode it
    dtype: str
    deadline: float
    result: np.ndarray = field(init=False)
    averaged: np.ndarray = field(init=False)  # per slice: averaged with someone
    contributors: Set[str] = field(default_factory=set)
    retry_from: float = 0.0  # monotonic time by which every member has decided on its attempt-0 results
    verify: Optional[Callable[[np.ndarray], bool]] = None  # see all_reduce
    pending: Dict[int, Tuple[float, np.ndarray, str]] = field(default_factory=dict)  # slice -> result to verify
    settled: Set[int] = field(default_factory=set)  # attempts whose results we stopped waiting for
    gates: Dict[str, asyncio.Semaphore] = field(default_factory=dict)  # per peer: our messages on the wire

    @property
    def nbytes(self) -> int:
        """Bytes of the whole vector on the wire: what the round's waits scale with."""
        return payload_bytes(self.sent.size, self.dtype)

    def gate(self, peer: str) -> asyncio.Semaphore:
        """At most ``SEND_WINDOW`` of our messages (parts and results) to ``peer`` at once, served in order."""
        return self.gates.setdefault(peer, asyncio.Semaphore(SEND_WINDOW))

    def __post_init__(self) -> None:
        self.result = self.sent.copy()
        self.averaged = np.zeros(len(self.bounds), dtype=bool)

    def key(self, index: int, attempt: int = 0) -> SliceKey:
        g = self.group
        return (g.module, g.round, g.group_id, index, attempt)


class Averager(ResultCheck):
    """Serves part/result messages and runs all-reduces; one per node, for every module."""

    def __init__(self, swarm: SwarmPort, swarm_id: str, *, hosted: Callable[[], Set[str]], spec: AveragingSpec) -> None:
        self._swarm = swarm
        self._swarm_id = swarm_id
        self._hosted = hosted
        self._spec = spec
        self.deadlines = Deadlines(spec.part_timeout_seconds, spec.deadline_multiplier)
        self._inbox = Inbox()
        self._active: Dict[Tuple[str, int], _Round] = {}  # (module, round) -> our all-reduce
        self._finished: Dict[str, int] = {}  # module -> last round we finished averaging
        self._residual: Dict[str, np.ndarray] = {}  # int8 error feedback, per module
        self._stale: Dict[Tuple[str, str], float] = {}  # (module, sender) -> when a part for a past round came
        self.stats = AveragingStats()
        self._unreachable: Dict[str, float] = {}  # peer -> wall time we last failed to connect to it
        self._message_asks: Dict[str, int] = {}  # module -> message bytes to ask for, from its last full round
        self.handler_name = handlers.averaging(swarm_id)

    async def start(self) -> None:
        await self._swarm.serve(self.handler_name, self._handle)

    @property
    def me(self) -> str:
        return self._swarm.peer_id

    def message_ask(self, module: str) -> Optional[int]:
        """The message size (bytes) to ask for in ``module``'s next group: MESSAGE_SECONDS of our last full
        round's rate; None before one."""
        return self._message_asks.get(module)

    # --- receiving -----------------------------------------------------------------
    async def _handle(self, remote_peer: str, frame: bytes) -> bytes:
        self.stats.bytes_received += len(frame)
        message: Optional[TensorPart] = None
        try:
            decoded, payload = decode(frame)
            if not isinstance(decoded, TensorPart):
                raise WireError("expected a part or result")
            message = decoded
            values = read_tensor(message, payload)
        except WireError as e:
            self.stats.reject("malformed")
            claimed = message.dict() if message is not None else (e.header or {})
            self._exclude(remote_peer, claimed.get("module"), claimed.get("round"))
            return encode(Ack.refuse(Refusal.MALFORMED, str(e)))
        refusal = self._refusal(message, remote_peer, values)
        if refusal is not None:
            code, reason = refusal
            self.stats.reject(code.value)
            if not code.benign:
                self._exclude(remote_peer, message.module, message.round)
            return encode(Ack.refuse(code, reason))
        key = (message.module, message.round, message.group_id, message.slice_index, message.attempt)
        slot = remote_peer if message.type == "part" else f"result:{remote_peer}"
        self._inbox.put(key, slot, message.weight, values)
        return encode(Ack(ok=True))

    def _exclude(self, peer: str, module: object = None, round_number: object = None) -> None:
        """Stop waiting for ``peer`` in the round it claimed, and in our active rounds of that module
        (of every module when the claim is unreadable) where it is a member."""
        if isinstance(module, str) and isinstance(round_number, int) and not isinstance(round_number, bool):
            self._inbox.exclude(module, round_number, peer)
        for (active_module, active_round), state in list(self._active.items()):
            if peer in state.group.members and (not isinstance(module, str) or module == active_module):
                self._inbox.exclude(active_module, active_round, peer)

    def _refusal(self, message: TensorPart, remote_peer: str, values: np.ndarray) -> Optional[Tuple[Refusal, str]]:
        if message.swarm_id != self._swarm_id:
            return Refusal.WRONG_SWARM, "this peer trains another manifest"
        if message.sender != remote_peer:
            return Refusal.SPOOFED_SENDER, "header sender differs from the stream's peer"
        if message.module not in self._hosted():
            return Refusal.NOT_HOSTED, f"this peer does not host {message.module}"
        state = self._active.get((message.module, message.round))
        if message.round <= self._finished.get(message.module, -1) and state is None:
            if any(m == message.module and remote_peer in s.group.members for (m, _), s in self._active.items()):
                return Refusal.WRONG_ROUND, "a member of our group sent a part for a round that is over"
            if message.type == "part":  # judged when our next round starts (see _refuse_early_strangers)
                self._stale[(message.module, remote_peer)] = self._swarm.now()
            return Refusal.ROUND_OVER, "this peer already finished that round"
        if message.type == "part" and message.weight != 1.0:
            return Refusal.BAD_WEIGHT, "a part must carry weight 1 (members count equally)"
        if message.type == "result" and not (1.0 <= message.weight <= 4096 and float(message.weight).is_integer()):
            return Refusal.BAD_WEIGHT, "a result's weight is the count of parts it combines"
        if state is None:
            return None  # early: checked again when our round starts
        if state.group.group_id != message.group_id:
            return Refusal.WRONG_GROUP, "this peer formed a different group for that round"
        if remote_peer not in state.group.members or message.slice_index >= len(state.bounds):
            return Refusal.WRONG_GROUP, "sender or slice is not in our group"
        if message.type == "result" and message.attempt in state.settled:
            return Refusal.TOO_LATE, "this peer stopped waiting for that result"
        lo, hi = state.bounds[message.slice_index]
        if values.size != hi - lo:
            return Refusal.WRONG_SIZE, f"slice {message.slice_index} has {hi - lo} elements, got {values.size}"
        return None

    def presumed_dead(self, peer: str, record_stored_at: float) -> bool:
        """We failed to connect to ``peer`` after its latest record was stored: don't wait for it."""
        return self._unreachable.get(peer, float("-inf")) > record_stored_at

    # --- one all-reduce ------------------------------------------------------------
    async def all_reduce(
        self,
        group: Group,
        vector: np.ndarray,
        *,
        regions: Optional[Sequence[int]] = None,
        compress: bool = True,
        verify: Optional[Callable[[np.ndarray], bool]] = None,
    ) -> AllReduceResult:
        """Average ``vector`` (float32, 1-D) with the group; never raises for peer failures.

        ``regions`` cuts the vector into parts of different nature (pseudo-gradient,
        parameters, momentum) that are checked separately; ``compress`` False sends float32.
        ``verify`` (re-syncs): results that fail the distance check outside the first region are
        held back and applied together if ``verify`` accepts the whole vector with them (the
        caller checks the state hash a majority of the group holds), refused otherwise."""
        started = time.monotonic()
        me = self.me
        if len(group.members) == 1:
            return AllReduceResult(vector.copy(), 0.0, (me,), 0.0)
        dtype = self._spec.compression if compress else "none"
        dtype = {"none": "float32", "fp16": "float16"}.get(dtype, dtype)
        regions = list(regions or [vector.size])
        chunk_elements = (group.message_bytes or self._spec.message_bytes) // 4
        bounds = region_bounds(regions, len(group.members), slice_values(chunk_elements, dtype))
        sent = self._encode_own(group.module, vector, bounds, dtype)
        deadline = started + self._spec.round_timeout_seconds
        state = _Round(group, bounds, regions, sent, dtype, deadline, verify=verify)
        self._active[(group.module, group.round)] = state
        self._inbox.expire(older_than_seconds=max(self._spec.round_timeout_seconds * 3, 60.0))
        self._refuse_early_strangers(group)
        try:
            await self._exchange(state, attempt=0, slices=list(range(len(bounds))))
            self._settle_pending(state)
            mine = group.index_of(me)
            size = len(group.members)
            failed = [i for i in range(len(bounds)) if owner_of(i, size) != mine and not state.averaged[i]]
            if failed and len(group.members) > 2:
                await self._exchange(state, attempt=1, slices=failed)
                self._settle_pending(state)
        finally:
            self._active.pop((group.module, group.round), None)
            self._finished[group.module] = max(group.round, self._finished.get(group.module, -1))
            for attempt in (0, 1):
                for index in range(len(bounds)):
                    self._inbox.pop(state.key(index, attempt))
        fraction = sum(hi - lo for (lo, hi), ok in zip(bounds, state.averaged, strict=True) if ok) / max(1, vector.size)
        contributors = tuple(sorted(state.contributors | {me}))
        dropped = tuple(sorted(set(group.members) - set(contributors)))
        unaveraged = tuple(b for b, ok in zip(bounds, state.averaged, strict=True) if not ok)
        seconds = time.monotonic() - started
        if fraction == 1.0 and not dropped and seconds > 0:  # rate per direction; a partial round's says little
            self._message_asks[group.module] = int(state.nbytes * 2 * (size - 1) / size / seconds * MESSAGE_SECONDS)
        return AllReduceResult(state.result, fraction, contributors, seconds, dropped, unaveraged)

    def _refuse_early_strangers(self, group: Group) -> None:
        """Members whose parts for this round arrived, before it started, under another group id,
        or who sent a part for an earlier round after saying they were ready for this one."""
        for member, posted_at in zip(group.members, group.posted_at, strict=False):
            sent_at = self._stale.pop((group.module, member), None)
            if sent_at is not None and sent_at > posted_at + CLOCK_SLACK_SECONDS:
                self.stats.reject("wrong_round")
                self._inbox.exclude(group.module, group.round, member)
        for key, items in list(self._inbox.items.items()):
            if key[:2] == (group.module, group.round) and key[2] != group.group_id:
                for slot in items:
                    if slot in group.members:
                        self.stats.reject("wrong_group")
                        self._inbox.exclude(group.module, group.round, slot)

    def _encode_own(self, module: str, vector: np.ndarray, bounds, dtype: str) -> np.ndarray:
        """Our vector as every receiver will decode it; int8 carries its rounding error into the
        module's next round (error feedback)."""
        target = vector.astype(np.float32, copy=True)
        if dtype == "float32":
            return target
        residual = self._residual.get(module) if dtype == "int8" else None
        if residual is not None and residual.size == target.size:
            target += residual
        sent = np.empty_like(target)
        for lo, hi in bounds:
            sent[lo:hi] = wire_round_trip(target[lo:hi], dtype)
        if dtype == "int8":
            self._residual[module] = target - sent
        return sent

    async def _exchange(self, state: _Round, attempt: int, slices: List[int]) -> None:
        """Send parts of ``slices`` to their reducers, reduce the ones that are ours, collect and check the rest."""
        group, me = state.group, self.me
        size = len(group.members)
        reducer_of = {i: group.members[owner_of(i, size) if attempt == 0 else backup_of(i, size)] for i in slices}
        started = time.monotonic()
        parts_wait = self.deadlines.timeout(group.module, "parts", state.nbytes)
        results_wait = self.deadlines.timeout(group.module, "results", state.nbytes)
        if attempt == 0:  # the latest a member can give up on a reducer and turn to the backup
            state.retry_from = started + parts_wait + results_wait
        # A backup waits for the members that turn to it last.
        parts_deadline = min(state.deadline, (max(started, state.retry_from) if attempt else started) + parts_wait)
        sends = [
            self._send_parts(state, peer, [i for i in slices if reducer_of[i] == peer], attempt)
            for peer in group.members
            if peer != me
        ]
        mine = [i for i in slices if reducer_of[i] == me]
        reduce = [self._reduce(state, i, attempt, parts_deadline, started, i == mine[-1]) for i in mine]
        await asyncio.gather(*sends, *reduce)
        results_started = time.monotonic()
        # Another reducer may still be waiting for a missing part until its own parts deadline:
        # its result is due one transfer after that, however early our own slice was done.
        results_deadline = min(state.deadline, max(results_started, parts_deadline) + results_wait)
        others = [i for i in slices if reducer_of[i] != me]
        waits = [
            self._inbox.wait_for(state.key(i, attempt), {reducer_of[i]}, results_deadline, prefix="result:")
            for i in others
        ]
        received = await asyncio.gather(*waits)
        state.settled.add(attempt)  # a result that comes now is refused: its reducer learns we went without it
        missing = {reducer_of[i] for i, (got, _) in zip(others, received, strict=True) if reducer_of[i] not in got}
        if others and all(complete for _, complete in received):
            self.deadlines.observe(group.module, "results", time.monotonic() - results_started, state.nbytes)
        elif self._slow(group, missing):
            self.deadlines.ran_out(group.module, "results", time.monotonic() - results_started, state.nbytes)
        results = {}
        for i, (got, _) in zip(others, received, strict=True):
            reducer = reducer_of[i]
            if reducer in got and not self._inbox.is_excluded(group.module, group.round, reducer):
                results[i] = got[reducer]
        logger.debug(
            "%s round %d attempt %d: results from %s of %s; excluded %s",
            group.module, group.round, attempt, _short(reducer_of[i] for i in results),
            _short(reducer_of[i] for i in others), _short(self._inbox.excluded.get((group.module, group.round), ())),
        )  # fmt: skip
        self._accept_checked(state, results, reducer_of, me)

    def _slow(self, group: Group, missing: Set[str]) -> bool:
        """Some of ``missing`` are still in the round (not excluded as bad or unreachable): only slow."""
        return any(not self._inbox.is_excluded(group.module, group.round, peer) for peer in missing)

    async def _reduce(
        self, state: _Round, index: int, attempt: int, deadline: float, started: float, last: bool
    ) -> None:
        group, me = state.group, self.me
        lo, hi = state.bounds[index]
        expected = set(group.members) - {me}
        if attempt:
            expected.discard(group.members[owner_of(index, len(group.members))])  # the reducer that failed it
        got, complete = await self._inbox.wait_for(state.key(index, attempt), expected, deadline)
        if expected and attempt == 0 and last:  # our last chunk: the whole parts phase
            if complete:
                self.deadlines.observe(group.module, "parts", time.monotonic() - started, state.nbytes)
            elif self._slow(group, expected - set(got)):
                self.deadlines.ran_out(group.module, "parts", time.monotonic() - started, state.nbytes)
        if attempt == 0:  # a member that failed us is out of our round: its result is not applied either
            for sender in expected - set(got):
                self._inbox.exclude(group.module, group.round, sender)
        parts = {me: state.sent[lo:hi]}
        for sender, (_, values) in got.items():
            if self._inbox.is_excluded(group.module, group.round, sender):
                continue  # it sent something bad elsewhere in this round
            if values.size != hi - lo:  # arrived before our round started, so unchecked until now
                self.stats.reject("wrong_size")
                self._inbox.exclude(group.module, group.round, sender)
                continue
            parts[sender] = values
        spec = self._spec
        combined = aggregate(
            parts, me, method=spec.aggregator, clip_multiplier=spec.clip_multiplier, outlier_ratio=spec.outlier_ratio
        )
        for sender in combined.outliers:
            self.stats.reject("outlier")
            self._inbox.exclude(group.module, group.round, sender)
        logger.debug(
            "%s round %d slice %d attempt %d: parts from %s, missing %s, outliers %s, clipped %s",
            group.module, group.round, index, attempt, _short(got), _short(expected - set(got)),
            _short(combined.outliers), _short(combined.clipped),
        )  # fmt: skip
        reduced = wire_round_trip(combined.values, state.dtype)  # exactly what the others will apply
        state.result[lo:hi] = reduced
        state.averaged[index] = len(combined.used) > 1
        state.contributors.update(combined.used)
        receivers = [p for p in combined.used if p != me]
        weight = float(len(combined.used))
        sends = [self._send(p, "result", state, index, weight, reduced, attempt) for p in receivers]
        if receivers and not any(await asyncio.gather(*sends)):
            # Nobody took our result (too late, gone, or unreachable): they went on without it, so this
            # slice was averaged with nobody, and saying otherwise would hide that our copy now differs.
            state.averaged[index] = False

    # --- sending -------------------------------------------------------------------
    async def _send_parts(self, state: _Round, peer: str, indices: List[int], attempt: int) -> None:
        """Our parts of ``indices`` to their reducer ``peer``, in order (through its gate), so its first
        chunks arrive and are reduced early; after one fails, the rest are left to the backup."""
        stop = asyncio.Event()

        async def one(index: int) -> None:
            values = state.sent[slice(*state.bounds[index])]
            if not await self._send(peer, "part", state, index, 1.0, values, attempt, stop):
                stop.set()

        await asyncio.gather(*(one(i) for i in indices))

    async def _send(
        self, peer: str, kind: PartKind, state: _Round, index: int, weight: float, values, attempt: int,
        stop: Optional[asyncio.Event] = None,
    ) -> bool:
        """One message; ``stop`` (set by an earlier failure to the same peer) skips it once its turn comes."""
        group = state.group
        try:
            async with state.gate(peer):
                if (stop is not None and stop.is_set()) or self._inbox.is_excluded(group.module, group.round, peer):
                    return False
                frame = self._frame(kind, state, index, weight, np.asarray(values, dtype=np.float32), attempt)
                reply = await self._call(peer, frame, state.deadline)
            self.stats.bytes_sent += len(frame)
            ack, _ = decode(reply)
        except ConnectionError as e:
            self._unreachable[peer] = self._swarm.now()
            self._inbox.exclude(group.module, group.round, peer)
            logger.info("cannot reach %s: %s", peer[-8:], e)
            return False
        except (TimeoutError, WireError) as e:
            logger.debug("%s to %s failed: %s", kind, peer[-8:], e)
            return False
        if not isinstance(ack, Ack):
            logger.info("peer %s answered our %s for %s with a %s", peer[-8:], kind, group.module, ack.type)
            self._inbox.exclude(group.module, group.round, peer)
            return False
        if not ack.ok:
            logger.info("peer %s refused our %s for %s: %s (%s)", peer[-8:], kind, group.module, ack.code, ack.reason)
            if ack.code is None or not ack.code.benign:  # e.g. it is done with the round: what it sent still counts
                self._inbox.exclude(group.module, group.round, peer)  # it will not reduce with us
            return False
        return True

    async def _call(self, peer: str, frame: bytes, deadline: float) -> bytes:
        """One request; a stream that p2pd closed under us is opened again, up to twice, a moment later
        (messages are idempotent). Only then is the peer taken for unreachable: streams to a live peer
        have been seen closing twice in a row (tests/bench/RESULTS.md, item 1)."""
        for attempt in range(STREAM_ATTEMPTS):
            timeout = max(0.1, min(self._spec.part_timeout_seconds, deadline - time.monotonic()))
            try:
                return await self._swarm.call(peer, self.handler_name, frame, timeout)
            except ConnectionError as e:
                if attempt == STREAM_ATTEMPTS - 1 or "closed" not in str(e):
                    raise
                logger.info("stream to %s closed under us (%s); opening another", peer[-8:], e)
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _frame(self, kind: PartKind, state: _Round, index: int, weight: float, values: np.ndarray, attempt: int):
        group = state.group
        header = TensorPart(
            type=kind,
            swarm_id=self._swarm_id,
            module=group.module,
            round=group.round,
            group_id=group.group_id,
            slice_index=index,
            sender=self.me,
            weight=float(weight),
            numel=int(values.size),
            dtype=state.dtype,  # type: ignore[arg-type]
            attempt=attempt,
        )
        return encode(header, tensor_payload(values, state.dtype))


def _short(peers) -> str:
    return ",".join(sorted(p[-4:] for p in peers)) or "-"
