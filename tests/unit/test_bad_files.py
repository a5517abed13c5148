"""Bad input that used to cost a traceback, a hang or the wrong exit code (issue 18, "bad input, everywhere"):
manifest and config files that are not small regular files, models too big to build, identity files p2pd cannot
use, timeouts p2pd cannot take, an announced port 0. Each is one line and exit 2, before any network starts."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from node.errors import ConfigError
from node.net import check_identity_file
from node.runtime.config import build_config
from node.training.model import MoETransformer
from protocol.manifest import MAX_PARAMETERS, ManifestError, ModelSpec, load_manifest
from protocol.typed import MAX_FILE_BYTES

DEFAULT = Path(__file__).resolve().parents[2] / "protocol" / "default_manifest.yaml"


@pytest.mark.parametrize(
    "spec",
    [ModelSpec(), ModelSpec(vocab_size=200, seq_len=17, d_model=64, n_layers=3, n_heads=2, n_experts=3, top_k=1,
                            expert_hidden=40)],
)  # fmt: skip
def test_the_parameter_count_is_the_models(spec: ModelSpec) -> None:
    assert spec.parameter_count() == sum(p.numel() for p in MoETransformer(spec, 0).parameters())


@pytest.mark.parametrize(
    "change, words",
    [({"d_model": 1_000_000}, "parameters, more than"), ({"n_experts": 100_000}, "n_experts must be <= 1024"),
     ({"n_layers": 1000}, "n_layers must be <= 256"), ({"expert_hidden": 10**7, "n_experts": 64}, "parameters")],
)  # fmt: skip
def test_models_too_big_to_build_are_refused(change: dict, words: str) -> None:
    with pytest.raises(ManifestError, match=words):
        dataclasses.replace(ModelSpec(), **change)
    assert ModelSpec().parameter_count() < MAX_PARAMETERS


def test_a_manifest_must_be_a_small_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "manifest.yaml"
    os.mkfifo(fifo)  # reading it would block forever
    with pytest.raises(ManifestError, match="not a regular file"):
        load_manifest(fifo)
    with pytest.raises(ManifestError, match="is a directory"):
        load_manifest(tmp_path)
    big = tmp_path / "big.yaml"
    big.write_bytes(DEFAULT.read_bytes() + b"#" * MAX_FILE_BYTES)
    with pytest.raises(ManifestError, match="more than"):
        load_manifest(big)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_manifest(binary)
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_a_config_from_a_device_is_refused_not_read_forever(path: str) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        build_config({}, path, environ={})


def test_a_config_fifo_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "node.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        build_config({}, str(fifo), environ={})


@pytest.mark.parametrize(
    "flags, words",
    [({"bootstrap_timeout_seconds": 1e10}, "must be in \\(0, 3600\\]"),
     ({"bootstrap_timeout_seconds": 0}, "must be in"),
     ({"stall_seconds": 1e12}, "30 days"), ({"announce_maddrs": ["/ip4/127.0.0.1/tcp/0"]}, "not port 0")],
)  # fmt: skip
def test_values_p2pd_cannot_take_are_config_errors(flags: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        build_config(flags, None, environ={})
    build_config({"announce_maddrs": ["/ip4/203.0.113.5/tcp/31337"]}, None, environ={})  # a real port is fine


def test_identity_files_p2pd_cannot_use_are_refused_before_it_starts(tmp_path: Path) -> None:
    cases = {"garbage.key": b"garbage\n", "empty.key": b"", "truncated.key": bytes.fromhex("080012a609")}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match="identity file") as refused:
            check_identity_file(str(tmp_path / name))
        assert "\n" not in str(refused.value) and len(str(refused.value)) < 300, refused.value
    (tmp_path / "dir.key").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        check_identity_file(str(tmp_path / "dir.key"))
    with pytest.raises(ConfigError, match="cannot be created"):
        check_identity_file(str(tmp_path / "missing" / "id.key"))
    check_identity_file(str(tmp_path / "new.key"))  # missing in a writable directory: a node creates it


def test_a_key_a_node_wrote_passes(tmp_path: Path) -> None:
    from hivemind.p2p import P2P

    P2P.generate_identity(str(tmp_path / "id.key"))
    check_identity_file(str(tmp_path / "id.key"))
