"""What one flooding peer costs an honest node (issue 18): its step rate and memory while a peer sends requests
as fast as it can, one kind at a time, against the same node left alone.

One real ``python -m node start`` (the shipped manifest, alone, so every step is its own) is pinned with its DHT
process and p2pd to core 0; the attacker, a separate process with its own DHT and p2pd, to core 1, so the flood
costs the node what it costs it, not the attacker's CPU. Phases of ``--seconds`` each, in turn: clean, then each
attack, then clean again. Per phase: the node's steps/s over windows of ``--window`` seconds (median, mean and the
worst window), its memory (the node, its DHT process and p2pd: the largest sum of RSS seen), and what it refused.

``--baseline REF`` runs the same phases against the node of another commit (a git worktree of REF), side by side
in one run, on the same clock: what the limits changed. Attacks (each from one identity, 16 requests in flight):

- hello       hellos, each on a fresh stream once the node closes the last one
- digest      state digests of the trunk (each used to hash the whole state)
- ranges      4 MiB state ranges of the trunk, over and over
- streams     new streams, left open and idle (up to 4,000)
- parts       1 MiB averaging parts for round 10^9 (they used to be kept)
- bigframes   streams announcing a 1 GiB frame, then 64 KiB, then nothing

    python -m bench.flood [--seconds 30] [--window 5] [--baseline REF] [--out bench-results/flood]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from bench.membership import timed as timed_batches
from tests.procs import REPO, NodeProcess, child_env, http_get, write_text_corpus

ATTACKS = ["hello", "digest", "ranges", "streams", "parts", "bigframes"]
IN_FLIGHT = 16


# --- the attacker (a process of its own) ---------------------------------------------------------------------------
def attack(mode: str, target: str, swarm_id: str, seconds: float) -> Dict[str, Any]:
    from node.net import HivemindSwarm
    from protocol import handlers
    from protocol.frames import stream_prefix
    from protocol.wire import Hello, StateReply, StateRequest, TensorPart, decode, encode, tensor_payload

    swarm = HivemindSwarm.open(initial_peers=[target], ensure_bootstrap=False)
    peer = target.rsplit("/p2p/", 1)[1]
    sent, failed, held = 0, 0, []
    part = encode(TensorPart(type="part", swarm_id=swarm_id, module="trunk", round=10**9, group_id="0" * 16,
                             slice_index=0, sender=swarm.peer_id, numel=1 << 18, dtype="float32"),
                  tensor_payload(np.ones(1 << 18, dtype=np.float32)))  # fmt: skip

    async def expected_hash() -> str:
        reply, _ = decode(await swarm.call(peer, handlers.state(swarm_id), encode(
            StateRequest(swarm_id=swarm_id, module="trunk")), 10.0))  # fmt: skip
        return reply.params_hash if isinstance(reply, StateReply) else ""

    async def one(request: bytes, name: str) -> None:
        nonlocal sent, failed
        try:
            await swarm.call(peer, name, request, 10.0)
            sent += 1
        except (ConnectionError, TimeoutError, asyncio.TimeoutError):
            failed += 1

    async def worker(end: float, expected: str) -> None:
        nonlocal sent, failed
        while time.monotonic() < end:
            if mode == "hello":
                await one(encode(Hello(swarm_id=swarm_id, peer_id=swarm.peer_id)), handlers.HELLO)
            elif mode == "digest":
                await one(encode(StateRequest(swarm_id=swarm_id, module="trunk")), handlers.state(swarm_id))
            elif mode == "ranges":
                request = StateRequest(swarm_id=swarm_id, module="trunk", offset=0, count=1 << 20,
                                       expected_hash=expected)  # fmt: skip
                await one(encode(request), handlers.state(swarm_id))
            elif mode == "parts":
                await one(part, handlers.averaging(swarm_id))
            elif mode in ("streams", "bigframes"):
                if len(held) >= 4000:
                    await asyncio.sleep(0.5)
                    continue
                try:
                    reader, writer = await swarm._open_stream(peer, handlers.averaging(swarm_id))
                    if mode == "bigframes":  # 64 KiB of the GiB it promises, then nothing
                        writer.write(stream_prefix(1 << 30) + b"x" * (64 << 10))
                        await writer.drain()
                    held.append(writer)
                    sent += 1
                except (ConnectionError, OSError, asyncio.TimeoutError):
                    failed += 1
                    await asyncio.sleep(0.01)

    async def main() -> None:
        expected = await expected_hash() if mode == "ranges" else ""
        end = time.monotonic() + seconds
        await asyncio.gather(*(worker(end, expected) for _ in range(IN_FLIGHT)))
        for writer in held:
            writer.close()

    try:
        swarm.run(main(), timeout=seconds + 60)
    finally:
        swarm.close()
    return {"mode": mode, "answered": sent, "failed": failed}


# --- what the checks cost, per request and per round ----------------------------------------------------------------
def timed(call: Any, repeats: int = 20, batch: int = 2000) -> Dict[str, float]:
    return timed_batches(call, repeats, batch)


def costs() -> Dict[str, Dict[str, float]]:
    """Microseconds per call of each check this issue added, in one process on one clock."""
    import torch

    from node.averaging import Averager
    from node.net import InProcessNetwork
    from node.net.streams import Limits, read_body, read_frame, read_size
    from node.runtime.rounds import NoShows, majority_check
    from node.swarm import SwarmView
    from node.training import ModuleState
    from node.training.model import MoETransformer
    from protocol.frames import stream_prefix
    from protocol.manifest import AveragingSpec, OuterOptimizerSpec, load_manifest
    from protocol.records import PeerRecord

    out: Dict[str, Dict[str, float]] = {}
    limits = Limits()

    def request_bookkeeping() -> None:  # what the serving loop adds to every request
        limits.open_stream("peer")
        limits.turn("peer", "state", 10.0)
        limits.reserve("peer", 1 << 20)
        limits.release("peer", 1 << 20)
        limits.close_stream("peer")

    limits._rates["state"].rate = 1e12  # never refuse here: the cost of saying yes
    out["limits, per request"] = timed(request_bookkeeping)
    frame = stream_prefix(4096) + b"x" * 4096

    def read(with_deadline: bool) -> None:
        async def one() -> None:
            reader = asyncio.StreamReader()
            reader.feed_data(frame)
            if with_deadline:
                await read_body(reader, await read_size(reader, limit=1 << 22), 30.0)
            else:
                await read_frame(reader)

        loop.run_until_complete(one())

    loop = asyncio.new_event_loop()
    out["frame read, no deadline (before)"] = timed(lambda: read(False), batch=500)
    out["frame read, limit and body deadline"] = timed(lambda: read(True), batch=500)
    loop.close()
    averager = Averager(InProcessNetwork().join("me"), "s" * 16, hosted=lambda: {"trunk"}, spec=AveragingSpec())
    averager.expect("trunk", 5, 1_000_000)
    out["early mail bound, per part"] = timed(lambda: (averager._keep_early("trunk", 5, "peer", 0), None)[1])
    view = SwarmView(peers={f"p{i}": PeerRecord(peer_id=f"p{i}", modules=["trunk"], outer_round=i, local_steps=0)
                            for i in range(100)})  # fmt: skip
    out["swarm round of 100 peers, per round"] = timed(lambda: view.swarm_round(exclude="p0"), batch=500)
    no_shows, members = NoShows(), [f"p{i}" for i in range(16)]
    out["no-shows of a group of 16, per module and round"] = timed(lambda: no_shows.observe(members, set(members[1:])))
    manifest = load_manifest(None)
    trunk = sum(p.numel() for p in MoETransformer(manifest.model, seed=0).module_parameters("trunk"))
    state = ModuleState("trunk", [torch.nn.Parameter(torch.randn(trunk))], OuterOptimizerSpec())
    state.momentum = torch.randn(trunk)

    def uncached() -> None:
        state._hash_cache = None
        state.params_hash()

    out[f"state digest of the trunk ({trunk:,} values), hashed (before)"] = timed(uncached, repeats=10, batch=20)
    out["state digest of the trunk, cached"] = timed(state.params_hash)
    hashes = ["a" * 32] * 3 + ["b" * 32] * 2
    out["re-sync majority with standing, per group"] = timed(
        lambda: majority_check(hashes, trunk, "centered_clip", [True, False, True, False, True], "a" * 32)
    )
    return out


# --- the node and its measurements ---------------------------------------------------------------------------------
def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def refused_counts(text: str) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("commons_requests_refused_total{") or line.startswith("commons_averaging_rejected_parts"):
            out[line.rsplit(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def group_rss(pgid: int) -> int:
    from node.ops import read_stat
    from node.ops.procs import in_process_group

    return sum(stat.rss_bytes for pid in in_process_group(pgid) if (stat := read_stat(pid)) is not None)


def run_version(name: str, code: Path, args: argparse.Namespace, work: Path) -> List[Dict[str, Any]]:
    """Every phase against one node running the code in ``code``."""
    env = child_env()
    env["PYTHONPATH"] = str(code) + os.pathsep + str(REPO)
    corpus = write_text_corpus(work / f"{name}-text.txt")
    argv = ["taskset", "-c", "0", sys.executable, "-m", "node", "start", "--data", str(corpus), "--experts", "2",
            "--metrics-addr", "127.0.0.1:0", "--log-format", "json"]  # fmt: skip
    node = NodeProcess(argv, work / name, name, env=env)
    rows: List[Dict[str, Any]] = []
    try:
        ready = node.wait_ready(180)
        metrics_url, target, swarm_id = ready["metrics_url"], ready["maddrs"][0], ready["swarm_id"]
        time.sleep(5)  # past its first steps
        for phase in ["clean", *args.attacks, "clean again"]:
            attacker: Optional[subprocess.Popen] = None
            if phase in ATTACKS:
                attacker = subprocess.Popen(
                    ["taskset", "-c", "1", sys.executable, "-m", "bench.flood", "--attacker", phase, "--target",
                     target, "--swarm-id", swarm_id, "--seconds", str(args.seconds + 10)],
                    env=child_env(), stdout=subprocess.PIPE, cwd=REPO,
                )  # fmt: skip
                time.sleep(8)  # its DHT and p2pd start, on its own core
            rows.append(measure(name, phase, node, metrics_url, args))
            if attacker is not None:
                out, _ = attacker.communicate(timeout=args.seconds + 120)
                rows[-1]["attacker"] = json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {}
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        rows[-1]["exit"] = node.terminate(60)
    finally:
        node.cleanup()
    return rows


def measure(name: str, phase: str, node: NodeProcess, metrics_url: str, args: argparse.Namespace) -> Dict[str, Any]:
    rates: List[float] = []
    peak = [0]
    stop = threading.Event()

    def sample_memory() -> None:
        while not stop.wait(0.25):
            peak[0] = max(peak[0], group_rss(node.proc.pid))

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    _, body = http_get(metrics_url)
    before_refused = refused_counts(body.decode())
    steps, at = metric(body.decode(), "commons_training_steps_total"), time.monotonic()
    end = at + args.seconds
    while time.monotonic() < end:
        time.sleep(args.window)
        _, body = http_get(metrics_url)
        now_steps, now = metric(body.decode(), "commons_training_steps_total"), time.monotonic()
        rates.append((now_steps - steps) / (now - at))
        steps, at = now_steps, now
    stop.set()
    sampler.join()
    refused = {k: v - before_refused.get(k, 0.0) for k, v in refused_counts(body.decode()).items()}
    return {
        "version": name, "phase": phase, "steps_per_s_median": statistics.median(rates),
        "steps_per_s_mean": statistics.fmean(rates), "steps_per_s_worst": min(rates),
        "rss_peak_mb": round(peak[0] / 1e6, 1), "refused": {k: v for k, v in refused.items() if v},
        "alive": node.proc.poll() is None,
    }  # fmt: skip


def report(rows: List[Dict[str, Any]]) -> str:
    lines = ["| version | phase | steps/s median | mean | worst window | vs clean (median) | peak RSS MB | refused |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        clean = next(r for r in rows if r["version"] == row["version"] and r["phase"] == "clean")
        ratio = row["steps_per_s_median"] / clean["steps_per_s_median"]
        refused = ", ".join(f"{k.split('{', 1)[-1].rstrip('}')}: {int(v)}" for k, v in row["refused"].items())
        lines.append(f"| {row['version']} | {row['phase']} | {row['steps_per_s_median']:.2f} | "
                     f"{row['steps_per_s_mean']:.2f} | {row['steps_per_s_worst']:.2f} | {ratio:.2f}x | "
                     f"{row['rss_peak_mb']} | {refused or '-'} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--baseline", default="", help="a git ref whose node to measure side by side")
    parser.add_argument("--attacks", nargs="*", default=ATTACKS)
    parser.add_argument("--out", default="bench-results/flood")
    parser.add_argument("--attacker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--target", default="", help=argparse.SUPPRESS)
    parser.add_argument("--swarm-id", default="", help=argparse.SUPPRESS)
    parser.add_argument("--costs-only", action="store_true", help="only the cost of the checks, in this process")
    args = parser.parse_args()
    if args.attacker:
        print(json.dumps(attack(args.attacker, args.target, args.swarm_id, args.seconds)), flush=True)
        return
    check_costs = costs()
    cost_table = ["| check | median µs | mean µs | worst µs |", "|---|---|---|---|"] + [
        f"| {name} | {c['median_us']:.2f} | {c['mean_us']:.2f} | {c['worst_us']:.2f} |"
        for name, c in check_costs.items()
    ]
    print("\n".join(cost_table), flush=True)
    if args.costs_only:
        return
    work = Path(tempfile.mkdtemp(prefix="commons-bench-flood-"))
    versions = {"this": REPO}
    try:
        if args.baseline:
            tree = work / "baseline"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.baseline],
                           check=True, capture_output=True)  # fmt: skip
            versions = {f"baseline {args.baseline}": tree, "this": REPO}
        rows: List[Dict[str, Any]] = []
        for name, code in versions.items():
            rows += run_version(name, code, args, work)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"phases": rows, "check_costs": check_costs}, indent=1))
        table = report(rows)
        (out / "results.md").write_text(table + "\n\n" + "\n".join(cost_table) + "\n")
        print(table)
    finally:
        if args.baseline:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "baseline")],
                           capture_output=True)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
