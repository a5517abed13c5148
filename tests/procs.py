"""Real node processes for tests: start, wait for the ready line, stop, and prove nothing leaked.

Each process starts in its own session, so it and everything it spawns (the DHT
process, p2pd) share a process group whose id is the child's pid. ``leftovers()``
lists what is still alive in that group; a test that finds anything there has
found a leak. Only processes we started are ever signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from node.ops.procs import in_process_group

REPO = Path(__file__).resolve().parents[1]

TINY_MANIFEST = """\
name: test-tiny
protocol_version: 5
seed: 7
model: {{vocab_size: 256, seq_len: 32, d_model: 32, n_layers: 1, n_heads: 2, n_experts: {experts}, top_k: 1,
        expert_hidden: 64}}
training: {{batch_size: 8, inner_steps: {steps}, eval_batches: 1}}
inner_optimizer: {{name: adamw, lr: 0.003, weight_decay: 0.0, beta1: 0.9, beta2: 0.95, grad_clip_norm: 1.0}}
outer_optimizer: {{name: sgd_nesterov, lr: 0.7, momentum: 0.9}}
averaging: {{compression: none, gather_seconds: 2.0, part_timeout_seconds: 4.0, round_timeout_seconds: 20.0}}
"""


def write_tiny_manifest(path: Path, experts: int = 2, steps: int = 10) -> Path:
    path.write_text(TINY_MANIFEST.format(experts=experts, steps=steps))
    return path


def write_text_corpus(path: Path, seed: int = 0, size: int = 60_000) -> Path:
    """Plain English-ish text generated here, so tests need no download and no stdlib scan."""
    words = "the swarm trains one model while every peer keeps its own data on its own disk and".split()
    out, state = [], seed * 7919 + 1
    while sum(map(len, out)) < size:
        state = (state * 1103515245 + 12345) % (1 << 31)
        out.append(words[state % len(words)] + (".\n" if state % 11 == 0 else " "))
    path.write_text("".join(out))
    return path


def http_get(url: str) -> Tuple[int, bytes]:
    """(status, body) of a GET on loopback; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def log_records(path: Path, kind: Optional[str] = None) -> List[dict]:
    """The JSON records of a node's log (--log-format json), all or those whose "event" is ``kind``."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # progress bars and other non-JSON output
        if isinstance(entry, dict) and (kind is None or entry.get("event") == kind):
            found.append(entry)
    return found


def child_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMMONS_")}
    # Several nodes share two cores: one BLAS/OpenMP thread each avoids oversubscription stalls.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


class NodeProcess:
    """One real process (``python -m node ...`` or a test harness) in its own process group."""

    def __init__(
        self,
        argv: Sequence[str],
        cwd: Path,
        name: str,
        env: Optional[Dict[str, str]] = None,
        interactive: bool = False,
    ) -> None:
        self.name = name
        self.cwd = Path(cwd)
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.log_path = self.cwd / f"{name}.stderr.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            list(argv),
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
            env=env or child_env(),
            start_new_session=True,
        )
        self.stdout_lines: List[str] = []
        self.ready: Optional[dict] = None
        self._buffer = b""

    @classmethod
    def node(cls, args: Sequence[str], cwd: Path, name: str) -> "NodeProcess":
        return cls([sys.executable, "-m", "node", *args], cwd, name)

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Block until the process prints its JSON ready line (never parses log text)."""
        self.ready = self.next_event(timeout, kind="ready")
        return self.ready

    def next_event(self, timeout: float = 60.0, kind: Optional[str] = None) -> dict:
        """The next JSON line on stdout (of ``kind``, when given, skipping others)."""
        deadline = time.monotonic() + timeout
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
        try:
            while True:
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    text = line.decode()
                    self.stdout_lines.append(text)
                    event = json.loads(text)
                    if kind is None or event.get("event") == kind:
                        return event
                if time.monotonic() >= deadline:
                    break
                if not selector.select(timeout=0.2):
                    if self.proc.poll() is not None:
                        break
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
                if not chunk:
                    break
                self._buffer += chunk
        finally:
            selector.close()
        what = f"a {kind} line" if kind else "a line"
        raise AssertionError(f"{self.name} printed no {what} in {timeout}s; stderr:\n{self.stderr_tail()}")

    def send(self, command: dict) -> None:
        """One JSON command on the process's stdin (``interactive=True``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()

    def events(self, kind: str) -> List[dict]:
        """The node's JSON log records (--log-format json) whose "event" field is ``kind``."""
        return log_records(self.log_path, kind)

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def maddr(self) -> str:
        assert self.ready is not None
        return self.ready["maddrs"][0]

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, as a user or init system would send; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, power loss); returns once every member has exited."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.leftovers(wait=5.0)  # the signal reaches the other members asynchronously

    def leftovers(self, wait: float = 0.0) -> List[int]:
        """Live processes (zombies excluded) still in this process's group, after up to ``wait`` s for it to empty."""
        deadline = time.monotonic() + wait
        leaked = in_process_group(self.proc.pid)
        while leaked and time.monotonic() < deadline:
            time.sleep(0.05)
            leaked = in_process_group(self.proc.pid)
        return leaked

    def cleanup(self) -> List[int]:
        """Stop everything this process started; return what had leaked before we killed it."""
        if self.proc.poll() is None:
            self.kill()
        leaked = self.leftovers(wait=5.0)
        if leaked:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        if self.proc.stdout:
            self.proc.stdout.close()
        if self.proc.stdin:  # interactive: the process has exited, so a command still buffered cannot land
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        return leaked
