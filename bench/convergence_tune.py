"""Quick DiLoCo tuner: 4 simulated workers in one process, no network; held-out loss per setting.

Usage: python -m bench.convergence_tune [--steps 1200] [--configs 25:0.7:0.9 10:0.7:0.9 ddp single ...]
                                          [--aggregator centered_clip[:M]|mean] [--parallel 2] [--out DIR]

A config is ``H:outer_lr:momentum[:warmup_rounds[:delay_steps[:compression]]]``, or ``ddp`` (4 workers' gradients
averaged every step, one AdamW) or ``single`` (one worker on all the training data). ``--steps`` is the total number of
batches of 16 over all workers, as in bench/convergence.py. Each worker is the node's own Trainer (the
manifest's model, every expert, AdamW as the manifest says) on its quarter shard; each module keeps a
node.diloco.ModuleState per worker, so the outer step is the node's. Per round, every module's pseudo-gradients
are aggregated as a 4-peer group would: cut into 4 slices, each combined by node.robust.aggregate (CenteredClip
by default, like the default manifest). *warmup_rounds*: the outer learning rate ramps linearly over that many
rounds (not in the node today). *delay_steps*: the averaged result is applied that many local steps into the next
round, keeping the drift, as ``averaging.overlap`` does when a round takes that long on the network. Settings run
``--parallel`` at a time (one torch thread each); results go to DIR/tune.jsonl (appended) and DIR/tune.md.
*compression* ``sparse[-topk[-error_feedback]]`` (e.g. ``sparse-64-0.95``): every worker sends each slice as the
node does with ``averaging.compression: sparse`` (protocol/sparse.py: the top-k of each block of 4096 in 2 bits,
what was not sent kept for the next round), the slice's result is the aggregate of the decoded parts, sent back in
8 bits; the table then gives the averaging bytes a worker sends per training sample (payloads only: no headers,
TCP or encryption) beside DDP's (a ring all-reduce of float32 gradients every step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from bench.convergence_data import build_model, diloco_manifest, evaluate, heldout_batches, split_corpus
from node.averaging.robust import aggregate
from node.averaging.slices import chunked_bounds, slice_values
from node.training.data import TextData
from node.training.diloco import ModuleState
from node.training.trainer import Trainer
from protocol import sparse

WORKERS = 4
EVAL_POINTS = 4


@dataclasses.dataclass(frozen=True)
class Setting:
    kind: str  # diloco | ddp | single
    inner_steps: int = 25
    lr: float = 0.7
    momentum: float = 0.9
    warmup: int = 0
    delay: int = 0
    compression: str = "none"
    topk: int = 64
    error_feedback: float = 0.95

    @classmethod
    def parse(cls, text: str) -> "Setting":
        if text in ("ddp", "single"):
            return cls(text)
        fields = text.split(":")
        h, lr, mom = int(fields[0]), float(fields[1]), float(fields[2])
        warm = int(fields[3]) if len(fields) > 3 else 0
        delay = int(fields[4]) if len(fields) > 4 else 0
        if len(fields) > 5 and fields[5] != "none":
            kind, *more = fields[5].split("-")
            if kind != "sparse":
                raise ValueError(f"unknown compression {fields[5]!r}")
            topk = int(more[0]) if more else 64
            feedback = float(more[1]) if len(more) > 1 else 0.95
            return cls("diloco", h, lr, mom, warm, delay, "sparse", topk, feedback)
        return cls("diloco", h, lr, mom, warm, delay)

    @property
    def label(self) -> str:
        if self.kind != "diloco":
            return self.kind
        label = f"H={self.inner_steps} lr={self.lr:g} mom={self.momentum:g} warmup={self.warmup} delay={self.delay}"
        if self.compression == "sparse":
            label += f" sparse topk={self.topk} ef={self.error_feedback:g}"
        return label


class Workers:
    """Four Trainers on their shards, and every module's DiLoCo state for each."""

    def __init__(self, setting: Setting, shards: List[Path], aggregator: str) -> None:
        self.setting = setting
        self.aggregator, _, self.clip_multiplier = aggregator.partition(":")  # centered_clip:2 sets the clip radius
        self.manifest = diloco_manifest(setting.inner_steps, setting.lr, setting.momentum)
        seq = self.manifest.model.seq_len
        self.trainers = [Trainer(self.manifest, TextData(str(s), seq, seed=i), torch.device("cpu"))
                         for i, s in enumerate(shards)]  # fmt: skip
        names = self.manifest.model.module_names()
        self.states: List[Dict[str, ModuleState]] = [
            {m: ModuleState(m, t.model.module_parameters(m), self.manifest.outer_optimizer) for m in names}
            for t in self.trainers
        ]
        self.residuals: List[Dict[str, np.ndarray]] = [{} for _ in self.trainers]  # sparse: what was not sent
        self.bytes_sent = 0  # sparse: payload bytes all workers sent (parts to reducers, results to members)

    def steps(self, count: int) -> None:
        for trainer in self.trainers:
            for _ in range(count):
                trainer.step()

    def aggregate(self) -> Tuple[Dict[str, np.ndarray], List[Dict[str, torch.Tensor]]]:
        """Each worker's pseudo-gradients and every module's group result (4 slices, robust aggregate)."""
        deltas = [{m: s.pseudo_gradient() for m, s in states.items()} for states in self.states]
        spec = self.manifest.averaging
        clip = float(self.clip_multiplier) if self.clip_multiplier else spec.clip_multiplier
        result: Dict[str, np.ndarray] = {}
        sparse_on = self.setting.compression == "sparse"
        for module in deltas[0]:
            parts = [d[module].numpy() for d in deltas]
            # the node's layout: float32 slices of chunk_elements, 16x that when sparse (node/averaging/slices.py)
            per_slice = slice_values(spec.chunk_elements, "topk2" if sparse_on else "float32")
            bounds = chunked_bounds(parts[0].size, WORKERS, per_slice)
            if sparse_on:
                parts = [self._sent(w, module, p, bounds) for w, p in enumerate(parts)]
            pieces = []
            for j, (lo, hi) in enumerate(bounds):
                sliced = {str(w): p[lo:hi] for w, p in enumerate(parts)}
                combined = aggregate(sliced, str(j % WORKERS), method=self.aggregator, clip_multiplier=clip,
                                     outlier_ratio=spec.outlier_ratio).values  # fmt: skip
                if sparse_on:
                    payload = sparse.encode_topk8(combined)
                    self.bytes_sent += (WORKERS - 1) * len(payload)  # the reducer sends it to every other member
                    combined = sparse.decode(payload, hi - lo, "topk8")
                pieces.append(combined)
            result[module] = np.concatenate(pieces)
        return result, deltas

    def _sent(self, worker: int, module: str, delta: np.ndarray, bounds: List[Tuple[int, int]]) -> np.ndarray:
        """What a sparse member's parts decode to, with error feedback (node/averaging/run.py: _encode_own)."""
        residual = self.residuals[worker].get(module)
        target = delta.astype(np.float32, copy=True)
        if residual is not None:
            target += np.float32(self.setting.error_feedback) * residual
        sent = np.empty_like(target)
        for j, (lo, hi) in enumerate(bounds):
            payload = sparse.encode_topk2(target[lo:hi], self.setting.topk)
            if j % WORKERS != worker:  # its own slice it reduces itself
                self.bytes_sent += len(payload)
            sent[lo:hi] = sparse.decode(payload, hi - lo, "topk2")
        self.residuals[worker][module] = target - sent
        return sent

    def apply(self, averaged: Dict[str, np.ndarray], deltas: List[Dict[str, torch.Tensor]], lr: float) -> None:
        for states, own in zip(self.states, deltas, strict=True):
            for module, state in states.items():
                state.spec = dataclasses.replace(state.spec, lr=lr)
                drift = None
                if self.setting.delay:  # what rounds.apply does with overlap
                    drift = state.local_flat() - (state.global_flat - own[module])
                state.apply(averaged[module], False, drift=drift)

    def global_into(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for module, state in self.states[0].items():
                flat, offset = state.global_flat, 0
                for p in model.module_parameters(module):  # type: ignore[operator]
                    p.copy_(flat[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()


def run_diloco(setting: Setting, shards: List[Path], per_worker: int, evals: List[torch.Tensor],
               aggregator: str) -> List[List[float]]:  # fmt: skip
    workers = Workers(setting, shards, aggregator)
    probe = build_model(workers.manifest)
    h, rounds = setting.inner_steps, max(1, per_worker // setting.inner_steps)
    curve: List[List[float]] = []
    pending: Optional[Tuple[Dict[str, np.ndarray], List[Dict[str, torch.Tensor]], float]] = None
    for r in range(rounds):
        lr = setting.lr * min(1.0, (r + 1) / setting.warmup) if setting.warmup else setting.lr
        if pending is not None:
            workers.steps(min(setting.delay, h))
            workers.apply(*pending)
            workers.steps(h - min(setting.delay, h))
        else:
            workers.steps(h)
        averaged, deltas = workers.aggregate()
        pending = (averaged, deltas, lr)
        if not setting.delay or r == rounds - 1:
            workers.apply(*pending)
            pending = None
        if (r + 1) % max(1, rounds // EVAL_POINTS) == 0 or r == rounds - 1:
            workers.global_into(probe)
            curve.append([(r + 1) * h * WORKERS * 16, evaluate(probe, evals)])
    if setting.compression == "sparse":  # bytes a worker sends per training sample, in the last column
        curve[-1].append(workers.bytes_sent / (rounds * h * WORKERS * 16))
    else:  # float32 parts of 3/4 of the vector to reducers, and 3 x the result of its own quarter
        numel = sum(s.numel for s in workers.states[0].values())
        curve[-1].append(WORKERS * 2 * (WORKERS - 1) / WORKERS * 4 * numel * rounds / (rounds * h * WORKERS * 16))
    return curve


def run_sync(setting: Setting, shards: List[Path], train_root: Path, steps: int, evals: List[torch.Tensor]) -> List:
    """``ddp``: 4 shards' gradients averaged every step; ``single``: one Trainer on all the training data."""
    manifest = diloco_manifest(25, 0.7, 0.9)
    seq, spec = manifest.model.seq_len, manifest.inner_optimizer
    trainer = Trainer(manifest, TextData(str(train_root), seq, seed=0), torch.device("cpu"))
    streams = [TextData(str(s), seq, seed=i).train_batches(16) for i, s in enumerate(shards)]
    model, curve = trainer.model, []
    n_steps = steps if setting.kind == "single" else steps // WORKERS
    for step in range(1, n_steps + 1):
        if setting.kind == "single":
            trainer.step()
        else:
            for stream in streams:
                (model.loss(next(stream)) / WORKERS).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip_norm)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        if step % max(1, n_steps // EVAL_POINTS) == 0 or step == n_steps:
            curve.append([step * 16 * (1 if setting.kind == "single" else WORKERS), evaluate(model, evals)])
    return curve


def run_one(job: Tuple[str, str, int, str]) -> dict:
    text, data_dir, steps, aggregator = job
    torch.set_num_threads(1)
    setting = Setting.parse(text)
    corpus_root = Path(data_dir)
    shards = sorted((corpus_root / "train").glob("shard-*"))
    evals = heldout_batches(corpus_root / "heldout", 128, windows=512)
    started = time.perf_counter()
    if setting.kind == "diloco":
        curve = run_diloco(setting, shards, steps // WORKERS, evals, aggregator)
    else:
        curve = run_sync(setting, shards, corpus_root / "train", steps, evals)
    sent = curve[-1][2] if len(curve[-1]) > 2 else None
    if setting.kind == "ddp":  # a ring all-reduce of float32 gradients every step: 2 x 3/4 x 4 bytes a parameter
        numel = sum(p.numel() for p in build_model(diloco_manifest(25, 0.7, 0.9)).parameters())
        sent = WORKERS * 2 * (WORKERS - 1) / WORKERS * 4 * numel / (WORKERS * 16)
    return {"config": text, "label": setting.label, "steps": steps, "aggregator": aggregator, "final": curve[-1][1],
            "curve": curve, "seconds": round(time.perf_counter() - started, 1), "bytes_per_sample": sent}  # fmt: skip


def table(rows: List[dict]) -> str:
    ref = next((r["final"] for r in rows if r["config"] == "ddp"), None)
    ddp_bytes = next((r.get("bytes_per_sample") for r in rows if r["config"] == "ddp"), None)
    lines = ["| setting | aggregator | total steps | held-out loss | × ddp | bytes sent per sample | ddp / that | "
             "seconds |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: r["final"]):
        ratio = f"{r['final'] / ref:.3f}" if ref else "—"
        sent = r.get("bytes_per_sample")
        fewer = f"{ddp_bytes / sent:,.0f}×" if sent and ddp_bytes else "—"
        shown = f"{sent:,.1f}" if sent else "—"
        lines.append(f"| {r['label']} | {r['aggregator']} | {r['steps']} | {r['final']:.4f} | {ratio} | {shown} | "
                     f"{fewer} | {r['seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1200, help="total batches of 16 over all workers")
    parser.add_argument("--configs", nargs="+", default=["ddp", "25:0.7:0.9", "50:0.7:0.9", "25:1.0:0.5"])
    parser.add_argument("--aggregator", default="centered_clip",
                        help="centered_clip | mean | centered_clip:M (clip radius: M x median distance)")  # fmt: skip
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-results/convergence/tune"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    if not (data / "heldout").exists():
        split_corpus(data, WORKERS)
    jobs = [(c, str(data), args.steps, args.aggregator) for c in args.configs]
    rows = []
    with multiprocessing.get_context("spawn").Pool(args.parallel) as pool:
        for row in pool.imap_unordered(run_one, jobs):
            print(f"{row['label']}: held-out {row['final']:.4f} ({row['seconds']:.0f}s)", flush=True)
            with open(args.out / "tune.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            rows.append(row)
    every = [json.loads(line) for line in (args.out / "tune.jsonl").read_text().splitlines()]
    text = table(every)
    (args.out / "tune.md").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
