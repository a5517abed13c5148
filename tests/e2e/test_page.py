"""End to end: the swarm page of a real node, in a real headless browser (Debian's chromium).

Two `node start` processes train a few rounds together; chromium loads the first node's `/`, lets the page's
script fetch `/status.json` and render (virtual time), and prints the DOM, which must show both peers and a
loss curve and no error. A screenshot is kept as a test artifact (COMMONS_TEST_ARTIFACTS, default
test-artifacts/ at the repository root) for a person to look at.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List

import pytest

from node.ops.procs import in_process_group
from tests.conftest import require_programs
from tests.procs import REPO, NodeProcess, http_get, write_text_corpus, write_tiny_manifest

pytestmark = pytest.mark.e2e

INSTALL = "sudo apt-get install --no-install-recommends chromium"


@pytest.fixture(scope="session")
def chromium_bin() -> str:
    """Debian's chromium (`make test` installs it: system-packages)."""
    return require_programs(("chromium",), f"install Debian's chromium package ({INSTALL})")["chromium"]


class Dom(HTMLParser):
    """What the test reads of the rendered page: elements by id (attributes and text), and the peer ids shown."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: Dict[str, Dict[str, str]] = {}
        self.text: Dict[str, str] = {}
        self.peer_ids: List[str] = []
        self._open: List[str] = []  # ids (or "") of the open elements, innermost last
        self._peer_span = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self._peer_span = "peer-id" in attributes.get("class", "").split()
        if "id" in attributes:
            self.by_id[attributes["id"]] = attributes
            self.text.setdefault(attributes["id"], "")
        if tag not in ("path", "circle", "line", "meta", "br"):  # void or self-closed in the dump
            self._open.append(attributes.get("id", ""))

    def handle_endtag(self, tag: str) -> None:
        if self._open and tag not in ("path", "circle", "line", "meta", "br"):
            self._open.pop()
        self._peer_span = False

    def handle_data(self, data: str) -> None:
        if self._peer_span:
            self.peer_ids.append(data)
        for element in self._open:
            if element:
                self.text[element] += data


def chromium(binary: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """One headless chromium run in its own session; every process it started is gone when this returns."""
    argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-crash-reporter", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
            *extra, url]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None or in_process_group(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def artifacts() -> Path:
    directory = Path(os.environ.get("COMMONS_TEST_ARTIFACTS", REPO / "test-artifacts"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def test_the_swarm_page_shows_both_peers_and_the_loss_curve(tmp_path, chromium_bin):
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml", experts=2, steps=10)
    nodes: List[NodeProcess] = []
    try:
        for name, seed in (("first", 1), ("second", 2)):
            corpus = write_text_corpus(tmp_path / f"{name}.txt", seed=seed)
            args = ["start", "--manifest", str(manifest), "--data", str(corpus), "--experts", "1",
                    "--metrics-addr", "127.0.0.1:0", "--eval-share", "1", "--log-format", "json"]  # fmt: skip
            if nodes:
                args += ["--initial-peers", nodes[0].maddr]
            nodes.append(NodeProcess.node(args, tmp_path / name, name))
            nodes[-1].wait_ready()
        ids = [n.ready["peer_id"] for n in nodes]
        page = nodes[0].ready["metrics_url"].rsplit("/metrics", 1)[0] + "/"

        # Two rounds of the first node (two points on its curve), one of the second, and both in the first's view.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = json.loads(http_get(page + "status.json")[1] or b"{}")
            seen = {p["peer_id"] for p in status.get("peers", [])}
            if len(status.get("rounds", [])) >= 2 and nodes[1].events("round") and set(ids) <= seen:
                break
            time.sleep(1)
        else:
            pytest.fail(f"no two rounds with both peers in view; {[n.stderr_tail() for n in nodes]}")
        code, body = http_get(page)
        assert code == 200 and body.startswith(b"<!doctype html>")

        dom = Dom(chromium(chromium_bin, page, tmp_path / "profile-dom", "--dump-dom").stdout)
        assert set(ids) <= set(dom.peer_ids), dom.peer_ids
        assert dom.text["my-peer-id"] == ids[0]
        curve = dom.by_id["loss-curve"]
        assert int(curve["data-points"]) >= 2 and curve["d"].count("L") >= 1, curve
        assert "hidden" in dom.by_id["error"] and dom.text["error"] == "", dom.text["error"]
        assert dom.text["live"] == "live"
        assert dom.text["swarm-id"] == "swarm " + nodes[0].ready["swarm_id"]

        shot = artifacts() / "swarm-page.png"
        shot.unlink(missing_ok=True)
        chromium(chromium_bin, page, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,1800")
        assert shot.stat().st_size > 10_000
        print(f"screenshot of the swarm page: {shot}")

        for node in nodes:
            assert node.terminate() == 0, node.stderr_tail()
    finally:
        leaks = {n.name: n.cleanup() for n in nodes}
    assert not any(leaks.values()), leaks
