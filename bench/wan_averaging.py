"""Benchmark: one averaging round of a big fp32 vector among peers on rate-limited links, side by side.

Usage: python -m bench.wan_averaging [--peers 4] [--mbytes 40] [--mbit 100] [--rounds 3] [--private K] [--out DIR]
Needs root (network namespaces, see bench/netns.py); otherwise prints why and exits 0.
Each peer is its own process in its own namespace (10.77.0.i), every link ``--mbit`` up and down.
Compared: Commons (tests/swarm/averaging_peer.py) per compression, hivemind DecentralizedAverager,
torch.distributed gloo all_reduce, and the bandwidth floor 2(n-1)/n * size / rate. One warm-up round,
then ``--rounds`` measured; a round lasts as long as its slowest peer says. Writes results.md and
results.png into ``--out`` and prints the table. Nothing passes or fails on a number.

``--private K`` adds, in the same run, each Commons compression again on a second network of the same links
where the last K hosts sit behind NAT routers (bench/netns.py: masquerade out, nothing new in): those peers
are send-only, as nodes that found themselves private are (node/swarm/reachability.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from bench.netns import JsonProcess, SkipBenchmark, TestNetwork, stopped
from protocol.manifest import AveragingSpec
from tests.procs import REPO, child_env

GLOO_PORT = 29500
TOLERANCE = {"none": 1e-4, "fp16": 1e-2, "int8": 0.1}  # |hivemind's result - true mean|, per coordinate


@dataclass
class Result:
    system: str
    compression: str
    seconds: List[float] = field(default_factory=list)  # all-reduce, group formed: per measured round, slowest peer
    wall: List[float] = field(default_factory=list)  # the whole call, matchmaking included
    groups: List[str] = field(default_factory=list)
    extras: Dict[str, List[float]] = field(default_factory=dict)  # per round: worst fraction, most peers dropped
    error: str = ""

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.seconds) if self.seconds else None


def group_sizes(replies: List[Dict[str, Any]]) -> str:
    """Each peer reports the size of its own group; 4 peers saying 2 are two groups: '2+2'."""
    counts = Counter(int(r.get("group_size") or 0) for r in replies)
    ordered = sorted(counts.items(), reverse=True)
    groups = [str(size or "failed") for size, peers in ordered for _ in range(-(-peers // max(size, 1)))]
    return "+".join(groups)


def run_peers(net: TestNetwork, result: Result, argv: Callable[[int, Optional[str]], List[str]], args: Any,
              logs: Path, bootstrap: bool) -> Result:  # fmt: skip
    """Start one peer per host (``bootstrap``: the first one's maddr goes to the others), run warm-up + rounds."""
    peers: List[JsonProcess] = []
    tag = f"{result.system.split()[0]}{'-nat' if 'NAT' in result.system else ''}-{result.compression}"
    try:
        for host in range(args.peers):
            first = peers[0].ready["maddrs"][0] if bootstrap and peers else None
            peers.append(JsonProcess(net, host, argv(host, first), logs / f"{tag}-{host}.log", cwd=REPO,
                                     env=child_env(GLOO_SOCKET_IFNAME="eth0")))  # fmt: skip
            if bootstrap:
                peers[-1].ready = peers[-1].expect("ready", 180)
        for peer in peers:
            peer.ready = peer.ready or peer.expect("ready", 180)
        ids = [peer.ready.get("peer_id", str(host)) for host, peer in enumerate(peers)]
        for rnd in range(args.rounds + 1):
            seeds = [1000 * rnd + host + 1 for host in range(args.peers)]  # "seeds": for hivemind's check
            for host, peer in enumerate(peers):
                peer.send({"cmd": "average", "module": "trunk", "round": rnd, "numel": args.numel,
                           "seed": seeds[host], "seeds": seeds, "expected": ids})  # fmt: skip
            replies = [peer.expect("averaged", args.round_timeout) for peer in peers]
            seconds = max(float(r["seconds"]) for r in replies)
            extra: Dict[str, float] = {}
            if all("ended_at" in r for r in replies):  # Commons: from the last member's start, as gloo's barrier
                extra["from own start"] = round(seconds, 2)
                ended = [float(r["ended_at"]) for r in replies]
                seconds = max(ended) - max(e - float(r["seconds"]) for e, r in zip(ended, replies, strict=True))
            wall = max(float(r.get("wall_seconds", r["seconds"])) for r in replies)
            if all("fraction" in r for r in replies):
                extra["fraction"] = min(float(r["fraction"]) for r in replies)
            if all("dropped" in r for r in replies):
                extra["dropped"] = max(len(r["dropped"]) for r in replies)
            if all("message_bytes" in r for r in replies):  # Commons: the message size the group agreed on
                extra["message KiB"] = min(int(r["message_bytes"]) for r in replies) >> 10
            print(f"  {result.system} {result.compression} round {rnd}{' (warm-up)' if rnd == 0 else ''}: all-reduce "
                  f"{seconds:.2f}s, whole call {wall:.2f}s, groups {group_sizes(replies)} {extra or ''}", flush=True)
            if rnd > 0:
                result.seconds.append(seconds)
                result.wall.append(wall)
                result.groups.append(group_sizes(replies))
                for key, value in extra.items():
                    result.extras.setdefault(key, []).append(value)
        for peer in peers:
            peer.send({"cmd": "quit"})
        deadline = time.monotonic() + 30
        for peer in peers:  # let them leave on their own (DHT and p2pd shutdown) before anything is signalled
            try:
                peer.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    except (RuntimeError, OSError) as e:
        result.error = str(e)
        print(f"  {result.system} {result.compression} failed: {e}", flush=True)
    finally:
        for peer in peers:
            peer.close()
    return result


def _compression(name: str) -> Any:
    from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization

    return {"none": NoCompression, "fp16": Float16Compression, "int8": Uniform8BitQuantization}[name]()


def hivemind_worker(args: argparse.Namespace) -> None:
    """One hivemind peer: DHT on --host, DecentralizedAverager; stdin/stdout as the Commons harness. Its
    "fraction" is checked here, untimed: the share of coordinates within TOLERANCE of the true mean."""
    import hivemind
    import torch
    from hivemind.averaging.control import AveragingStage

    def vector(seed: int) -> torch.Tensor:
        return torch.randn(args.numel, generator=torch.Generator().manual_seed(seed))

    dht = hivemind.DHT(host_maddrs=[f"/ip4/{args.host}/tcp/0"], initial_peers=args.initial_peers, start=True)
    tensor = torch.zeros(args.numel)
    averager = hivemind.averaging.DecentralizedAverager(
        [tensor], dht, start=True, prefix="wanbench", target_group_size=args.peers,
        min_matchmaking_time=args.matchmaking, request_timeout=min(3.0, args.matchmaking / 2),
        compression=_compression(args.compression[0]))  # fmt: skip
    print(json.dumps({"event": "ready", "peer_id": str(dht.peer_id),
                      "maddrs": [str(m) for m in dht.get_visible_maddrs()]}), flush=True)  # fmt: skip
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if command["cmd"] == "quit":
                break
            with averager.get_tensors() as (averaged,):
                averaged.copy_(vector(command["seed"]))
            started = time.perf_counter()
            control = averager.step(gather=args.host, wait=False, require_trigger=True, timeout=args.round_timeout)
            while control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP) and not control.done():
                time.sleep(0.005)
            found = time.perf_counter()
            control.allow_allreduce()
            try:
                group = len(control.result())
            except Exception:  # hivemind logs the reason
                group = 0
            done = time.perf_counter()
            reply = {"event": "averaged", "round": command["round"], "seconds": done - found,
                     "wall_seconds": done - started, "group_size": group}  # fmt: skip
            if group == len(command["seeds"]):
                mean = sum(vector(seed) for seed in command["seeds"]) / group
                with averager.get_tensors() as (averaged,):
                    close = (averaged - mean).abs() <= TOLERANCE[args.compression[0]]
                reply["fraction"] = round(float(close.float().mean()), 4)
            print(json.dumps(reply), flush=True)
    finally:
        averager.shutdown()
        dht.shutdown()


def gloo_worker(args: argparse.Namespace) -> None:
    """One torch.distributed rank; 'average' = barrier, then a timed all_reduce and division."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:{GLOO_PORT}", rank=args.index,
                            world_size=args.peers, timeout=timedelta(seconds=args.round_timeout))  # fmt: skip
    print(json.dumps({"event": "ready", "peer_id": f"rank{args.index}"}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        tensor = torch.randn(args.numel, generator=torch.Generator().manual_seed(command["seed"]))
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(tensor)
        tensor /= args.peers
        print(json.dumps({"event": "averaged", "round": command["round"], "seconds": time.perf_counter() - started,
                          "group_size": args.peers}), flush=True)  # fmt: skip
    dist.destroy_process_group()


LEGEND = """A round lasts until its slowest peer is done. *All-reduce*: from the formed group to the averaged
vector (gloo: after a barrier; Commons: from the moment the last member formed the group, the same clock on every
host, and *from own start* in the notes is the slowest peer timed from its own group formation, which adds how much
later than the others its last member became ready). *Whole call*: hivemind `step()`, Commons' `wall_seconds`
(matchmaking included, and for Commons generating the vector). *fraction*: Commons' own report; for hivemind,
the share of coordinates within 1e-4 / 1e-2 / 0.1 (none / fp16 / int8) of the true mean, checked after the round.
The floor is for fp32 on the wire (fp16 halves it, int8 quarters it)."""


def table(results: List[Result], floor: float, args: argparse.Namespace, load: str) -> str:
    gloo = next((r.median for r in results if r.system == "gloo all_reduce" and r.median), None)
    lines = [f"{args.peers} peers, {args.mbytes:g} MB fp32 vector ({args.numel:,} floats), {args.mbit:g} Mbit/s up and "
             f"down per peer (tbf), median of {args.rounds} rounds after 1 warm-up round; {os.cpu_count()} CPU cores "
             f"shared by all peers, 1-minute load average {load}. " + LEGEND.replace("\n", " ") + "\n",
             "| system | compression | all-reduce s | × floor | × gloo | whole call s | group sizes per round "
             "| all-reduce s per round | notes |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| bandwidth floor 2(n−1)/n·size/rate | none | {floor:.2f} | 1.00 | "
             f"{f'{floor / gloo:.2f}' if gloo else '—'} | | {args.peers} | | |"]  # fmt: skip
    for r in results:
        if r.median is None:
            lines.append(f"| {r.system} | {r.compression} | — | — | — | — | — | — | {r.error[:160]} |")
            continue
        vs_gloo = f"{r.median / gloo:.2f}" if gloo else "—"
        notes = "; ".join(f"{key}: {', '.join(f'{v:g}' for v in values)}" for key, values in r.extras.items())
        lines.append(f"| {r.system} | {r.compression} | {r.median:.2f} | {r.median / floor:.2f} | {vs_gloo} | "
                     f"{statistics.median(r.wall):.2f} | {', '.join(r.groups)} | "
                     f"{', '.join(f'{s:.2f}' for s in r.seconds)} | {notes} |")  # fmt: skip
    return "\n".join(lines)


def chart(results: List[Result], floor: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.median is not None]
    labels = [f"{r.system.split()[0]}\n{r.compression}" for r in shown]
    palette = {"Commons": "tab:green", "hivemind": "tab:orange", "gloo": "tab:blue"}
    colors = [palette[r.system.split()[0]] for r in shown]
    walls = [statistics.median(r.wall) for r in shown]
    fig, ax = plt.subplots(figsize=(1.4 * len(shown) + 2, 4.5))
    ax.bar(labels, walls, color=colors, alpha=0.3, label="whole call (matchmaking included)")
    bars = ax.bar(labels, [r.median or 0.0 for r in shown], color=colors, label="all-reduce")
    ax.bar_label(bars, labels=[f"{(r.median or 0):.1f}s\n{(r.median or 0) / floor:.2f}×" for r in shown],
                 label_type="center", color="white")  # fmt: skip
    ax.axhline(floor, color="black", linestyle="--", label=f"bandwidth floor (fp32) {floor:.2f}s")
    wire = [floor * {"fp16": 0.5, "int8": 0.25}.get(r.compression, 1.0) for r in shown]
    ax.hlines(wire, [i - 0.4 for i in range(len(shown))], [i + 0.4 for i in range(len(shown))], colors="black",
              linestyles="dotted", label="floor for the bytes on the wire")  # fmt: skip
    ax.set_ylabel("median seconds per averaging round")
    ax.set_title(title)
    ax.set_ylim(0, 1.3 * max([floor] + walls))
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def worker_argv(net: TestNetwork, args: argparse.Namespace, kind: str, compression: str, host: int,
                first: Optional[str]) -> List[str]:  # fmt: skip
    argv = [sys.executable, "-m", "bench.wan_averaging", "--worker", kind, "--index", str(host),
            "--peers", str(args.peers), "--mbytes", str(args.mbytes), "--round-timeout", str(args.round_timeout),
            "--host", net.ip(host), "--master", net.ip(0), "--compression", compression,
            "--matchmaking", str(args.matchmaking)]  # fmt: skip
    return argv + (["--initial-peers", first] if first else [])


def commons_argv(net: TestNetwork, args: argparse.Namespace, compression: str, host: int, first: Optional[str]):
    argv = [sys.executable, "-m", "tests.swarm.averaging_peer", "--host-maddrs", f"/ip4/{net.ip(host)}/tcp/0",
            "--compression", compression, "--aggregator", args.aggregator, "--chunk-elements", str(args.chunk_elements),
            "--part-timeout", "60"]  # 10 MB slices on 100 Mbit/s; no --out: it saves every averaged vector
    argv += ["--send-only"] if host in net.private else []
    return argv + (["--initial-peers", first] if first else [])


def measure_private(args: argparse.Namespace, logs: Path) -> List[Result]:
    """Commons again, on links of the same rate with the last ``args.private`` hosts behind NAT."""
    results: List[Result] = []
    with TestNetwork(hosts=args.peers, mbit=args.mbit, private=range(args.peers - args.private, args.peers)) as net:
        for name in args.compression:
            commons = functools.partial(commons_argv, net, args, name)
            label = f"Commons {args.aggregator}, {args.private} behind NAT"
            results.append(run_peers(net, Result(label, name), commons, args, logs, bootstrap=True))
    return results


def measure(net: TestNetwork, args: argparse.Namespace, logs: Path) -> List[Result]:
    results: List[Result] = []
    if "gloo" in args.systems:
        gloo = functools.partial(worker_argv, net, args, "gloo", "none")
        results.append(run_peers(net, Result("gloo all_reduce", "none"), gloo, args, logs, bootstrap=False))
    for name in args.hivemind_compression if "hivemind" in args.systems else []:
        hive = functools.partial(worker_argv, net, args, "hivemind", name)
        results.append(run_peers(net, Result("hivemind DecentralizedAverager", name), hive, args, logs, True))
    for name in args.compression if "commons" in args.systems else []:
        commons = functools.partial(commons_argv, net, args, name)
        results.append(run_peers(net, Result(f"Commons {args.aggregator}", name), commons, args, logs, bootstrap=True))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--mbytes", type=float, default=40.0, help="vector size in MB (10^6 bytes) of fp32")
    parser.add_argument("--mbit", type=float, default=100.0, help="per-host rate, each direction")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up round)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--compression", nargs="+", default=["none", "fp16", "int8"], help="Commons compressions")
    parser.add_argument("--aggregator", default="centered_clip", choices=["centered_clip", "mean"], help="Commons")
    parser.add_argument("--hivemind-compression", nargs="+", default=["none"], choices=["none", "fp16", "int8"])
    parser.add_argument("--matchmaking", type=float, default=5.0, help="hivemind min_matchmaking_time")
    parser.add_argument("--chunk-elements", type=int, default=AveragingSpec.chunk_elements, help="Commons")
    parser.add_argument("--systems", nargs="+", default=["gloo", "hivemind", "commons"])
    parser.add_argument("--round-timeout", type=float, default=300.0)
    parser.add_argument("--private", type=int, default=0, help="also Commons with this many peers behind NAT")
    parser.add_argument("--worker", choices=["hivemind", "gloo"], help=argparse.SUPPRESS)
    for hidden in ("--index", "--host", "--master", "--initial-peers"):
        parser.add_argument(hidden, nargs="*" if hidden == "--initial-peers" else None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.numel = int(args.mbytes * 1e6) // 4
    if args.worker:
        args.index = int(args.index)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks (DHT, p2pd shutdown)
        (hivemind_worker if args.worker == "hivemind" else gloo_worker)(args)
        return 0
    floor = 2 * (args.peers - 1) / args.peers * args.numel * 4 * 8 / (args.mbit * 1e6)
    load = f"{os.getloadavg()[0]:.2f} before"
    try:
        with TestNetwork(hosts=args.peers, mbit=args.mbit) as net:
            out = args.out or Path(tempfile.mkdtemp(prefix="wan_averaging-"))
            (out / "logs").mkdir(parents=True, exist_ok=True)
            print(f"writing to {out}", flush=True)
            results = measure(net, args, out / "logs")
        if args.private:
            results += measure_private(args, out / "logs")
    except (SkipBenchmark, KeyboardInterrupt) as reason:
        return stopped(reason)
    text = table(results, floor, args, f"{load}, {os.getloadavg()[0]:.2f} after")
    (out / "results.md").write_text(text + "\n")
    title = f"{args.peers} peers, {args.mbytes:g} MB fp32, {args.mbit:g} Mbit/s links"
    chart(results, floor, out / "results.png", title)
    print("\n" + text + f"\n\nwrote {out / 'results.md'} and {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
