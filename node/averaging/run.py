"""One all-reduce: one module's vector averaged within one group in one round, by an object that lives
exactly as long (in the spirit of hivemind's AllReduceRunner).

The vector is cut into chunks, and each chunk into one slice per member (sorted peer order): slice
*i* is reduced by member ``i mod n`` (node/averaging/slices.py). A slice, one message, carries about
the bytes of ``chunk_elements`` float32 values (fp16 slices hold twice as many values, int8 four
times, sparse ones sixteen), or up to 4x more when the group agreed on larger messages
(node/averaging/matchmaking.py).

With ``sparse`` compression a member sends each reducer the ``topk`` largest values of each block of its
slice (protocol/sparse.py), and keeps what it did not send for its next round (error feedback). A reducer
decodes every part into the slice's full length, zeros where nothing was sent, and screens, clips and checks
those exactly as dense parts: a sparse part is a vector like any other, and its norm is what the outlier
screen and CenteredClip bound. Its result holds every position some part sent, in 8 bits.
Every member sends each reducer its slices ("parts") in order, a few on the wire at once; the reducer
combines a slice's parts as soon as they are in, with the robust aggregator (node/averaging/robust.py),
and sends the result back while later chunks still travel, so reducing and both directions of the
transfer overlap. Each member sends and receives about 2·(n−1)/n of the vector.

Checks, in order: every part is validated on arrival (node/averaging/averager.py, then ``refusal``
here for what only this run knows: group, slice, size); a bad part excludes its sender from the round
at once, so nobody waits for it. A member whose part did not reach us by our deadline is out of our
round too (its result is not applied). The reducer refuses outlier parts and clips the rest. Every
member checks each result it gets against its own part (node/averaging/resultcheck.py); a slice whose
result is missing or fails is sent again, once, to a backup reducer (the next member), which reduces it
without the failed reducer. What cannot be recovered stays at the member's own value, and the result
reports the fraction of the vector that was averaged with at least one other peer: a partial round is
never reported as a full one.

The run owns its members, slice bounds, our parts as sent, the results, its inbox (node/averaging/inbox.py)
with every exclusion and its reason, and its outcome. What the next run needs lives in the module's
ModuleMemory (node/averaging/memory.py): deadlines, error feedback, the message size to ask for.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from node.averaging.inbox import Inbox, SliceKey
from node.averaging.matchmaking import Group
from node.averaging.memory import AveragingStats, ModuleMemory
from node.averaging.resultcheck import check_results
from node.averaging.robust import aggregate
from node.averaging.slices import backup_of, owner_of, region_bounds, slice_values
from node.net import Clock, SwarmPort
from protocol.manifest import AveragingSpec
from protocol.sparse import SPARSE_DTYPES
from protocol.sparse import decode as sparse_decode
from protocol.sparse import size_of as sparse_size
from protocol.wire import (
    Ack,
    Refusal,
    TensorPart,
    WireDtype,
    WireError,
    decode,
    encode,
    payload_bytes,
    tensor_payload,
    wire_round_trip,
)

logger = logging.getLogger("node.averaging")

PartKind = Literal["part", "result"]
# Every part a peer sends for a round is acknowledged before it finishes that round, and it
# posts ready for the next one only after that (and, in a node, after the next local steps):
# a part for the earlier round that arrives after the post is a lie about its round. Hosts'
# clocks would have to disagree by more than that gap to blame an honest peer.
CLOCK_SLACK_SECONDS = 0.0
STREAM_ATTEMPTS = 3  # tries of one message whose stream closed under us
SEND_WINDOW = 2  # our messages on the wire at once per peer (measured: 2 beat 4 and 8 over 100 Mbit/s)
# Message size to ask for: what the last round's rate moves in this long. Under the manifest's 256 KB at
# 100 Mbit/s (best there), the 1 MiB cap at 1 Gbit/s and on loopback (bench/RESULTS.md, item 6).
MESSAGE_SECONDS = 0.02
# A message answered ``too_early`` (its receiver has not posted for the round yet: its matchmaking is slower than
# ours, or its inbox of early mail is full) goes again after each of these waits, within the round's deadline.
EARLY_RETRY_SECONDS = (0.05, 0.1, 0.2, 0.4) + (0.5,) * 120
Verify = Callable[[np.ndarray], bool]
WIRE_DTYPE_OF: Dict[str, WireDtype] = {"none": "float32", "fp16": "float16", "int8": "int8", "sparse": "topk2"}
RESULT_DTYPE_OF: Dict[WireDtype, WireDtype] = {"topk2": "topk8"}  # a result holds the union of the parts' values


@dataclass(frozen=True)
class AllReduceResult:
    vector: np.ndarray
    averaged_fraction: float
    contributors: Tuple[str, ...]
    seconds: float
    dropped: Tuple[str, ...] = ()  # members whose part or result we did not get or refused
    unaveraged: Tuple[Tuple[int, int], ...] = ()  # ranges of the vector that kept our own values
    excluded: Mapping[str, str] = field(default_factory=dict)  # member -> why it was out of our round
    # The parts we reduced, per member: what a receipt vouches for (protocol/contributions.py).
    received: Mapping[str, "Received"] = field(default_factory=dict)


@dataclass(frozen=True)
class Received:
    """What one member's parts gave our slices in one round: elements, bytes on the wire, a SHA-256 over the parts
    (in slice order), and the elements it sent to reducers in all (its vector less the slices it reduces)."""

    elements: int
    bytes: int
    part_hash: str
    total: int


@dataclass(frozen=True)
class RunContext:
    """What every run of one node shares: its door to the swarm, the manifest's settings, the counters."""

    port: SwarmPort
    swarm_id: str
    handler: str  # the averaging handler name (protocol/handlers.py)
    spec: AveragingSpec
    stats: AveragingStats
    clock: Clock  # monotonic seconds, the clock of the event loop the run awaits on
    mark_unreachable: Callable[[str], None]  # we failed to connect to this peer
    receipts: bool = False  # note each member's parts we reduce (AllReduceResult.received; members-only swarms)


class AllReduceRun:
    """One all-reduce of one group in one round. ``await run()`` once; never raises for peer failures."""

    def __init__(
        self,
        context: RunContext,
        group: Group,
        vector: np.ndarray,
        memory: ModuleMemory,
        inbox: Inbox,
        *,
        regions: Optional[Sequence[int]] = None,
        compress: bool = True,
        verify: Optional[Verify] = None,
    ) -> None:
        """``regions`` cuts the vector into parts of different nature (pseudo-gradient, parameters,
        momentum) that are checked separately; ``compress`` False sends float32. ``verify`` (re-syncs):
        results that fail the distance check outside the first region are held back and applied together
        if ``verify`` accepts the whole vector with them (the caller checks the state hash a majority of
        the group holds), refused otherwise. ``inbox``: what already arrived for this round."""
        self.context = context
        self.group = group
        self.memory = memory
        self.inbox = inbox
        self.me = context.port.peer_id
        self.started = context.clock()
        spec = context.spec
        self.dtype: WireDtype = WIRE_DTYPE_OF[spec.compression if compress else "none"]
        self.result_dtype: WireDtype = RESULT_DTYPE_OF.get(self.dtype, self.dtype)
        self._payloads: Dict[int, bytes] = {}  # slice -> our sparse part as sent (encoded once: see _encode_own)
        self.regions = list(regions or [vector.size])
        chunk_elements = (group.message_bytes or spec.message_bytes) // 4
        self.bounds = region_bounds(self.regions, len(group.reducers), slice_values(chunk_elements, self.dtype))
        self.sent = self._encode_own(vector)  # our vector as every receiver decodes it
        self.deadline = self.started + spec.round_timeout_seconds
        self.result = self.sent.copy()
        self.averaged = np.zeros(len(self.bounds), dtype=bool)  # per slice: averaged with someone
        self.contributors: Set[str] = set()
        self.verify = verify
        self.retry_from = 0.0  # when every member has decided on its attempt-0 results
        self.pending: Dict[int, Tuple[float, np.ndarray, str]] = {}  # slice -> held-back re-sync result
        self.settled: Set[int] = set()  # attempts whose results we stopped waiting for
        self._gates: Dict[str, asyncio.Semaphore] = {}  # per peer: our messages on the wire
        # member -> slice -> (digest, bytes on the wire) of its part we reduced (attempt 0)
        self._taken: Dict[str, Dict[int, Tuple[bytes, int]]] = {}

    # --- what the run knows about its round -------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the whole vector on the wire: what the round's waits scale with."""
        if self._payloads:
            return sum(len(p) for p in self._payloads.values())
        return payload_bytes(self.sent.size, self.dtype)

    def key(self, index: int, attempt: int = 0) -> SliceKey:
        g = self.group
        return (g.module, g.round, g.group_id, index, attempt)

    def exclude(self, peer: str, reason: str) -> None:
        """``peer`` is out of this round: nobody waits for it, what it sends is not used."""
        self.inbox.exclude(self.group.module, self.group.round, peer, reason)

    def is_excluded(self, peer: str) -> bool:
        return self.inbox.is_excluded(self.group.module, self.group.round, peer)

    @property
    def exclusions(self) -> Mapping[str, str]:
        return self.inbox.excluded.get((self.group.module, self.group.round), {})

    def gate(self, peer: str) -> asyncio.Semaphore:
        """At most ``SEND_WINDOW`` of our messages (parts and results) to ``peer`` at once, served in order."""
        return self._gates.setdefault(peer, asyncio.Semaphore(SEND_WINDOW))

    # --- receiving (called by the Averager's handler) -----------------------------------
    def refusal(self, message: TensorPart, remote_peer: str, values: np.ndarray) -> Optional[Tuple[Refusal, str]]:
        """Why this run refuses a message the Averager found well-formed for its round; None: take it."""
        if self.group.group_id != message.group_id:
            return Refusal.WRONG_GROUP, "this peer formed a different group for that round"
        if remote_peer not in self.group.members or message.slice_index >= len(self.bounds):
            return Refusal.WRONG_GROUP, "sender or slice is not in our group"
        dtype = self.dtype if message.type == "part" else self.result_dtype
        if message.dtype != dtype:
            return Refusal.MALFORMED, f"this round's {message.type}s are {dtype}, got {message.dtype}"
        if message.type == "result" and message.attempt in self.settled:
            return Refusal.TOO_LATE, "this peer stopped waiting for that result"
        lo, hi = self.bounds[message.slice_index]
        if values.size != hi - lo:
            return Refusal.WRONG_SIZE, f"slice {message.slice_index} has {hi - lo} elements, got {values.size}"
        return None

    # --- the run ------------------------------------------------------------------------
    async def run(self) -> AllReduceResult:
        group, me = self.group, self.me
        self._refuse_early_strangers()
        await self._exchange(attempt=0, slices=list(range(len(self.bounds))))
        self._settle_pending()
        mine, reducers = group.index_of(me), group.reducers
        failed = [i for i in range(len(self.bounds)) if owner_of(i, reducers) != mine and not self.averaged[i]]
        # A backup needs a second reducer, and someone besides the failed reducer and itself to average with.
        if failed and len(reducers) > 1 and len(group.members) > 2:
            await self._exchange(attempt=1, slices=failed)
            self._settle_pending()
        return self._outcome()

    def _outcome(self) -> AllReduceResult:
        group, bounds = self.group, self.bounds
        fraction = sum(hi - lo for (lo, hi), ok in zip(bounds, self.averaged, strict=True) if ok) / max(
            1, self.sent.size
        )
        contributors = tuple(sorted(self.contributors | {self.me}))
        dropped = tuple(sorted(set(group.members) - set(contributors)))
        unaveraged = tuple(b for b, ok in zip(bounds, self.averaged, strict=True) if not ok)
        seconds = self.context.clock() - self.started
        residual = self.memory.residual if self.dtype in ("int8", "topk2") else None
        if unaveraged and residual is not None and residual.size == self.sent.size:
            for lo, hi in unaveraged:  # not applied (rounds.leave_unstepped): still owed, with what we sent there
                residual[lo:hi] += self.sent[lo:hi]
        if fraction == 1.0 and not dropped and seconds > 0:  # rate per direction; a partial round's says little
            size = len(group.members)
            self.memory.message_ask = int(self.nbytes * 2 * (size - 1) / size / seconds * MESSAGE_SECONDS)
        excluded = {p: why for p, why in self.exclusions.items() if p in group.members}
        return AllReduceResult(self.result, fraction, contributors, seconds, dropped, unaveraged, excluded,
                               self._received())  # fmt: skip

    def _received(self) -> Dict[str, Received]:
        """Per member whose parts we reduced (and that is not out of the round): what a receipt vouches for."""
        group, bounds = self.group, self.bounds
        out: Dict[str, Received] = {}
        for sender, digests in self._taken.items():
            if self.is_excluded(sender) or sender not in group.members:
                continue
            index = group.index_of(sender)
            own = sum(hi - lo for i, (lo, hi) in enumerate(bounds) if owner_of(i, group.reducers) == index)
            elements = sum(bounds[i][1] - bounds[i][0] for i in digests)
            digest = hashlib.sha256(b"".join(digests[i][0] for i in sorted(digests))).hexdigest()
            sent = sum(nbytes for _, nbytes in digests.values())
            out[sender] = Received(elements, sent, digest, self.sent.size - own)
        return out

    def _refuse_early_strangers(self) -> None:
        """Members whose parts for this round arrived, before it started, under another group id,
        or who sent a part for an earlier round after saying they were ready for this one."""
        group, stats = self.group, self.context.stats
        for member, posted_at in zip(group.members, group.posted_at, strict=False):
            sent_at = self.memory.stale_parts.pop(member, None)
            if sent_at is not None and sent_at > posted_at + CLOCK_SLACK_SECONDS:
                stats.reject(Refusal.WRONG_ROUND.value)
                self.exclude(member, Refusal.WRONG_ROUND.value)
        for key, items in list(self.inbox.items.items()):
            if key[2] != group.group_id:
                for slot in items:
                    if slot in group.members:
                        stats.reject(Refusal.WRONG_GROUP.value)
                        self.exclude(slot, Refusal.WRONG_GROUP.value)

    def _encode_own(self, vector: np.ndarray) -> np.ndarray:
        """Our vector as every receiver will decode it; int8 and sparse carry what they did not send into the
        module's next round (error feedback, kept in the module's memory; sparse keeps ``error_feedback`` of it)."""
        target = vector.astype(np.float32, copy=True)
        self.memory.residual_before = self.memory.residual  # every run: ``take_back`` undoes only this one
        if self.dtype == "float32":
            return target
        residual = self.memory.residual if self.dtype in ("int8", "topk2") else None
        if residual is not None and residual.size == target.size:
            decay = self.context.spec.error_feedback if self.dtype == "topk2" else 1.0
            target += residual if decay == 1.0 else np.float32(decay) * residual
        sent = np.empty_like(target)
        if self.dtype == "topk2":  # encoded once: decoding and encoding again would not give the same bytes
            topk = self.context.spec.topk
            for index, (lo, hi) in enumerate(self.bounds):
                self._payloads[index] = payload = tensor_payload(target[lo:hi], self.dtype, topk)
                sent[lo:hi] = sparse_decode(payload, hi - lo, self.dtype)
            self.memory.residual = target - sent
            return sent
        for lo, hi in self.bounds:
            sent[lo:hi] = wire_round_trip(target[lo:hi], self.dtype)
        if self.dtype == "int8":
            self.memory.residual = target - sent
        return sent

    async def _exchange(self, attempt: int, slices: List[int]) -> None:
        """Send parts of ``slices`` to their reducers, reduce the ones that are ours, collect and check the rest."""
        group, me, clock = self.group, self.me, self.context.clock
        reducers = group.reducers
        reducer_of = {i: group.members[owner_of(i, reducers) if attempt == 0 else backup_of(i, reducers)]
                      for i in slices}  # fmt: skip
        started = clock()
        deadlines = self.memory.deadlines
        parts_wait = deadlines.timeout("parts", self.nbytes)
        results_wait = deadlines.timeout("results", self.nbytes)
        if attempt == 0:  # the latest a member can give up on a reducer and turn to the backup
            self.retry_from = started + parts_wait + results_wait
        # A backup waits for the members that turn to it last.
        parts_deadline = min(self.deadline, (max(started, self.retry_from) if attempt else started) + parts_wait)
        sends = [
            self._send_parts(peer, [i for i in slices if reducer_of[i] == peer], attempt)
            for peer in group.members
            if peer != me
        ]
        mine = [i for i in slices if reducer_of[i] == me]
        reduce = [self._reduce(i, attempt, parts_deadline, started, i == mine[-1]) for i in mine]
        await asyncio.gather(*sends, *reduce)
        results_started = clock()
        # Another reducer may still be waiting for a missing part until its own parts deadline:
        # its result is due one transfer after that, however early our own slice was done.
        results_deadline = min(self.deadline, max(results_started, parts_deadline) + results_wait)
        others = [i for i in slices if reducer_of[i] != me]
        waits = [
            self.inbox.wait_for(self.key(i, attempt), {reducer_of[i]}, results_deadline, prefix="result:")
            for i in others
        ]
        received = await asyncio.gather(*waits)
        self.settled.add(attempt)  # a result that comes now is refused: its reducer learns we went without it
        missing = {reducer_of[i] for i, (got, _) in zip(others, received, strict=True) if reducer_of[i] not in got}
        if others and all(complete for _, complete in received):
            deadlines.observe("results", clock() - results_started, self.nbytes)
        elif self._slow(missing):
            deadlines.ran_out("results", clock() - results_started, self.nbytes)
        results: Dict[int, Tuple[float, np.ndarray]] = {}
        for i, (got, _) in zip(others, received, strict=True):
            reducer = reducer_of[i]
            if reducer in got and not self.is_excluded(reducer):
                results[i] = got[reducer]
        logger.debug(
            "%s round %d attempt %d: results from %s of %s; excluded %s",
            group.module, group.round, attempt, _short(reducer_of[i] for i in results),
            _short(reducer_of[i] for i in others), _short(self.exclusions),
        )  # fmt: skip
        self._accept_checked(results, reducer_of)

    def _slow(self, missing: Iterable[str]) -> bool:
        """Some of ``missing`` are still in the round (not excluded as bad or unreachable): only slow."""
        return any(not self.is_excluded(peer) for peer in missing)

    async def _reduce(self, index: int, attempt: int, deadline: float, started: float, last: bool) -> None:
        group, me, stats, clock = self.group, self.me, self.context.stats, self.context.clock
        lo, hi = self.bounds[index]
        expected = set(group.members) - {me}
        if attempt:
            expected.discard(group.members[owner_of(index, group.reducers)])  # the reducer that failed it
        got, complete = await self.inbox.wait_for(self.key(index, attempt), expected, deadline)
        if expected and attempt == 0 and last:  # our last chunk: the whole parts phase
            if complete:
                self.memory.deadlines.observe("parts", clock() - started, self.nbytes)
            elif self._slow(expected - set(got)):
                self.memory.deadlines.ran_out("parts", clock() - started, self.nbytes)
        if attempt == 0:  # a member that failed us is out of our round: its result is not applied either
            for sender in expected - set(got):
                self.exclude(sender, "no_part")
        parts = {me: self.sent[lo:hi]}
        for sender, (_, values) in got.items():
            if self.is_excluded(sender):
                continue  # it sent something bad elsewhere in this round
            if values.size != hi - lo:  # arrived before our round started, so unchecked until now
                stats.reject(Refusal.WRONG_SIZE.value)
                self.exclude(sender, Refusal.WRONG_SIZE.value)
                continue
            parts[sender] = values
        spec = self.context.spec
        combined = aggregate(
            parts, me, method=spec.aggregator, clip_multiplier=spec.clip_multiplier, outlier_ratio=spec.outlier_ratio
        )
        for sender in combined.outliers:
            stats.reject("outlier")
            self.exclude(sender, "outlier")
        logger.debug(
            "%s round %d slice %d attempt %d: parts from %s, missing %s, outliers %s, clipped %s",
            group.module, group.round, index, attempt, _short(got), _short(expected - set(got)),
            _short(combined.outliers), _short(combined.clipped),
        )  # fmt: skip
        if attempt == 0 and self.context.receipts:
            for sender in combined.used:
                if sender != me:
                    digest = hashlib.sha256(parts[sender].tobytes()).digest()
                    self._taken.setdefault(sender, {})[index] = (digest, self._wire_size(parts[sender]))
        payload: Optional[bytes] = None
        if self.result_dtype in SPARSE_DTYPES:  # exactly what the others will apply, and the bytes they decode
            payload = tensor_payload(combined.values, self.result_dtype)
            reduced = sparse_decode(payload, hi - lo, self.result_dtype)
        else:
            reduced = wire_round_trip(combined.values, self.dtype)
        self.result[lo:hi] = reduced
        self.averaged[index] = len(combined.used) > 1
        self.contributors.update(combined.used)
        receivers = [p for p in combined.used if p != me]
        weight = float(len(combined.used))
        sends = [self._send(p, "result", index, weight, reduced, attempt, payload=payload) for p in receivers]
        if receivers and not any(await asyncio.gather(*sends)):
            # Nobody took our result (too late, gone, or unreachable): they went on without it, so this
            # slice was averaged with nobody, and saying otherwise would hide that our copy now differs.
            self.averaged[index] = False

    # --- checking results ---------------------------------------------------------------
    def _accept_checked(self, results: Dict[int, Tuple[float, np.ndarray]], reducer_of: Mapping[int, str]) -> None:
        """Apply each result that passes the check against our own part (node/averaging/resultcheck.py)."""
        size = len(self.group.members)
        me = self.group.index_of(self.me)
        reduced = {
            i: self.result[slice(*self.bounds[i])]
            for i in range(len(self.bounds))
            if owner_of(i, self.group.reducers) == me and self.averaged[i]
        }
        verdicts = check_results(
            {i: values for i, (_, values) in results.items()}, self.sent, self.bounds, self.regions,
            group_size=size, reduced=reduced, tolerance=self.context.spec.result_tolerance,
            verifiable=self.verify is not None,
        )  # fmt: skip
        self.context.stats.reject(Refusal.WRONG_SIZE.value, len(verdicts.wrong_size))
        for i in verdicts.held:
            weight, values = results[i]
            self.pending[i] = (weight, values, reducer_of[i])  # see _settle_pending
        for i, (distance, limit) in verdicts.refused.items():
            self.context.stats.reject("bad_result")
            logger.warning(
                "refused %s's result for slice %d of %s: %.3g from our part, limit %.3g",
                reducer_of[i][-8:], i, self.group.module, distance, limit,
            )  # fmt: skip
        for i in verdicts.accepted:
            weight, values = results[i]
            self._apply(i, weight, values, reducer_of[i])

    def _apply(self, index: int, weight: float, values: np.ndarray, reducer: str) -> None:
        self.result[slice(*self.bounds[index])] = values
        self.averaged[index] = weight > 1
        self.contributors.add(reducer)
        if weight >= len(self.group.members):  # every member's part is in it (send-only members are seen only so)
            self.contributors.update(self.group.members)

    def _settle_pending(self) -> None:
        """Apply the held-back re-sync results if the vector with them passes ``verify``; else refuse them."""
        if not self.pending:
            return
        candidate = self.result.copy()
        for i, (_, values, _) in self.pending.items():
            candidate[slice(*self.bounds[i])] = values
        verified = bool(self.verify and self.verify(candidate))
        for i, (weight, values, reducer) in self.pending.items():
            if verified:
                self._apply(i, weight, values, reducer)
            else:
                self.context.stats.reject("bad_result")
        if not verified:
            logger.warning("refused %d re-sync result(s) for %s: far from our state, and the whole is not the "
                           "majority's state", len(self.pending), self.group.module)  # fmt: skip
        self.pending.clear()

    # --- sending --------------------------------------------------------------------------
    async def _send_parts(self, peer: str, indices: List[int], attempt: int) -> None:
        """Our parts of ``indices`` to their reducer ``peer``, in order (through its gate), so its first
        chunks arrive and are reduced early; after one fails, the rest are left to the backup."""
        stop = asyncio.Event()

        async def one(index: int) -> None:
            values = self.sent[slice(*self.bounds[index])]
            if not await self._send(peer, "part", index, 1.0, values, attempt, stop, self._payloads.get(index)):
                stop.set()

        await asyncio.gather(*(one(i) for i in indices))

    async def _send(
        self, peer: str, kind: PartKind, index: int, weight: float, values: np.ndarray, attempt: int,
        stop: Optional[asyncio.Event] = None, payload: Optional[bytes] = None,
    ) -> bool:  # fmt: skip
        """One message; ``stop`` (set by an earlier failure to the same peer) skips it once its turn comes.
        ``payload``: ``values`` already encoded (sparse ones are encoded once)."""
        group = self.group
        try:
            async with self.gate(peer):
                frame = self._frame(kind, index, weight, np.asarray(values, dtype=np.float32), attempt, payload)
                for wait in EARLY_RETRY_SECONDS:  # the peer has not posted for this round yet: again, shortly
                    if (stop is not None and stop.is_set()) or self.is_excluded(peer):
                        return False
                    reply = await self._call(peer, frame)
                    self.context.stats.bytes_sent += len(frame)
                    ack, _ = decode(reply)
                    if not (isinstance(ack, Ack) and ack.code == Refusal.TOO_EARLY):
                        break
                    if self.context.clock() + wait >= self.deadline:
                        break
                    await asyncio.sleep(wait)
        except ConnectionError as e:
            self.context.mark_unreachable(peer)
            self.exclude(peer, "unreachable")
            logger.info("cannot reach %s: %s", peer[-8:], e)
            return False
        except (TimeoutError, WireError) as e:
            logger.debug("%s to %s failed: %s", kind, peer[-8:], e)
            return False
        if not isinstance(ack, Ack):
            logger.info("peer %s answered our %s for %s with a %s", peer[-8:], kind, group.module, ack.type)
            self.exclude(peer, "no_ack")
            return False
        if not ack.ok:
            logger.info("peer %s refused our %s for %s: %s (%s)", peer[-8:], kind, group.module, ack.code, ack.reason)
            if ack.code is None or not ack.code.benign:  # e.g. it is done with the round: what it sent still counts
                self.exclude(peer, f"refused_ours:{ack.code.value if ack.code else '?'}")  # it will not reduce with us
            return False
        return True

    async def _call(self, peer: str, frame: bytes) -> bytes:
        """One request; a stream that p2pd closed under us is opened again, up to twice, a moment later
        (messages are idempotent). Only then is the peer taken for unreachable: streams to a live peer
        have been seen closing twice in a row (bench/RESULTS.md, item 1)."""
        context = self.context
        for attempt in range(STREAM_ATTEMPTS):
            timeout = max(0.1, min(context.spec.part_timeout_seconds, self.deadline - context.clock()))
            try:
                return await context.port.call(peer, context.handler, frame, timeout)
            except ConnectionError as e:
                if attempt == STREAM_ATTEMPTS - 1 or "closed" not in str(e):
                    raise
                logger.info("stream to %s closed under us (%s); opening another", peer[-8:], e)
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _frame(
        self, kind: PartKind, index: int, weight: float, values: np.ndarray, attempt: int, payload: Optional[bytes]
    ) -> bytes:
        group = self.group
        dtype = self.dtype if kind == "part" else self.result_dtype
        header = TensorPart(
            type=kind,
            swarm_id=self.context.swarm_id,
            module=group.module,
            round=group.round,
            group_id=group.group_id,
            slice_index=index,
            sender=self.me,
            weight=float(weight),
            numel=int(values.size),
            dtype=dtype,
            attempt=attempt,
        )
        return encode(header, payload if payload is not None else tensor_payload(values, dtype, self.context.spec.topk))

    def _wire_size(self, values: np.ndarray) -> int:
        """Bytes a member's part of these values took on the wire (as we decoded it)."""
        if self.dtype in SPARSE_DTYPES:
            return sparse_size(values, self.dtype)
        return payload_bytes(values.size, self.dtype)


def _short(peers: Iterable[str]) -> str:
    return ",".join(sorted(p[-4:] for p in peers)) or "-"
