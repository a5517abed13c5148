"""The port's contract (tests/port_contract.py) on two real HivemindSwarms: two DHT processes, two p2pd daemons."""

from __future__ import annotations

import asyncio
import gc
import os
import warnings
from typing import Any, Awaitable, Dict, Iterator, Tuple, TypeVar

import pytest

from node.net import Handler, HivemindSwarm
from node.ops.procs import children_of
from tests.port_contract import CHECKS, Check, check_name, check_unknown_peer

pytestmark = pytest.mark.swarm
T = TypeVar("T")
# A well-formed peer id that no peer of ours has (one of IPFS's bootstrap peers, unreachable from here).
ABSENT_PEER = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"


class OnItsLoop:
    """A HivemindSwarm's port for a coroutine on another event loop: each operation runs on the swarm's own
    loop thread, as every call into a swarm must, and the caller awaits its outcome."""

    def __init__(self, swarm: HivemindSwarm) -> None:
        self.swarm = swarm

    @property
    def peer_id(self) -> str:
        return self.swarm.peer_id

    def now(self) -> float:
        return self.swarm.now()

    async def _on_its_loop(self, coro: Awaitable[T]) -> T:
        return await asyncio.wrap_future(self.swarm.submit(coro))

    async def serve(self, name: str, handler: Handler) -> None:
        await self._on_its_loop(self.swarm.serve(name, handler))

    async def call(self, peer_id: str, name: str, request: bytes, timeout: float) -> bytes:
        return await self._on_its_loop(self.swarm.call(peer_id, name, request, timeout))

    async def store(self, key: str, subkey: str, value: Any, expiration_time: float) -> bool:
        return await self._on_its_loop(self.swarm.store(key, subkey, value, expiration_time))

    async def read(self, key: str) -> Dict[str, Tuple[Any, float]]:
        return await self._on_its_loop(self.swarm.read(key))


@pytest.fixture(scope="module")
def ports() -> Iterator[Tuple[OnItsLoop, OnItsLoop]]:
    """A server and a client, shared by every check (each uses its own handlers and keys)."""
    before = set(children_of(os.getpid()))
    first = HivemindSwarm.open()
    second = HivemindSwarm.open(initial_peers=first.visible_maddrs())
    try:
        yield OnItsLoop(first), OnItsLoop(second)
    finally:
        second.close()
        first.close()
        assert set(children_of(os.getpid())) <= before  # DHT processes and their p2pd are gone


def run_on_a_loop_of_its_own(check: Awaitable[None]) -> None:
    """Run a check on a fresh loop. Not asyncio.run: that would drop, unclosed, the loop hivemind made current
    on this thread.

    When p2pd refuses to open a stream (no such peer, no such handler), hivemind's ``stream_open`` raises
    without closing its connection to the daemon; the garbage collector finds it later and warns, failing
    whichever test runs then. That one warning is silenced here, and the garbage collected before the next
    test, until node/net/hivemind.py closes that connection itself.
    """
    loop = asyncio.new_event_loop()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"unclosed (resource )?<(StreamWriter|UnixTransport)", ResourceWarning)
        try:
            loop.run_until_complete(asyncio.wait_for(check, timeout=60))
        finally:
            loop.close()
            gc.collect()


@pytest.mark.parametrize("check", CHECKS, ids=check_name)
def test_the_port_contract(check: Check, ports: Tuple[OnItsLoop, OnItsLoop]) -> None:
    server, client = ports
    run_on_a_loop_of_its_own(check(server, client))


def test_a_peer_that_is_not_there_cannot_be_reached(ports: Tuple[OnItsLoop, OnItsLoop]) -> None:
    _, client = ports
    run_on_a_loop_of_its_own(check_unknown_peer(client, ABSENT_PEER))
