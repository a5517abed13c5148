"""The Python API: a Commons node inside your own process (a notebook, a script).

    from node import CommonsNode
    with CommonsNode(experts=2) as me:          # keyword arguments = `node start` options
        me.train(rounds=3)                      # foreground, with a tqdm.auto progress bar
        print(me.status(), me.swarm())          # plain data (me.swarm(as_dataframe=True) with pandas)
        print(me.sample("def main("))           # text from the current model

The node's networking runs on its own threads, never on the caller's event loop, so it
works in Jupyter's already-running loop. ``start()`` trains in the background instead and
returns at once. ``stop()`` (also on ``with`` exit and at interpreter exit) leaves the
swarm and stops every helper process.
"""

from __future__ import annotations

import atexit
import math
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import torch

from node.errors import CommonsError
from node.faces.status import swarm_status
from node.runtime import Node, RoundSummary, build_config, read_config_file
from node.training import ModelFactory

if TYPE_CHECKING:
    from node.runtime import Joined


NOTEBOOK_EVAL_SHARE = 1.0  # the API's default --eval-share: score the held-out split after every round


class StateError(CommonsError, RuntimeError):
    """A method was called in a state where it cannot work; the message says what to do."""


class CommonsNode:
    """One node of a swarm, driven from Python. Options are the `node start` options."""

    def __init__(
        self, config: Union[str, Path, None] = None, *, model_factory: Optional[ModelFactory] = None, **options: Any
    ) -> None:
        """``config``: a YAML file of options; ``options`` override it (e.g. ``initial_peers=[...]``).
        ``model_factory(manifest) -> torch.nn.Module``: your own model (see node.training.SwarmModel)."""
        flags = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in options.items()}
        if "eval_share" not in flags and not (config and "eval_share" in read_config_file(str(config))):
            # `node start` keeps scoring under 1% of wall time; a notebook trains a few rounds and plots their
            # held-out loss, so here every round is scored unless asked otherwise.
            flags["eval_share"] = NOTEBOOK_EVAL_SHARE
        self.config = build_config(flags, config_path=str(config) if config else None, environ={})
        self._node = Node(self.config, model_factory=model_factory)
        self._state = "created"  # created -> open -> (training) -> stopped
        self._lock = threading.Lock()
        self._background: Optional[threading.Thread] = None
        self._background_error: Optional[BaseException] = None
        self._opened = threading.Event()
        self._final: Optional[Dict[str, Any]] = None
        atexit.register(_stop_quietly, weakref.ref(self))

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> "CommonsNode":
        """Join and train in the background until ``stop()``; returns at once."""
        with self._lock:
            self._require("created", "open", action="start()")
            if self._background is not None:
                raise StateError("this node is already training in the background; call stop() to end it")
            self._background = threading.Thread(target=self._run_background, name="commons-node", daemon=True)
            self._background.start()
        return self

    def wait_ready(self, timeout: float = 120.0) -> Dict[str, Any]:
        """Block until the node has joined; return its ready event (peer_id, maddrs, swarm_id, ...)."""
        if self._state == "created" and self._background is None:
            self._open()
        if not self._opened.wait(timeout):
            raise StateError(f"the node did not join within {timeout:.0f}s")
        if self._background_error is not None:
            raise self._background_error
        return self._node.ready_event()

    def train(
        self, *, steps: Optional[int] = None, rounds: Optional[int] = None, progress: bool = True
    ) -> List[RoundSummary]:
        """Train in the calling thread for ``steps`` local steps or ``rounds`` averaging rounds.

        Returns the summaries of the rounds finished meanwhile (loss, eval loss, group sizes, times).
        """
        if (steps is None) == (rounds is None):
            raise ValueError("pass exactly one of steps=N or rounds=N")
        if self._background is not None and self._background.is_alive():
            raise StateError("this node is training in the background; stop() it, or read status() meanwhile")
        self._open()
        done_before = len(self._node.history)
        total = steps if steps is not None else (rounds or 0) * self._node.manifest.training.inner_steps
        bar = _progress_bar(total, progress)
        try:
            self._node.run(max_rounds=rounds, max_steps=steps, on_step=lambda loss: _advance(bar, loss))
        finally:
            if bar is not None:
                bar.close()
        return self._node.history[done_before:]

    def stop(self) -> None:
        """Leave the swarm and stop every helper process. Safe to call twice."""
        with self._lock:
            if self._state == "stopped":
                return
            self._node.stop()
            thread = self._background
        if thread is not None:
            thread.join(timeout=60)
        self._final = {**self.status(), "state": "stopped"}  # the last real figures, for status() after stop()
        self._node.close()
        self._state = "stopped"

    def __enter__(self) -> "CommonsNode":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- looking at it ----------------------------------------------------------------
    def status(self) -> Dict[str, Any]:
        """This node, as plain data."""
        if self._state == "stopped" and self._final is not None:
            return dict(self._final)
        joined = self._node.joined if self._state == "open" else None
        state = self._state if not (self._background and self._background.is_alive()) else "training"
        if joined is None:
            return {"state": state, "peer_id": None, "swarm_id": self._node.manifest.swarm_id, "outer_round": 0,
                    "rounds_done": 0, "local_steps": 0, "loss": None, "eval_loss": None,
                    "modules": ["trunk"]}  # fmt: skip
        progress = joined.progress
        return {
            "state": state,
            "peer_id": joined.peer_id,
            "swarm_id": joined.swarm_id,
            "outer_round": progress.outer_round,
            "rounds_done": progress.rounds_done,
            "local_steps": joined.trainer.local_steps,
            "loss": joined.trainer.loss_ema,
            "eval_loss": progress.last_eval_loss,
            "modules": joined.hosting.modules,
        }

    def swarm(self, as_dataframe: bool = False) -> Any:
        """The swarm as the DHT shows it: the `node status --json` shape, or a pandas DataFrame of peers (with
        ``last_seen`` as a UTC timestamp)."""
        joined = self._joined("swarm()")
        status = swarm_status(joined.refresh_view(), joined.swarm_id, joined.module_names)
        if not as_dataframe:
            return status
        try:
            import pandas as pd
        except ImportError:
            raise StateError("as_dataframe=True needs pandas: pip install 'commons-node[notebook]'") from None
        peers = pd.DataFrame(status["peers"])
        if "last_seen" in peers:  # unix seconds in the plain data; a time a reader can read in a table
            peers["last_seen"] = pd.to_datetime(peers["last_seen"], unit="s", utc=True)
        return peers

    @property
    def model(self) -> torch.nn.Module:
        """The live model (a reference: copy.deepcopy it for a snapshot)."""
        model: torch.nn.Module = self._joined("model").trainer.model
        return model

    def evaluate(self, text: str) -> float:
        """Mean next-byte cross entropy (nats/byte) of the current model on ``text``."""
        joined = self._joined("evaluate()")
        with joined.model_lock:
            return joined.trainer.evaluate_text(text)

    def sample(self, prompt: str = "", max_bytes: int = 200, temperature: float = 0.8, seed: int = 0) -> str:
        """Text the current model writes after ``prompt`` (bytes it cannot decode are replaced). A custom model
        needs ``forward(tokens)`` returning next-byte logits, or a ``generate`` of its own (SwarmModel);
        TypeError otherwise."""
        joined = self._joined("sample()")
        with joined.model_lock:
            return joined.trainer.sample(prompt, max_bytes, temperature, seed)

    # --- internals ----------------------------------------------------------------------
    def _open(self) -> None:
        with self._lock:
            if self._state == "created":
                self._node.open()
                self._node.announce_ready()
                self._state = "open"
                self._opened.set()
            self._require("open", action="train()")

    def _run_background(self) -> None:
        try:
            self._open()
            self._node.run()
        except BaseException as e:  # surfaced by wait_ready()/status(); the thread must not die silently
            self._background_error = e
            self._opened.set()

    def _joined(self, action: str) -> "Joined":
        """The joined node, for a call that needs one; StateError saying what to do otherwise."""
        self._require("open", action=action)
        joined = self._node.joined
        assert joined is not None  # "open" means joined
        return joined

    def _require(self, *states: str, action: str) -> None:
        if self._state in states:
            return
        if self._state == "stopped":
            raise StateError(f"{action}: this node was stopped; create a new CommonsNode")
        raise StateError(f"{action}: the node has not joined yet; call start() and wait_ready(), or train()")


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc="training")


def _advance(bar: Any, loss: float) -> None:
    if bar is not None:
        bar.update(1)
        if not math.isnan(loss):
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)


def _stop_quietly(ref: "weakref.ref[CommonsNode]") -> None:
    node = ref()
    if node is not None:
        try:
            node.stop()
        except Exception:
            pass
