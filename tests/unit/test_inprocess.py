"""InProcessSwarm: the port's contract, every fault kind, killing peers, byte counts, and the virtual clock."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Awaitable, Callable, List, Tuple, TypeVar

import pytest

from node.net import (
    InProcessNetwork,
    InProcessSwarm,
    VirtualClock,
    VirtualDeadlock,
    flip_bit,
    run_virtual,
)
from protocol.frames import MAX_FRAME_BYTES
from tests.port_contract import CHECKS, Check, check_name, check_unknown_peer

T = TypeVar("T")
Scenario = Callable[[InProcessNetwork], Awaitable[T]]


def run(scenario: Scenario[T], max_frame_bytes: int = MAX_FRAME_BYTES) -> T:
    """Run ``scenario(network)`` in virtual time on a fresh network whose ``now()`` follows that time."""
    clock = VirtualClock()
    network = InProcessNetwork(clock=clock.wall, max_frame_bytes=max_frame_bytes)

    async def main() -> T:
        try:
            return await scenario(network)
        finally:
            await network.close()

    return run_virtual(main(), clock=clock)


class Recorder:
    """A handler answering ``request[::-1]`` after ``seconds``, noting (loop time, caller, request) on arrival."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.seen: List[Tuple[float, str, bytes]] = []
        self.cancelled = 0

    async def __call__(self, peer: str, request: bytes) -> bytes:
        self.seen.append((asyncio.get_running_loop().time(), peer, request))
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return request[::-1]

    @property
    def requests(self) -> List[bytes]:
        return [request for _, _, request in self.seen]


async def pair(network: InProcessNetwork, handler: Recorder) -> Tuple[InProcessSwarm, InProcessSwarm]:
    """A client and a server serving ``handler`` as "h"."""
    server, client = network.join("server"), network.join("client")
    await server.serve("h", handler)
    return server, client


def elapsed_since(started: float) -> float:
    return asyncio.get_running_loop().time() - started


# --- the contract --------------------------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS, ids=check_name)
def test_the_port_contract(check: Check) -> None:
    async def scenario(network: InProcessNetwork) -> None:
        await check(network.join("server"), network.join("client"))

    run(scenario)


def test_unknown_and_killed_peers_cannot_be_reached() -> None:
    async def scenario(network: InProcessNetwork) -> None:
        client, gone = network.join(), network.join()
        await check_unknown_peer(client, "nobody")
        network.kill(gone.peer_id)
        await check_unknown_peer(client, gone.peer_id)

    run(scenario)


def test_messages_are_fresh_copies_and_frames_over_the_limit_close_the_stream() -> None:
    kept: List[bytes] = []

    async def keep(peer: str, request: bytes) -> bytes:
        kept.append(request)
        return b"answer" if request != b"big answer" else b"x" * 17

    async def scenario(network: InProcessNetwork) -> None:
        server, client = network.join(), network.join()
        await server.serve("keep", keep)
        buffer = bytearray(b"request")  # a caller's buffer, reused at once: the port keeps a copy
        response = await client.call(server.peer_id, "keep", buffer, timeout=5)  # type: ignore[arg-type]
        buffer[:] = b"reused!"
        assert kept == [b"request"] and type(kept[0]) is bytes and response == b"answer"
        sent = b"x" * 16  # exactly the limit
        await client.call(server.peer_id, "keep", sent, timeout=5)
        assert kept[-1] == sent and kept[-1] is not sent
        for request in (b"x" * 17, b"big answer"):
            with pytest.raises(ConnectionError, match="closed"):
                await client.call(server.peer_id, "keep", request, timeout=5)
        assert kept[-1] == b"big answer"  # the oversized request never reached the handler

    run(scenario, max_frame_bytes=16)


# --- faults ----------------------------------------------------------------------------------------


def test_a_dropped_request_times_out_and_is_never_handled() -> None:
    handler = Recorder()

    async def scenario(network: InProcessNetwork) -> None:
        server, client = await pair(network, handler)
        rule = network.faults.on(handler="h").drop()
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError, match="did not answer h within 5.0s"):
            await client.call(server.peer_id, "h", b"lost", timeout=5)
        assert elapsed_since(started) == 5.0 and rule.fired == 1
        assert await client.call(server.peer_id, "h", b"kept", timeout=5) == b"tpek"  # times=1: used up
        assert handler.requests == [b"kept"] and (rule.seen, rule.fired) == (2, 1)

    run(scenario)


def test_a_dropped_response_times_out_after_the_handler_ran() -> None:
    handler = Recorder()

    async def scenario(network: InProcessNetwork) -> None:
        server, client = await pair(network, handler)
        network.faults.on(sender="server", response=True).drop()
        with pytest.raises(TimeoutError):
            await client.call(server.peer_id, "h", b"done", timeout=5)
        assert handler.requests == [b"done"]
        assert (server.bytes_sent, client.bytes_received) == (4, 0)

    run(scenario)


def test_a_delayed_request_arrives_late_even_after_its_caller_gave_up() -> None:
    handler = Recorder()

    async def scenario(network: InProcessNetwork) -> None:
        server, client = await pair(network, handler)
        start = asyncio.get_running_loop().time()
        network.faults.on(handler="h", times=2).delay(3.0)
        assert await client.call(server.peer_id, "h", b"ab", timeout=5) == b"ba"
        assert elapsed_since(start) == 3.0
        network.faults.on(handler="h").delay(7.0)  # with the first rule's 3 s: 10 s, past the timeout
        with pytest.raises(TimeoutError):
            await client.call(server.peer_id, "h", b"late", timeout=5)
        await asyncio.sleep(10)
        assert [(t - start, r) for t, _, r in handler.seen] == [(3.0, b"ab"), (13.0, b"late")]

    run(scenario)


def test_corrupted_and_truncated_requests_are_delivered_changed() -> None:
    handler = Recorder()

    async def scenario(network: InProcessNetwork) -> None:
        server, client = await pair(network, handler)
        network.faults.on(handler="h").flip_bit()  # the top bit of the last byte
        network.faults.on(handler="h", nth=2).corrupt(flip_bit(0))  # the second request only
        network.faults.on(handler="h", nth=3).truncate(2)
        network.faults.on(handler="h", nth=4).corrupt(lambda data: data.upper())
        for _ in range(5):
            await client.call(server.peer_id, "h", b"abc", timeout=5)
        assert handler.requests == [b"ab\xe3", b"`bc", b"ab", b"ABC", b"abc"]
        assert flip_bit(-9)(b"\x00\x00") == b"\x80\x00" and flip_bit(3)(b"") == b""

    run(scenario)


def test_a_closed_stream_raises_connection_error_before_or_after_the_handler() -> None:
    handler = Recorder()

    async def scenario(network: InProcessNetwork) -> None:
        server, client = await pair(network, handler)
        network.faults.on(receiver="server").close()
        with pytest.raises(ConnectionError, match="server closed the h stream"):
            await client.call(server.peer_id, "h", b"one", timeout=5)
        network.faults.on(sender="server", response=True).close()
        with pytest.raises(ConnectionError, match="closed"):
            await client.call(server.peer_id, "h", b"two", timeout=5)
        assert handler.requests == [b"two"]

    run(scenario)


def test_rules_select_by_sender_receiver_predicate_and_count() -> None:
    handler = Recorder()

    async def scenario(network: InProcessNetwork) -> None:
        b, c = network.join("b"), network.join("c")
        network.join("a")
        for peer in (b, c):
            await peer.serve("h", handler)
        lossy = network.faults.on(sender="a", receiver=["c"], nth=2, times=2).drop()
        marked = network.faults.on(match=lambda data: data.startswith(b"x"), times=None).close()
        outcomes = []
        for sender, receiver, request in [("a", "c", b"1"), ("a", "c", b"2"), ("b", "c", b"3"), ("a", "b", b"4"),
                                          ("a", "c", b"5"), ("a", "c", b"6"), ("b", "b", b"x7"), ("c", "b", b"x8")]:
            try:
                await network.peer(sender).call(receiver, "h", request, timeout=1)
                outcomes.append("ok")
            except (TimeoutError, ConnectionError) as e:
                outcomes.append(type(e).__name__)
        assert outcomes == ["ok", "TimeoutError", "ok", "ok", "TimeoutError", "ok", "ConnectionError",
                            "ConnectionError"]
        assert (lossy.seen, lossy.fired, marked.fired) == (4, 2, 2)
        network.faults.remove(marked)
        assert await b.call("b", "h", b"x9", timeout=1) == b"9x"
        with pytest.raises(ValueError):
            network.faults.on(nth=0)
        with pytest.raises(ValueError):
            network.faults.on().delay(-1)

    run(scenario)


# --- killing peers -------------------------------------------------------------------------------------


def test_killing_a_peer_closes_its_streams_and_cancels_its_work() -> None:
    handler = Recorder(seconds=100)

    async def scenario(network: InProcessNetwork) -> None:
        server, client = await pair(network, handler)
        started = asyncio.get_running_loop().time()
        ticks: List[float] = []

        async def ticking() -> None:
            while True:
                await asyncio.sleep(1)
                ticks.append(elapsed_since(started))

        background = server.spawn(ticking())
        network.faults.on(handler="h", nth=2).drop()  # lost in flight: the peer's death still closes it
        calls = [client.spawn(client.call("server", "h", request, timeout=50)) for request in (b"slow", b"lost")]
        await asyncio.sleep(2.5)
        network.kill("server")
        for call in calls:
            with pytest.raises(ConnectionError, match="closed"):
                await call
        assert elapsed_since(started) == 2.5 and ticks == [1.0, 2.0]
        await asyncio.sleep(0)
        assert background.cancelled() and handler.cancelled == 1
        with pytest.raises(ConnectionError, match="cannot reach peer server: it was killed"):
            await client.call("server", "h", b"again", timeout=5)
        with pytest.raises(ConnectionError):
            await server.call("client", "h", b"from the dead", timeout=5)
        with pytest.raises(ConnectionError):
            await server.store("k", "s", 1, server.now() + 10)
        with pytest.raises(RuntimeError):
            server.spawn(asyncio.sleep(1))

    run(scenario)


def test_a_killed_caller_sees_its_calls_fail_and_its_records_outlive_it() -> None:
    async def scenario(network: InProcessNetwork) -> None:
        server, client = await pair(network, Recorder(seconds=10))
        assert await client.store("k", "client", "mine", client.now() + 30)
        pending = asyncio.get_running_loop().create_task(client.call("server", "h", b"x", timeout=20))
        await asyncio.sleep(1)
        network.kill("client")
        with pytest.raises(ConnectionError, match="closed"):
            await pending
        assert set(await server.read("k")) == {"client"}
        await asyncio.sleep(30)
        assert await server.read("k") == {}
        with pytest.raises(ValueError):
            network.join("server")
        again = network.join("client")  # a restarted peer with the same id
        assert await again.call("server", "h", b"back", timeout=20) == b"kcab"
        assert [network.join().peer_id for _ in range(2)] == ["peer-1", "peer-2"]

    run(scenario)


# --- bytes -----------------------------------------------------------------------------------------------


def test_bytes_are_counted_at_the_port_for_requests_and_responses() -> None:
    async def scenario(network: InProcessNetwork) -> None:
        server, client = await pair(network, Recorder())
        await client.call("server", "h", b"12345", timeout=5)  # 5 out, 5 back
        network.faults.on(handler="h").drop()
        with pytest.raises(TimeoutError):
            await client.call("server", "h", b"123", timeout=5)  # sent, never received
        network.faults.on(handler="h").truncate(1)
        await client.call("server", "h", b"1234567", timeout=5)  # 7 sent, 1 arrives and 1 comes back
        assert (client.bytes_sent, client.bytes_received) == (15, 6)
        assert (server.bytes_received, server.bytes_sent) == (6, 6)

    run(scenario)


# --- the virtual clock --------------------------------------------------------------------------------------


def test_virtual_time_jumps_over_sleeps_and_timeouts() -> None:
    async def main() -> List[Tuple[float, str]]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        events: List[Tuple[float, str]] = []

        def note(what: str) -> None:
            events.append((loop.time() - start, what))

        await asyncio.sleep(100)
        note("slept")
        woken = asyncio.Event()
        loop.call_later(5, woken.set)
        await asyncio.wait_for(woken.wait(), timeout=15)
        note("woken")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), timeout=15)
        note("timed out")
        assert await asyncio.gather(asyncio.sleep(3, "three"), asyncio.sleep(1, "one")) == ["three", "one"]
        note("gathered")
        assert await asyncio.to_thread(lambda: 42) == 42  # runs at once, on the loop's thread
        note("threaded")
        return events

    wall = time.perf_counter()
    events = run_virtual(main())
    assert time.perf_counter() - wall < 0.5
    assert events == [(100.0, "slept"), (105.0, "woken"), (120.0, "timed out"), (123.0, "gathered"),
                      (123.0, "threaded")]


def test_the_network_clock_follows_virtual_time() -> None:
    clock = VirtualClock(start=50.0, epoch=1_800_000_000.0)
    network = InProcessNetwork(clock=clock.wall)

    async def main() -> None:
        assert asyncio.get_running_loop().time() == 50.0 and network.now() == 1_800_000_000.0
        await asyncio.sleep(60)
        assert network.now() == 1_800_000_060.0

    run_virtual(main(), clock=clock)
    assert abs(InProcessNetwork().now() - time.time()) < 1  # the default clock is wall time
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_a_deadlock_is_reported_not_waited_on() -> None:
    cleaned = []

    async def stuck_forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("stuck")

    async def main() -> None:
        asyncio.get_running_loop().create_task(stuck_forever(), name="stuck")
        await asyncio.sleep(5)
        await asyncio.get_running_loop().create_future()

    wall = time.perf_counter()
    with pytest.raises(VirtualDeadlock, match=r"every task waits.*stuck at .*test_inprocess.py:\d+"):
        run_virtual(main())
    assert time.perf_counter() - wall < 0.5
    assert cleaned == ["stuck"]  # the leftovers were cancelled


# --- determinism -------------------------------------------------------------------------------------------------


def a_busy_scenario(seed: int) -> Scenario[List[Tuple[float, str]]]:
    """Four peers calling each other with random waits, under delays, drops, corruption and a kill."""

    async def scenario(network: InProcessNetwork) -> List[Tuple[float, str]]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        log: List[Tuple[float, str]] = []
        rng = random.Random(seed)
        peers = [network.join() for _ in range(4)]

        def handler_of(me: str) -> Callable[[str, bytes], Awaitable[bytes]]:
            async def handle(peer: str, request: bytes) -> bytes:
                log.append((loop.time() - start, f"{me} got {request!r} from {peer}"))
                await asyncio.sleep(rng.choice([0.0, 0.5, 2.0]))
                return request

            return handle

        for peer in peers:
            await peer.serve("h", handler_of(peer.peer_id))
        network.faults.on(receiver="peer-2", times=None).delay(0.7)
        network.faults.on(sender="peer-3", nth=2, times=3).drop()
        network.faults.on(handler="h", nth=5, times=None).flip_bit(0)

        async def chatter(me: InProcessSwarm) -> None:
            for i in range(6):
                target = rng.choice([p.peer_id for p in peers if p is not me])
                try:
                    await me.call(target, "h", b"%s-%d" % (me.peer_id.encode(), i), timeout=1.5)
                    outcome = "answered"
                except (TimeoutError, ConnectionError) as e:
                    outcome = type(e).__name__
                log.append((loop.time() - start, f"{me.peer_id} -> {target}: {outcome}"))
                await me.store("seen", me.peer_id, i, me.now() + 5)

        tasks = [peer.spawn(chatter(peer)) for peer in peers]
        await asyncio.sleep(4)
        network.kill("peer-4")
        await asyncio.gather(*tasks, return_exceptions=True)
        log.append((loop.time() - start, f"records {sorted(await peers[0].read('seen'))}"))
        return log

    return scenario


def test_the_same_scenario_runs_the_same_way_every_time() -> None:
    first, second = run(a_busy_scenario(seed=1)), run(a_busy_scenario(seed=1))
    assert first == second
    outcomes = " ".join(event for _, event in first)
    assert len(first) > 30 and all(word in outcomes for word in ("answered", "TimeoutError", "ConnectionError"))
    assert run(a_busy_scenario(seed=2)) != first  # the log does depend on what happened
