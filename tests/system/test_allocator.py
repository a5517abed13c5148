"""glibc malloc settings of `node start`: memory a step frees stays in the process for the next step."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tests.procs import REPO, child_env

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"),
]

# Training steps of the default manifest's model, as `node start` runs them; faults over the last 10.
STEPS = """
import resource, sys
if sys.argv[1] == "keep":
    from node.ops.allocator import keep_freed_memory
    assert keep_freed_memory()
import torch
from node.training.data import TextData
from node.training.model import MoETransformer
from protocol.manifest import load_manifest
manifest = load_manifest(None)
model = MoETransformer(manifest.model, seed=manifest.seed)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
batches = TextData(None, manifest.model.seq_len, seed=1).train_batches(manifest.training.batch_size)
def step():
    model.loss(next(batches)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, cwd=REPO,
                          env=child_env(), timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_freed_step_memory_is_reused_without_page_faults():
    kept = page_faults("keep")
    default = page_faults("default")
    print(f"page faults in 10 steps: {default} with glibc's defaults, {kept} with the node's settings")
    assert default > 5_000, f"glibc's defaults did not fault here ({default}): this test cannot tell the difference"
    assert kept * 10 < default, f"{kept} page faults in 10 steps with the settings applied ({default} without)"
