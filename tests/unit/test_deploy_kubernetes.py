"""deploy/kubernetes/ refers only to what the node has (tests/deploy_checks.py), and passes Kubernetes' own
JSON schemas (kubernetes-validate, offline); its join script, the StatefulSet's entry point, in-process."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Optional, Set, Tuple

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from node.net import validate_peer_maddr
from node.ops.endpoints import DEFAULT_METRICS_ADDR
from tests.deploy_checks import (
    DEPLOY,
    check_environment,
    check_inside,
    check_start_command,
    option_variables,
    port_of_addr,
    port_of_maddr,
    round_seconds,
)
from tests.unit.test_deploy_assets import image

KUBERNETES = DEPLOY / "kubernetes"
# Kinds without a schema in kubernetes-validate: the Prometheus operator's CRD (checked by SERVICE_MONITOR
# below) and kustomize's own file (checked by test_kustomization_lists_every_manifest).
NOT_IN_KUBERNETES_SCHEMAS = {"ServiceMonitor", "Kustomization"}


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
    monkeypatch.setenv("COMMONS_INITIAL_PEERS", "")  # recorded, so the value join.main() sets is undone after
    monkeypatch.delenv("COMMONS_INITIAL_PEERS")
    join.main()
    (argv,) = started
    check_start_command(argv, "join.py")
    assert join.os.environ["COMMONS_INITIAL_PEERS"] == "/ip4/10.0.0.1/tcp/31337/p2p/QmC"


def test_kubernetes_runs_the_dockerfile_user() -> None:
    uid, _, gid = image().user.partition(":")
    context = pod_spec()["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid or uid))
