"""Benchmark: how many `node start` processes one machine holds on loopback, and what each one costs.

Usage: python -m bench.scale [--nodes 4 8 16] [--experts 1 2 4 8 16] [--seconds 60] [--sweep-seconds 120]
                             [--out DIR]

For each N in ``--nodes``: one swarm of N real nodes (one BLAS thread each) on 127.0.0.1, every node hosting
``--hosted`` experts. The first node starts a new swarm; once it is ready the others join it, one every
``--stagger`` seconds. Then the expert sweep: one more swarm with one node per value of ``--experts``, each
hosting that many experts. The manifest is the shipped one (same model, 2 x 8 experts) with
``training.inner_steps`` cut to ``--inner-steps`` and one eval batch, so rounds come often enough on 2 cores,
and ``--gather-seconds`` as the matchmaking window; it is written into ``--out``.

Measured, per swarm:
- join: spawn -> JSON ready line on stdout; and the lag from the moment the last node was ready until each
  node's view (``commons_swarm_view_peers`` on its /metrics/swarm, refreshed every 0.5 s) holds all N peers.
- DHT lookup success: (a) nodes whose view held all N peers within ``--view-deadline`` s of the last ready
  line; (b) during the measurement window, the share of view reads (each node's /metrics/swarm, once a
  second) holding all N peers; plus the "swarm refresh failed" warnings the nodes logged (failed DHT reads).
- memory and processes: every 5 s of the window, the node's process group (the node, hivemind's DHT process,
  p2pd) read from /proc: summed VmRSS (shared pages counted once per process), summed Pss (shared pages split)
  and the number of processes and threads; per node the peak over the window, the RSS change from the first
  to the last sample, and the node's local steps (commons_training_steps_total) at the end: RSS depends on
  how long a node has trained, so compare rows at similar step counts.
- rounds: the ``round`` JSON log entries stamped inside the window (from all N views full, for ``--seconds``;
  ``--sweep-seconds`` for the expert sweep): the share whose trunk group held all N peers, and the mean
  averaged trunk fraction.
The window ends with SIGTERM to every node at once (a clean leave: exit 0, no process left in the group).
Nodes also get ``--max-seconds`` as a safety net, so none outlives a killed benchmark by long.
``--node-env KEY=VALUE`` adds to the nodes' environment (e.g. ``MALLOC_MMAP_THRESHOLD_=131072`` for an A/B of the
allocator). Writes results.md and results.png into ``--out`` and prints the tables. Nothing passes or fails on a
number. About 10-12 minutes with the defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from tests.procs import REPO, NodeProcess, child_env, http_get

MIB = 1024 * 1024
SAMPLE_EVERY = 5  # seconds between memory samples in the window (view reads: every second)
MEMORY_HEAD = ("| node | RSS MiB (whole group) | PSS MiB (whole group) | RSS MiB of DHT process + p2pd "
               "| RSS change over the window MiB | local steps at the end | processes per node "
               "| threads per node |")  # fmt: skip
MEMORY_RULE = "|---|---|---|---|---|---|---|---|"


@dataclass
class Usage:
    rss: int = 0  # bytes, summed over the process group
    pss: int = 0
    procs: int = 0
    threads: int = 0
    helpers_rss: int = 0  # the DHT process and p2pd
    steps: int = -1  # the node's local training steps so far


@dataclass
class Member:
    """One node under measurement."""

    proc: NodeProcess
    experts: int
    spawned: float  # time.monotonic()
    ready_at: Optional[float] = None
    full_view_at: Optional[float] = None
    error: str = ""
    usage: List[Usage] = field(default_factory=list)
    views: List[int] = field(default_factory=list)  # view sizes read in the window; -1: no answer

    @property
    def hosted(self) -> int:
        return len(self.proc.ready["modules"]) - 1 if self.proc.ready else 0

    def peak(self, what: str) -> int:
        return max((getattr(u, what) for u in self.usage), default=0)


@dataclass
class SwarmResult:
    label: str
    wanted: int
    members: List[Member]
    last_ready: float = 0.0
    rounds: List[dict] = field(default_factory=list)  # round entries inside the window
    refresh_failures: int = 0
    warnings: Counter = field(default_factory=Counter)
    exit_codes: Counter = field(default_factory=Counter)
    leaked: int = 0
    note: str = ""

    @property
    def ready(self) -> List[Member]:
        return [m for m in self.members if m.ready_at is not None]


def write_manifest(path: Path, inner_steps: int, gather_seconds: float) -> Path:
    spec = yaml.safe_load((REPO / "protocol" / "default_manifest.yaml").read_text())
    spec["name"] = "scale-bench"
    spec["training"].update(inner_steps=inner_steps, eval_batches=1)
    spec["averaging"].update(gather_seconds=gather_seconds)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def process_groups() -> Dict[int, List[int]]:
    """pgid -> pids of every live (non-zombie) process, from one pass over /proc."""
    groups: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            groups.setdefault(int(fields[2]), []).append(int(entry))
    return groups


def kib_field(path: str, name: str) -> int:
    """A ``Name:  123 kB`` line of a /proc file, in bytes (0 if the process is gone)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * (1024 if line.endswith("kB") else 1)
    except (OSError, ValueError):
        pass
    return 0


def group_usage(members: Sequence[Member]) -> None:
    """Append one Usage sample to every live member: its whole process group, p2pd included."""
    groups = process_groups()
    for member in members:
        pgid = member.proc.proc.pid
        usage = Usage()
        for pid in groups.get(pgid, []):
            rss = kib_field(f"/proc/{pid}/status", "VmRSS")
            usage.rss += rss
            usage.pss += kib_field(f"/proc/{pid}/smaps_rollup", "Pss")
            usage.threads += kib_field(f"/proc/{pid}/status", "Threads")
            usage.procs += 1
            usage.helpers_rss += rss if pid != pgid else 0
        if usage.procs:
            member.usage.append(usage)


def metric(member: Member, name: str, path: str = "") -> int:
    """One unlabelled sample of the node's /metrics (or /metrics/swarm); -1 when it does not answer."""
    assert member.proc.ready is not None
    status, body = http_get(member.proc.ready["metrics_url"] + path)
    match = re.search(rb"^" + name.encode() + rb" (\S+)$", body, re.MULTILINE) if status == 200 else None
    return int(float(match.group(1))) if match else -1


def view_size(member: Member) -> int:
    """Peers in the node's swarm view (/metrics/swarm, refreshed by the node every 0.5 s)."""
    return metric(member, "commons_swarm_view_peers", "/swarm")


def sample_usage(members: Sequence[Member]) -> None:
    group_usage(members)
    for member in members:
        if member.usage:
            member.usage[-1].steps = metric(member, "commons_training_steps_total")


def node_args(args: argparse.Namespace, manifest: Path, experts: int, bootstrap: Optional[str]) -> List[str]:
    budget = args.ready_timeout + args.view_deadline + max(args.seconds, args.sweep_seconds) + 120
    argv = ["start", "--manifest", str(manifest), "--experts", str(experts), "--metrics-addr", "127.0.0.1:0",
            "--log-format", "json", "--max-seconds", str(budget), "--device", "cpu",
            "--bootstrap-timeout-seconds", str(args.bootstrap_timeout)]  # fmt: skip
    return argv + (["--initial-peers", bootstrap] if bootstrap else [])


def poll_ready(members: Sequence[Member], until: float) -> None:
    """Read ready lines as they come (stamping each) until ``until`` or until none is pending."""
    selector = selectors.DefaultSelector()
    for member in members:
        if member.ready_at is None and not member.error:
            selector.register(member.proc.proc.stdout, selectors.EVENT_READ, member)  # type: ignore[arg-type]
    try:
        while selector.get_map() and time.monotonic() < until:
            for key, _ in selector.select(timeout=max(0.0, min(0.5, until - time.monotonic()))):
                member = key.data
                try:
                    member.proc.wait_ready(timeout=30)
                    member.ready_at = time.monotonic()
                except (AssertionError, ValueError) as e:
                    member.error = f"no ready line (exit {member.proc.proc.poll()}): {str(e).splitlines()[0]}"
                selector.unregister(key.fileobj)
    finally:
        selector.close()


def spawn_swarm(result: SwarmResult, experts: Sequence[int], args: argparse.Namespace, workdir: Path,
                manifest: Path) -> None:  # fmt: skip
    """Bootstrap node, then the rest every ``--stagger`` s; stop adding when memory runs short."""
    for index, count in enumerate(experts):
        if mem_available() < args.min_free_gib * 1024 * MIB:
            result.note = f"stopped at {index} nodes: under {args.min_free_gib} GiB available"
            break
        bootstrap = result.members[0].proc.maddr if result.members else None
        argv = [sys.executable, "-m", "node", *node_args(args, manifest, count, bootstrap)]
        proc = NodeProcess(argv, workdir / f"node{index}", f"node{index}", env=child_env(**args.node_env))
        result.members.append(Member(proc, count, time.monotonic()))
        if index == 0:
            poll_ready(result.members, time.monotonic() + args.ready_timeout)
            if result.members[0].ready_at is None:
                result.note = f"bootstrap node failed: {result.members[0].error or 'not ready'}"
                return
        else:
            next_spawn = time.monotonic() + args.stagger
            poll_ready(result.members, next_spawn)
            time.sleep(max(0.0, next_spawn - time.monotonic()))
    poll_ready(result.members, time.monotonic() + args.ready_timeout)
    for member in result.members:
        if member.ready_at is None and not member.error:
            member.error = f"not ready after {args.ready_timeout}s"


def wait_full_views(result: SwarmResult, seconds: float) -> None:
    """Poll every ready node's view until each holds every ready peer, or ``seconds`` after the last ready line."""
    ready = result.ready
    result.last_ready = max(m.ready_at for m in ready if m.ready_at is not None)
    deadline = result.last_ready + seconds
    while time.monotonic() < deadline:
        waiting = [m for m in ready if m.full_view_at is None]
        if not waiting:
            return
        for member in waiting:
            if view_size(member) >= len(ready):
                member.full_view_at = time.monotonic()
        time.sleep(0.5)


def measure_window(result: SwarmResult, seconds: float) -> Tuple[float, float]:
    """View reads every second and memory samples every SAMPLE_EVERY s; returns the window in unix time."""
    ready = result.ready
    start_unix, end = time.time(), time.monotonic() + seconds
    tick = 0
    while time.monotonic() < end:
        started = time.monotonic()
        if tick % SAMPLE_EVERY == 0:
            sample_usage(ready)
        for member in ready:
            member.views.append(view_size(member))
        tick += 1
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    sample_usage(ready)
    return start_unix, time.time()


def stop_all(result: SwarmResult) -> None:
    """SIGTERM every node at once, wait for each, then count what was left in its process group."""
    for member in result.members:
        if member.proc.proc.poll() is None:
            member.proc.proc.send_signal(signal.SIGTERM)
    for member in result.members:
        try:
            code = str(member.proc.proc.wait(60))
        except subprocess.TimeoutExpired:
            code = "no exit in 60s"
        result.exit_codes[code] += 1
    for member in result.members:
        result.leaked += len(member.proc.cleanup())


def read_logs(result: SwarmResult, window: Tuple[float, float]) -> None:
    for member in result.members:
        for entry in member.proc.events("round"):
            if window[0] <= entry.get("timestamp", 0) <= window[1]:
                result.rounds.append(entry)
        for line in member.proc.log_path.read_text(errors="replace").splitlines():
            if '"level": "warning"' in line or '"level": "error"' in line:
                message = re.sub(r"[0-9a-f]{8,}|\d+(\.\d+)?", "#", line.split('"message": "', 1)[-1])[:90]
                result.warnings[message] += 1
                result.refresh_failures += "swarm refresh failed" in line


def run_swarm(label: str, experts: Sequence[int], args: argparse.Namespace, workdir: Path, manifest: Path,
              seconds: float) -> SwarmResult:  # fmt: skip
    result = SwarmResult(label, len(experts), [])
    print(f"[{label}] starting {len(experts)} nodes", flush=True)
    try:
        spawn_swarm(result, experts, args, workdir / label, manifest)
        if result.ready:
            wait_full_views(result, args.view_deadline)
            print(f"[{label}] {len(result.ready)} ready; measuring {seconds:g}s", flush=True)
            window = measure_window(result, seconds)
        else:
            window = (0.0, 0.0)
    finally:
        stop_all(result)
    read_logs(result, window)
    return result


def med_max(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "—"
    return f"{fmt.format(statistics.median(values))} / {fmt.format(max(values))}"


def join_row(r: SwarmResult) -> str:
    ready, n = r.ready, len(r.ready)
    spawn_to_ready = [m.ready_at - m.spawned for m in ready if m.ready_at is not None]
    lags = [m.full_view_at - max(m.ready_at, r.last_ready) for m in ready if m.full_view_at and m.ready_at]
    reads = [v for m in ready for v in m.views]
    full_reads = sum(v >= n for v in reads)
    full = [e for e in r.rounds if e["trunk_group"] >= n]
    fraction = statistics.mean(e["trunk_fraction"] for e in r.rounds) if r.rounds else float("nan")
    groups = statistics.median(e["trunk_group"] for e in r.rounds) if r.rounds else float("nan")
    codes = ", ".join(f"{code}×{count}" for code, count in sorted(r.exit_codes.items()))
    return (f"| {r.label} | {n}/{r.wanted} | {med_max(spawn_to_ready)} | {med_max(lags)} | "
            f"{len(lags)}/{n} | {full_reads}/{len(reads)} ({full_reads / max(len(reads), 1):.1%}) | "
            f"{r.refresh_failures} | {len(full)}/{len(r.rounds)} ({len(full) / max(len(r.rounds), 1):.0%}) | "
            f"{groups:g} | {fraction:.3f} | {codes} | {r.leaked} |")  # fmt: skip


def memory_row(label: str, members: Sequence[Member]) -> str:
    measured = [m for m in members if m.usage]
    rss = [m.peak("rss") / MIB for m in measured]
    pss = [m.peak("pss") / MIB for m in measured]
    helpers = [m.peak("helpers_rss") / MIB for m in measured]
    procs = sorted({m.peak("procs") for m in measured})
    threads = [m.peak("threads") for m in measured]
    growth = [(m.usage[-1].rss - m.usage[0].rss) / MIB for m in measured]
    steps = [m.usage[-1].steps for m in measured]
    return (f"| {label} | {med_max(rss, '{:.0f}')} | {med_max(pss, '{:.0f}')} | {med_max(helpers, '{:.0f}')} | "
            f"{med_max(growth, '{:+.0f}')} | {med_max(steps, '{:.0f}')} | {', '.join(map(str, procs)) or '—'} | "
            f"{med_max(threads, '{:.0f}')} |")  # fmt: skip


def report(swarms: List[SwarmResult], sweep: Optional[SwarmResult], args: argparse.Namespace, header: str) -> str:
    lines = [header, "", "## Join, DHT lookups, rounds", "",
             "| swarm | nodes ready | spawn → ready s (median / max) | last ready → view holds all N s "
             "(median / max) | views full within deadline | view reads holding all N | refresh failures "
             "| rounds with all N in the trunk group | median trunk group | mean trunk fraction | exit codes "
             "| leaked processes |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [join_row(r) for r in swarms + ([sweep] if sweep else [])]
    lines += ["", "## Memory and processes per node vs N (peak over the window, per node; median / max over nodes)",
              "", MEMORY_HEAD, MEMORY_RULE]  # fmt: skip
    lines += [memory_row(f"N = {len(r.ready)}, {args.hosted} experts each", r.ready) for r in swarms]
    if sweep:
        title = f"## Memory and processes per node vs hosted experts (one swarm of {len(sweep.ready)} nodes)"
        head = MEMORY_HEAD.replace("| node |", "| experts asked / hosted |")
        lines += ["", title, "", head, MEMORY_RULE]
        lines += [memory_row(f"{m.experts} / {m.hosted}", [m]) for m in sweep.ready]
    notes = [f"- {r.label}: {r.note}" for r in swarms + ([sweep] if sweep else []) if r.note]
    notes += [f"- {r.label} node{i}: {m.error}" for r in swarms + ([sweep] if sweep else [])
              for i, m in enumerate(r.members) if m.error]  # fmt: skip
    warned = sum((r.warnings for r in swarms + ([sweep] if sweep else [])), Counter())
    notes += [f"- warning ×{count}: `{message}`" for message, count in warned.most_common(6)]
    return "\n".join(lines + (["", "## Notes", ""] + notes if notes else []))


def chart(swarms: List[SwarmResult], sweep: Optional[SwarmResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    plots = [(axes[0], [(len(r.ready), m) for r in swarms for m in r.ready if m.usage], "nodes in the swarm (N)")]
    if sweep:
        plots.append((axes[1], [(m.hosted, m) for m in sweep.ready if m.usage], "experts hosted by the node"))
    for ax, points, xlabel in plots:
        for what, color in (("rss", "tab:blue"), ("pss", "tab:green")):
            xs = sorted({x for x, _ in points})
            ys = [statistics.median(m.peak(what) / MIB for x2, m in points if x2 == x) for x in xs]
            ax.scatter([x for x, _ in points], [m.peak(what) / MIB for _, m in points], color=color, alpha=0.3, s=12)
            ax.plot(xs, ys, marker="o", color=color, label=f"{what.upper()} per node (median)")
        for x in sorted({x for x, _ in points}):
            procs = max(m.peak("procs") for x2, m in points if x2 == x)
            ax.annotate(f"{procs} procs", (x, 0), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=8)
        if ax is axes[1]:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({x for x, _ in points}), [str(x) for x in sorted({x for x, _ in points})])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MiB, whole process group (peak in window)")
        ax.set_ylim(bottom=0)
        ax.legend(loc="center right", fontsize="small")
    axes[0].set_title("memory per node vs N")
    axes[1].set_title("memory per node vs hosted experts")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def header(args: argparse.Namespace, load: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    extra_env = "".join(f", {k}={v}" for k, v in args.node_env.items())
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    return (f"# Scale on loopback\n\nCommit {commit.stdout.strip() or '?'}{' (working tree modified)' if dirty else ''}"
            f", {time.strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} CPU cores, "
            f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 1024**3:.0f} GiB, 1-minute load average "
            f"{load}. Manifest: the shipped one with inner_steps {args.inner_steps}, eval_batches 1 and gather_seconds "
            f"{args.gather_seconds:g} "
            f"(`{args.out / 'manifest.yaml'}`); one BLAS thread per node{extra_env}; joiners every {args.stagger:g} s; "
            f"bootstrap timeout {args.bootstrap_timeout:g} s; window {args.seconds:g} s ({args.sweep_seconds:g} s "
            f"for the expert sweep) after all views were full (or {args.view_deadline:g} s passed). "
            "Definitions: the docstring of `bench/scale.py`.")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="*", default=[4, 8, 16], help="swarm sizes")
    parser.add_argument("--hosted", type=int, default=4, help="experts per node in the --nodes swarms")
    parser.add_argument("--experts", type=int, nargs="*", default=[1, 2, 4, 8, 16], help="the sweep: one node each")
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window per swarm")
    parser.add_argument("--sweep-seconds", type=float, default=120.0, help="measurement window of the sweep")
    parser.add_argument("--inner-steps", type=int, default=10)
    # 16 nodes on 2 cores take seconds per step: the ready posts of one round spread over more than the
    # shipped 3 s window, which then splits the round into small groups (a load limit, measured at 3 s too)
    parser.add_argument("--gather-seconds", type=float, default=3.0, help="the manifest's matchmaking window")
    parser.add_argument("--stagger", type=float, default=1.0, help="seconds between joining nodes")
    parser.add_argument("--view-deadline", type=float, default=90.0)
    parser.add_argument("--ready-timeout", type=float, default=240.0)
    parser.add_argument("--bootstrap-timeout", type=float, default=60.0, help="the nodes' --bootstrap-timeout-seconds")
    parser.add_argument("--min-free-gib", type=float, default=2.0, help="start no node with less memory available")
    parser.add_argument("--node-env", nargs="*", default=[], metavar="KEY=VALUE", help="extra environment of the nodes")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "scale")
    args = parser.parse_args()
    args.node_env = dict(item.split("=", 1) for item in args.node_env)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(args.out / "manifest.yaml", args.inner_steps, args.gather_seconds)
    load = f"{os.getloadavg()[0]:.2f} before"
    started = time.monotonic()
    logs = args.out / "logs"
    swarms = [run_swarm(f"N={n}", [args.hosted] * n, args, logs, manifest, args.seconds) for n in args.nodes]
    sweep = run_swarm("experts", args.experts, args, logs, manifest, args.sweep_seconds) if args.experts else None
    load += f", {os.getloadavg()[0]:.2f} after; {(time.monotonic() - started) / 60:.1f} min in all"
    text = report(swarms, sweep, args, header(args, load))
    (args.out / "results.md").write_text(text + "\n")
    chart(swarms, sweep, args.out / "results.png", f"Commons nodes on one {os.cpu_count()}-core machine, loopback")
    print("\n" + text + f"\n\nwrote {args.out / 'results.md'} and {args.out / 'results.png'}")


if __name__ == "__main__":
    main()
