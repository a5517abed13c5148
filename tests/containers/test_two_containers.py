"""Two containers of deploy/Dockerfile's image on a network of the test's own train together and stop cleanly.

The second joins the first through COMMONS_INITIAL_PEERS with the first's address on that network; both
reach rounds averaged together (their JSON round log lines), HEALTHCHECK reports healthy, and `podman stop`
(SIGTERM) ends both with exit code 0. Each container runs attached (`podman run` in the foreground), so its
stdout (the ready line) and stderr (the JSON log) arrive apart, as from a `node` process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List

import pytest

from tests.containers import podman
from tests.containers.dockerfile import read_image
from tests.procs import NodeProcess, write_text_corpus, write_tiny_manifest

pytestmark = pytest.mark.containers

SHARE = "/swarm"  # where the test's manifest and text are mounted, read-only


def run_container(scope: podman.Scope, role: str, network: str, share: Path, tmp: Path, **env: str) -> NodeProcess:
    name = scope.name(role)
    argv = ["podman", "run", "--name", name, "--network", network, "--volume", f"{share}:{SHARE}:ro"]
    settings = {"COMMONS_MANIFEST": f"{SHARE}/manifest.yaml", "COMMONS_DATA": f"{SHARE}/{role}.txt",
                "COMMONS_EXPERTS": "1", **env}  # fmt: skip
    for key, value in settings.items():
        argv += ["--env", f"{key}={value}"]
    return NodeProcess([*argv, podman.NODE_IMAGE], tmp / role, name, env=podman.environment())


def address_on(container: str, network: str) -> str:
    networks = json.loads(podman.run("inspect", "--format", "{{json .NetworkSettings.Networks}}", container))
    return networks[network]["IPAddress"]


def averaged_rounds(node: NodeProcess) -> List[int]:
    return [e["round"] for e in node.events("round") if e["trunk_group"] == 2 and e["trunk_fraction"] == 1.0]


def state(container: str) -> Dict[str, object]:
    return json.loads(podman.run("inspect", "--format", "{{json .State}}", container))


def test_two_containers_train_together_report_healthy_and_stop_cleanly(images, scope, tmp_path):
    image = read_image()
    p2p_port = image.env["COMMONS_HOST_MADDRS"].rsplit("/", 1)[1]
    assert f"{p2p_port}/tcp" in image.exposed and image.env["COMMONS_LOG_FORMAT"] == "json"
    share = tmp_path / "share"
    share.mkdir(mode=0o755)  # read by the image's non-root user
    write_tiny_manifest(share / "manifest.yaml", experts=2, steps=10)
    for seed, role in enumerate(("first", "second")):
        write_text_corpus(share / f"{role}.txt", seed=seed)
    network = scope.network()
    nodes: List[NodeProcess] = []
    try:
        nodes.append(run_container(scope, "first", network, share, tmp_path))
        first = nodes[0].wait_ready(timeout=180)
        peer = f"/ip4/{address_on(nodes[0].name, network)}/tcp/{p2p_port}/p2p/{first['peer_id']}"
        assert peer in first["maddrs"], first["maddrs"]
        nodes.append(run_container(scope, "second", network, share, tmp_path, COMMONS_INITIAL_PEERS=peer))
        second = nodes[1].wait_ready(timeout=180)
        assert second["swarm_id"] == first["swarm_id"] and second["peer_id"] != first["peer_id"]

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not all(len(averaged_rounds(n)) >= 2 for n in nodes):
            time.sleep(1)
        assert all(len(averaged_rounds(n)) >= 2 for n in nodes), [n.stderr_tail() for n in nodes]

        for node in nodes:  # what the image's HEALTHCHECK runs, run now (no systemd here to schedule it)
            podman.run("healthcheck", "run", node.name)
            assert state(node.name)["Health"]["Status"] == "healthy"

        started = time.monotonic()
        podman.run("stop", "--time", "30", *(n.name for n in nodes), timeout=90)
        assert time.monotonic() - started < 25, "SIGTERM took too long: the stop fell back to SIGKILL"
        for node in nodes:
            assert node.proc.wait(timeout=30) == 0, node.stderr_tail()
            assert state(node.name)["ExitCode"] == 0
            assert node.proc.stdout is not None
            assert node.proc.stdout.read().strip() == b"", "stdout holds the ready line only"
    finally:
        leaks = {n.name: n.cleanup() for n in nodes}
        assert not any(leaks.values()), leaks
