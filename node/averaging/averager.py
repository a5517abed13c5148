"""The averaging service of one node: serves every part and result peers send, and starts one
AllReduceRun (node/averaging/run.py) per group and round, for every module it hosts.

A message is checked here for what holds whatever the round (schema, swarm, sender, hosted module,
weights, a round that is over) and handed to its round's run, which checks the rest (group, slice,
size) and keeps it. A message for a round that has not started here yet waits in the inbox of early
mail and moves into the run when it starts, but only for the round this node posted for (``expect``) and
within a bound of bytes per sender and per round (``EARLY_SHARE``); other early mail is answered
``too_early`` and its sender sends it again shortly. A malformed or lying message excludes its sender from
the round it claimed, and from our rounds of that module where it is a member, so nobody waits for it.

What outlives a run is one ModuleMemory per module (node/averaging/memory.py), the peers we failed to
reach, and the node-wide counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Dict, Optional, Sequence, Set, Tuple

import numpy as np

from node.averaging.deadlines import Deadlines
from node.averaging.inbox import Inbox
from node.averaging.matchmaking import Group
from node.averaging.memory import AveragingStats, ModuleMemory
from node.averaging.run import RESULT_DTYPE_OF, WIRE_DTYPE_OF, AllReduceResult, AllReduceRun, RunContext, Verify
from node.net import Buckets, Clock, SwarmPort
from protocol import handlers
from protocol.manifest import AveragingSpec
from protocol.wire import Ack, Refusal, TensorPart, WireError, decode, encode, read_tensor

logger = logging.getLogger("node.averaging")

EARLY_MAIL_SECONDS = 60.0  # early mail for a round that never starts here is dropped after max(this, 3 rounds)
# Early mail kept for one (module, round), in bytes of the module's whole vector (a re-sync's three regions): from
# one sender, and from all. An honest member sends us only the slices we reduce, at most half of it.
EARLY_SHARE_PER_SENDER, EARLY_SHARE = 1.0, 2.0
# Refusals for cause a peer may draw before our answers to it are held back: PENALTY_BURST at once, then
# PENALTY_RATE a second; a held answer waits at most PENALTY_HOLD_SECONDS.
PENALTY_RATE, PENALTY_BURST, PENALTY_HOLD_SECONDS = 1.0, 20.0, 10.0
OVER_SHARE = "this peer holds as much early mail as it takes"


class Averager:
    """Serves part/result messages and runs all-reduces; one per node, for every module."""

    run_class = AllReduceRun  # the run of one group and round (tests swap in attackers)

    def __init__(
        self,
        swarm: SwarmPort,
        swarm_id: str,
        *,
        hosted: Callable[[], Set[str]],
        spec: AveragingSpec,
        clock: Optional[Clock] = None,
        round_now: Optional[Callable[[], int]] = None,
    ) -> None:
        """``hosted``: the modules this node averages now; ``clock``: monotonic seconds of the event loop
        the averaging runs on (default time.monotonic; a test on a virtual-time loop passes its time)."""
        self._swarm = swarm
        self._swarm_id = swarm_id
        self._hosted = hosted
        self._spec = spec
        self._clock: Clock = clock or time.monotonic
        self.handler_name = handlers.averaging(swarm_id)
        self.stats = AveragingStats()
        self._memory: Dict[str, ModuleMemory] = {}
        self._early = Inbox(self._clock)  # messages for rounds not started here yet
        self._active: Dict[Tuple[str, int], AllReduceRun] = {}  # (module, round) -> its run
        self._unreachable: Dict[str, float] = {}  # peer -> swarm time we last failed to connect to it
        self._expected: Dict[str, Tuple[int, int]] = {}  # module -> (the round we posted for, its vector's bytes)
        self._early_bytes: Dict[Tuple[str, int], Dict[str, int]] = {}  # (module, round) -> slot -> bytes kept
        self._penalties = Buckets(PENALTY_RATE, PENALTY_BURST, self._clock)
        self._round_now = round_now or (lambda: -1)  # the node's round (runtime): mail far past it is suspect
        self.receipts = False  # note what each member's parts gave our slices (members-only swarms sign receipts)
        # The formats parts and results come in: the manifest's compression, or float32 (re-syncs send state so).
        part_dtype = WIRE_DTYPE_OF[spec.compression]
        self._formats = {"part": sorted({part_dtype, "float32"}),
                         "result": sorted({RESULT_DTYPE_OF.get(part_dtype, part_dtype), "float32"})}  # fmt: skip

    async def start(self) -> None:
        await self._swarm.serve(self.handler_name, self._handle)

    @property
    def me(self) -> str:
        return self._swarm.peer_id

    def memory(self, module: str) -> ModuleMemory:
        """What ``module``'s averaging carries from one run to the next (created on first use)."""
        found = self._memory.get(module)
        if found is None:
            deadlines = Deadlines(self._spec.part_timeout_seconds, self._spec.deadline_multiplier)
            found = self._memory[module] = ModuleMemory(deadlines)
        return found

    def message_ask(self, module: str) -> Optional[int]:
        """The message size (bytes) to ask for in ``module``'s next group: a short time's worth of our last
        full round's rate (node/averaging/run.py: MESSAGE_SECONDS); None before one."""
        return self.memory(module).message_ask

    def presumed_dead(self, peer: str, record_stored_at: float) -> bool:
        """We failed to connect to ``peer`` after its latest record was stored: don't wait for it."""
        return self._unreachable.get(peer, float("-inf")) > record_stored_at

    def _mark_unreachable(self, peer: str) -> None:
        self._unreachable[peer] = self._swarm.now()

    def expect(self, module: str, round_number: int, numel: int) -> None:
        """We posted (or are about to post) for ``module``'s round ``round_number``: keep the mail that comes for
        it before its run starts, up to a bound set by the module's ``numel`` values (its re-sync vector is 3 x)."""
        self._expected[module] = (round_number, 3 * 4 * numel)
        for key in [k for k in self._early_bytes if k[0] == module and k[1] != round_number]:
            del self._early_bytes[key]

    # --- one all-reduce ------------------------------------------------------------
    async def all_reduce(
        self,
        group: Group,
        vector: np.ndarray,
        *,
        regions: Optional[Sequence[int]] = None,
        compress: bool = True,
        verify: Optional[Verify] = None,
    ) -> AllReduceResult:
        """Average ``vector`` (float32, 1-D) with the group; never raises for peer failures (see AllReduceRun)."""
        if len(group.members) == 1:
            return AllReduceResult(vector.copy(), 0.0, (self.me,), 0.0)
        key = (group.module, group.round)
        memory = self.memory(group.module)
        self.expect(group.module, group.round, vector.size // 3 if regions else vector.size)
        self._early.expire(older_than_seconds=max(self._spec.round_timeout_seconds * 3, EARLY_MAIL_SECONDS))
        self._early_bytes.pop(key, None)
        context = RunContext(
            self._swarm, self._swarm_id, self.handler_name, self._spec, self.stats, self._clock, self._mark_unreachable,
            self.receipts,
        )
        inbox = self._early.take(*key)
        run = self.run_class(context, group, vector, memory, inbox, regions=regions, compress=compress, verify=verify)
        self._started(run)
        self._active[key] = run
        try:
            return await run.run()
        finally:
            del self._active[key]
            memory.finished(group.round)

    def _started(self, run: AllReduceRun) -> None:
        """Called with each run before it starts (tests build attackers by setting up theirs here)."""

    # --- receiving -----------------------------------------------------------------
    async def _handle(self, remote_peer: str, frame: bytes) -> bytes:
        self.stats.bytes_received += len(frame)
        message: Optional[TensorPart] = None
        try:
            decoded, payload = decode(frame)
            if not isinstance(decoded, TensorPart):
                raise WireError("expected a part or result")
            message = decoded
            # What the header alone refuses is refused before the payload is read (a flood of parts for round
            # 10^9 costs a header each, not the decoding and checking of every value).
            refusal = self._refusal(message, remote_peer)
            values = read_tensor(message, payload) if refusal is None else None
        except WireError as e:
            claimed = message.dict() if message is not None else (e.header or {})
            self._exclude(remote_peer, claimed.get("module"), claimed.get("round"), Refusal.MALFORMED.value)
            return await self._refuse(remote_peer, Refusal.MALFORMED, str(e))
        run = self._active.get((message.module, message.round))
        if refusal is None and run is not None and values is not None:
            refusal = run.refusal(message, remote_peer, values)
        if refusal is not None:
            code, reason = refusal
            if not code.benign:
                self._exclude(remote_peer, message.module, message.round, code.value)
            return await self._refuse(remote_peer, code, reason, far=self._suspect(message, reason))
        assert values is not None
        key = (message.module, message.round, message.group_id, message.slice_index, message.attempt)
        slot = remote_peer if message.type == "part" else f"result:{remote_peer}"
        (run.inbox if run is not None else self._early).put(key, slot, message.weight, values)
        return encode(Ack(ok=True))

    async def _refuse(self, peer: str, code: Refusal, reason: str, far: bool = False) -> bytes:
        """Count and answer a refusal. A peer whose messages we refuse for cause (malformed, or mail for rounds far
        ahead of ours or past a round's share) past its allowance waits for our answer (PENALTY_RATE a second): its
        stream is held, so a flood of bad parts comes in at that pace, not as fast as it can send them."""
        self.stats.reject(code.value)
        if code == Refusal.MALFORMED or far:  # not a wrong group or round: honest members see those while recovering
            wait = self._penalties.reserve(peer, 1.0, PENALTY_HOLD_SECONDS)
            await asyncio.sleep(PENALTY_HOLD_SECONDS if wait is None else wait)
        return encode(Ack.refuse(code, reason))

    def _suspect(self, message: TensorPart, reason: str) -> bool:
        """Early mail nobody honest sends: for a round more than one past the node's, the last it posted for or
        finished; or past the round's share of early mail."""
        expected = self._expected.get(message.module)
        known = max(expected[0] if expected is not None else -1, self.memory(message.module).finished_round,
                    self._round_now())  # fmt: skip
        return (known >= 0 and message.round > known + 1) or reason.startswith(OVER_SHARE)

    def _keep_early(self, module: str, round_number: int, slot: str, nbytes: int) -> Optional[str]:
        """Count ``nbytes`` of early mail from ``slot`` for (module, round); why not, when it cannot be kept."""
        expected = self._expected.get(module)
        if expected is None or expected[0] != round_number:
            return f"this peer has not posted for round {round_number} of {module}"
        kept = self._early_bytes.setdefault((module, round_number), {})
        mine, everyone = kept.get(slot, 0) + nbytes, sum(kept.values()) + nbytes
        if mine > EARLY_SHARE_PER_SENDER * expected[1] or everyone > EARLY_SHARE * expected[1]:
            return f"{OVER_SHARE} for round {round_number} of {module}"
        kept[slot] = mine
        return None

    def _exclude(self, peer: str, module: object, round_number: object, reason: str) -> None:
        """Stop waiting for ``peer`` in the round it claimed, and in our active rounds of that module
        (of every module when the claim is unreadable) where it is a member."""
        if isinstance(module, str) and isinstance(round_number, int) and not isinstance(round_number, bool):
            if (module, round_number) not in self._active:  # not started here yet: its run will find it
                self._early.exclude(module, round_number, peer, reason)
        for (active_module, _), run in list(self._active.items()):
            if peer in run.group.members and (not isinstance(module, str) or module == active_module):
                run.exclude(peer, reason)

    def _refusal(self, message: TensorPart, remote_peer: str) -> Optional[Tuple[Refusal, str]]:
        """What the header alone refuses (the run checks the rest: node/averaging/run.py AllReduceRun.refusal)."""
        if message.swarm_id != self._swarm_id:
            return Refusal.WRONG_SWARM, "this peer trains another manifest"
        if message.sender != remote_peer:
            return Refusal.SPOOFED_SENDER, "header sender differs from the stream's peer"
        if message.module not in self._hosted():
            return Refusal.NOT_HOSTED, f"this peer does not host {message.module}"
        run = self._active.get((message.module, message.round))
        memory = self.memory(message.module)
        if message.round <= memory.finished_round and run is None:
            if any(m == message.module and remote_peer in r.group.members for (m, _), r in self._active.items()):
                return Refusal.WRONG_ROUND, "a member of our group sent a part for a round that is over"
            if message.type == "part":  # judged when our next round starts (AllReduceRun._refuse_early_strangers)
                memory.stale_parts[remote_peer] = self._swarm.now()
            return Refusal.ROUND_OVER, "this peer already finished that round"
        formats = self._formats[message.type]
        if message.dtype not in formats:
            return Refusal.MALFORMED, f"{message.type}s here are {' or '.join(formats)}, not {message.dtype}"
        expected = self._expected.get(message.module)
        if expected is not None and 4 * message.numel > expected[1]:  # checked before a sparse payload is unpacked
            return Refusal.WRONG_SIZE, f"{message.numel} values are more than {message.module}'s whole vector"
        if message.type == "part" and message.weight != 1.0:
            return Refusal.BAD_WEIGHT, "a part must carry weight 1 (members count equally)"
        if message.type == "result" and not (1.0 <= message.weight <= 4096 and float(message.weight).is_integer()):
            return Refusal.BAD_WEIGHT, "a result's weight is the count of parts it combines"
        if run is None:  # early: kept within bounds, and checked again when our round starts
            slot = remote_peer if message.type == "part" else f"result:{remote_peer}"
            early = self._keep_early(message.module, message.round, slot, 4 * message.numel)
            return (Refusal.TOO_EARLY, early) if early is not None else None
        return None
