"""node/averaging/inbox.py: who a waiter waits for, what wakes it, and what it returns."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from node.averaging.inbox import Inbox

A, B, C = "peer-a", "peer-b", "peer-c"


def key(index: int, round_number: int = 3) -> tuple:
    return ("trunk", round_number, "0123456789abcdef", index, 0)


def test_a_waiter_returns_once_every_peer_delivered_or_was_excluded() -> None:
    async def run() -> None:
        inbox = Inbox()
        deadline = time.monotonic() + 10
        waiter = asyncio.ensure_future(inbox.wait_for(key(0), {A, B, C}, deadline))
        inbox.put(key(0), A, 1.0, np.ones(4, np.float32))
        inbox.put(key(1), B, 1.0, np.ones(4, np.float32))  # another slice
        await asyncio.sleep(0.01)
        assert not waiter.done()
        inbox.put(key(0), B, 1.0, np.zeros(4, np.float32))
        inbox.exclude("trunk", 2, C)  # another round
        await asyncio.sleep(0.01)
        assert not waiter.done()
        inbox.exclude("trunk", 3, C)
        got, complete = await asyncio.wait_for(waiter, 1)
        assert set(got) == {A, B} and not complete
        assert got[A][1].sum() == 4 and got[B][0] == 1.0

    asyncio.run(run())


def test_results_are_told_apart_by_slot_prefix_and_the_deadline_ends_the_wait() -> None:
    async def run() -> None:
        inbox = Inbox()
        inbox.put(key(0), A, 1.0, np.ones(2, np.float32))  # a part from A, not its result
        started = time.monotonic()
        got, complete = await inbox.wait_for(key(0), {A}, started + 0.2, prefix="result:")
        assert got == {} and not complete and time.monotonic() - started >= 0.19
        inbox.put(key(0), "result:" + A, 2.0, np.ones(2, np.float32))
        got, complete = await inbox.wait_for(key(0), {A}, time.monotonic() + 1, prefix="result:")
        assert complete and got[A][0] == 2.0

    asyncio.run(run())


def test_arrivals_wake_only_the_waiters_of_their_own_slice() -> None:
    """512 slices, a waiter on each, two senders: every waiter wakes at most twice, where waking all
    of them on every arrival would take 512 x 1024 wakeups."""

    async def run() -> None:
        inbox = Inbox()
        slices = 512
        deadline = time.monotonic() + 30
        waiters = [asyncio.ensure_future(inbox.wait_for(key(i), {A, B}, deadline)) for i in range(slices)]
        await asyncio.sleep(0)
        for i in range(slices):
            for sender in (A, B):
                inbox.put(key(i), sender, 1.0, np.full(8, i, np.float32))
                await asyncio.sleep(0)
        results = await asyncio.wait_for(asyncio.gather(*waiters), 10)
        assert all(complete and got[A][1][0] == i for i, (got, complete) in enumerate(results))
        assert inbox.wakeups <= 2 * slices
        for i in range(slices):
            inbox.pop(key(i))
        assert not inbox.items and not inbox._waiting

    asyncio.run(run())
