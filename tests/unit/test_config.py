"""Unit tests for NodeConfig: validation, and flag > environment > config file > default."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import pytest

from node.errors import ConfigError
from node.faces.cli import main
from node.net import peer_id_of
from node.runtime.config import NodeConfig, build_config, read_env

PEER = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWKVT8rzJo9rUEyVZAWiqSjRoDDhEU738oJjeskTykUhvz"
PEER2 = "/ip4/10.0.0.2/tcp/4000/p2p/12D3KooWKVT8rzJo9rUEyVZAWiqSjRoDDhEU738oJjeskTykUhvz"


def _config_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return str(path)


def _error(flags: Optional[dict] = None, config_path: Optional[str] = None, environ: Optional[dict] = None) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(flags or {}, config_path, environ=environ or {})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_are_valid() -> None:
    config = NodeConfig()
    assert config.experts == 4 and config.device == "auto" and config.log_format == "text"
    assert config.initial_peers == () and config.host_maddrs == ("/ip4/127.0.0.1/tcp/0",)
    assert build_config({}, None, environ={}) == config
    assert isinstance(config.as_log_dict(), dict)


def test_flags_set_to_none_keep_lower_layers() -> None:
    # argparse leaves every flag not given as None: those must not override anything.
    flags = {name: None for name in NodeConfig.field_names()}
    assert build_config(flags, None, environ={"COMMONS_EXPERTS": "2"}).experts == 2


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = _config_file(tmp_path, "experts: 1\ndevice: cpu\nlog_format: json\nmax_rounds: 7\n")
    environ = {"COMMONS_EXPERTS": "2", "COMMONS_DEVICE": "cuda"}
    config = build_config({"experts": 3}, path, environ=environ)
    assert config.experts == 3  # flag
    assert config.device == "cuda"  # env over file
    assert config.log_format == "json"  # file over default
    assert config.max_rounds == 7
    assert config.metrics_addr == NodeConfig().metrics_addr  # default
    assert build_config({}, path, environ=environ).experts == 2
    assert build_config({}, path, environ={}).experts == 1


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = _config_file(tmp_path, "experts: 5\n")
    assert build_config({}, None, environ={"COMMONS_CONFIG": path}).experts == 5
    other = tmp_path / "other.yaml"
    other.write_text("experts: 6\n")
    # An explicit --config wins over COMMONS_CONFIG.
    assert build_config({}, str(other), environ={"COMMONS_CONFIG": path}).experts == 6


def test_config_file_with_dashes_and_lists(tmp_path: Path) -> None:
    path = _config_file(tmp_path, f"max-rounds: 3\ninitial-peers:\n  - {PEER}\n  - {PEER2}\nmax_seconds: 12\n")
    config = build_config({}, path, environ={})
    assert config.max_rounds == 3 and config.initial_peers == (PEER, PEER2)
    assert config.max_seconds == 12.0 and isinstance(config.max_seconds, float)


def test_empty_config_file(tmp_path: Path) -> None:
    assert build_config({}, _config_file(tmp_path, "# nothing\n"), environ={}) == NodeConfig()


@pytest.mark.parametrize("raw", [f"{PEER} {PEER2}", f"{PEER},{PEER2}", f" {PEER}, {PEER2} ", f"{PEER}\n{PEER2}"])
def test_env_list_parsing(raw: str) -> None:
    assert build_config({}, None, environ={"COMMONS_INITIAL_PEERS": raw}).initial_peers == (PEER, PEER2)


def test_env_typed_values() -> None:
    environ = {
        "COMMONS_EXPERTS": "0",
        "COMMONS_MAX_SECONDS": "1.5",
        "COMMONS_MAX_ROUNDS": "none",
        "COMMONS_IDENTITY": "",
        "COMMONS_HOST_MADDRS": "/ip4/0.0.0.0/tcp/4000 /ip6/::/tcp/4000",
    }
    config = build_config({}, None, environ=environ)
    assert config.experts == 0 and config.max_seconds == 1.5 and config.max_rounds is None
    assert config.identity is None
    assert config.host_maddrs == ("/ip4/0.0.0.0/tcp/4000", "/ip6/::/tcp/4000")


def test_unknown_commons_env_vars_are_ignored() -> None:
    environ = {"COMMONS_NOT_AN_OPTION": "x", "COMMONS_": "y", "OTHER_EXPERTS": "9", "COMMONS_EXPERTS": "2"}
    assert read_env(environ) == {"experts": "2"}
    assert build_config({}, None, environ=environ).experts == 2


@pytest.mark.parametrize(
    "var, value", [("COMMONS_EXPERTS", "two"), ("COMMONS_EXPERTS", "2.5"), ("COMMONS_MAX_SECONDS", "soon")]
)
def test_bad_env_value_names_the_variable(var: str, value: str) -> None:
    message = _error(environ={var: value})
    assert var in message and repr(value) in message


@pytest.mark.parametrize(
    "flags, needle",
    [
        ({"host_maddrs": ["/ip4/notanip/tcp/0"]}, "--host-maddrs"),
        ({"announce_maddrs": ["not a multiaddr"]}, "--announce-maddrs"),
        ({"initial_peers": ["/ip4/127.0.0.1/tcp/bad/p2p/x"]}, "--initial-peers"),
        ({"host_maddrs": []}, "--host-maddrs"),
    ],
)
def test_bad_multiaddr(flags: dict, needle: str) -> None:
    assert needle in _error(flags)


def test_initial_peer_without_p2p_part() -> None:
    message = _error({"initial_peers": ["/ip4/127.0.0.1/tcp/31337"]})
    assert "--initial-peers" in message and "/p2p/" in message


def test_bad_multiaddr_from_env_is_refused() -> None:
    assert "--initial-peers" in _error(environ={"COMMONS_INITIAL_PEERS": "/ip4/127.0.0.1/tcp/1"})


@pytest.mark.parametrize("addr", ["9100", "localhost", "127.0.0.1:", ":9100", "127.0.0.1:99999", "host:port"])
def test_bad_metrics_addr(addr: str) -> None:
    message = _error({"metrics_addr": addr})
    assert "--metrics-addr" in message and repr(addr) in message


def test_good_metrics_addrs() -> None:
    for addr in ("0.0.0.0:0", "[::1]:9100", "localhost:65535"):
        assert build_config({"metrics_addr": addr}, None, environ={}).metrics_addr == addr


@pytest.mark.parametrize(
    "flags, needle",
    [
        ({"device": "tpu"}, "--device"),
        ({"log_format": "xml"}, "--log-format"),
        ({"log_level": "verbose"}, "--log-level"),
        ({"experts": -1}, "--experts"),
        ({"max_rounds": 0}, "--max-rounds"),
        ({"max_seconds": 0.0}, "--max-seconds"),
        ({"bootstrap_timeout_seconds": -1.0}, "--bootstrap-timeout-seconds"),
        ({"eval_share": 0.0}, "--eval-share"),
        ({"eval_share": 1.5}, "--eval-share"),
    ],
)
def test_bad_values_name_the_option(flags: dict, needle: str) -> None:
    assert needle in _error(flags)


def test_negative_experts_from_env() -> None:
    assert "--experts" in _error(environ={"COMMONS_EXPERTS": "-3"})


def test_unknown_key_in_config_file(tmp_path: Path) -> None:
    path = _config_file(tmp_path, "experts: 1\nexpertz: 2\n")
    message = _error(config_path=path)
    assert "expertz" in message and path in message


def test_unknown_key_is_reported_before_bad_values(tmp_path: Path) -> None:
    message = _error(config_path=_config_file(tmp_path, "experts: many\nexpertz: 2\n"))
    assert "unknown option 'expertz'" in message


@pytest.mark.parametrize(
    "text, needle",
    [
        ("experts: many\n", "experts"),
        ("experts: true\n", "experts"),
        ("initial_peers: 5\n", "initial_peers"),
        ("max_seconds: [1]\n", "max_seconds"),
    ],
)
def test_wrong_type_in_config_file(tmp_path: Path, text: str, needle: str) -> None:
    path = _config_file(tmp_path, text)
    message = _error(config_path=path)
    assert needle in message and path in message


def test_config_file_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    assert missing in _error(config_path=missing)
    assert "mapping" in _error(config_path=_config_file(tmp_path, "- a\n- b\n"))
    assert "not valid YAML" in _error(config_path=_config_file(tmp_path, "experts: [1\n"))
    assert str(tmp_path) in _error(config_path=str(tmp_path))  # a directory


def test_float_for_int_in_config_file_is_refused(tmp_path: Path) -> None:
    assert "experts" in _error(config_path=_config_file(tmp_path, "experts: 2.7\n"))


@pytest.mark.parametrize("var", ["COMMONS_MAX_SECONDS", "COMMONS_BOOTSTRAP_TIMEOUT_SECONDS"])
def test_nan_float_option_is_refused(var: str) -> None:
    _error(environ={var: "nan"})


def test_list_for_string_option_in_config_file_is_refused(tmp_path: Path) -> None:
    assert "data" in _error(config_path=_config_file(tmp_path, "data: [a.txt, b.txt]\n"))


def test_as_log_dict_round_trips() -> None:
    config = build_config({"experts": 2, "initial_peers": (PEER,)}, None, environ={})
    logged = config.as_log_dict()
    assert logged["experts"] == 2 and list(logged["initial_peers"]) == [PEER]
    assert not any(isinstance(v, float) and math.isnan(v) for v in logged.values())


# Addresses: one parser (node/net/addresses.py) for the config, the hello exchange and `node status`.

RELAY = "/ip4/10.0.0.3/tcp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N/p2p-circuit"


def test_peer_id_of_reads_the_p2p_part() -> None:
    assert peer_id_of(PEER) == PEER.rsplit("/", 1)[1]
    # Behind a relay, the peer to greet is the last /p2p/ part, not the relay.
    assert peer_id_of(f"{RELAY}/p2p/{peer_id_of(PEER)}") == peer_id_of(PEER)


@pytest.mark.parametrize("addr", ["/ip4/127.0.0.1/tcp/1", "not a multiaddr", ""])
def test_peer_id_of_refuses_an_address_without_a_peer(addr: str) -> None:
    with pytest.raises(ConfigError) as info:
        peer_id_of(addr, "--initial-peers")
    assert "--initial-peers" in str(info.value) and "\n" not in str(info.value)


def test_relayed_peer_is_a_valid_initial_peer() -> None:
    relayed = f"{RELAY}/p2p/{peer_id_of(PEER)}"
    assert build_config({"initial_peers": [relayed]}, None, environ={}).initial_peers == (relayed,)


@pytest.mark.parametrize("addr", ["/ip4/127.0.0.1/tcp/31337", "/ip4/notanip/tcp/0/p2p/x"])
def test_status_checks_initial_peers_like_start(addr: str, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process and before hivemind is imported: a bad address never reaches the network.
    assert main(["status", "--initial-peers", addr]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("node: error: --initial-peers") and repr(addr) in err
    assert _error({"initial_peers": [addr]}) in err
