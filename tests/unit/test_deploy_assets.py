"""deploy/ refers only to what the node has: flags, COMMONS_* variables, ports, HTTP paths and state paths.

Every list is read from the code, never written here: `node start`'s flags from ``build_parser()``, the
variables from NodeConfig's fields, the HTTP paths from the handler of node/ops/endpoints.py, the exit
codes from node.errors, a round's length from the default manifest. A renamed option, port or path
fails here. Assets: the systemd unit and its environment file, node.example.yaml, the Kubernetes manifests
(validated against Kubernetes' own JSON schemas by kubernetes-validate, offline) and their join script,
and deploy/Dockerfile and deploy/compose.yaml where they exist.

`systemd-analyze verify` and `security` of the unit: tests/system/test_systemd.py.
"""

from __future__ import annotations

import importlib.util
import io
import re
import shlex
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from prometheus_client import CollectorRegistry

from node.errors import EXIT_CODES, ConfigError, DataPathError, PeerUnreachable, SwarmMismatch
from node.faces.cli import build_parser
from node.net import validate_peer_maddr
from node.ops import endpoints
from node.ops.endpoints import DEFAULT_METRICS_ADDR, Endpoints, Health
from node.runtime import ENV_PREFIX, NodeConfig, build_config
from node.runtime.config import read_values
from protocol.manifest import load_manifest
from tests.containers.dockerfile import Image, read_image
from tests.unit.test_cli_surface import long_flags, subcommands

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "commons-node.service"
ENV_FILE = DEPLOY / "commons-node.env"
EXAMPLE_YAML = DEPLOY / "node.example.yaml"
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
# Kinds without a schema in kubernetes-validate: the Prometheus operator's CRD (checked by SERVICE_MONITOR
# below) and kustomize's own file (checked by test_kustomization_lists_every_manifest).
NOT_IN_KUBERNETES_SCHEMAS = {"ServiceMonitor", "Kustomization"}


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


@pytest.fixture(scope="module")
def served() -> Iterator[Set[str]]:
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
        yield {path for path in candidates if status(path) != 404}


def test_served_paths_come_from_the_handler(served: Set[str]) -> None:
    assert {"/metrics", "/healthz", "/readyz"} <= served and "/nothing-here" not in served


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


# --- Kubernetes ----------------------------------------------------------------------------------------------
def manifests() -> List[Tuple[str, Dict[str, Any]]]:
    """(file name, document) of every YAML document in deploy/kubernetes/."""
    return [(path.name, doc) for path in sorted(KUBERNETES.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]  # fmt: skip


def one(kind: str, name: Optional[str] = None) -> Dict[str, Any]:
    (found,) = [d for _, d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def kustomization() -> Dict[str, Any]:
    return yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())


def generated_config_maps() -> List[Dict[str, Any]]:
    """The ConfigMaps kustomization.yaml's configMapGenerator makes (without kustomize's name suffix)."""
    return [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": g["name"], "labels": g.get("options", {}).get("labels", {})},
         "data": {Path(f).name: (KUBERNETES / f).read_text() for f in g["files"]}}
        for g in kustomization().get("configMapGenerator", [])
    ]  # fmt: skip


SCHEMA_VERSIONS = sorted({all_versions()[0], all_versions()[-1]})  # the oldest and newest Kubernetes bundled


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_manifests_match_kubernetes_schemas(version: str) -> None:
    documents = [(name, d) for name, d in manifests() if d["kind"] not in NOT_IN_KUBERNETES_SCHEMAS]
    documents += [("configMapGenerator", d) for d in generated_config_maps()]
    assert {d["kind"] for _, d in documents} >= {"StatefulSet", "Service", "ConfigMap"}
    for name, document in documents:
        try:  # strict: an unknown field (a misspelt key) is an error too
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} {document['kind']}: {'.'.join(map(str, e.path))}: {e.message}", pytrace=False)


def test_schema_check_catches_a_misspelt_field() -> None:
    statefulset = one("StatefulSet")
    broken = dict(statefulset, spec=dict(statefulset["spec"], terminationGracePeriodSecond=120))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, SCHEMA_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = kustomization()["resources"]
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    # The ServiceMonitor is applied on its own: it needs the Prometheus operator's CRDs.
    assert set(listed) == on_disk - {"servicemonitor.yaml"}
    for generator in kustomization()["configMapGenerator"]:
        assert all((KUBERNETES / f).is_file() for f in generator["files"])
    assert {i["name"] for i in kustomization()["images"]} == {c["image"].partition(":")[0] for c in containers()}


def pod_spec() -> Dict[str, Any]:
    return one("StatefulSet")["spec"]["template"]["spec"]


def containers() -> List[Dict[str, Any]]:
    return pod_spec()["containers"]


def container_environment() -> Dict[str, str]:
    """The node container's environment: its ConfigMaps (envFrom) and its env (plain values only)."""
    (node,) = containers()
    variables: Dict[str, str] = {}
    for source in node.get("envFrom", []):
        variables.update(one("ConfigMap", source["configMapRef"]["name"])["data"])
    variables.update({e["name"]: e["value"] for e in node.get("env", []) if "value" in e})
    return variables


def named_port(name: str) -> int:
    (node,) = containers()
    (port,) = [p["containerPort"] for p in node["ports"] if p["name"] == name]
    return int(port)


def test_statefulset_environment_is_options_with_valid_values() -> None:
    variables = container_environment()
    config = check_environment(variables, "statefulset.yaml")
    (node,) = containers()
    # The other variables are join.py's (it reads them by name), never the node's.
    for name in {e["name"] for e in node["env"]} - option_variables():
        assert f'"{name}"' in (KUBERNETES / "join.py").read_text(), f"nothing reads {name}"
    assert config.identity and config.checkpoint_dir


def test_statefulset_ports_are_the_configured_ones() -> None:
    config = check_environment(container_environment(), "statefulset.yaml")
    assert named_port("p2p") == port_of_maddr(config.host_maddrs[0])
    assert named_port("metrics") == port_of_addr(config.metrics_addr) == port_of_addr(DEFAULT_METRICS_ADDR)
    annotations = one("StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == named_port("metrics")


def test_statefulset_probes_and_scrapes_ask_for_served_paths(served: Set[str]) -> None:
    (node,) = containers()
    probes = {kind: node[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz" and probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert probe["path"] in served and probe["port"] == "metrics"
    annotations = one("StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in served


def test_statefulset_keeps_state_in_its_volume_and_writes_nowhere_else() -> None:
    statefulset = one("StatefulSet")
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    (node,) = containers()
    mounts = {m["name"]: m["mountPath"] for m in node["volumeMounts"]}
    config = check_environment(container_environment(), "statefulset.yaml")
    check_inside([config.identity, config.checkpoint_dir], mounts[claim["metadata"]["name"]], "statefulset.yaml")
    assert node["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert "emptyDir" in volumes[next(n for n, path in mounts.items() if path == "/tmp")]
    assert pod_spec()["securityContext"]["runAsNonRoot"] is True
    assert pod_spec()["enableServiceLinks"] is False  # Service `commons` would add COMMONS_* variables


def test_statefulset_waits_longer_than_a_round_to_stop() -> None:
    assert pod_spec()["terminationGracePeriodSeconds"] > round_seconds()


def test_join_script_is_mounted_and_run() -> None:
    (node,) = containers()
    script = node["command"][-1]
    (mount,) = [m for m in node["volumeMounts"] if Path(script).parent == Path(m["mountPath"])]
    volume = next(v for v in pod_spec()["volumes"] if v["name"] == mount["name"])
    generated = {c["metadata"]["name"]: c["data"] for c in generated_config_maps()}
    assert Path(script).name in generated[volume["configMap"]["name"]]
    assert node["command"][0] == "python" and "args" not in node  # join.py's argv is its own


def test_services_select_the_pods_and_name_their_ports() -> None:
    statefulset = one("StatefulSet")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    headless = one("Service", statefulset["spec"]["serviceName"])
    bootstrap = one("Service", "commons-bootstrap")
    assert headless["spec"]["clusterIP"] == "None"
    assert container_environment()["JOIN_SERVICE"] == headless["metadata"]["name"]
    (node,) = containers()
    names = {p["name"] for p in node["ports"]}
    for service in (headless, bootstrap):
        selector = dict(service["spec"]["selector"])
        # A bootstrap multiaddr names one peer id: that Service selects pod 0 alone.
        pod = selector.pop("statefulset.kubernetes.io/pod-name", None)
        assert selector.items() <= labels.items()
        assert all(p["targetPort"] in names for p in service["spec"]["ports"])
    assert bootstrap["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == statefulset["metadata"]["name"] + "-0"
    assert pod is not None


# The fields of the Prometheus operator's ServiceMonitor these manifests use: a subset of its CRD's schema
# (monitoring.coreos.com/v1), which kubernetes-validate does not bundle.
SERVICE_MONITOR = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"], "additionalProperties": False,
                     "properties": {"name": {"type": "string"}, "labels": {"type": "object"}}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"], "properties": {
            "selector": {"type": "object", "additionalProperties": False,
                         "properties": {"matchLabels": {"type": "object"}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["port", "path"], "properties": {
                    "port": {"type": "string"}, "path": {"type": "string"},
                    "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                    "relabelings": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"targetLabel": {"type": "string"}, "replacement": {"type": "string"}}}}}}}}},
    },
}  # fmt: skip


def test_service_monitors_scrape_served_paths_on_named_ports(served: Set[str]) -> None:
    import jsonschema  # kubernetes-validate's own dependency

    monitors = [d for _, d in manifests() if d["kind"] == "ServiceMonitor"]
    services = [d for _, d in manifests() if d["kind"] == "Service"]
    assert {"/metrics", "/metrics/swarm"} <= {e["path"] for m in monitors for e in m["spec"]["endpoints"]}
    for monitor in monitors:
        jsonschema.validate(monitor, SERVICE_MONITOR)
        wanted = monitor["spec"]["selector"]["matchLabels"].items()
        (service,) = [s for s in services if wanted <= s["metadata"]["labels"].items()]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] in served
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    # deploy/prometheus/alerts.yml asks for job="commons": the jobs keep the scrape config's names.
    jobs = {r["replacement"] for m in monitors for e in m["spec"]["endpoints"] for r in e["relabelings"]}
    assert jobs == {c["job_name"] for c in yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
                    ["scrape_configs"] if c["job_name"].startswith("commons")}  # fmt: skip


# --- join.py, the StatefulSet's entry point -------------------------------------------------------------------
@pytest.fixture()
def join() -> ModuleType:
    spec = importlib.util.spec_from_file_location("commons_join", KUBERNETES / "join.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pod_environment(pod: str, ip: str) -> Dict[str, str]:
    return dict(container_environment(), POD_NAME=pod, POD_IP=ip)


def test_join_finds_the_ready_pods_but_itself(join: ModuleType) -> None:
    answers = {"http://10.0.0.2:9347/status.json": "QmYEXohoh1kCi7g8SzbgxUznbPhHy7XTSWSyaE3H717JD3",
               "http://[fd00::3]:9347/status.json": "QmQkCpn2qD1SagJJiXkSDxK1HspVsidETfFp5NvMfvpZgk"}  # fmt: skip
    env = pod_environment("commons-1", "10.0.0.1")
    peers = join.ready_peers(env, resolve=lambda name: ["10.0.0.1", "10.0.0.2", "10.0.0.9", "fd00::3"],
                             fetch_peer_id=answers.get)  # fmt: skip
    config = check_environment(env, "statefulset.yaml")
    port = port_of_maddr(config.host_maddrs[0])
    assert peers == [f"/ip4/10.0.0.2/tcp/{port}/p2p/QmYEXohoh1kCi7g8SzbgxUznbPhHy7XTSWSyaE3H717JD3",
                     f"/ip6/fd00::3/tcp/{port}/p2p/QmQkCpn2qD1SagJJiXkSDxK1HspVsidETfFp5NvMfvpZgk"]  # fmt: skip
    for peer in peers:
        validate_peer_maddr(peer, "COMMONS_INITIAL_PEERS")
    check_environment(dict(env, COMMONS_INITIAL_PEERS=" ".join(peers)), "join.py")


def test_join_pod_zero_starts_the_swarm_and_the_others_wait(join: ModuleType) -> None:
    waits: List[float] = []
    assert join.initial_peers(pod_environment("commons-0", "10.0.0.1"), find=lambda env: [], sleep=waits.append) == []
    assert waits == []
    found = iter([[], [], ["/ip4/10.0.0.1/tcp/31337/p2p/Qm"]])
    peers = join.initial_peers(pod_environment("commons-2", "10.0.0.3"), find=lambda env: next(found),
                               sleep=waits.append)  # fmt: skip
    assert peers == ["/ip4/10.0.0.1/tcp/31337/p2p/Qm"] and len(waits) == 2


def test_join_keeps_the_peers_given(join: ModuleType) -> None:
    given = "/ip4/203.0.113.8/tcp/31337/p2p/QmA,/ip4/203.0.113.9/tcp/31337/p2p/QmB"
    env = dict(pod_environment("commons-1", "10.0.0.2"), COMMONS_INITIAL_PEERS=given)
    assert join.initial_peers(env, find=lambda env: ["/ip4/10.0.0.1/tcp/31337/p2p/QmC"]) == [
        "/ip4/203.0.113.8/tcp/31337/p2p/QmA", "/ip4/203.0.113.9/tcp/31337/p2p/QmB", "/ip4/10.0.0.1/tcp/31337/p2p/QmC"
    ]  # fmt: skip


def test_join_becomes_node_start(join: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    started: List[List[str]] = []
    monkeypatch.setattr(join, "initial_peers", lambda env: ["/ip4/10.0.0.1/tcp/31337/p2p/QmC"])
    monkeypatch.setattr(join.os, "execv", lambda program, argv: started.append(argv))
    monkeypatch.delenv("COMMONS_INITIAL_PEERS", raising=False)
    join.main()
    (argv,) = started
    check_start_command(argv, "join.py")
    assert join.os.environ["COMMONS_INITIAL_PEERS"] == "/ip4/10.0.0.1/tcp/31337/p2p/QmC"


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


def test_kubernetes_runs_the_dockerfile_user() -> None:
    uid, _, gid = image().user.partition(":")
    context = pod_spec()["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid or uid))


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
