"""Benchmark: a node's training throughput against a plain PyTorch loop on the same model and data.

Usage: python -m tests.bench.overhead [--pairs 2] [--rounds 6] [--threads 1] [--device cpu] [--out DIR]
Alternates, in one run, a plain loop (model, AdamW, gradient clipping, batches from the same text
reader; nothing else) and a real ``python -m node start`` alone, hosting every expert, on the default
manifest and corpus; each in its own process with ``--threads`` BLAS threads. The node's steps/s is
measured over wall time between the end of its first round and the end of its last full round, so
evaluation after each round, the rounds themselves, metrics and logging all count against it.
Writes results.md into ``--out`` and prints the table. Nothing passes or fails on a number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from tests.procs import REPO, NodeProcess, child_env

WARMUP_STEPS = 20


def plain_loop(steps: int, device: str) -> Dict[str, float]:
    """The reference: the node's model, optimizer settings and data reader, in a bare loop."""
    import torch

    from node.data import TextData
    from node.model import MoETransformer
    from protocol.manifest import load_manifest

    manifest = load_manifest(None)
    model = MoETransformer(manifest.model, seed=manifest.seed).to(device)
    spec = manifest.inner_optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(spec.beta1, spec.beta2),
                                  weight_decay=spec.weight_decay)  # fmt: skip
    batches = TextData(None, manifest.model.seq_len, seed=1).train_batches(manifest.training.batch_size)
    started = 0.0
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            started = time.perf_counter()
        loss = model.loss(next(batches).to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    seconds = time.perf_counter() - started
    return {"steps": steps, "seconds": seconds, "steps_per_second": steps / seconds}


def run_plain(steps: int, args: argparse.Namespace) -> Dict[str, float]:
    argv = [sys.executable, "-m", "tests.bench.overhead", "--plain", str(steps), "--device", args.device]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=child_env(**threads(args)), timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"plain loop failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_node(args: argparse.Namespace, workdir: Path, experts: int) -> Dict[str, Any]:
    argv = ["start", "--log-format", "json", "--experts", str(experts), "--device", args.device,
            "--max-rounds", str(args.rounds + 2)]  # fmt: skip
    node = NodeProcess([sys.executable, "-m", "node", *argv], workdir, "overhead-node", env=child_env(**threads(args)))
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
            "in_step_per_second": steps / inside}  # fmt: skip


def threads(args: argparse.Namespace) -> Dict[str, str]:
    return {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2, help="plain/node pairs, alternated")
    parser.add_argument("--rounds", type=int, default=6, help="node rounds measured (50 steps each by default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "overhead")
    parser.add_argument("--plain", type=int, default=0, help=argparse.SUPPRESS)  # child mode: run the loop
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain_loop(args.plain, args.device)))
        return
    from protocol.manifest import load_manifest

    manifest = load_manifest(None)
    experts = manifest.model.n_layers * manifest.model.n_experts
    steps = args.rounds * manifest.training.inner_steps
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            plain = run_plain(steps, args)
            node = run_node(args, Path(tmp) / f"node{pair}", experts)
            rows.append({"pair": pair, "plain": plain, "node": node})
            print(f"  pair {pair}: plain {plain['steps_per_second']:.2f} steps/s, node "
                  f"{node['steps_per_second']:.2f} steps/s", file=sys.stderr)  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    lines = [f"Node overhead: default manifest, all {experts} experts hosted, {args.threads} thread(s), "
             f"device {args.device}; commit {commit.stdout.strip()}, {time.strftime('%Y-%m-%d')}", "",
             "| pair | plain loop steps/s | node steps/s (wall) | node / plain | node time inside steps | "
             "node steps/s inside steps |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        p, n = r["plain"], r["node"]
        lines.append(f"| {r['pair']} | {p['steps_per_second']:.2f} | {n['steps_per_second']:.2f} | "
                     f"{n['steps_per_second'] / p['steps_per_second']:.3f} | {n['compute_share']:.1%} | "
                     f"{n['in_step_per_second']:.2f} |")  # fmt: skip
    ratio = statistics.median(r["node"]["steps_per_second"] / r["plain"]["steps_per_second"] for r in rows)
    lines += ["", f"Median node / plain: **{ratio:.3f}** (target ≥ 0.97)"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
