"""`node keygen`, `node invite` and `node start` of a members-only swarm as a user runs them: one JSON line, or
one `node: error:` line and exit code 2 (a bad file or flag) or 7 (not a member), before any networking.

Each test runs `python -m node` in a subprocess; keygen and invite take well under a second, `node start` a few
(torch is imported). The whole swarm (members, outsiders, revocation): tests/e2e/test_members_only.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import pytest

from node.faces import members
from tests.procs import child_env, write_text_corpus, write_tiny_manifest

pytestmark = pytest.mark.e2e


def _node(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=cwd, env=child_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _one_error_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The command failed with ``code`` and said why in exactly one line, the last one on stderr (`node start`
    logs INFO lines before it)."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("node: error:"), result.stderr
    assert sum("node: error:" in line for line in lines) == 1, result.stderr
    return lines[-1]


def _keygen(tmp_path: Path, name: str) -> dict:
    result = _node(tmp_path, "keygen", "--out", str(tmp_path / name))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _members_only(tmp_path: Path) -> Tuple[Path, Path]:
    """A tiny members-only manifest and the key file of its one founder."""
    founder_key = tmp_path / "founder.key"
    founder = members.keygen(str(founder_key))
    manifest = write_tiny_manifest(tmp_path / "manifest.yaml")
    with manifest.open("a") as f:
        f.write(f"membership: {{founders: [{founder['public_key']}]}}\n")
    return manifest, founder_key


def test_keygen_prints_one_json_line_and_writes_a_private_key(tmp_path: Path) -> None:
    result = _node(tmp_path, "keygen", "--out", str(tmp_path / "me.key"))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    made = json.loads(lines[0])
    assert made["peer_id"].startswith("12D3KooW") and made["public_key"].startswith("ed25519:")
    assert len(made["public_key"]) == len("ed25519:") + 64
    assert stat.S_IMODE((tmp_path / "me.key").stat().st_mode) == 0o600


def test_keygen_never_overwrites_a_key(tmp_path: Path) -> None:
    _keygen(tmp_path, "me.key")
    before = (tmp_path / "me.key").read_bytes()
    result = _node(tmp_path, "keygen", "--out", str(tmp_path / "me.key"))
    line = _one_error_line(result, 2)
    assert "already exists" in line and str(tmp_path / "me.key") in line
    assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "me.key").read_bytes() == before


def _invite(tmp_path: Path, manifest: Path, founder_key: Path, peer_id: str) -> subprocess.CompletedProcess:
    args = ["invite", "--manifest", str(manifest), "--founder-key", str(founder_key), "--peer-id", peer_id,
            "--org", "Example Org", "--expires", "30d", "--out", str(tmp_path / "invite.json")]  # fmt: skip
    return _node(tmp_path, *args)


def test_invite_works_and_refuses_a_key_the_manifest_does_not_list(tmp_path: Path) -> None:
    manifest, founder_key = _members_only(tmp_path)
    member = _keygen(tmp_path, "member.key")
    result = _invite(tmp_path, manifest, founder_key, member["peer_id"])
    assert result.returncode == 0, result.stderr
    made = json.loads(result.stdout)
    assert made["complete"] is True and made["peer_id"] == member["peer_id"] and made["org"] == "Example Org"

    _keygen(tmp_path, "stranger.key")
    (tmp_path / "invite.json").unlink()
    result = _invite(tmp_path, manifest, tmp_path / "stranger.key", member["peer_id"])
    line = _one_error_line(result, 2)
    assert "not one of the manifest's founders" in line and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "invite.json").exists()


def test_invite_refuses_a_founder_key_others_can_read(tmp_path: Path) -> None:
    manifest, founder_key = _members_only(tmp_path)
    os.chmod(founder_key, 0o644)
    member = _keygen(tmp_path, "member.key")
    result = _invite(tmp_path, manifest, founder_key, member["peer_id"])
    line = _one_error_line(result, 2)
    assert "chmod 600" in line and str(founder_key) in line and len(result.stderr.strip().splitlines()) == 1


def _start(tmp_path: Path, manifest: Path, identity: Path, *extra: str) -> subprocess.CompletedProcess:
    """`node start` with no --initial-peers: a refusal must come from the offline check, before any daemon."""
    data = write_text_corpus(tmp_path / "data.txt", size=20_000)
    args = ["start", "--manifest", str(manifest), "--identity", str(identity), "--data", str(data),
            "--device", "cpu", "--max-rounds", "1", *extra]  # fmt: skip
    return _node(tmp_path, *args)


def _no_daemon_of(identity: Path) -> List[str]:
    """p2pd processes started with our key (p2pd gets it as -id=<path>): none, when the node failed before
    networking."""
    found = subprocess.run(["pgrep", "-a", "-x", "p2pd"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in found if str(identity) in line]


def test_start_without_an_invite_is_not_a_member(tmp_path: Path) -> None:
    manifest, _ = _members_only(tmp_path)
    member = _keygen(tmp_path, "member.key")
    started = time.monotonic()
    result = _start(tmp_path, manifest, tmp_path / "member.key")
    line = _one_error_line(result, 7)
    assert "invite" in line and member["peer_id"] in line, line
    assert time.monotonic() - started < 90
    assert _no_daemon_of(tmp_path / "member.key") == []


def test_start_with_an_expired_invite_is_not_a_member(tmp_path: Path) -> None:
    manifest, founder_key = _members_only(tmp_path)
    member = _keygen(tmp_path, "member.key")
    # Issued two days ago for one day: made in-process (the CLI issues invites as of now).
    members.invite(str(manifest), str(founder_key), member["peer_id"], "Example Org", "1d",
                   str(tmp_path / "invite.json"), now=time.time() - 2 * 86400)  # fmt: skip
    result = _start(tmp_path, manifest, tmp_path / "member.key", "--invite", str(tmp_path / "invite.json"))
    line = _one_error_line(result, 7)
    assert "expired" in line and str(tmp_path / "invite.json") in line, line
    assert _no_daemon_of(tmp_path / "member.key") == []
