"""deploy/ refers only to what the node has: flags, COMMONS_* variables, ports, HTTP paths and state paths.

Every list is read from the code, never written here: `node start`'s flags from ``build_parser()``, the
variables from NodeConfig's fields, the HTTP paths from the handler of node/ops/endpoints.py, the exit
codes from node.errors, a round's length from the default manifest. A renamed option, port or path
fails here. Assets: the systemd unit and its environment file, node.example.yaml, deploy/Dockerfile and
deploy/compose.yaml; the Kubernetes manifests: tests/unit/test_deploy_kubernetes.py. What the assets are
compared with, and the shared checks: tests/deploy_checks.py.

`systemd-analyze verify` and `security` of the unit: tests/system/test_systemd.py.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest
import yaml

from node.errors import EXIT_CODES, ConfigError, DataPathError, PeerUnreachable, SwarmMismatch
from node.runtime import NodeConfig
from node.runtime.config import read_values
from tests.containers.dockerfile import Image, read_image
from tests.deploy_checks import (
    DEPLOY,
    check_environment,
    check_inside,
    check_start_command,
    option_variables,
    port_of_addr,
    port_of_maddr,
    round_seconds,
    start_flags,
)

UNIT = DEPLOY / "commons-node.service"
ENV_FILE = DEPLOY / "commons-node.env"
EXAMPLE_YAML = DEPLOY / "node.example.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"


def test_served_paths_come_from_the_handler(served: Set[str]) -> None:
    assert {"/metrics", "/healthz", "/readyz"} <= served and "/nothing-here" not in served


def test_every_commons_variable_in_deploy_is_an_option() -> None:
    """Text and comments included. compose.yaml's own ${COMMONS_...} settings are interpolated by compose and
    never reach a node, so they (and their mentions in that file) are exempt."""
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        text = path.read_text(errors="replace")
        exempt = set(re.findall(r"\$\{(COMMONS_\w+)", text)) if path == COMPOSE else set()
        unknown = set(re.findall(r"\bCOMMONS_[A-Z0-9_]*[A-Z0-9]\b", text)) - option_variables() - exempt
        assert not unknown, f"{path.relative_to(DEPLOY)}: `node start` reads no {sorted(unknown)}"


# --- systemd -------------------------------------------------------------------------------------------------
def unit_settings() -> Dict[str, List[str]]:
    """``Key: [values...]`` of the unit's [Service] section (a key may repeat)."""
    settings: Dict[str, List[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def env_file_assignments(text: str) -> Dict[str, str]:
    """KEY=VALUE lines of an environment file, the commented-out examples included."""
    return {m[1]: m[2] for m in re.finditer(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", text, re.M)}


def test_unit_runs_node_start_with_its_flags() -> None:
    (exec_start,) = unit_settings()["ExecStart"]
    check_start_command(shlex.split(exec_start), "commons-node.service ExecStart")


def test_unit_restarts_only_what_a_restart_can_fix() -> None:
    settings = unit_settings()
    assert settings["Restart"] == ["on-failure"]  # not after exit 0: SIGTERM and --max-rounds end cleanly
    prevented = {int(code) for code in settings["RestartPreventExitStatus"][0].split()}
    assert prevented == {ConfigError.exit_code, DataPathError.exit_code, SwarmMismatch.exit_code}
    assert prevented < set(EXIT_CODES) and PeerUnreachable.exit_code not in prevented


def test_unit_waits_longer_than_a_round_to_stop() -> None:
    settings = unit_settings()
    assert float(settings["TimeoutStopSec"][0]) > round_seconds()
    assert settings["KillMode"] == ["mixed"]  # SIGTERM to the node alone: it stops its DHT process and p2pd


def test_unit_paths_are_the_ones_its_files_name() -> None:
    settings = unit_settings()
    (environment_file,) = settings["EnvironmentFile"]
    assert environment_file.lstrip("-") in ENV_FILE.read_text()  # the example says where it goes
    config = shlex.split(settings["ExecStart"][0])
    config_file = config[config.index("--config") + 1]
    assert Path(config_file).parent == Path("/etc") / settings["ConfigurationDirectory"][0]
    state = f"/var/lib/{settings['StateDirectory'][0]}"
    assert settings["WorkingDirectory"] == ["%S/" + settings["StateDirectory"][0]]
    # ProtectSystem=strict: the state directory is the only persistent place the node can write (or read
    # outside the system's own files), so the example config keeps everything there.
    example = read_values(yaml.safe_load(EXAMPLE_YAML.read_text()), str(EXAMPLE_YAML))
    check_inside([example.get("identity"), example.get("checkpoint_dir"), example.get("data")], state, "node.yaml")


def test_env_file_sets_only_options_with_valid_values() -> None:
    variables = env_file_assignments(ENV_FILE.read_text())
    assert len(variables) >= 5
    check_environment(variables, ENV_FILE.name)


def test_example_config_keys_are_options_with_valid_values() -> None:
    text = EXAMPLE_YAML.read_text()
    commented = set(re.findall(r"^#\s*([a-z][a-z_]*):\s*\S", text, re.M))
    assert commented <= set(NodeConfig.field_names())
    NodeConfig(**read_values(yaml.safe_load(text), str(EXAMPLE_YAML)))  # ConfigError for a bad key or value


# --- deploy/Dockerfile and deploy/compose.yaml (written alongside; checked when they exist) -------------------
def image() -> Image:
    """What deploy/Dockerfile sets (tests/containers/dockerfile.py reads it as a container runtime would)."""
    if not DOCKERFILE.exists():
        pytest.skip("deploy/Dockerfile does not exist")
    return read_image(DOCKERFILE)


def test_dockerfile_runs_node_start_with_valid_options(served: Set[str]) -> None:
    node = image()
    config = check_environment(node.env, "deploy/Dockerfile ENV")
    check_start_command(node.command, "deploy/Dockerfile")
    exposed = {int(p.split("/")[0]) for p in node.exposed}
    assert exposed == {port_of_maddr(config.host_maddrs[0]), port_of_addr(config.metrics_addr)}
    (volume,) = node.volumes
    check_inside([config.identity, config.checkpoint_dir], volume, "deploy/Dockerfile")
    healthcheck = " ".join(node.healthcheck)
    assert set(re.findall(r"(/[a-z][a-z/.]*)'", healthcheck)) <= served and "/healthz" in healthcheck



def compose_nodes() -> Dict[str, Dict[str, Any]]:
    """The compose services that run the node image (built from deploy/Dockerfile)."""
    if not COMPOSE.exists():
        pytest.skip("deploy/compose.yaml does not exist")
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    return {name: s for name, s in services.items() if s.get("build", {}).get("dockerfile") == "deploy/Dockerfile"}


def test_compose_runs_node_start_with_valid_options(served: Set[str]) -> None:
    nodes = compose_nodes()
    assert nodes
    node = image()
    for name, service in nodes.items():
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        config = check_environment({**node.env, **environment}, f"compose.yaml {name}")
        argv = list(service.get("entrypoint") or node.entrypoint) + list(
            service.get("command") or ([] if service.get("entrypoint") else node.cmd)
        )
        if argv[:2] == ["python", "-c"]:  # a script that ends in exec of `node start`: its literal words
            script = argv[2]
            assert re.search(r'"-m",\s*"node",\s*"start"', script), f"compose.yaml {name}: no `node start`"
            unknown = set(re.findall(r'"(--[a-z][a-z-]*)"', script)) - start_flags()
            assert not unknown, f"compose.yaml {name}: `node start` has no {sorted(unknown)}"
            for port, path in re.findall(r"http://[\w.-]+:(\d+)(/[\w./]*)", script):
                assert int(port) == port_of_addr(config.metrics_addr) and path in served
        else:
            check_start_command(argv, f"compose.yaml {name}")
        for mapping in service.get("ports", []):
            assert int(str(mapping).rpartition(":")[2].split("/")[0]) in {
                port_of_maddr(config.host_maddrs[0]), port_of_addr(config.metrics_addr)}  # fmt: skip
        targets = [str(v).split(":")[1] for v in service.get("volumes", [])]
        assert any(config.identity and Path(config.identity).is_relative_to(t) for t in targets), name


def test_compose_gives_a_stopping_node_longer_than_a_round() -> None:
    """A SIGTERM lets the round in flight finish or be abandoned and a checkpoint be written: the grace
    period must outlast a round of the shipped manifest, as the systemd unit's TimeoutStopSec does."""
    periods = {name: str(s.get("stop_grace_period", "10s")) for name, s in compose_nodes().items()}
    assert periods
    for name, period in periods.items():
        assert period.endswith("s") and float(period[:-1]) > round_seconds(), (name, period)


def test_the_image_pins_every_dependency_the_node_declares() -> None:
    """deploy/constraints.txt (tests/containers/constraints.py writes it) pins each of setup.cfg's
    install_requires, and only with ==: the image's build gets the versions tested."""
    from tests.containers.constraints import normalized, roots

    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and re.fullmatch(r"[\w.!+-]+", version), f"not an exact pin: {line!r}"
            pins[normalized(name)] = version
    assert {normalized(name) for name in roots()} <= set(pins), sorted(set(map(normalized, roots())) - set(pins))
    assert "COPY deploy/constraints.txt" in DOCKERFILE.read_text() and "-c constraints.txt" in DOCKERFILE.read_text()
