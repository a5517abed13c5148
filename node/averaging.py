"""Butterfly all-reduce of one module's vector within its group, over our own p2p streams.

The vector is cut into one slice per member (sorted peer order). Member *j* is the
reducer of slice *j*: every member sends it that slice ("part"); it computes the
weighted mean of the parts it received by the deadline and sends the mean back
("result"). Each member sends and receives about 2·(n−1)/n of the vector.

Failure handling: a member whose part does not arrive in time, or is malformed, is
left out of that slice's mean; a reducer whose result does not arrive leaves that
slice at the member's own value. The result reports the fraction of the vector that
was actually averaged with at least one other peer, so a partial round is never
reported as a full one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Literal, Optional, Set, Tuple

import numpy as np

from node.matchmaking import Group
from node.swarm import now as wall_clock
from protocol.wire import Ack, TensorPart, WireError, decode, encode, read_tensor, tensor_payload

logger = logging.getLogger(__name__)

PartKind = Literal["part", "result"]
SliceKey = Tuple[str, int, str, int]  # module, round, group_id, slice index


@dataclass
class AveragingStats:
    """Counters the metrics layer reads; owned by the Averager, mutated on its loop only."""

    parts_rejected: Dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0

    def reject(self, reason: str) -> None:
        self.parts_rejected[reason] = self.parts_rejected.get(reason, 0) + 1


@dataclass(frozen=True)
class AllReduceResult:
    vector: np.ndarray
    averaged_fraction: float
    contributors: Tuple[str, ...]
    seconds: float
    dropped: Tuple[str, ...] = ()  # members whose part or result we did not get


@dataclass(frozen=True)
class ModuleOutcome:
    """How one module's averaging round went, as the node reports and counts it."""

    module: str
    group_size: int
    averaged_fraction: float
    resync: bool
    seconds: float
    result: str  # ok | partial | failed
    dropped: int = 0
    numel: int = 0


def classify(group_size: int, fraction: float, expected_others: int) -> str:
    """ok: averaged in full, or nobody else hosts the module; partial: some of it; failed: none of it."""
    if group_size == 1:
        return "ok" if expected_others == 0 else "failed"
    if fraction >= 1.0:
        return "ok"
    return "partial" if fraction > 0 else "failed"


def slice_bounds(numel: int, parts: int) -> List[Tuple[int, int]]:
    """Contiguous near-equal slices; the first ``numel % parts`` are one element longer."""
    base, extra = divmod(numel, parts)
    bounds, start = [], 0
    for index in range(parts):
        end = start + base + (1 if index < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


class _Inbox:
    """Parts and results that arrived, keyed by slice; waiters are woken on every arrival."""

    def __init__(self) -> None:
        self.items: Dict[SliceKey, Dict[str, Tuple[float, np.ndarray]]] = {}
        self.born: Dict[SliceKey, float] = {}
        self.changed = asyncio.Event()

    def put(self, key: SliceKey, sender: str, weight: float, values: np.ndarray) -> None:
        self.items.setdefault(key, {})[sender] = (weight, values)
        self.born.setdefault(key, time.monotonic())
        self.changed.set()
        self.changed = asyncio.Event()

    def pop(self, key: SliceKey) -> Dict[str, Tuple[float, np.ndarray]]:
        self.born.pop(key, None)
        return self.items.pop(key, {})

    def expire(self, older_than_seconds: float) -> None:
        limit = time.monotonic() - older_than_seconds
        for key in [k for k, born in self.born.items() if born < limit]:
            self.pop(key)

    async def wait_for(self, key: SliceKey, senders: Set[str], deadline: float) -> Dict[str, Tuple[float, np.ndarray]]:
        """Wait until every sender in ``senders`` delivered ``key`` or the monotonic deadline passes."""
        while not senders <= set(self.items.get(key, {})):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return dict(self.items.get(key, {}))


class Averager:
    """Serves part/result messages and runs all-reduces; one per node, for every module."""

    def __init__(
        self,
        swarm,
        swarm_id: str,
        *,
        hosted: Callable[[], Set[str]],
        part_timeout: float,
        compression: str = "none",
    ) -> None:
        self._swarm = swarm
        self._swarm_id = swarm_id
        self._hosted = hosted
        self._part_timeout = part_timeout
        self._dtype: Literal["float32", "float16"] = "float16" if compression == "fp16" else "float32"
        self._inbox = _Inbox()
        self._active: Dict[Tuple[str, int], str] = {}  # (module, round) -> our group id
        self._finished: Dict[str, int] = {}  # module -> last round we finished averaging
        self.stats = AveragingStats()
        self._unreachable: Dict[str, float] = {}  # peer -> wall time we last failed to connect to it
        self.handler_name = f"commons/{swarm_id}/avg"

    async def start(self) -> None:
        await self._swarm.add_handler(self.handler_name, self._handle)

    async def _handle(self, remote_peer: str, frame: bytes) -> bytes:
        self.stats.bytes_received += len(frame)
        try:
            message, payload = decode(frame)
            if not isinstance(message, TensorPart):
                raise WireError("expected a part or result")
            values = read_tensor(message, payload)
        except WireError as e:
            self.stats.reject("malformed")
            return encode(Ack(ok=False, reason=f"malformed: {e}"))
        reason = self._refusal(message, remote_peer)
        if reason:
            self.stats.reject(reason.split(":")[0])
            return encode(Ack(ok=False, reason=reason))
        key = (message.module, message.round, message.group_id, message.slice_index)
        slot = remote_peer if message.type == "part" else f"result:{remote_peer}"
        self._inbox.put(key, slot, message.weight, values)
        return encode(Ack(ok=True))

    def _refusal(self, message: TensorPart, remote_peer: str) -> str:
        if message.swarm_id != self._swarm_id:
            return "wrong_swarm: this peer trains another manifest"
        if message.sender != remote_peer:
            return "spoofed_sender: header sender differs from the stream's peer"
        if message.module not in self._hosted():
            return f"not_hosted: this peer does not host {message.module}"
        if message.round <= self._finished.get(message.module, -1):
            return "round_over: this peer already finished that round"
        active = self._active.get((message.module, message.round))
        if active is not None and active != message.group_id:
            return "wrong_group: this peer formed a different group for that round"
        if not (np.isfinite(message.weight) and message.weight > 0):
            return "bad_weight: weight must be finite and positive"
        return ""

    def presumed_dead(self, peer: str, record_stored_at: float) -> bool:
        """We failed to connect to ``peer`` after its latest record was stored: don't wait for it."""
        return self._unreachable.get(peer, float("-inf")) > record_stored_at

    async def all_reduce(self, group: Group, vector: np.ndarray, weight: float, timeout: float) -> AllReduceResult:
        """Average ``vector`` (float32, 1-D) with the group; never raises for peer failures."""
        started = time.monotonic()
        me = self._swarm.peer_id
        if len(group.members) == 1:
            return AllReduceResult(vector.copy(), 0.0, (me,), 0.0)
        deadline = started + timeout
        my_index = group.index_of(me)
        bounds = slice_bounds(vector.size, len(group.members))
        self._active[(group.module, group.round)] = group.group_id
        self._inbox.expire(older_than_seconds=max(timeout * 3, 60.0))
        try:
            sent_to = await self._send_parts(group, vector, weight, bounds, deadline)
            # Peers that refused our part formed another group (or finished the round): don't wait for theirs.
            reduced, contributors = await self._reduce_my_slice(
                group, vector, weight, bounds[my_index], sent_to, deadline
            )
            unreachable = await self._send_results(group, reduced, contributors, my_index, deadline)
            # A reducer answers within its own part timeout plus one transfer; waiting longer only stalls us.
            results_deadline = min(deadline, started + 1.5 * self._part_timeout + 1.0)
            result = vector.copy()
            averaged = 0
            lo, hi = bounds[my_index]
            result[lo:hi] = reduced
            averaged += (hi - lo) if len(contributors) > 1 else 0
            dropped = set(group.members) - set(contributors)
            for index, peer in enumerate(group.members):
                if index == my_index:
                    continue
                if peer not in sent_to or peer in unreachable:
                    dropped.add(peer)
                    continue
                key = (group.module, group.round, group.group_id, index)
                slot = f"result:{peer}"  # only the slice's own reducer may answer for it
                got = await self._inbox.wait_for(key, {slot}, results_deadline)
                if slot in got:
                    count, values = got[slot]
                    lo, hi = bounds[index]
                    if values.size == hi - lo:
                        result[lo:hi] = values
                        averaged += (hi - lo) if count > 1 else 0
                        continue
                    self.stats.reject("wrong_size")
                dropped.add(peer)
            fraction = averaged / max(1, vector.size)
            seconds = time.monotonic() - started
            return AllReduceResult(result, fraction, tuple(sorted(contributors)), seconds, tuple(sorted(dropped)))
        finally:
            self._active.pop((group.module, group.round), None)
            self._finished[group.module] = max(group.round, self._finished.get(group.module, -1))
            for index in range(len(group.members)):
                self._inbox.pop((group.module, group.round, group.group_id, index))

    async def _send_parts(self, group: Group, vector: np.ndarray, weight: float, bounds, deadline: float) -> Set[str]:
        me = self._swarm.peer_id

        async def send(index: int, peer: str) -> Optional[str]:
            lo, hi = bounds[index]
            ok = await self._send(peer, "part", group, index, weight, vector[lo:hi], deadline)
            return peer if ok else None

        sends = [send(i, p) for i, p in enumerate(group.members) if p != me]
        return {peer for peer in await asyncio.gather(*sends) if peer}

    async def _reduce_my_slice(
        self, group: Group, vector: np.ndarray, weight: float, bounds, expected, deadline: float
    ):
        me = self._swarm.peer_id
        lo, hi = bounds
        key = (group.module, group.round, group.group_id, group.index_of(me))
        others = set(group.members) - {me}
        received = await self._inbox.wait_for(key, set(expected), min(deadline, time.monotonic() + self._part_timeout))
        total = vector[lo:hi].astype(np.float64) * weight
        weight_sum = weight
        contributors = [me]
        for sender, (w, values) in received.items():
            if sender not in others:
                continue
            if values.size != hi - lo:
                self.stats.reject("wrong_size")
                continue
            total += values.astype(np.float64) * w
            weight_sum += w
            contributors.append(sender)
        return (total / weight_sum).astype(np.float32), contributors

    async def _send_results(
        self, group: Group, reduced: np.ndarray, contributors, my_index: int, deadline: float
    ) -> Set[str]:
        """Send our reduced slice to every contributor; return those we could not reach."""
        me = self._swarm.peer_id
        count = float(len(contributors))
        peers = [peer for peer in contributors if peer != me]
        sends = [self._send(peer, "result", group, my_index, count, reduced, deadline) for peer in peers]
        delivered = await asyncio.gather(*sends)
        return {peer for peer, ok in zip(peers, delivered, strict=True) if not ok}

    async def _send(self, peer: str, kind: PartKind, group: Group, index: int, weight: float, values, deadline) -> bool:
        array = np.asarray(values, dtype=np.float16 if self._dtype == "float16" else np.float32)
        header = TensorPart(
            type=kind,
            swarm_id=self._swarm_id,
            module=group.module,
            round=group.round,
            group_id=group.group_id,
            slice_index=index,
            sender=self._swarm.peer_id,
            weight=float(weight),
            numel=int(array.size),
            dtype=self._dtype,
        )
        frame = encode(header, tensor_payload(array))
        timeout = max(0.1, min(self._part_timeout, deadline - time.monotonic()))
        try:
            reply = await self._swarm.call(peer, self.handler_name, frame, timeout)
            self.stats.bytes_sent += len(frame)
            ack, _ = decode(reply)
        except ConnectionError as e:
            self._unreachable[peer] = wall_clock()
            logger.info("cannot reach %s: %s", peer[-8:], e)
            return False
        except (TimeoutError, WireError) as e:
            logger.debug("%s to %s failed: %s", kind, peer[-8:], e)
            return False
        if not isinstance(ack, Ack) or not ack.ok:
            logger.info("peer %s refused our %s for %s: %s", peer[-8:], kind, group.module, getattr(ack, "reason", "?"))
            return False
        return True
