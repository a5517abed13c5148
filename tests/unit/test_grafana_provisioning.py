"""deploy/grafana/provisioning/ against Grafana's provisioning schema, and wired as deploy/compose.yaml mounts it.

No Grafana runs here (no package, no image registry), so its provisioning files are checked against what
Grafana's provisioning reader accepts (apiVersion 1; pkg/services/provisioning/{datasources,dashboards} in
Grafana's source: keys, their types, `access` proxy or direct, at most one default data source per
organisation, unique provider names, a `file` provider's options.path), and against the compose file:
the directories Grafana reads are the ones compose mounts them at, the dashboard sits in the provider's
path, the data source's URL is the compose Prometheus, and every data source the dashboard uses resolves
to a provisioned one. The rest of the compose file runs in the containers tier (tests/containers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple
from urllib.parse import urlparse

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
DASHBOARD = DEPLOY / "grafana" / "commons-dashboard.json"
IN_GRAFANA = "/etc/grafana/provisioning"

# Grafana's apiVersion 1 schemas: key -> accepted types (a YAML bool is not taken for an int here).
Schema = Dict[str, Tuple[type, ...]]
DATASOURCE_FILE: Schema = {"apiVersion": (int,), "datasources": (list,), "deleteDatasources": (list,)}
DATASOURCE: Schema = {
    "orgId": (int,), "orgName": (str,), "version": (int,), "name": (str,), "type": (str,), "access": (str,),
    "url": (str,), "user": (str,), "database": (str,), "basicAuth": (bool,), "basicAuthUser": (str,),
    "withCredentials": (bool,), "isDefault": (bool,), "correlations": (list,), "jsonData": (dict,),
    "secureJsonData": (dict,), "editable": (bool,), "uid": (str,),
}  # fmt: skip
DASHBOARD_FILE: Schema = {"apiVersion": (int,), "providers": (list,)}
PROVIDER: Schema = {
    "name": (str,), "type": (str,), "orgId": (int,), "folder": (str,), "folderUid": (str,), "editable": (bool,),
    "options": (dict,), "disableDeletion": (bool,), "updateIntervalSeconds": (int,), "allowUiUpdates": (bool,),
}  # fmt: skip
FILE_OPTIONS: Schema = {"path": (str,), "foldersFromFilesStructure": (bool,)}
UID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")  # Grafana's rule for a uid


def check_keys(entry: Any, schema: Schema, where: str) -> None:
    assert isinstance(entry, dict), f"{where}: a mapping expected, got {entry!r}"
    for key, value in entry.items():
        assert key in schema, f"{where}: Grafana knows no key {key!r} (one of {sorted(schema)})"
        kinds = schema[key]
        fits = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        assert fits, f"{where}: {key} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}"


def provisioned(kind: str, top: Schema, entries: str, schema: Schema) -> List[Dict[str, Any]]:
    """Every entry under ``entries`` of the provisioning files in ``kind``/, each checked against ``schema``."""
    paths = sorted([*(PROVISIONING / kind).glob("*.yaml"), *(PROVISIONING / kind).glob("*.yml")])
    assert paths, f"no {kind} provisioning file in {PROVISIONING / kind}"
    found: List[Dict[str, Any]] = []
    for path in paths:
        document = yaml.safe_load(path.read_text())
        check_keys(document, top, path.name)
        assert document["apiVersion"] == 1, f"{path.name}: apiVersion 1 expected"
        for index, entry in enumerate(document.get(entries, [])):
            check_keys(entry, schema, f"{path.name}: {entries}[{index}]")
            found.append(entry)
    return found


def datasources() -> List[Dict[str, Any]]:
    return provisioned("datasources", DATASOURCE_FILE, "datasources", DATASOURCE)


def providers() -> List[Dict[str, Any]]:
    return provisioned("dashboards", DASHBOARD_FILE, "providers", PROVIDER)


def grafana_service() -> Dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["grafana"]


def mounts() -> Dict[Path, str]:
    """{file or directory under deploy/: where the compose file mounts it in Grafana's container}."""
    found = {}
    for volume in grafana_service()["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            found[(DEPLOY / source).resolve()] = target
    return found


def test_datasources_follow_grafanas_schema():
    entries = datasources()
    assert entries
    defaults: Dict[int, int] = {}
    for entry in entries:
        assert entry.get("name") and entry.get("type"), f"a data source needs a name and a type: {entry}"
        assert entry.get("access", "proxy") in ("proxy", "direct"), entry
        assert UID.match(entry.get("uid", "")), f"give each data source a stable uid: {entry}"
        defaults[entry.get("orgId", 1)] = defaults.get(entry.get("orgId", 1), 0) + entry.get("isDefault", False)
    assert max(defaults.values()) <= 1, "Grafana refuses more than one default data source per organisation"
    assert len({e["uid"] for e in entries}) == len(entries) and len({e["name"] for e in entries}) == len(entries)


def test_dashboard_providers_follow_grafanas_schema():
    entries = providers()
    assert len({e["name"] for e in entries}) == len(entries), "provider names must be unique"
    for entry in entries:
        assert entry["type"] == "file", entry
        check_keys(entry["options"], FILE_OPTIONS, f"provider {entry['name']}: options")
        assert entry["options"]["path"].startswith("/"), entry


def test_compose_mounts_the_provisioning_where_grafana_reads_it():
    mounted = mounts()
    for kind in ("datasources", "dashboards"):
        assert mounted.get(PROVISIONING / kind) == f"{IN_GRAFANA}/{kind}", mounted
    dashboard_at = mounted.get(DASHBOARD.resolve())
    assert dashboard_at, "compose mounts no dashboard"
    assert any(dashboard_at.startswith(p["options"]["path"].rstrip("/") + "/") for p in providers()), (
        f"the dashboard is mounted at {dashboard_at}, outside every provider's path"
    )
    home = grafana_service()["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home in (None, dashboard_at), home


def test_the_datasource_is_the_compose_prometheus():
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    listen = next(a for a in services["prometheus"]["command"] if a.startswith("--web.listen-address="))
    port = int(listen.rpartition(":")[2])
    urls = [urlparse(e["url"]) for e in datasources() if e["type"] == "prometheus"]
    assert urls and all((u.hostname, u.port) == ("prometheus", port) for u in urls), urls


def used_datasources(node: Any) -> List[Dict[str, Any]]:
    """Every {"type", "uid"} datasource reference in the dashboard (panels, their targets, nested rows)."""
    found = []
    if isinstance(node, dict):
        reference = node.get("datasource")
        if isinstance(reference, dict):
            found.append(reference)
        for key, value in node.items():
            if key != "templating":
                found += used_datasources(value)
    elif isinstance(node, list):
        for value in node:
            found += used_datasources(value)
    return found


@pytest.mark.parametrize("dashboard_path", [DASHBOARD], ids=["commons-dashboard"])
def test_every_datasource_the_dashboard_uses_is_provisioned(dashboard_path: Path):
    dashboard = json.loads(dashboard_path.read_text())
    assert dashboard.get("title") and UID.match(dashboard.get("uid", "")), "provisioning needs a title and a uid"
    provisioned = {e["uid"]: e["type"] for e in datasources()}
    default_types: Set[str] = {e["type"] for e in datasources() if e.get("isDefault")}
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    references = used_datasources(dashboard.get("panels", []))
    assert references, "the dashboard's panels name no data source"
    for reference in references:
        uid = reference.get("uid", "")
        variable = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", uid)
        if variable:
            name = variable.group(1) or variable.group(2)
            assert variables.get(name, {}).get("type") == "datasource", f"{uid} is no data source variable"
            plugin = variables[name]["query"]
            # The variable lists the data sources of that type and starts on the default one.
            assert plugin in default_types, f"{uid} picks a {plugin} data source, and none is the default"
            current = variables[name].get("current", {}).get("value")
            assert current in (None, "", "default", *provisioned), f"{uid} starts on {current}, not provisioned"
            assert reference.get("type") in (None, plugin), reference
        else:
            assert provisioned.get(uid) == reference.get("type"), f"the dashboard uses {reference}, not provisioned"
