"""The container's entry command, run on the host as deploy/Dockerfile says (no image is built here).

Read from the Dockerfile (tests/containers/dockerfile.py), so that a change there is what runs here:

- the command line: ENTRYPOINT then CMD, with this virtualenv's python for the image's ``python`` (which
  is the image's virtualenv's, by PATH);
- the environment: ENV's COMMONS_* and PYTHON* variables (PATH, VIRTUAL_ENV and PIP_* describe the image's
  file system); the image's state volume (VOLUME, also its WORKDIR) becomes a temporary directory wherever a
  value names it, and every port becomes 0, a free one, as a fixed port on a shared machine may be taken.
  The hosts stay: the metrics server must listen on 0.0.0.0. The test adds what a user's ``-e`` would: a tiny
  manifest, its text, one expert;
- the HEALTHCHECK command, with the same substitutions and the metrics port the node got;
- STOPSIGNAL, which must end the node with exit code 0 and leave no process behind.

The containers tier (tests/containers) builds the image and runs the same command in containers.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Dict

import pytest

from tests.containers.dockerfile import read_image
from tests.procs import NodeProcess, child_env, http_get, log_records, write_text_corpus, write_tiny_manifest

pytestmark = pytest.mark.e2e


def host_environment(image_env: Dict[str, str], volume: str, state: Path) -> Dict[str, str]:
    env = {}
    for name, value in image_env.items():
        if name.startswith(("COMMONS_", "PYTHON")):
            value = value.replace(volume, str(state))
            value = re.sub(r"/tcp/\d+", "/tcp/0", value)  # a multiaddr's port
            env[name] = re.sub(r"^(.+):\d+$", r"\1:0", value)  # HOST:PORT
    return env


def on_host(command: list) -> list:
    assert command and command[0] == "python", f"the image runs {command!r}: expected `python ...`"
    return [sys.executable, *command[1:]]


def test_container_entry_command_serves_health_and_leaves_on_its_stop_signal(tmp_path):
    image = read_image()
    assert image.volumes, "the image keeps its state in no volume"
    volume = image.volumes[0]
    state = tmp_path / "state"
    (state / "checkpoints").mkdir(parents=True)  # the image creates it too
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml", experts=2, steps=10)
    corpus = write_text_corpus(tmp_path / "text.txt")
    env = host_environment(image.env, volume, state)
    assert env["COMMONS_METRICS_ADDR"].startswith("0.0.0.0:"), "inside a container, metrics must listen on 0.0.0.0"
    env.update(COMMONS_MANIFEST=str(manifest), COMMONS_DATA=str(corpus), COMMONS_EXPERTS="1")
    node = NodeProcess(on_host(image.command), state, "entry", env=child_env(**env))
    try:
        ready = node.wait_ready(timeout=120)
        metrics = urllib.parse.urlparse(ready["metrics_url"])
        # The ready line names a URL a browser can open (not the unroutable 0.0.0.0); the socket listens
        # on every interface, as a container's port mapping needs.
        assert metrics.hostname == "127.0.0.1", ready["metrics_url"]
        assert listening_on_every_interface(metrics.port), f"nothing listens on 0.0.0.0:{metrics.port}"
        healthz = f"http://127.0.0.1:{metrics.port}/healthz"
        deadline = time.monotonic() + 90
        while http_get(healthz)[0] != 200 and time.monotonic() < deadline and node.proc.poll() is None:
            time.sleep(0.5)  # healthy from the first training step on
        assert http_get(healthz)[0] == 200, node.stderr_tail()

        check_env = child_env(**dict(env, COMMONS_METRICS_ADDR=f"0.0.0.0:{metrics.port}"))
        check = subprocess.run(on_host(image.healthcheck), env=check_env, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"HEALTHCHECK failed: {check.stderr}"

        identity = Path(env["COMMONS_IDENTITY"])
        assert identity.parent == state and identity.is_file(), "the identity key belongs in the state volume"
        assert log_records(node.log_path), "COMMONS_LOG_FORMAT=json: stderr holds JSON records"

        node.proc.send_signal(getattr(signal, image.stop_signal))
        assert node.proc.wait(timeout=30) == 0, node.stderr_tail()
        assert node.leftovers(wait=5.0) == [], "the node left processes behind"
    finally:
        leaks = node.cleanup()
        assert not leaks, leaks


def listening_on_every_interface(port: int) -> bool:
    """A TCP socket listens on 0.0.0.0:``port`` (from /proc/net/tcp: local address 00000000, state 0A)."""
    wanted = f"00000000:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == "0A":
            return True
    return False
