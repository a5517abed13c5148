"""Benchmark: a node's training throughput against a plain PyTorch loop on the same model and data.

Usage: python -m bench.overhead [--pairs 6] [--rounds 6] [--threads 1] [--device cpu] [--out DIR]
       [--sequential | --no-pin]
Runs, at the same time, a plain loop (model, AdamW, gradient clipping, batches from the same text
reader; nothing else) and a real ``python -m node start`` alone, hosting every expert, on the default
manifest and corpus; each in its own process with ``--threads`` BLAS threads, so both see the same
machine at the same moment (run one after the other, the plain loop alone drifted 5-10% between
runs). Each is pinned with everything it starts to its own core, and the cores are swapped every pair:
the summary's geometric mean cancels one core being faster than the other. The node pays for its DHT
process and p2pd on its own core. The node's steps/s is measured over wall time between the end of
its first round and the end of its last full round, so evaluation, the rounds themselves, metrics and
logging all count against it; the plain loop's over exactly that window. ``--sequential`` alternates
them instead. Writes results.md into ``--out`` and prints the table. Nothing passes or fails on a number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from tests.procs import REPO, NodeProcess, child_env

WARMUP_STEPS = 20


def plain_loop(steps: int, device: str, stream: bool = False, keep_memory: bool = False) -> Dict[str, float]:
    """The reference: the node's model, optimizer settings and data reader, in a bare loop.

    With ``stream``, runs until stopped and prints the wall time (time.time()) at the end of every step.
    With ``keep_memory``, first applies the glibc malloc settings `node start` applies (node/ops/allocator.py).
    """
    if keep_memory:
        from node.ops.allocator import keep_freed_memory

        keep_freed_memory()
    import torch

    from node.training.data import TextData
    from node.training.model import MoETransformer
    from protocol.manifest import load_manifest

    manifest = load_manifest(None)
    model = MoETransformer(manifest.model, seed=manifest.seed).to(device)
    spec = manifest.inner_optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(spec.beta1, spec.beta2),
                                  weight_decay=spec.weight_decay)  # fmt: skip
    batches = TextData(None, manifest.model.seq_len, seed=1).train_batches(manifest.training.batch_size)
    started = 0.0
    step = 0
    while stream or step < WARMUP_STEPS + steps:
        if step == WARMUP_STEPS:
            started = time.perf_counter()
        loss = model.loss(next(batches).to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        step += 1
        if stream:
            print(f"{time.time():.6f}", flush=True)
    seconds = time.perf_counter() - started
    return {"steps": steps, "seconds": seconds, "steps_per_second": steps / seconds}


def plain_argv(args: argparse.Namespace, steps: int, stream: bool = False) -> List[str]:
    """This module in child mode: the plain loop for ``steps`` steps, or (``stream``) until stopped."""
    argv = [sys.executable, "-m", "bench.overhead", "--plain", str(steps), "--device", args.device]
    return argv + ["--plain-allocator", args.plain_allocator] + (["--stream"] if stream else [])


def run_plain(steps: int, args: argparse.Namespace) -> Dict[str, float]:
    argv = plain_argv(args, steps)
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=child_env(**threads(args)), timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"plain loop failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_node(args: argparse.Namespace, workdir: Path, experts: int, prefix: Sequence[str] = ()) -> Dict[str, Any]:
    argv = ["start", "--log-format", "json", "--experts", str(experts), "--device", args.device,
            "--max-rounds", str(args.rounds + 2)]  # fmt: skip
    argv = [*prefix, sys.executable, "-m", "node", *argv]
    node = NodeProcess(argv, workdir, "overhead-node", env=child_env(**threads(args)))
    try:
        node.wait_ready(180)
        node.proc.wait(timeout=900)
    finally:
        node.cleanup()
    rounds = node.events("round")
    first, last = rounds[0], rounds[-2]  # the last round is drained while leaving
    wall = last["timestamp"] - first["timestamp"]
    steps = last["steps_total"] - first["steps_total"]
    inside = last["step_seconds_total"] - first["step_seconds_total"]
    return {"steps": steps, "seconds": wall, "steps_per_second": steps / wall, "compute_share": inside / wall,
            "in_step_per_second": steps / inside, "window": (first["timestamp"], last["timestamp"])}  # fmt: skip


def run_side_by_side(args: argparse.Namespace, workdir: Path, experts: int, cpus: List[str]) -> Dict[str, Any]:
    """The node and a streaming plain loop at the same time: both see the same machine at the same moment.

    ``cpus`` (plain's, node's): each pinned, with everything it starts, to its own core ([] = not pinned).
    The plain loop's rate is taken over exactly the node's measured window (first to last full round).
    """
    argv = plain_argv(args, 1, stream=True)

    def pin(index: int) -> List[str]:
        return ["taskset", "-c", cpus[index]] if cpus else []

    plain = subprocess.Popen(pin(0) + argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                             env=child_env(**threads(args)), start_new_session=True)  # fmt: skip
    try:
        node = run_node(args, workdir, experts, pin(1))
    finally:
        plain.terminate()
        out, _ = plain.communicate(timeout=60)
    stamps = [float(line) for line in out.split()]
    inside = [t for t in stamps if node["window"][0] <= t <= node["window"][1]]
    seconds = node["window"][1] - node["window"][0]
    return {"plain": {"steps": len(inside), "seconds": seconds, "steps_per_second": len(inside) / seconds},
            "node": node}  # fmt: skip


def threads(args: argparse.Namespace) -> Dict[str, str]:
    return {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=6, help="plain/node pairs (cores swapped every pair)")
    parser.add_argument("--rounds", type=int, default=6, help="node rounds measured (50 steps each by default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "overhead")
    parser.add_argument("--sequential", action="store_true",
                        help="alternate plain loop and node instead of running them side by side")  # fmt: skip
    parser.add_argument("--no-pin", action="store_true",
                        help="side by side, do not pin the two to their own cores (swapped every pair)")  # fmt: skip
    parser.add_argument("--plain-allocator", choices=("default", "keep"), default="default",
                        help="keep: the plain loop gets the node's glibc malloc settings too")  # fmt: skip
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plain", type=int, default=0, help=argparse.SUPPRESS)  # child mode: run the loop
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain_loop(args.plain, args.device, args.stream, args.plain_allocator == "keep")))
        return
    from protocol.manifest import load_manifest

    manifest = load_manifest(None)
    experts = manifest.model.n_layers * manifest.model.n_experts
    steps = args.rounds * manifest.training.inner_steps
    rows: List[Dict[str, Any]] = []
    available = sorted(os.sched_getaffinity(0))
    pinned = not args.sequential and not args.no_pin and len(available) >= 2 and shutil.which("taskset") is not None
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            cpus = [str(available[pair % 2]), str(available[(pair + 1) % 2])] if pinned else []
            if args.sequential:
                plain = run_plain(steps, args)
                node = run_node(args, Path(tmp) / f"node{pair}", experts)
            else:
                both = run_side_by_side(args, Path(tmp) / f"node{pair}", experts, cpus)
                plain, node = both["plain"], both["node"]
            rows.append({"pair": pair, "plain": plain, "node": node, "cpus": cpus})
            print(f"  pair {pair}: plain {plain['steps_per_second']:.2f} steps/s, node "
                  f"{node['steps_per_second']:.2f} steps/s", file=sys.stderr)  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    how = ("alternated" if args.sequential else "side by side, each pinned to its own core, cores swapped every pair"
           if pinned else "side by side")  # fmt: skip
    lines = [f"Node overhead: default manifest, all {experts} experts hosted, {args.threads} thread(s), "
             f"device {args.device}, {how}; plain loop's malloc settings: {args.plain_allocator}; "
             f"commit {commit.stdout.strip()}, {time.strftime('%Y-%m-%d')}", "",
             "| pair | cores (plain, node) | plain loop steps/s | node steps/s (wall) | node / plain | "
             "node time inside steps | node steps/s inside steps |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        p, n = r["plain"], r["node"]
        cores = ", ".join(r["cpus"]) or "-"
        lines.append(f"| {r['pair']} | {cores} | {p['steps_per_second']:.2f} | {n['steps_per_second']:.2f} | "
                     f"{n['steps_per_second'] / p['steps_per_second']:.3f} | {n['compute_share']:.1%} | "
                     f"{n['in_step_per_second']:.2f} |")  # fmt: skip
    ratios = [r["node"]["steps_per_second"] / r["plain"]["steps_per_second"] for r in rows]
    lines += ["", f"Median node / plain: **{statistics.median(ratios):.3f}** (target ≥ 0.97)"]
    if pinned and len(rows) >= 2:  # a core faster than the other favours whoever runs on it: average both ways
        by_core = [statistics.mean(ratios[k::2]) for k in (0, 1)]
        lines.append(f"Mean node / plain with the node on core {available[1]}: {by_core[0]:.3f}; on core "
                     f"{available[0]}: {by_core[1]:.3f}; geometric mean of the two: "
                     f"**{(by_core[0] * by_core[1]) ** 0.5:.3f}**")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
