"""Benchmark: raw throughput of a hivemind p2pd binary stream vs a plain TCP socket, both on loopback.

Usage: python -m tests.bench.transport [--mbytes 256] [--chunk-kib 1024] [--repeats 3]
Two DHTs (two p2pd daemons) in this process's children; the sender writes ``--mbytes`` MiB in
``--chunk-kib`` writes through ``call_binary_stream_handler``, the receiver counts them and answers
with one byte; the clock stops at that answer. Then the same through a TCP socket on 127.0.0.1.
Prints a Markdown table (median of ``--repeats``). Nothing passes or fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import sys
import threading
import time
from typing import Callable, List

import hivemind
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo

from node.procs import children_of

HANDLER = "commons-bench-transport"


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


async def p2p_runs(total: int, chunk: int, repeats: int, daemons: List[int]) -> List[float]:
    """Times ``repeats`` transfers; appends the pids of the two p2pd daemons to ``daemons``."""
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
        await _p2p_once(sender, receiver.peer_id, 1 << 20, chunk)  # warm-up: connection, stream negotiation
        return [await _p2p_once(sender, receiver.peer_id, total, chunk) for _ in range(repeats)]
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


def row(name: str, total: int, samples: List[float], reference: Callable[[], float]) -> str:
    median = statistics.median(samples)
    rate = total / (1 << 20) / median
    return f"| {name} | {total >> 20} | {median:.3f} | {rate:.0f} | {rate / reference():.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mbytes", type=int, default=256, help="MiB per transfer")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="size of each write")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    total, chunk = args.mbytes << 20, args.chunk_kib << 10
    daemons: List[int] = []
    try:
        p2p = asyncio.run(p2p_runs(total, chunk, args.repeats, daemons))  # its finally shuts both DHTs down
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    tcp_once(1 << 20, chunk)  # warm-up
    tcp = [tcp_once(total, chunk) for _ in range(args.repeats)]
    tcp_rate = total / (1 << 20) / statistics.median(tcp)
    print(f"Loopback, {args.mbytes} MiB in {args.chunk_kib} KiB writes, median of {args.repeats}:\n")
    print("| transport | MiB | seconds | MiB/s | vs TCP |\n|---|---|---|---|---|")
    print(row("hivemind p2pd binary stream", total, p2p, lambda: tcp_rate))
    print(row("TCP socket 127.0.0.1", total, tcp, lambda: tcp_rate))
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in daemons) and time.monotonic() < deadline:
        time.sleep(0.2)
    leaked = [pid for pid in daemons if os.path.exists(f"/proc/{pid}")]
    print(f"\np2pd daemons {daemons}: " + (f"LEFT BEHIND {leaked}" if leaked else "all exited"))


if __name__ == "__main__":
    main()
