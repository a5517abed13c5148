"""One outer round of every hosted module: form each module's group, all-reduce, report.

The training thread prepares what it sends (each module's pseudo-gradient and state
hash) and hands the round to the swarm loop; the loop returns each module's averaged
vector, which the training thread applies. Nothing here touches the model, so with
``averaging.overlap`` the next local steps run while this round is on the network.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Awaitable, Callable, Collection, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from node.averaging import AllReduceResult, Averager, Group, Matchmaker
from node.runtime.report import ModuleOutcome, classify
from node.swarm import Membership
from node.training import ModuleState, state_hash
from protocol.manifest import AveragingSpec

logger = logging.getLogger("node")


@dataclass(frozen=True)
class Prepared:
    """What the training thread captured for one module at the end of its local steps."""

    state: ModuleState
    delta: torch.Tensor  # global - local: the pseudo-gradient we send
    params_hash: str


@dataclass
class Averaged:
    outcome: ModuleOutcome
    vector: np.ndarray
    resync: bool
    step: bool = True  # False: the round averaged nothing; the module keeps its local progress (apply)
    adopted: Optional[np.ndarray] = None  # [global copy; momentum] of the group's majority, taken before stepping


# A module whose round expected peers but averaged with none does not step: an outer step on its own
# pseudo-gradient would move its global copy away from its group's (a re-sync next round), and a group's outer
# momentum on a lone pseudo-gradient is no DiLoCo step. Its local progress stays in its parameters and goes into
# the next round's pseudo-gradient. Past this many such rounds in a row it steps alone, as a lone node does, so
# that pseudo-gradient stays within what the reducers' outlier screen takes (robust.py: outlier_ratio).
UNSTEPPED_ROUNDS = 3


@dataclass
class PendingRound:
    """A round handed to the swarm loop; applied by the training thread when done."""

    round_number: int
    steps: int
    prepared: Dict[str, Prepared]
    future: "concurrent.futures.Future[List[Averaged]]"
    compute_seconds: float
    submitted_at: float


def prepare(states: Dict[str, ModuleState]) -> Dict[str, Prepared]:
    return {name: Prepared(state, state.pseudo_gradient(), state.params_hash()) for name, state in states.items()}


STANDING_ROUNDS = 5  # rounds a peer contributed to our all-reduces before its word counts in state majorities


class Standing:
    """Peers whose word counts where a majority decides state (a re-sync's verdict: majority_check; the state a
    node adopts: node/swarm/statesync.py _agree): the operator's bootstrap peers, and peers whose parts went into
    our all-reduces in STANDING_ROUNDS distinct rounds. A fresh identity has none, so any number of them cannot
    outvote this node and the peers it has averaged with."""

    def __init__(self, trusted: Iterable[str] = ()) -> None:
        self._trusted = set(trusted)
        self._rounds: Dict[str, Tuple[int, int]] = {}  # peer -> (rounds it contributed to, the last of them)

    def observe(self, round_number: int, contributors: Iterable[str]) -> None:
        for peer in contributors:
            count, last = self._rounds.get(peer, (0, -1))
            if round_number != last:
                self._rounds[peer] = (count + 1, round_number)

    def trust(self, peers: Iterable[str]) -> None:
        self._trusted |= set(peers)

    def has(self, peer: str) -> bool:
        return peer in self._trusted or self._rounds.get(peer, (0, -1))[0] >= STANDING_ROUNDS

    def peers(self) -> Set[str]:
        return self._trusted | {p for p, (count, _) in self._rounds.items() if count >= STANDING_ROUNDS}


NO_SHOW_ROUNDS = 2  # groups in a row a member posted for and gave nothing to, before its posts stop moving us


class NoShows:
    """Members of our groups that posted ready but contributed nothing: a peer that posts for the next round and
    never sends a part would cut every round of ours short. After NO_SHOW_ROUNDS such groups in a row, its ready
    posts do not cut our rounds short (node/swarm/membership.py) until it contributes to one of our groups again.
    It is still grouped with: the groups every member computes must not depend on what one of them saw."""

    def __init__(self) -> None:
        self._missed: Dict[str, int] = {}  # peer -> our groups in a row it gave nothing to

    def observe(self, members: Iterable[str], contributors: Collection[str]) -> None:
        for peer in members:
            if peer in contributors:
                self._missed.pop(peer, None)
            else:
                self._missed[peer] = self._missed.get(peer, 0) + 1

    def __contains__(self, peer: object) -> bool:
        return isinstance(peer, str) and self._missed.get(peer, 0) >= NO_SHOW_ROUNDS


class RoundAverager:
    """Averages every prepared module concurrently; never raises for peer failures."""

    def __init__(
        self, peer_id: str, matchmaker: Matchmaker, averager: Averager, membership: Membership, spec: AveragingSpec
    ) -> None:
        self._me = peer_id
        self._matchmaker = matchmaker
        self._averager = averager
        self._membership = membership
        self._spec = spec
        self._stranded: Set[str] = set()  # modules whose last group had no member others can dial
        self.no_shows = NoShows()
        self.standing = Standing()  # joined.py trusts its bootstrap peers in it
        self._unstepped: Dict[str, int] = {}  # module -> rounds in a row that averaged with nobody
        # Told of every finished all-reduce (members-only swarms sign receipts for the parts we reduced).
        self.on_averaged: Optional[Callable[[Group, AllReduceResult], object]] = None
        # Downloads the state of a module that hashes to a given value from the given peers (joined.py; adoption).
        # Without it, a group whose members hold different states re-syncs, as protocol versions before 5 did.
        self.fetch_state: Optional[FetchState] = None

    def _say_if_nobody_dialable(self, module: str, stranded: bool) -> None:
        """Once when a module's group is only members behind NAT (nobody can reduce for them: a relay-less swarm
        needs one public host per module), and once when that is over."""
        if stranded and module not in self._stranded:
            self._stranded.add(module)
            logger.warning(
                "%s: every member of its group is behind NAT, so none can receive the others' parts; it averages "
                "once a public node hosts it (this node keeps trying every round)", module,
                extra={"event": "no_public_member", "module_name": module},
            )  # fmt: skip
        elif not stranded and module in self._stranded:
            self._stranded.discard(module)
            logger.info("%s: a public member is in its group again", module)

    async def average(
        self, prepared: Dict[str, Prepared], round_number: int, window_seconds: Optional[float] = None
    ) -> List[Averaged]:
        """``window_seconds``: the matchmaking window to ask for (node/averaging/matchmaking.py)."""
        tasks = [self._module(name, item, round_number, window_seconds) for name, item in prepared.items()]
        return list(await asyncio.gather(*tasks))

    async def _module(self, name: str, item: Prepared, round_number: int, window_seconds: Optional[float]) -> Averaged:
        started = time.monotonic()
        state = item.state
        view = self._membership.view
        others = [
            peer
            for peer in view.hosts_of(name, exclude=self._me, round_number=round_number)
            if not self._averager.presumed_dead(peer, view.seen_at.get(peer, 0.0))
        ]
        delta = item.delta.numpy()
        if not others:  # alone: DiLoCo outer step on our own pseudo-gradient
            outcome = ModuleOutcome(name, 1, 0.0, False, 0.0, classify(1, 0.0, 0), numel=state.numel)
            return Averaged(outcome, delta.copy(), False)
        self._averager.expect(name, round_number, state.numel)  # a faster member's parts may come before our group
        group = await self._matchmaker.form_group(
            name, round_number, item.params_hash, state.numel, others, self._spec.round_timeout_seconds,
            window_seconds, self._averager.message_ask(name),
        )  # fmt: skip
        self._say_if_nobody_dialable(name, group.nobody_dialable)
        resync, adopting = group.needs_resync, None
        majority = adoption_target(group.params_hashes) if resync and self.fetch_state is not None else None
        if majority is not None:  # most members hold one state (or two halves do): a normal round, the others adopt it
            resync = False
            if item.params_hash != majority:
                adopting = asyncio.ensure_future(self._adopt(name, state.numel, group, majority, item.params_hash))
        if resync:  # no state most members hold: average the global copies too, uncompressed
            vector = state.payload(True, item.delta)
            counted = [m != self._me and self.standing.has(m) for m in group.members]
            verify = majority_check(group.params_hashes, state.numel, self._spec.aggregator, counted, item.params_hash)
            result = await self._averager.all_reduce(
                group, vector, regions=[state.numel] * 3, compress=False, verify=verify
            )
        else:
            result = await self._averager.all_reduce(group, delta)
        adopted = await adopting if adopting is not None else None
        leave_unstepped(result, state.numel)
        self.standing.observe(round_number, (p for p in result.contributors if p != self._me))
        self.no_shows.observe((m for m in group.members if m != self._me), result.contributors)
        if self.on_averaged is not None and result.received:
            try:
                self.on_averaged(group, result)
            except Exception:  # receipts are bookkeeping: a bug there must not cost the round
                logger.exception("signing receipts for %s round %d failed", name, round_number)
        size = len(group.members)
        step = resync or result.averaged_fraction > 0 or self._unstepped.get(name, 0) >= UNSTEPPED_ROUNDS
        vector = result.vector
        if step:
            self._unstepped.pop(name, None)
            if not resync and result.averaged_fraction == 0:  # steps alone, as a lone node does
                self._averager.memory(name).take_back()
                vector = delta.copy()
        else:
            self._unstepped[name] = self._unstepped.get(name, 0) + 1
            self._averager.memory(name).take_back()  # what it did not send is in its pseudo-gradient again
            logger.info("%s round %d averaged with nobody of %d expected: not stepped (%d in a row)", name,
                        round_number, len(others), self._unstepped[name])  # fmt: skip
        outcome = ModuleOutcome(
            name,
            size,
            result.averaged_fraction,
            resync,
            time.monotonic() - started,
            classify(size, result.averaged_fraction, len(others)),
            dropped=len(result.dropped),
            numel=state.numel,
        )
        return Averaged(outcome, vector, resync, step, adopted if step else None)

    async def _adopt(self, name: str, numel: int, group: Group, majority: str, own: str) -> Optional[np.ndarray]:
        """The state ``group`` adopts (hash ``majority``: adoption_target), downloaded from its holders while the
        round runs; None when the members whose word counts here (Standing; none: our own) do not make it their
        target too, or no holder delivered it (we then keep our own state: the next round tries again)."""
        assert self.fetch_state is not None
        others = [(m, h) for m, h in zip(group.members, group.params_hashes, strict=True) if m != self._me]
        voters = [h for m, h in others if self.standing.has(m)] or [own]
        if adoption_target(voters) != majority:
            logger.info("%s round %d: most of the group holds another state than ours, but not most of the members "
                        "whose word counts here: keeping ours", name, group.round)  # fmt: skip
            return None
        holders = [m for m, h in others if h == majority]
        vector = await self.fetch_state(name, holders, numel, majority)
        if vector is None:
            logger.warning("%s round %d: could not download the group's state from %d holder(s): keeping ours", name,
                           group.round, len(holders))  # fmt: skip
            return None
        logger.info("%s round %d: adopted the state %d of %d members hold", name, group.round, len(holders),
                    len(group.members), extra={"event": "adopted", "module_name": name})  # fmt: skip
        return vector


FetchState = Callable[[str, List[str], int, str], Awaitable[Optional[np.ndarray]]]


def majority_state(hashes: Sequence[str]) -> Optional[str]:
    """The state hash a strict majority of ``hashes`` holds, if one does."""
    if not hashes:
        return None
    value, count = Counter(hashes).most_common(1)[0]
    return value if 2 * count > len(hashes) else None


def adoption_target(hashes: Sequence[str]) -> Optional[str]:
    """The state a group with differing states adopts instead of re-syncing: the one a strict majority of
    ``hashes`` holds; or, when the group holds exactly two states, each by half of it and by at least two
    members, the smaller hash (every member computes the same). Two pairs that averaged apart for a while meet in
    a group of four with two states and no majority; re-syncing sends global copies and momentum in float32
    (hundreds of sparse rounds' bytes), slows those rounds, and the pairs drift apart again (bench/RESULTS.md,
    issue 21). The tie goes to a hash, which its holders could choose: it gives nothing to an attacker who
    would not already share a re-sync's CenteredClip half and half (two identities with standing against two)."""
    value = majority_state(hashes)
    if value is not None:
        return value
    counts = Counter(hashes)
    if len(counts) == 2 and len(set(counts.values())) == 1 and min(counts.values()) >= 2:
        return min(counts)
    return None


def leave_unstepped(result: AllReduceResult, numel: int) -> None:
    """Zero the pseudo-gradient (the first ``numel`` values) where nobody averaged with us: that slice is
    not stepped, so members that all missed it keep identical global copies there."""
    for lo, hi in result.unaveraged:
        result.vector[lo : min(hi, numel)] = 0.0


def majority_check(
    hashes: Sequence[str], numel: int, aggregator: str, counted: Optional[Sequence[bool]] = None, own: str = ""
) -> Optional[Callable[[np.ndarray], bool]]:
    """A re-sync's ``verify``: with CenteredClip, a group where most members hold one state gets exactly
    that state back (robust.coordinate_median), so a result far from ours is accepted if the whole
    re-synced state hashes to the majority's (see Averager._settle_pending). ``counted``: per member, whether
    its hash is counted (the members with standing: Standing; default all); when none is, ``own`` (our hash)
    decides: a group of fresh identities cannot replace the state we hold."""
    voters = [h for h, c in zip(hashes, counted, strict=True) if c] if counted is not None else list(hashes)
    value = majority_state(voters or ([own] if own else []))
    if value is None or aggregator != "centered_clip":
        return None
    return lambda vector: state_hash(vector[numel : 2 * numel], vector[2 * numel : 3 * numel]) == value


def apply(pending: PendingRound, results: List[Averaged], overlap: bool) -> List[ModuleOutcome]:
    """Outer step of every module; with overlap, keep the local steps taken since ``prepare``."""
    for item, averaged in zip(pending.prepared.values(), results, strict=True):
        if not averaged.step:
            continue
        drift: Optional[torch.Tensor] = None
        if overlap:  # local now - local at prepare time (= global - delta)
            drift = item.state.local_flat() - (item.state.global_flat - item.delta)
        if averaged.adopted is not None:  # the group's state, then the group's step on it: the members' state
            item.state.adopt(averaged.adopted)
        item.state.apply(averaged.vector, averaged.resync, drift=drift)
    return [a.outcome for a in results]
