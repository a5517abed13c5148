"""Virtual time for asyncio: an event loop whose clock jumps to the next timer instead of sleeping.

    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall)  # DHT records stamped in virtual wall time
    result = run_virtual(scenario(network), clock=clock)

How it works. ``VirtualEventLoop`` is a plain ``asyncio.SelectorEventLoop`` with two changes: ``time()`` reads
a ``VirtualClock``, and its selector never blocks. asyncio asks the selector to wait ``timeout`` seconds for
I/O exactly when no callback is ready, ``timeout`` being the time to the next timer; ours polls the real
selector without waiting and, when nothing is ready, moves the clock forward by ``timeout``, so that timer
is due at once. asyncio.sleep, wait_for, call_later, Event waits with timeouts and gather all run on
timers, so a scenario with 15-second timeouts finishes in milliseconds of wall time, and the same scenario
runs callbacks in the same order every time (asyncio runs ready callbacks first in, first out).

A wait for ever (``timeout=None``) with nothing ready means every task waits on something no timer and no
I/O will ever bring: the loop raises ``VirtualDeadlock`` naming where each task waits, instead of hanging.

Limits. Only the loop's clock is virtual: ``time.monotonic()`` and ``time.time()`` read by code still move
in real time (code under test takes its clock as a parameter: ``loop.time`` and ``clock.wall``). Work
costs no virtual time. ``run_in_executor`` (and so ``asyncio.to_thread``) runs its function at once on
the loop's thread, because a real thread would run in real time while the clock jumps past its timeouts;
threads started otherwise, and real sockets or pipes, race the jumping clock and have no place here. The
loop's self-pipe is an AF_UNIX socket pair, as in every selector loop; nothing else is opened.
"""

from __future__ import annotations

import asyncio
import os
import selectors
from concurrent.futures import Executor
from typing import Any, Callable, Coroutine, List, Mapping, Optional, Tuple, TypeVar

T = TypeVar("T")

DEFAULT_START = 10_000.0  # the loop's time at the start: far from 0, so "0 means never" bugs show
DEFAULT_EPOCH = 1_700_000_000.0  # wall time at the start (2023-11-14), fixed so that runs repeat exactly
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__)


class VirtualDeadlock(RuntimeError):
    """Every task waits, and no callback, timer or I/O will ever wake one: the scenario can never finish."""


class VirtualClock:
    """Virtual seconds: ``monotonic()`` is the loop's time, ``wall()`` a fixed epoch plus the time elapsed."""

    def __init__(self, start: float = DEFAULT_START, epoch: float = DEFAULT_EPOCH) -> None:
        self.start = start
        self.epoch = epoch
        self._now = start

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        """Wall time in virtual seconds: what ``SwarmPort.now()`` should read under a virtual loop."""
        return self.epoch + (self._now - self.start)

    def advance(self, seconds: float) -> None:
        """Jump forward (a machine that stalled); timers now overdue run on the loop's next turn."""
        if seconds < 0:
            raise ValueError(f"virtual time only moves forward, not by {seconds} s")
        self._now += seconds


class _JumpingSelector(selectors.BaseSelector):
    """The real selector, polled without waiting; a wait for I/O becomes a jump of the virtual clock."""

    def __init__(self, clock: VirtualClock, describe_waits: Callable[[], str]) -> None:
        self._real = selectors.DefaultSelector()
        self._clock = clock
        self._describe_waits = describe_waits

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()

    def select(self, timeout: Optional[float] = None) -> List[Tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        if ready:
            return ready
        if timeout is None:
            raise VirtualDeadlock(f"every task waits and no timer is set: {self._describe_waits()}")
        if timeout > 0:
            self._clock.advance(timeout)
        return []


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """An asyncio event loop on a ``VirtualClock`` (see the module docstring)."""

    def __init__(self, clock: Optional[VirtualClock] = None) -> None:
        self.clock = clock if clock is not None else VirtualClock()
        super().__init__(_JumpingSelector(self.clock, self._describe_waits))

    def time(self) -> float:
        return self.clock.monotonic()

    # The base method's signature types its arguments with a TypeVarTuple, which Python 3.10 lacks.
    def run_in_executor(  # type: ignore[override]
        self, executor: Optional[Executor], func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        """Run ``func(*args)`` now, on this thread, and return its outcome as a done future."""
        self._check_closed()  # type: ignore[attr-defined]  # asyncio's own guard, as the base method does
        future: asyncio.Future[T] = self.create_future()
        try:
            future.set_result(func(*args))
        except Exception as e:  # the caller sees it when it awaits, as with a real executor
            future.set_exception(e)
        return future

    def _describe_waits(self) -> str:
        waits = []
        for task in sorted(asyncio.all_tasks(self), key=lambda t: t.get_name()):
            # The innermost frame of ours: asyncio's own (an Event's wait, a Queue's get) says little.
            stack = task.get_stack()
            frames = [f for f in stack if not f.f_code.co_filename.startswith(_ASYNCIO_DIR)] or stack
            where = f"{frames[-1].f_code.co_filename}:{frames[-1].f_lineno}" if frames else "?"
            waits.append(f"{task.get_name()} at {where}")
        return "; ".join(waits) or "no tasks"


def run_virtual(main: Coroutine[Any, Any, T], *, clock: Optional[VirtualClock] = None) -> T:
    """Run ``main`` to completion on a new ``VirtualEventLoop`` and return its result, like ``asyncio.run``:
    then cancel the tasks left over, finish async generators and close the loop.

    Raises what ``main`` raises, or ``VirtualDeadlock`` when every task waits for ever.
    """
    loop = VirtualEventLoop(clock)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def _cancel_leftovers(loop: VirtualEventLoop) -> None:
    leftovers = asyncio.all_tasks(loop)
    if not leftovers:  # gather() of nothing would look for the thread's own loop
        return
    for task in leftovers:
        task.cancel()
    try:
        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
    except VirtualDeadlock:  # a task that swallows its cancellation and waits again: leave it
        pass
    for task in leftovers:  # one that failed instead of stopping: say so, as asyncio.run does
        if task.done() and not task.cancelled() and task.exception() is not None:
            context = {"message": "a task left over by run_virtual failed", "exception": task.exception(), "task": task}
            loop.call_exception_handler(context)
