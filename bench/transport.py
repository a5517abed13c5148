"""Benchmark: raw throughput of a hivemind p2pd binary stream vs a plain TCP socket, both on loopback,
and what a Commons averaging round between two peers achieves over the same p2pd streams.

Usage: python -m bench.transport [--mbytes 256] [--chunk-kib 1024] [--repeats 3] [--round-mbytes 64]
       [--out DIR]
Two DHTs (two p2pd daemons) in this process's children; the sender writes ``--mbytes`` MiB in
``--chunk-kib`` writes through ``call_binary_stream_handler``, the receiver counts them and answers
with one byte; the clock stops at that answer. Then the same through a TCP socket on 127.0.0.1.
Then two real averaging peers (tests/swarm/averaging_peer.py, the node's Averager) all-reduce a
``--round-mbytes`` MiB float32 vector, uncompressed: each peer sends half the vector as parts and half
as results, so the round's rate is ``--round-mbytes`` / the all-reduce time, per peer and direction,
comparable with one stream's rate. The peers post the message size their last round asks for, as
nodes do, so after the first (warm-up) round a group sends larger messages than the manifest's
(node/averaging/matchmaking.py); ``mean`` also runs with the asks off, the manifest's messages throughout.

Every row also gives the CPU time it cost: every process involved (this process or the peers, the DHT
processes, the p2pd daemons), per MiB delivered. A round's CPU time includes its matchmaking (about
0.05 s for both peers). Prints Markdown tables (medians of ``--repeats``). Nothing passes or fails on a
number.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import hivemind
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo

from node.ops.procs import children_of, helper_totals
from tests.procs import NodeProcess

HANDLER = "commons-bench-transport"


@dataclass
class Runs:
    """Repeated transfers: their times, and what they delivered and cost over all of them."""

    seconds: List[float] = field(default_factory=list)
    delivered: int = 0  # bytes, every direction counted
    cpu: float = 0.0  # seconds, every process involved
    messages: List[int] = field(default_factory=list)  # a round's message size (bytes) its group agreed on
    own_start: List[float] = field(default_factory=list)  # a round's slowest peer, timed from its own start

    def rate(self, per_run: int) -> float:
        """MiB/s of ``per_run`` bytes (one direction of one run) at the median time."""
        return per_run / (1 << 20) / statistics.median(self.seconds)

    def cpu_per_mib(self) -> float:
        return self.cpu / (self.delivered / (1 << 20))

    def cores(self) -> float:
        return self.cpu / sum(self.seconds)


def cpu_here() -> float:
    """CPU seconds so far of this process and everything under it (DHT processes, p2pd daemons)."""
    return time.process_time() + sum(stat.cpu_seconds for stat in helper_totals(os.getpid()).values())


async def _drain_count(reader: asyncio.StreamReader) -> int:
    (total,) = struct.unpack("!Q", await reader.readexactly(8))
    left = total
    while left:
        left -= len(await reader.read(min(left, 1 << 20)))
    return total


async def _p2p_once(sender: P2P, receiver_id: PeerID, total: int, chunk: int) -> float:
    payload = bytes(chunk)
    started = time.perf_counter()
    _, reader, writer = await sender.call_binary_stream_handler(receiver_id, HANDLER)
    writer.write(struct.pack("!Q", total))
    sent = 0
    while sent < total:
        piece = payload[: min(chunk, total - sent)]
        writer.write(piece)
        await writer.drain()
        sent += len(piece)
    await reader.readexactly(1)
    seconds = time.perf_counter() - started
    writer.close()
    return seconds


async def p2p_runs(total: int, chunk: int, repeats: int, daemons: List[int]) -> List[Runs]:
    """Times ``repeats`` one-way transfers, then ``repeats`` pairs of transfers in opposite directions at once
    (as in an averaging round, where every peer sends and receives); appends the two p2pd pids to ``daemons``."""
    first = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    second = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs(), start=True)
    daemons += [pid for dht in (first, second) for pid in children_of(dht.pid or 0)]
    try:
        receiver, sender = await first.replicate_p2p(), await second.replicate_p2p()

        async def handle(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _drain_count(reader)
            writer.write(b"k")
            await writer.drain()
            writer.close()

        await receiver.add_binary_stream_handler(HANDLER, handle)
        await sender.add_binary_stream_handler(HANDLER, handle)
        await _p2p_once(sender, receiver.peer_id, 1 << 20, chunk)  # warm-up: connection, stream negotiation
        one_way, both_ways = Runs(), Runs()
        cpu = cpu_here()
        for _ in range(repeats):
            one_way.seconds.append(await _p2p_once(sender, receiver.peer_id, total, chunk))
        one_way.delivered, one_way.cpu = repeats * total, cpu_here() - cpu
        cpu = cpu_here()
        for _ in range(repeats):
            pair = await asyncio.gather(_p2p_once(sender, receiver.peer_id, total, chunk),
                                        _p2p_once(receiver, sender.peer_id, total, chunk))  # fmt: skip
            both_ways.seconds.append(max(pair))
        both_ways.delivered, both_ways.cpu = 2 * repeats * total, cpu_here() - cpu
        return [one_way, both_ways]
    finally:
        second.shutdown()
        first.shutdown()


def tcp_once(total: int, chunk: int) -> float:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            (expected,) = struct.unpack("!Q", conn.recv(8, socket.MSG_WAITALL))
            left = expected
            while left:
                got = conn.recv(min(left, 1 << 20))
                if not got:
                    break
                left -= len(got)
            conn.sendall(b"k")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    payload = memoryview(bytes(chunk))
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(struct.pack("!Q", total))
        sent = 0
        while sent < total:
            piece = payload[: min(chunk, total - sent)]
            conn.sendall(piece)
            sent += len(piece)
        conn.recv(1)
    seconds = time.perf_counter() - started
    thread.join()
    server.close()
    return seconds


def tcp_runs(total: int, chunk: int, repeats: int) -> Runs:
    tcp_once(1 << 20, chunk)  # warm-up
    runs, cpu = Runs(), time.process_time()
    runs.seconds = [tcp_once(total, chunk) for _ in range(repeats)]
    runs.delivered, runs.cpu = repeats * total, time.process_time() - cpu
    return runs


def commons_rounds(mbytes: int, aggregator: str, repeats: int, workdir: str, asks: bool = True) -> Runs:
    """All-reduce seconds of two averaging peers on loopback, from the moment the later one formed the
    group to the last averaged vector (and, in ``own_start``, the slower peer from its own start: that
    adds the time it waited for the other to form the group). Without ``asks``, the peers ask for no
    message size and keep the manifest's."""
    numel = (mbytes << 20) // 4
    peers: List[NodeProcess] = []
    runs = Runs()
    try:
        for index in range(2):
            argv = [sys.executable, "-m", "tests.swarm.averaging_peer", "--aggregator", aggregator]
            argv += [] if asks else ["--message-ask", "0"]
            argv += ["--initial-peers", peers[0].maddr] if peers else []
            name = f"{aggregator}{'' if asks else '-fixed'}-{index}"
            peers.append(NodeProcess(argv, Path(workdir) / name, f"peer{index}", interactive=True))
            peers[-1].wait_ready(60)
        ids = [p.ready["peer_id"] for p in peers]  # type: ignore[index]
        for rnd in range(repeats + 1):  # the first round warms up streams and deadlines
            for seed, peer in enumerate(peers):
                peer.send({"cmd": "average", "round": rnd, "numel": numel, "seed": seed, "expected": ids})
            replies = [peer.next_event(120) for peer in peers]
            if any(r.get("fraction") != 1.0 or r.get("group_size") != 2 for r in replies):
                raise RuntimeError(f"round {rnd} was not a full round of two: {replies}")
            if rnd:  # from the last member's start, as in bench/wan_averaging.py (one clock: one host)
                ended = [float(r["ended_at"]) for r in replies]
                started = max(e - float(r["seconds"]) for e, r in zip(ended, replies, strict=True))
                runs.seconds.append(max(ended) - started)
                runs.own_start.append(max(float(r["seconds"]) for r in replies))
                runs.cpu += sum(sum(r["cpu"].values()) for r in replies)
                runs.delivered += 2 * (mbytes << 20)  # each peer sends the vector's size: parts, then results
                runs.messages.append(replies[0]["message_bytes"])
        for peer in peers:
            peer.send({"cmd": "quit"})
        return runs
    finally:
        for peer in peers:
            peer.cleanup()


def row(name: str, per_run: int, runs: Runs, *references: float, cores: bool = True) -> str:
    """A table row: name, MiB, median seconds, MiB/s per direction, its ratio to each reference rate,
    CPU per MiB delivered and (``cores``) cores busy."""
    rate = runs.rate(per_run)
    ratios = "".join(f" {rate / reference:.2f} |" for reference in references)
    busy = f" {runs.cores():.2f} |" if cores else ""
    return (
        f"| {name} | {per_run >> 20} | {statistics.median(runs.seconds):.3f} | {rate:.0f} |{ratios}"
        f" {1000 * runs.cpu_per_mib():.1f} |{busy}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mbytes", type=int, default=256, help="MiB per transfer")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="size of each write")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--round-mbytes", type=int, default=64, help="MiB of float32 in the averaging rounds")
    parser.add_argument("--out", type=Path, default=None, help="also write results.md here")
    args = parser.parse_args()
    total, chunk = args.mbytes << 20, args.chunk_kib << 10
    daemons: List[int] = []
    try:
        p2p, p2p_both = asyncio.run(p2p_runs(total, chunk, args.repeats, daemons))  # its finally shuts both DHTs
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    tcp = tcp_runs(total, chunk, args.repeats)
    tcp_rate = tcp.rate(total)
    lines = [f"Loopback, {args.mbytes} MiB in {args.chunk_kib} KiB writes, median of {args.repeats}; CPU: every "
             "process involved, per MiB delivered (both directions counted), and cores busy on average:", "",
             "| transport | MiB | seconds | MiB/s (per direction) | vs TCP | CPU ms per MiB | cores busy |",
             "|---|---|---|---|---|---|---|",
             row("hivemind p2pd binary stream", total, p2p, tcp_rate),
             row("hivemind p2pd, two streams in opposite directions at once", total, p2p_both, tcp_rate),
             row("TCP socket 127.0.0.1", total, tcp, tcp_rate)]  # fmt: skip
    print("\n".join(lines), flush=True)
    stream_rate, both_rate = p2p.rate(total), p2p_both.rate(total)
    round_bytes = args.round_mbytes << 20
    lines += ["", f"Commons averaging round, 2 peers on loopback, {args.round_mbytes} MiB float32, uncompressed; per "
              f"peer and direction {args.round_mbytes} MiB (half as parts, half as results); median of "
              f"{args.repeats}; seconds from the moment the later peer formed the group:", "",
              "| aggregator, messages | MiB | seconds | MiB/s per peer and direction | vs one p2pd stream | "
              "vs p2pd both ways at once | CPU ms per MiB | slower peer from its own start, s |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    print("\n".join(lines[-4:]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for aggregator, asks in (("mean", True), ("centered_clip", True), ("mean", False)):
            runs = commons_rounds(args.round_mbytes, aggregator, args.repeats, tmp, asks)
            sizes = "/".join(f"{size >> 10}" for size in sorted(set(runs.messages)))
            name = f"{aggregator}, {sizes} KiB messages" + (" (agreed)" if asks else " (the manifest's, asks off)")
            own_start = statistics.median(runs.own_start)
            lines.append(row(name, round_bytes, runs, stream_rate, both_rate, cores=False) + f" {own_start:.3f} |")
            print(lines[-1], flush=True)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in daemons) and time.monotonic() < deadline:
        time.sleep(0.2)
    leaked = [pid for pid in daemons if os.path.exists(f"/proc/{pid}")]
    print(f"\np2pd daemons {daemons}: " + (f"LEFT BEHIND {leaked}" if leaked else "all exited"))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
