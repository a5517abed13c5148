"""Benchmark: each member trains on its own language; is the common model good at all of them?

Usage (from the repository root; needs Debian's translated manual pages: ``make bench-languages`` installs them
as root; about 25 minutes on 2 cores at the default --rounds):
    python -m bench.languages [--rounds 12] [--experts 8] [--languages de,fr,es,pl] [--out bench-results/languages]

The corpora are Debian's manual pages (``manpages-de``, ``-fr``, ``-es``, ``-pl``): gzip-compressed troff that
no one here wrote, read by the node as they are stored (``--data`` a directory of ``.gz`` files). Per language,
every 10th file (in name order) is held out; the node of that language gets the other files. Side by side in one
run, one arm after the other so that each has the machine's 2 cores to itself, every arm on the shipped manifest
(H = 50, overlap, CenteredClip; only ``placement`` differs where said), the same number of steps per node:

(alone)      4 lone nodes at once, each on its own language, each its own swarm (no peers); each hosts
             ``--experts`` of the 16 experts, as it does in the swarm: the same compute, no swarm.
(swarm-lr)   4 nodes, one swarm, each on its own language, placement ``least_replicated`` (the default).
(swarm-fd)   the same with placement ``follow_data``.
(swarm-mix)  4 nodes, one swarm, the union of the training files dealt evenly (shuffled) over the nodes.
(ddp)        4 torch.distributed gloo ranks (loopback), each on its own language, the full model (every expert),
             gradients averaged every step: the same samples (``--rounds`` x 50 steps x 16 per rank).

Each node writes a checkpoint when it leaves; the common model is the trunk's and every expert's global copy (an
expert from the first node, in language order, that hosts it). A lone node is scored as it is: its own hosted
experts. Loss is next-byte cross entropy (nats/byte) on 256 fixed windows of each language's held-out files;
"union" is the mean over the languages. Routing: the share of each language's top-k routing choices that goes to
each expert, from the common model of swarm-lr (and -fd), as a heat map. Bytes: every node's averaging bytes sent,
from its "left" event. Writes OUT/results.md, OUT/results.json, OUT/routing.png and logs.

What could favour the swarm: nothing is timed (quality at equal samples only). What could favour DDP: it hosts
every expert on every rank, the swarm's nodes host half each.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from bench.convergence_data import build_model, evaluate, load_global, write_manifest
from node.ops.checkpoint import CheckpointStore
from node.training.model import MoETransformer
from protocol.manifest import Manifest, PlacementSpec, load_manifest
from tests.procs import REPO, NodeProcess, log_records

MAN = Path("/usr/share/man")
HELD_OUT_EVERY = 10
WINDOWS = 256
BATCH = 16


# --- corpora ---------------------------------------------------------------------------------------------------------
def language_files(lang: str) -> List[Path]:
    files = sorted(Path(p) for p in glob.glob(str(MAN / lang / "man*" / "*.gz")))
    if not files:
        raise SystemExit(f"no manual pages for {lang!r} in {MAN / lang}: install manpages-{lang} (as root)")
    return files


def prepare(langs: Sequence[str], out: Path, seed: int = 0) -> Dict[str, Any]:
    """Per language: train dir (symlinks to the .gz files), held-out files; and the union dealt over 4 dirs."""
    data = out / "data"
    shutil.rmtree(data, ignore_errors=True)
    train: Dict[str, List[Path]] = {}
    held: Dict[str, List[Path]] = {}
    for lang in langs:
        files = language_files(lang)
        held[lang] = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
        train[lang] = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
        link_all(train[lang], data / lang, lang)
    union = [(lang, f) for lang in langs for f in train[lang]]
    random.Random(seed).shuffle(union)
    mixed = [data / f"mix-{i}" for i in range(len(langs))]
    for i, (lang, f) in enumerate(union):
        link_all([f], mixed[i % len(langs)], lang)
    return {"train": {lang: data / lang for lang in langs}, "held": held, "mixed": mixed}


def link_all(files: Sequence[Path], directory: Path, prefix: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for f in files:
        (directory / f"{prefix}-{f.parent.name}-{f.name}").symlink_to(f)


def heldout_batches(files: Sequence[Path], seq_len: int) -> List[torch.Tensor]:
    """``WINDOWS`` windows of ``seq_len + 1`` bytes evenly spaced over the held-out files' text."""
    text = b"".join(gzip.decompress(f.read_bytes()) for f in files)
    span = seq_len + 1
    starts = np.linspace(0, len(text) - span, WINDOWS).astype(np.int64)
    arr = np.stack([np.frombuffer(text[s : s + span], dtype=np.uint8) for s in starts]).astype(np.int64)
    return [torch.from_numpy(arr[i : i + BATCH]) for i in range(0, WINDOWS, BATCH)]


# --- arms ------------------------------------------------------------------------------------------------------------
def node_argv(args: argparse.Namespace, manifest: Path, data: Path, ckpt: Path, extra: List[str]) -> List[str]:
    return [sys.executable, "-m", "node", "start", "--manifest", str(manifest), "--data", str(data),
            "--experts", str(args.experts), "--device", "cpu", "--log-format", "json", "--max-rounds",
            str(args.rounds), "--metrics-addr", "127.0.0.1:0", "--checkpoint-dir", str(ckpt),
            "--checkpoint-every-rounds", "1000", "--bootstrap-timeout-seconds", "120", *extra]  # fmt: skip


def run_nodes(args: argparse.Namespace, arm: str, manifest: Path, datas: Sequence[Path], swarm: bool) -> List[Path]:
    """Start one node per data dir (joined through the first when ``swarm``), wait until all left; their dirs."""
    root = args.out / arm
    done = [root / f"node-{i}" for i in range(len(datas))]
    if args.rescore and all(any(d.glob("ckpt-*.json")) for d in done):
        return done  # --rescore: score the checkpoints an earlier run left
    shutil.rmtree(root, ignore_errors=True)
    procs: List[NodeProcess] = []
    try:
        for i, data in enumerate(datas):
            extra = ["--initial-peers", procs[0].maddr] if swarm and procs else []
            proc = NodeProcess(node_argv(args, manifest, data, root / f"node-{i}", extra), root, f"node-{i}")
            procs.append(proc)
            if swarm and i == 0:
                proc.wait_ready(timeout=180)  # the others join through its address
        deadline = time.monotonic() + args.timeout
        for proc in procs:
            rc = proc.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if rc != 0:
                raise RuntimeError(f"{arm} {proc.name} exited with {rc}:\n{proc.stderr_tail()}")
    finally:
        leaks = [pid for p in procs for pid in p.cleanup()]
        if leaks:
            print(f"  warning: {arm} left processes {leaks}", flush=True)
    return [root / f"node-{i}" for i in range(len(datas))]


def node_model(manifest: Manifest, ckpt: Path) -> MoETransformer:
    """A lone node's model as it stands: its global copies, routing among the experts it hosts."""
    tensors = last_snapshot(ckpt).tensors
    model = build_model(manifest)
    hosted = [k.split("/", 1)[1] for k in tensors if k.startswith("global/")]
    load_global(model, tensors, hosted)
    model.set_hosted_experts([m for m in hosted if m != "trunk"])
    return model


def common_model(manifest: Manifest, ckpts: Sequence[Path]) -> MoETransformer:
    """The swarm's model: every module's global copy from the first node that hosts it; every expert routed to."""
    model = build_model(manifest)
    missing = set(model.module_names())
    for ckpt in ckpts:
        tensors = last_snapshot(ckpt).tensors
        have = [m for m in missing if f"global/{m}" in tensors]
        load_global(model, tensors, have)
        missing -= set(have)
    if missing:
        raise RuntimeError(f"no node hosted {sorted(missing)} at the end")
    return model


def last_snapshot(ckpt: Path) -> Any:
    store = CheckpointStore(ckpt)
    return store.load(store.generations()[0])  # newest first


def hosted_by(ckpts: Sequence[Path]) -> List[List[str]]:
    return [sorted(k.split("/", 1)[1] for k in last_snapshot(c).tensors if k.startswith("global/e"))
            for c in ckpts]  # fmt: skip


def replicas(hosted: Sequence[Sequence[str]]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for modules in hosted:
        for m in modules:
            counts[m] = counts.get(m, 0) + 1
    return counts


def sent_bytes(node_dirs: Sequence[Path]) -> List[int]:
    out = []
    for d in node_dirs:
        left = log_records(d.parent / f"{d.name}.stderr.log", "left")
        out.append(int(left[-1].get("averaging_sent_bytes", -1)) if left else -1)
    return out


def run_ddp(args: argparse.Namespace, langs: Sequence[str], corpora: Dict[str, Any]) -> Path:
    out = args.out / "ddp"
    if args.rescore and any(out.glob("snap-*.pt")):
        return sorted(out.glob("snap-*.pt"))[-1]
    shutil.rmtree(out, ignore_errors=True)
    steps = args.rounds * load_manifest(None).training.inner_steps
    procs = []
    try:
        for rank, lang in enumerate(langs):
            argv = [sys.executable, "-m", "bench.convergence_workers", "ddp", "--rank", str(rank), "--world",
                    str(len(langs)), "--master", "127.0.0.1", "--port", str(args.ddp_port), "--data",
                    str(corpora["train"][lang]), "--steps", str(steps), "--snap-every", str(steps), "--out", str(out)]
            procs.append(NodeProcess(argv, out, f"rank-{rank}"))  # fmt: skip
        for proc in procs:
            rc = proc.proc.wait(timeout=args.timeout)
            if rc != 0:
                raise RuntimeError(f"ddp {proc.name} exited with {rc}:\n{proc.stderr_tail()}")
    finally:
        for proc in procs:
            proc.cleanup()
    return sorted(out.glob("snap-*.pt"))[-1]


# --- routing ---------------------------------------------------------------------------------------------------------
def routing_shares(model: MoETransformer, batches: Sequence[torch.Tensor], experts: Sequence[str]) -> List[float]:
    """Share of each layer's top-k routing choices that goes to each expert (the model's own measure)."""
    affinity = model.routing_affinity(batches)
    return [affinity[e] for e in experts]


def heat_map(shares: Dict[str, Dict[str, List[float]]], experts: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(shares)
    fig, axes = plt.subplots(len(arms), 1, figsize=(12, 2.2 * len(arms) + 0.6), squeeze=False)
    for ax, arm in zip(axes[:, 0], arms, strict=True):
        langs = list(shares[arm])
        grid = np.array([shares[arm][lang] for lang in langs])
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
        ax.set_yticks(range(len(langs)), langs)
        ax.set_xticks(range(len(experts)), [e.replace("expert.", "") for e in experts], rotation=90, fontsize=7)
        ax.set_title(f"{arm}: share of each language's routing choices per expert (layer.index)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- report ----------------------------------------------------------------------------------------------------------
def table(losses: Dict[str, Dict[str, float]], langs: Sequence[str]) -> str:
    cols = [*langs, "union"]
    lines = ["| arm | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for arm, row in losses.items():
        lines.append(f"| {arm} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def verdicts(losses: Dict[str, Dict[str, float]], langs: Sequence[str]) -> List[str]:
    out = []
    for arm in ("swarm-lr", "swarm-fd", "swarm-mix"):
        if arm in losses and "ddp" in losses:
            ddp = losses["ddp"]["union"]
            out.append(f"{arm} / ddp on the union: {losses[arm]['union'] / ddp:.3f} (target <= 1.03)")
    for arm in ("swarm-lr", "swarm-fd"):
        if arm not in losses or any(f"alone-{lang}" not in losses for lang in langs):
            continue
        own = [losses[arm][lang] / losses[f"alone-{lang}"][lang] for lang in langs]
        others = [losses[f"alone-{a}"][b] / losses[arm][b] for a in langs for b in langs if a != b]
        out.append(f"{arm} / alone on each member's own language: " + ", ".join(f"{r:.3f}" for r in own)
                   + f" (target <= 1); alone / {arm} on the others' languages: median "
                   f"{float(np.median(others)):.2f}x, min {min(others):.2f}x")  # fmt: skip
    if "swarm-lr" in losses and "swarm-fd" in losses:
        diff = [losses["swarm-fd"][lang] / losses["swarm-lr"][lang] for lang in langs]
        out.append("follow_data / least_replicated per language: " + ", ".join(f"{d:.3f}" for d in diff))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="averaging rounds per node (x 50 steps)")
    parser.add_argument("--experts", type=int, default=8, help="experts each node hosts (of 16)")
    parser.add_argument("--languages", default="de,fr,es,pl")
    parser.add_argument("--arms", default="alone,swarm-lr,swarm-fd,swarm-mix,ddp")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--ddp-port", type=int, default=29533)
    parser.add_argument("--rescore", action="store_true", help="score the arms an earlier run left in --out")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "languages")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    langs = args.languages.split(",")
    arms = args.arms.split(",")
    base = load_manifest(None)
    corpora = prepare(langs, args.out)
    evals = {lang: heldout_batches(corpora["held"][lang], base.model.seq_len) for lang in langs}
    manifests = {
        policy: write_manifest(args.out / f"manifest-{policy}.yaml", dataclasses.replace(
            base, name=f"languages-{policy}", placement=PlacementSpec(policy=policy)))
        for policy in ("least_replicated", "follow_data")
    }  # fmt: skip
    experts = [m for m in base.model.module_names() if m != "trunk"]
    losses: Dict[str, Dict[str, float]] = {}
    shares: Dict[str, Dict[str, List[float]]] = {}
    report: Dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "arms": {}}
    started = time.monotonic()

    def score(arm: str, model: torch.nn.Module) -> None:
        row = {lang: evaluate(model, evals[lang]) for lang in langs}
        row["union"] = float(np.mean([row[lang] for lang in langs]))
        losses[arm] = row
        print(f"  {arm}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)

    if "alone" in arms:
        print("alone: 4 lone nodes", flush=True)
        dirs = run_nodes(args, "alone", manifests["least_replicated"], [corpora["train"][g] for g in langs], False)
        for lang, d in zip(langs, dirs, strict=True):
            score(f"alone-{lang}", node_model(base, d))
        report["arms"]["alone"] = {"hosted": hosted_by(dirs), "sent_bytes": sent_bytes(dirs)}
    swarms = {"swarm-lr": ("least_replicated", "train"), "swarm-fd": ("follow_data", "train"),
              "swarm-mix": ("least_replicated", "mixed")}  # fmt: skip
    for arm, (policy, split) in swarms.items():
        if arm not in arms:
            continue
        print(f"{arm}: 4 nodes, placement {policy}, data {split}", flush=True)
        datas = [corpora["train"][g] for g in langs] if split == "train" else corpora["mixed"]
        dirs = run_nodes(args, arm, manifests[policy], datas, True)
        model = common_model(base, dirs)
        score(arm, model)
        shares[arm] = {lang: routing_shares(model, evals[lang], experts) for lang in langs}
        report["arms"][arm] = {"hosted": hosted_by(dirs), "sent_bytes": sent_bytes(dirs)}
    if "ddp" in arms:
        print("ddp: 4 gloo ranks", flush=True)
        model = build_model(base)
        model.load_state_dict(torch.load(run_ddp(args, langs, corpora), weights_only=True))
        score("ddp", model)
        shares["ddp"] = {lang: routing_shares(model, evals[lang], experts) for lang in langs}
    report.update(losses=losses, routing=shares, experts=experts, verdicts=verdicts(losses, langs),
                  minutes=round((time.monotonic() - started) / 60, 1))  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    if shares:
        heat_map(shares, experts, args.out / "routing.png")
    arms_info = [f"- {arm}: experts hosted per node {[len(h) for h in info['hosted']]}, replicas per expert "
                 f"{sorted(replicas(info['hosted']).values())}, averaging bytes sent per node {info['sent_bytes']}"
                 for arm, info in report["arms"].items()]  # fmt: skip
    text = "\n".join([table(losses, langs), "", *[f"- {v}" for v in report["verdicts"]], "", *arms_info])
    (args.out / "results.md").write_text(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
