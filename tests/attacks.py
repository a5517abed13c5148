"""Attackers built from the production averaging code, with one thing changed per attack mode.

Used by both tiers: the in-process fault tier (tests/unit/test_averaging_faults.py) and the real-process
swarm tier (tests/swarm/averaging_peer.py). ``make_vector`` gives every peer of a test the same kind of
pseudo-gradient, so the honest aggregate can be computed independently.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Callable, List, Optional, Sequence

import msgpack
import numpy as np

from node.averaging import AllReduceRun, Averager
from node.averaging.robust import aggregate
from node.averaging.run import PartKind
from node.averaging.slices import chunked_bounds, owner_of
from protocol.manifest import AveragingSpec
from protocol.wire import tensor_payload

# attack -> the rejection counter (on some honest peer) that must move when a peer attacks that way
CLASSES = {
    "nan": "malformed",
    "inf": "malformed",
    "scale_1e30": "outlier",
    "sign_flip_100": "outlier",
    "weight_huge": "bad_weight",
    "weight_negative": "bad_weight",
    "wrong_length": "wrong_size",
    "wrong_dtype": "malformed",
    "broadcast": "wrong_size",
    "wrong_round": "wrong_round",
    "wrong_group": "wrong_group",
    "lying_reducer": "bad_result",
}
ATTACKS = (
    "none nan inf scale_1e30 sign_flip_100 weight_huge weight_negative wrong_length wrong_dtype "
    "broadcast wrong_round wrong_group lying_reducer crash_after_parts sign_flip noise slow_reducer"
).split()


def make_vector(round_number: int, seed: int, numel: int) -> np.ndarray:
    """A pseudo-gradient-like vector: a component shared by all peers in a round plus this peer's own."""
    shared = np.random.default_rng([round_number, 1]).standard_normal(numel, dtype=np.float32)
    own = np.random.default_rng([round_number, 2, seed]).standard_normal(numel, dtype=np.float32)
    return shared + 0.5 * own


def honest_aggregate(
    round_number: int, honest: Sequence[int], group_size: int, numel: int, chunk: int, spec: AveragingSpec
) -> np.ndarray:
    """What the reducers compute from the ``honest`` peers' parts (seeds): each slice of a group of
    ``group_size``'s layout on its own, with ``spec``'s aggregator."""
    parts = [make_vector(round_number, i, numel) for i in honest]
    out = np.empty(numel, dtype=np.float32)
    for lo, hi in chunked_bounds(numel, group_size, chunk):
        slices = {str(i): part[lo:hi] for i, part in zip(honest, parts, strict=True)}
        out[lo:hi] = aggregate(slices, str(honest[0]), method=spec.aggregator, clip_multiplier=spec.clip_multiplier,
                               outlier_ratio=spec.outlier_ratio).values  # fmt: skip
    return out


def die() -> None:
    """The real-process attacker's death: SIGKILL of its own process (its DHT and p2pd follow)."""
    os.kill(os.getpid(), signal.SIGKILL)


class AttackRun(AllReduceRun):
    """The production run with one thing changed per attack mode (``attack``); ``crash`` ends the attacker
    the way its tier can (SIGKILL of its process, or killing its in-process peer)."""

    attack = "none"
    crash: Callable[[], None] = staticmethod(die)

    def _frame(
        self, kind: PartKind, index: int, weight: float, values: np.ndarray, attempt: int, payload: Optional[bytes]
    ) -> bytes:
        """``payload`` (the honest encoding) is dropped wherever the attack changes the values."""
        mode = self.attack
        if kind == "result":
            if mode == "lying_reducer":
                values, payload = values * -10.0, None
            return super()._frame(kind, index, weight, values, attempt, payload)
        if mode != "none":
            payload = None
        values = values.copy()
        if mode in ("nan", "inf"):
            values[values.size // 2] = np.nan if mode == "nan" else np.inf
        elif mode == "scale_1e30":
            values *= 1e30
        elif mode == "sign_flip_100":
            values *= -100.0
        elif mode == "sign_flip":
            values *= -4.0
        elif mode == "noise":
            rng = np.random.default_rng()
            values = (10 * np.linalg.norm(values) / np.sqrt(values.size)) * rng.standard_normal(values.size)
            values = values.astype(np.float32)
        elif mode == "wrong_length":
            values = values[:-1]
        elif mode == "broadcast":
            values = values[:1]
        frame = super()._frame(kind, index, weight, values, attempt, payload)
        if mode in ("weight_huge", "weight_negative", "wrong_dtype", "int8_in_sparse", "wrong_round", "wrong_group"):
            size = int.from_bytes(frame[:4], "big")
            header = msgpack.unpackb(frame[4 : 4 + size])
            payload = frame[4 + size :]
            if mode == "weight_huge":
                header["weight"] = 1e9
            elif mode == "weight_negative":
                header["weight"] = -3.0
            elif mode == "wrong_dtype":
                header["dtype"], payload = "float64", tensor_payload(values.astype(np.float64))
            elif mode == "int8_in_sparse":  # a well-formed part in a format this swarm does not send
                header["dtype"], payload = "int8", tensor_payload(values, "int8")
            elif mode == "wrong_round":
                header["round"] = max(0, header["round"] - 1)
            else:
                header["group_id"] = "0" * 16
            packed = msgpack.packb(header, use_bin_type=True)
            frame = len(packed).to_bytes(4, "big") + packed + payload
        return frame

    async def _send(
        self, peer: str, kind: PartKind, index: int, weight: float, values: np.ndarray, attempt: int,
        stop: Optional[asyncio.Event] = None, payload: Optional[bytes] = None,
    ) -> bool:  # fmt: skip
        if kind == "result" and self.attack == "slow_reducer":  # past every member's results deadline
            await asyncio.sleep(2 * self.context.spec.part_timeout_seconds)
        return await super()._send(peer, kind, index, weight, values, attempt, stop, payload)

    async def _exchange(self, attempt: int, slices: List[int]) -> None:
        if self.attack != "crash_after_parts":
            return await super()._exchange(attempt, slices)
        group = self.group
        for index, bounds in enumerate(self.bounds):
            peer = group.members[owner_of(index, group.reducers)]
            if peer != self.me:
                await self._send(peer, "part", index, 1.0, self.sent[slice(*bounds)], 0)
        self.crash()
        await asyncio.sleep(3600)  # an in-process peer is cancelled here


class Attacker(Averager):
    """The production Averager whose runs attack as ``attack`` says (set it before each round)."""

    run_class = AttackRun
    attack = "none"
    crash: Callable[[], None] = staticmethod(die)

    def _started(self, run: AllReduceRun) -> None:
        assert isinstance(run, AttackRun)
        run.attack, run.crash = self.attack, self.crash
