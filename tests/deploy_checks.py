"""What the deploy assets' tests compare with: the node's flags, variables, ports and HTTP paths, read from the
code (never written here), and the checks tests/unit/test_deploy_assets.py and test_deploy_kubernetes.py share."""

from __future__ import annotations

import io
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Set, Tuple

import pytest
from prometheus_client import CollectorRegistry

from node.faces.cli import build_parser
from node.ops import endpoints
from node.ops.endpoints import Endpoints, Health
from node.runtime import ENV_PREFIX, NodeConfig, build_config
from protocol.manifest import load_manifest
from tests.unit.test_cli_surface import long_flags, subcommands

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


# --- what the node has, read from the code -------------------------------------------------------------------
def start_flags() -> Set[str]:
    return long_flags(subcommands(build_parser())["start"])


def option_variables() -> Set[str]:
    """Every variable `node start` reads: COMMONS_<FIELD> for each NodeConfig field, and COMMONS_CONFIG."""
    return {ENV_PREFIX + name.upper() for name in NodeConfig.field_names()} | {ENV_PREFIX + "CONFIG"}


def round_seconds() -> float:
    """The longest a round can take on the default manifest: what a stop has to wait for, at most."""
    return load_manifest().averaging.round_timeout_seconds


def port_of_maddr(maddr: str) -> int:
    parts = maddr.strip("/").split("/")
    return int(parts[parts.index("tcp") + 1])


def port_of_addr(host_port: str) -> int:
    return int(host_port.rpartition(":")[2])


class _NoServer:
    """Stands in for the HTTP server: the Endpoints build their handler, and nothing listens."""

    daemon_threads = False

    def __init__(self, address: Tuple[str, int], handler: type) -> None:
        self.server_address, self.handler = address, handler

    def serve_forever(self) -> None:
        pass

    def server_close(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def served_paths() -> Set[str]:
    """The paths node/ops/endpoints.py answers (anything but 404), asked of its own request handler."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(endpoints, "ThreadingHTTPServer", _NoServer)
        made = Endpoints("127.0.0.1", 0, CollectorRegistry(), CollectorRegistry(), Health(stall_seconds=1.0),
                         page=lambda: {"node": {"peer_id": "Qm"}})  # fmt: skip
        handler = made._server.handler  # type: ignore[attr-defined]

        def status(path: str) -> int:
            answer = handler.__new__(handler)
            codes: List[int] = []
            answer.path, answer.wfile = path, io.BytesIO()
            answer.send_response = lambda code, message=None: codes.append(code)
            answer.send_header = lambda *_: None
            answer.end_headers = lambda: None
            answer.do_GET()
            return codes[0]

        candidates = ("/", "/metrics", "/metrics/swarm", "/healthz", "/readyz", "/status.json", "/nothing-here")
        return {path for path in candidates if status(path) != 404}



# --- shared checks -------------------------------------------------------------------------------------------
def node_start_flags(argv: Sequence[str]) -> List[str]:
    """The flags of a `node start` command line (`node start ...`, `python -m node start ...`)."""
    words = list(argv)
    at = next((i for i in range(len(words) - 1) if words[i].endswith("node") and words[i + 1] == "start"), None)
    assert at is not None and (words[at] == "node" or words[at - 1] == "-m"), f"not a `node start`: {argv}"
    return [word.partition("=")[0] for word in words[at + 2 :] if word.startswith("--")]


def check_start_command(argv: Sequence[str], where: str) -> None:
    unknown = set(node_start_flags(argv)) - start_flags()
    assert not unknown, f"{where}: `node start` has no {sorted(unknown)}"


def check_environment(variables: Mapping[str, str], where: str) -> NodeConfig:
    """Every COMMONS_* name is an option's variable, and the values build a valid config (ConfigError otherwise)."""
    unknown = {name for name in variables if name.startswith(ENV_PREFIX)} - option_variables()
    assert not unknown, f"{where}: `node start` reads no {sorted(unknown)}"
    return build_config({}, environ={k: v for k, v in variables.items() if k != ENV_PREFIX + "CONFIG"})


def check_inside(paths: Sequence[Optional[str]], directory: str, where: str) -> None:
    for path in paths:
        assert path and Path(path).is_relative_to(directory), f"{where}: {path} is not in {directory}"
