"""Joining a running swarm: download each module's current state from the peers that hold it.

Serving: every node answers state requests for the modules it hosts: a *digest* (round,
size, hash of [global copy; momentum]) or a *range* of that vector, refused when the
state has moved on since the digest the requester trusts (the state before our last outer step
is still served: a group member adopting the state its group held at the round's start asks for it).

Downloading: ask every host for its digest; trust the hash most hosts report (ties: the
newer round), never one donor's word alone when others disagree. Split the vector into
ranges fetched in parallel from the agreeing donors, each with a timeout; a range that
fails (timeout, wrong size, non-finite values) is fetched from another donor. The result
must hash to the agreed value, else the module is downloaded whole from one donor at a
time until one matches. Nobody to download from: the caller keeps its own state, and says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Awaitable, Callable, Collection, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from node.net import Buckets, SwarmPort
from node.training import ModuleState, state_hash
from protocol import handlers
from protocol.wire import StateReply, StateRequest, WireError, decode, encode

logger = logging.getLogger(__name__)

RANGE_ELEMENTS = 1 << 20  # 4 MiB per request: small enough to spread over donors and retry cheaply
ATTEMPTS = 4  # fresh digests after the donors' state moved on (a round ended mid-download)


@dataclass(frozen=True)
class Digest:
    peer: str
    outer_round: int
    numel: int
    params_hash: str


# A peer may download this many times our whole state, plus 64 MiB, per STATE_WINDOW_SECONDS (a newcomer needs it
# once): a peer asking for ranges as fast as it can would otherwise keep us copying state for it forever.
STATE_SHARE, STATE_WINDOW_SECONDS = 2.0, 600.0


class StateServer:
    """Answers state requests from the modules ``states()`` returns (read on the swarm loop); ranges within a
    share per peer (STATE_SHARE), counted in ``refused`` past it."""

    def __init__(
        self,
        swarm: SwarmPort,
        swarm_id: str,
        states: Callable[[], Dict[str, ModuleState]],
        round_now: Callable[[], int],
    ) -> None:
        self._swarm = swarm
        self._swarm_id = swarm_id
        self._states = states
        self._round_now = round_now
        self.handler_name = handlers.state(swarm_id)
        self._shares: Optional[Buckets] = None  # bytes of ranges per peer
        self.refused = 0  # range requests past a peer's share

    def _within_share(self, peer: str, size: int) -> bool:
        burst = STATE_SHARE * sum(8 * s.numel for s in self._states().values()) + (64 << 20)
        if self._shares is None or self._shares.burst < burst:  # we host more now: a larger share
            self._shares = Buckets(burst / STATE_WINDOW_SECONDS, burst)
        return self._shares.take(peer, size)

    async def start(self) -> None:
        await self._swarm.serve(self.handler_name, self._handle)

    async def _handle(self, remote_peer: str, frame: bytes) -> bytes:
        try:
            request, _ = decode(frame)
            if not isinstance(request, StateRequest) or request.swarm_id != self._swarm_id:
                raise WireError("expected a state request for this swarm")
        except WireError as e:
            return encode(StateReply(ok=False, reason=str(e)))
        state = self._states().get(request.module)
        if state is None:
            return encode(StateReply(ok=False, reason=f"not hosting {request.module}"))
        # count == 0 asks for the digest only; the state is [global copy; momentum], 2 x numel values.
        digest = StateReply(ok=True, outer_round=self._round_now(), numel=state.numel, params_hash=state.params_hash())
        if request.count == 0:
            return encode(digest)
        found = state.snapshot(request.expected_hash)  # the current state, or the one before our last step
        if found is None:
            return encode(digest.copy(update={"ok": False, "reason": "state moved on since that digest"}))
        global_flat, momentum = found
        end, numel = min(request.offset + request.count, 2 * state.numel), state.numel
        if request.offset >= end:
            return encode(digest.copy(update={"ok": False, "reason": "range outside the state"}))
        if not self._within_share(remote_peer, 4 * (end - request.offset)):
            self.refused += 1
            return encode(digest.copy(update={"ok": False, "reason": "this peer downloaded its share of our state"}))
        pieces = []  # the range's values, without copying the whole state first
        if request.offset < numel:
            pieces.append(global_flat[request.offset : min(end, numel)].numpy())
        if end > numel:
            pieces.append(momentum[max(request.offset, numel) - numel : end - numel].numpy())
        values = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.float32)
        reply = digest.copy(update={"offset": request.offset, "count": end - request.offset})
        return encode(reply, values.astype("<f4").tobytes())


class StateDownloader:
    """Fetches modules from donors; ``on_progress(elements)`` drives a progress bar."""

    def __init__(
        self, swarm: SwarmPort, swarm_id: str, timeout: float, on_progress: Optional[Callable[[int], None]] = None,
        trusted: Collection[str] = (),
    ) -> None:  # fmt: skip
        """``trusted``: donors whose word outweighs the others' (``_agree``)."""
        self.trusted = trusted
        self._swarm = swarm
        self._swarm_id = swarm_id
        self._timeout = timeout
        self._on_progress = on_progress or (lambda n: None)
        self._handler = handlers.state(swarm_id)
        self.rejected: Dict[str, int] = {}

    async def digests(self, module: str, donors: Sequence[str]) -> List[Digest]:
        async def ask(peer: str) -> Optional[Digest]:
            reply = await self._request(peer, StateRequest(swarm_id=self._swarm_id, module=module))
            if reply is None:
                return None
            return Digest(peer, reply[0].outer_round, reply[0].numel, reply[0].params_hash)

        return [d for d in await asyncio.gather(*(ask(p) for p in donors)) if d is not None]

    async def download(self, module: str, donors: Sequence[str], numel: int) -> Optional[Tuple[np.ndarray, int]]:
        """[global copy; momentum] (2 x numel float32) and its round, or None if no donor delivered.

        Donors' state moves on at every round boundary; a download that straddles one is
        retried from fresh digests, without the donors that failed or lied so far.
        """
        bad: Set[str] = set()
        for _ in range(ATTEMPTS):
            live = [p for p in donors if p not in bad]
            found = await self.digests(module, live)
            bad |= set(live) - {d.peer for d in found}  # no digest: timed out or refused
            found = [d for d in found if d.numel == numel]
            if not found:
                return None
            agreed, agreeing = _agree(found, self.trusted)
            vector = await self._fetch(module, [d.peer for d in agreeing], agreed, 2 * numel)
            if vector is not None and _hash(vector, numel) == agreed:
                return vector, agreeing[0].outer_round
            if len(agreeing) > 1:  # find who lied: one donor at a time
                for donor in agreeing:
                    vector = await self._fetch(module, [donor.peer], agreed, 2 * numel)
                    if vector is not None and _hash(vector, numel) == agreed:
                        return vector, donor.outer_round
                    if vector is not None:
                        bad.add(donor.peer)
                        self._reject("hash_mismatch")
            elif vector is not None:
                bad.add(agreeing[0].peer)
                self._reject("hash_mismatch")
        return None

    async def exact(self, module: str, donors: Sequence[str], numel: int, expected: str) -> Optional[np.ndarray]:
        """[global copy; momentum] of the state that hashes to ``expected`` (a group's majority: the donors hold it
        or held it before their last step), from all ``donors`` at once, then one at a time; None if none did."""
        vector = await self._fetch(module, list(donors), expected, 2 * numel)
        if vector is not None and _hash(vector, numel) == expected:
            return vector
        for donor in donors if len(donors) > 1 else ():
            vector = await self._fetch(module, [donor], expected, 2 * numel)
            if vector is not None and _hash(vector, numel) == expected:
                return vector
            if vector is not None:
                self._reject("hash_mismatch")
        return None

    async def head(self, module: str, donors: Sequence[str], count: int) -> Optional[np.ndarray]:
        """The first ``count`` values of a module's global copy (e.g. an expert's router gate), from a donor
        whose digest most donors report, one donor at a time; None if none delivered. A part cannot be checked
        against the hash of the whole, so a lying donor is outvoted here, not caught: only for values where a
        wrong one costs little (placement's affinity), never for state a node trains from."""
        found = await self.digests(module, donors)
        if not found:
            return None
        agreed, agreeing = _agree(found, self.trusted)
        for donor in agreeing:
            values = await self._fetch(module, [donor.peer], agreed, min(count, 2 * donor.numel))
            if values is not None:
                return values
        return None

    async def _fetch(self, module: str, peers: List[str], expected: str, total: int) -> Optional[np.ndarray]:
        """Ranges pulled in parallel, one worker per donor; a donor that fails once is dropped and
        its range goes back to the queue for the others."""
        out = np.empty(total, dtype=np.float32)
        queue: asyncio.Queue[Tuple[int, int]] = asyncio.Queue()
        for offset in range(0, total, RANGE_ELEMENTS):
            queue.put_nowait((offset, min(RANGE_ELEMENTS, total - offset)))
        remaining = queue.qsize()
        done = 0

        async def worker(peer: str) -> None:
            nonlocal done
            while not queue.empty():
                offset, count = queue.get_nowait()
                request = StateRequest(
                    swarm_id=self._swarm_id, module=module, offset=offset, count=count, expected_hash=expected
                )
                values = self._check(await self._request(peer, request), offset, count)
                if values is None:
                    queue.put_nowait((offset, count))
                    return
                out[offset : offset + count] = values
                done += 1
                self._on_progress(count)

        await asyncio.gather(*(worker(p) for p in peers))
        return out if done == remaining else None

    def _check(self, reply: Optional[Tuple[StateReply, bytes]], offset: int, count: int) -> Optional[np.ndarray]:
        if reply is None:
            return None
        header, payload = reply
        if not header.ok or header.offset != offset or header.count != count or len(payload) != 4 * count:
            self._reject("wrong_range")
            return None
        values = np.frombuffer(payload, dtype="<f4").astype(np.float32)
        if not np.isfinite(values).all():
            self._reject("non_finite")
            return None
        return values

    async def _request(self, peer: str, request: StateRequest) -> Optional[Tuple[StateReply, bytes]]:
        try:
            frame = await self._swarm.call(peer, self._handler, encode(request), self._timeout)
            reply, payload = decode(frame)
        except (TimeoutError, ConnectionError, WireError) as e:
            logger.info("state donor %s failed: %s", peer[-8:], e)
            self._reject("donor_failed")
            return None
        if not isinstance(reply, StateReply) or not reply.ok:
            logger.info("state donor %s refused: %s", peer[-8:], getattr(reply, "reason", "?"))
            return None
        return reply, bytes(payload)

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def _agree(found: List[Digest], trusted: Collection[str] = ()) -> Tuple[str, List[Digest]]:
    """The hash most donors report (ties: the newer round), and the donors that report it. Donors in ``trusted``
    (the operator's bootstrap peers, peers with a track record: node/runtime/rounds.py Standing) outvote any
    number of others: when one of them answered, only theirs are counted, so fresh identities cannot buy the
    state a newcomer adopts."""
    voters = [d for d in found if d.peer in trusted] or found
    votes = Counter(d.params_hash for d in voters)
    agreed = max(votes, key=lambda h: (votes[h], max(d.outer_round for d in voters if d.params_hash == h)))
    return agreed, [d for d in found if d.params_hash == agreed]


def _hash(vector: np.ndarray, numel: int) -> str:
    """The hash peers advertise for [global copy; momentum] (ModuleState.params_hash)."""
    return state_hash(vector[:numel], vector[numel:])


async def catch_up(
    downloader: StateDownloader, states: Dict[str, ModuleState], donors_of: Callable[[str], List[str]]
) -> Dict[str, int]:
    """Download every module that has donors; return {module: donors' round} for those adopted."""
    adopted: Dict[str, int] = {}
    for name, state in states.items():
        donors = donors_of(name)
        if not donors:
            continue
        got = await downloader.download(name, donors, state.numel)
        if got is None:
            logger.warning("could not get %s from any of %d donor(s): keeping our own copy", name, len(donors))
            continue
        vector, round_number = got
        state.adopt(vector)
        state.load_global()
        adopted[name] = round_number
    return adopted


def download_modules(
    swarm: SwarmPort,
    swarm_id: str,
    states: Dict[str, ModuleState],
    donors: Dict[str, List[str]],
    timeout: float,
    run: Callable[[Awaitable[Dict[str, int]]], Dict[str, int]],
    trusted: Collection[str] = (),
) -> Dict[str, int]:
    """Blocking: download every module that has donors, with a progress bar; log what happened.
    ``run`` runs a coroutine on the swarm's event loop and waits for it; ``trusted``: see ``_agree``."""
    from tqdm.auto import tqdm

    total = sum(2 * states[m].numel for m, peers in donors.items() if peers)
    if total == 0:
        return {}
    started = time.perf_counter()
    with tqdm(total=total * 4, unit="B", unit_scale=True, desc="downloading state", leave=False) as bar:
        downloader = StateDownloader(swarm, swarm_id, timeout, on_progress=lambda n: bar.update(4 * n), trusted=trusted)
        adopted = run(catch_up(downloader, states, lambda m: donors[m]))
    seconds = time.perf_counter() - started
    size = sum(8 * states[m].numel for m in adopted)
    logger.info(
        "downloaded %d of %d module(s) from donors, %.1f MB in %.2fs%s",
        len(adopted),
        sum(1 for peers in donors.values() if peers),
        size / 1e6,
        seconds,
        f"; refused: {downloader.rejected}" if downloader.rejected else "",
        extra={"event": "state_downloaded", "modules": sorted(adopted), "bytes": size, "seconds": round(seconds, 3),
               "donors": max((len(p) for p in donors.values()), default=0),
               "hashes": {m: states[m].params_hash() for m in adopted}},
    )  # fmt: skip
    return adopted


def exact_fetcher(
    swarm: SwarmPort, swarm_id: str, timeout: float
) -> Callable[[str, List[str], int, str], Awaitable[Optional[np.ndarray]]]:
    """``fetch(module, donors, numel, expected_hash)``: StateDownloader.exact, for a member adopting its group's
    state (node/runtime/rounds.py)."""

    async def fetch(module: str, donors: List[str], numel: int, expected: str) -> Optional[np.ndarray]:
        return await StateDownloader(swarm, swarm_id, timeout).exact(module, donors, numel, expected)

    return fetch


def fetch_heads(
    swarm: SwarmPort, swarm_id: str, donors: Dict[str, List[str]], count: int, timeout: float,
    run: Callable[[Awaitable[Dict[str, np.ndarray]]], Dict[str, np.ndarray]], trusted: Collection[str] = (),
) -> Dict[str, np.ndarray]:  # fmt: skip
    """Blocking: the first ``count`` values of each module's global copy (StateDownloader.head), all modules
    at once; modules no donor delivered are left out. ``run`` runs a coroutine on the swarm's event loop."""
    downloader = StateDownloader(swarm, swarm_id, timeout, trusted=trusted)
    modules = list(donors)

    async def fetch_all() -> Dict[str, np.ndarray]:
        got = await asyncio.gather(*(downloader.head(m, donors[m], count) for m in modules))
        return {m: values for m, values in zip(modules, got, strict=True) if values is not None}

    return run(fetch_all())
