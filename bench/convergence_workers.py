"""Worker processes of the convergence benchmark: the single-worker Trainer loop and one torch.distributed rank.

    python -m bench.convergence_workers single --data DIR --steps N --snap-every K --out DIR
    python -m bench.convergence_workers ddp --rank R --world 4 --master IP --data SHARD --steps N ...

``single`` is the node's own ``Trainer`` (default manifest, every expert) on all the training data. ``ddp`` is
the same model wrapped in ``DistributedDataParallel`` (gloo), AdamW with the manifest's inner hyperparameters,
batch 16 per rank on its own shard, gradients averaged by DDP at every step, then clipped as the Trainer clips.
Every ``--snap-every`` steps rank 0 (or the single worker) saves the model's state_dict as ``snap-<samples>.pt``;
the time spent saving is not counted in ``elapsed``. stdout: one JSON line per snapshot, then ``done`` with
every step's duration (rank 0's, wall clock, DDP's all-reduce included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, List

import torch

from bench.convergence_data import build_model
from node.training.data import TextData
from node.training.trainer import Trainer
from protocol.manifest import load_manifest

BATCH = 16  # the default manifest's batch size


class LossOf(torch.nn.Module):
    """DDP hooks run on forward(): make the model's training loss the forward pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.loss(batch)  # type: ignore[operator]


def train_loop(step: Callable[[], None], model: torch.nn.Module, args: argparse.Namespace, samples_per_step: int,
               save: bool) -> None:  # fmt: skip
    """Run ``args.steps`` steps; snapshot every ``args.snap_every`` (and at the end); print the events."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    durations: List[float] = []
    paused = 0.0
    started = time.perf_counter()
    for n in range(1, args.steps + 1):
        t = time.perf_counter()
        step()
        durations.append(time.perf_counter() - t)
        if save and (n % args.snap_every == 0 or n == args.steps):
            t = time.perf_counter()
            path = out / f"snap-{n * samples_per_step:09d}.pt"
            torch.save(model.state_dict(), path)
            paused += time.perf_counter() - t
            print(json.dumps({"event": "snapshot", "step": n, "samples": n * samples_per_step, "path": str(path),
                              "elapsed": time.perf_counter() - started - paused}), flush=True)  # fmt: skip
    print(json.dumps({"event": "done", "steps": args.steps, "elapsed": time.perf_counter() - started - paused,
                      "step_seconds": [round(d, 4) for d in durations]}), flush=True)  # fmt: skip


def single(args: argparse.Namespace) -> None:
    manifest = load_manifest(None)
    trainer = Trainer(manifest, TextData(args.data, manifest.model.seq_len, seed=0), torch.device("cpu"))
    trainer.model.set_hosted_experts(trainer.model.module_names())
    train_loop(trainer.step, trainer.model, args, BATCH, save=True)


def ddp(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:{args.port}", rank=args.rank,
                            world_size=args.world, timeout=timedelta(seconds=600))  # fmt: skip
    manifest = load_manifest(None)
    spec = manifest.inner_optimizer
    model = build_model(manifest)
    wrapped = DistributedDataParallel(LossOf(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(spec.beta1, spec.beta2),
                                  weight_decay=spec.weight_decay)  # fmt: skip
    batches = TextData(args.data, manifest.model.seq_len, seed=args.rank).train_batches(BATCH)

    def step() -> None:
        loss = wrapped(next(batches))
        loss.backward()  # DDP averages the gradients over the ranks here
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    dist.barrier()
    train_loop(step, model, args, BATCH * args.world, save=args.rank == 0 and args.snap_every > 0)
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["single", "ddp"])
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, required=True, help="steps of this worker")
    parser.add_argument("--snap-every", type=int, default=0, help="0: no snapshots (timing only)")
    parser.add_argument("--out", default=".")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--master", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=29500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    (single if args.kind == "single" else ddp)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
