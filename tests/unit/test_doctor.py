"""`node doctor`'s checks, each on real files, or on peers of the in-process network (no process, no socket).

The checks that start p2pd or bind a port, and the whole command against a real node: tests/e2e/test_doctor.py.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, List

import pytest
import torch

from node.errors import ChecksFailed, ConfigError
from node.faces import doctor
from node.faces.cli import build_parser, main
from node.faces.doctor import Check, DialSample
from node.net import InProcessNetwork
from node.runtime import NodeConfig
from node.swarm import Greeter
from node.training import MoETransformer
from protocol import handlers
from protocol.manifest import Manifest, load_manifest
from protocol.records import PeerRecord, peers_key
from protocol.wire import DialBackReply, encode
from tests.procs import write_text_corpus, write_tiny_manifest
from tests.unit.test_inprocess import run as in_process  # a scenario in virtual time: timeouts without waiting

PEER = "QmW761Nh844Pg74rY2ZjZUoVauwGEEdHYnKEL6SG2BECb2"


@pytest.fixture
def tiny(tmp_path: Path) -> Manifest:
    return load_manifest(write_tiny_manifest(tmp_path / "manifest.yaml"))


# --- the record and the report ------------------------------------------------------------------------------
def test_a_check_is_one_line_with_its_fix_and_a_json_entry() -> None:
    bad = doctor.failed("data", "data path x does not exist", "pass --data")
    assert bad.line() == "FAIL  data: data path x does not exist — fix: pass --data"
    assert doctor.passed("device", "cpu only (no CUDA)").line() == "PASS  device: cpu only (no CUDA)"
    assert doctor.skipped("clock skew", "no peer").line() == "SKIP  clock skew: no peer"
    assert bad.as_dict() == {"name": "data", "ok": False, "status": "fail", "detail": "data path x does not exist",
                             "fix": "pass --data"}  # fmt: skip
    checks = [bad, doctor.passed("device", "cpu"), doctor.skipped("clock skew", "no peer")]
    assert doctor.report(checks)["ok"] is False and len(doctor.report(checks)["checks"]) == 3
    assert doctor.report(checks[1:])["ok"] is True  # a skipped check is not a failure
    assert doctor.summary(checks) == "1 of 3 checks failed (1 skipped)"
    assert doctor.summary(checks[1:2]) == "all 1 checks passed"


# --- p2pd and the listen ports (the parts that start nothing) ----------------------------------------------
def test_a_missing_or_unusable_p2pd_fails_with_the_reinstall_fix(tmp_path: Path) -> None:
    for binary in (None, tmp_path / "p2pd"):
        check = doctor.check_p2pd(binary)
        assert check.status == "fail" and "reinstall hivemind" in check.fix
    (tmp_path / "p2pd").write_text("not a program")  # there, but not executable: nothing is started
    assert "not executable" in doctor.check_p2pd(tmp_path / "p2pd").detail


def test_the_p2pd_of_the_installed_hivemind_is_found() -> None:
    found = doctor.p2pd_path()
    assert found is not None and found.name == "p2pd" and found.is_file()


def test_port_zero_passes_and_an_address_without_a_tcp_port_is_not_tried() -> None:
    assert doctor.check_listen_port("/ip4/0.0.0.0/tcp/0").status == "pass"  # bound by no one: no socket opened
    assert doctor.check_listen_port("/ip4/0.0.0.0/udp/4001/quic").status == "skip"


def test_the_doctors_own_swarm_listens_on_any_port_where_the_configured_one_is_taken() -> None:
    hosts = ["/ip4/0.0.0.0/tcp/31337", "/ip6/::/tcp/31337", "/ip4/10.3.13.37/tcp/3133"]
    assert doctor.doctor_host_maddrs(hosts, [False, True, False]) == [
        "/ip4/0.0.0.0/tcp/0",
        "/ip6/::/tcp/31337",
        "/ip4/10.3.13.37/tcp/0",
    ]


# --- this machine --------------------------------------------------------------------------------------------
def test_a_writable_checkpoint_dir_with_room_passes(tmp_path: Path) -> None:
    check = doctor.check_checkpoint_dir(str(tmp_path), need_bytes=1 << 20)
    assert check.status == "pass" and "writable" in check.detail and "created" not in check.detail
    later = doctor.check_checkpoint_dir(str(tmp_path / "a" / "b"), need_bytes=1 << 20)
    assert later.status == "pass" and f"created at start, in {tmp_path}" in later.detail
    assert not (tmp_path / "a").exists() and os.listdir(tmp_path) == []  # the doctor leaves nothing behind


def test_no_checkpoint_dir_is_skipped() -> None:
    assert doctor.check_checkpoint_dir(None, need_bytes=0).status == "skip"


def test_a_checkpoint_dir_under_a_file_fails(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    check = doctor.check_checkpoint_dir(str(tmp_path / "file" / "ckpt"), need_bytes=0)
    assert check.status == "fail" and "is not a directory" in check.detail and "--checkpoint-dir" in check.fix


def test_a_checkpoint_dir_that_takes_no_file_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated, because the suite may run as root, for whom a read-only mode changes nothing.
    def refuse(*_: Any, **__: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    check = doctor.check_checkpoint_dir(str(tmp_path), need_bytes=0)
    assert check.status == "fail" and "Permission denied" in check.detail and "permissions" in check.fix


def test_a_checkpoint_dir_without_room_fails(tmp_path: Path) -> None:
    def full(_: str) -> Any:
        return SimpleNamespace(free=10 << 20)

    check = doctor.check_checkpoint_dir(str(tmp_path), need_bytes=100 << 20, disk_usage=full)
    assert check.status == "fail" and "10 MiB free" in check.detail and "100 MiB" in check.detail
    assert "--checkpoint-keep" in check.fix


def test_the_space_a_checkpoint_needs_follows_the_model_and_the_hosted_experts(tiny: Manifest) -> None:
    model = MoETransformer(tiny.model, seed=0)
    trunk, expert = model.count_parameters("trunk"), model.count_parameters("expert.0.0")
    assert doctor.generation_bytes(tiny, 1) == 16 * (trunk + expert)  # four float32 per parameter
    assert doctor.generation_bytes(tiny, 99) == 16 * (trunk + 2 * expert)  # no more experts than the model has
    assert doctor.generation_bytes(tiny, 0) == 16 * trunk
    config = NodeConfig(checkpoint_keep=3, experts=1)
    assert doctor.checkpoint_need_bytes(config, tiny) == doctor.CHECKPOINT_FLOOR_BYTES  # a tiny model: the floor
    big = Manifest.from_dict({"model": {"d_model": 512, "n_heads": 8, "n_layers": 4, "expert_hidden": 2048}})
    assert doctor.checkpoint_need_bytes(config, big) == 4 * doctor.generation_bytes(big, 1)


def test_data_that_is_there_passes_and_data_that_is_not_fails(tmp_path: Path, tiny: Manifest) -> None:
    corpus = write_text_corpus(tmp_path / "text.txt")
    check = doctor.check_data(NodeConfig(data=str(corpus)), tiny)
    assert check.status == "pass" and str(corpus) in check.detail
    missing = doctor.check_data(NodeConfig(data=str(tmp_path / "nothing")), tiny)
    assert missing.status == "fail" and "does not exist" in missing.detail and "--data" in missing.fix


def test_the_device_fails_only_when_cuda_is_asked_for_and_absent() -> None:
    assert doctor.check_device("auto", lambda: None).detail == "cpu only (no CUDA)"
    assert doctor.check_device("cpu", lambda: None).ok
    assert doctor.check_device("auto", lambda: "NVIDIA H200").detail == "cuda: NVIDIA H200"
    assert doctor.check_device("cpu", lambda: "NVIDIA H200").detail == "cuda: NVIDIA H200 (not used: --device cpu)"
    cuda = doctor.check_device("cuda", lambda: None)
    assert cuda.status == "fail" and "--device cpu" in cuda.fix


def test_the_device_check_reports_what_torch_sees() -> None:
    check = doctor.check_device("auto")
    assert check.ok and check.detail.startswith("cuda: " if torch.cuda.is_available() else "cpu only")


# --- the identity key ----------------------------------------------------------------------------------------
def test_the_identity_is_the_one_node_start_would_use(tmp_path: Path) -> None:
    assert NodeConfig().identity_file() is None
    assert NodeConfig(identity="id.key", checkpoint_dir="ck").identity_file() == "id.key"
    assert NodeConfig(checkpoint_dir="ck").identity_file() == str(Path("ck") / "identity.key")


def test_an_identity_that_does_not_exist_yet_passes_without_asking_anyone(tmp_path: Path) -> None:
    none = doctor.read_identity(None, None)
    assert isinstance(none, Check) and none.status == "pass" and "new peer id" in none.detail
    fresh = doctor.read_identity(str(tmp_path / "id.key"), None)
    assert isinstance(fresh, Check) and fresh.status == "pass" and "created at start" in fresh.detail
    (tmp_path / "id.key").write_bytes(b"key")
    unread = doctor.read_identity(str(tmp_path / "id.key"), None)  # no p2pd to read it with
    assert isinstance(unread, Check) and unread.status == "skip"


def test_an_identity_a_running_peer_answers_with_or_the_swarm_lists_is_in_use() -> None:
    swarm_id = "59f8ffdd4f7bff9b"

    async def scenario(network: InProcessNetwork) -> List[Check]:
        running, behind_nat, asking = network.join(), network.join(), network.join()
        await Greeter(running, swarm_id, "commons-default").start()
        record = PeerRecord(peer_id=behind_nat.peer_id, modules=["trunk"], outer_round=1, local_steps=5)
        await behind_nat.store(peers_key(swarm_id), behind_nat.peer_id, record.dict(), network.now() + 12)
        network.kill(behind_nat.peer_id)  # nobody can call it; its record stays until it expires
        await asyncio.sleep(3)
        return [await doctor.check_identity(asking, peer, "id.key", swarm_id, timeout=5)
                for peer in (running.peer_id, behind_nat.peer_id, "nobody")]  # fmt: skip

    answers, listed, free = in_process(scenario)
    assert answers.status == "fail" and f"a running peer answers with it (a node of swarm {swarm_id})" in answers.detail
    assert "--identity" in answers.fix
    assert listed.status == "fail" and listed.detail.endswith("is in use: the swarm lists it (announced 3 s ago)")
    assert free.status == "pass" and "no peer answers with it or lists it" in free.detail


# --- the bootstrap peers -------------------------------------------------------------------------------------
def test_a_bootstrap_peer_answers_with_its_swarm_id(tiny: Manifest) -> None:
    async def scenario(network: InProcessNetwork) -> List[Check]:
        ours, theirs, asking = network.join(PEER), network.join(PEER[:-1] + "3"), network.join()
        await Greeter(ours, tiny.swarm_id, tiny.name).start()
        await Greeter(theirs, "0123456789abcdef", "another").start()
        maddr = "/ip4/10.0.0.2/tcp/4001/p2p/"
        return [await doctor.check_bootstrap_peer(asking, maddr + peer, tiny, timeout=5)
                for peer in (ours.peer_id, theirs.peer_id, PEER[:-1] + "4")]  # fmt: skip

    same, other, silent = in_process(scenario)
    assert same.status == "pass" and same.name == f"bootstrap peer …{PEER[-8:]}"
    assert f"swarm id {tiny.swarm_id} (same manifest" in same.detail
    assert other.status == "fail" and "'another' (swarm id 0123456789abcdef)" in other.detail
    assert "--manifest" in other.fix
    assert silent.status == "fail" and "no answer" in silent.detail


# --- dial-back: reachability and clock skew ------------------------------------------------------------------
def sample(reachable: List[int], tried: List[int], skew: float = 0.0, peer: str = PEER, reason: str = "") -> DialSample:
    reply = DialBackReply(observed="203.0.113.5", reachable=reachable, tried=tried, reason=reason, now=1000.0 + skew)
    return DialSample(peer, reply, "", 999.9, 1000.1)


def test_the_dial_back_reply_carries_the_peers_clock() -> None:
    async def dial_back(_: str, __: bytes) -> bytes:
        return encode(DialBackReply(observed="203.0.113.5", reachable=[4001], tried=[4001], now=1003.0))

    async def scenario(network: InProcessNetwork) -> DialSample:
        peer, asking = network.join(), network.join()
        await peer.serve(handlers.DIALBACK, dial_back)
        times = iter([999.0, 1001.0])
        return await doctor.dial_back(asking, peer.peer_id, [4001], timeout=5, clock=lambda: next(times))

    got = in_process(scenario)
    assert got.reply is not None and got.reply.reachable == [4001] and got.skew == pytest.approx(3.0)
    assert doctor.check_clock_skew([got]).status == "fail"


def test_a_peer_that_does_not_dial_back_leaves_an_error_and_no_skew() -> None:
    async def scenario(network: InProcessNetwork) -> DialSample:
        return await doctor.dial_back(network.join(), "nobody", [4001], timeout=5)

    got = in_process(scenario)
    assert got.reply is None and got.error and got.skew is None


def test_a_peer_that_reached_us_makes_the_node_reachable() -> None:
    check = doctor.check_reachability([sample([], [4001], peer="a" * 12), sample([4001], [4001])], [4001], NodeConfig())
    assert check.status == "pass" and "203.0.113.5 port 4001 and connected" in check.detail


def test_a_node_nobody_reaches_is_private_and_told_how_to_be_reachable() -> None:
    public = NodeConfig(host_maddrs=("/ip4/0.0.0.0/tcp/4001",))
    check = doctor.check_reachability([sample([], [4001])], [4001], public)
    assert check.status == "fail"
    dialed = f"peer …{PEER[-8:]} dialed 203.0.113.5:4001 and got no connection"
    assert check.detail == f"not reachable from outside ({dialed})"
    assert "forward TCP port 4001 on your router" in check.fix and "a private node still trains" in check.fix
    loopback = doctor.check_reachability([sample([], [4001])], [4001], NodeConfig())
    assert "--host-maddrs /ip4/0.0.0.0/tcp/" in loopback.fix
    any_port = doctor.check_reachability([sample([], [4001])], [4001], NodeConfig(host_maddrs=("/ip4/0.0.0.0/tcp/0",)))
    assert "fixed port" in any_port.fix
    announced = NodeConfig(host_maddrs=("/ip4/0.0.0.0/tcp/4001",), announce_maddrs=("/ip4/203.0.113.5/tcp/4001",))
    assert "--announce-maddrs" in doctor.check_reachability([sample([], [4001])], [4001], announced).fix


def test_what_the_node_is_told_about_its_reachability_is_weighed() -> None:
    private = doctor.check_reachability([sample([], [4001])], [4001], NodeConfig(reachability="private"))
    assert private.status == "pass" and "as --private says" in private.detail
    public = doctor.check_reachability([sample([], [4001])], [4001], NodeConfig(reachability="public"))
    assert public.status == "fail" and public.fix.startswith("drop --public")


def test_reachability_nobody_dialed_for_is_not_known() -> None:
    refused = sample([], [], reason="at most one dial-back per 10s")
    silent = DialSample("b" * 12, None, "peer bbbbbbbb did not answer", 0.0, 0.0)
    check = doctor.check_reachability([refused, silent], [4001], NodeConfig())
    assert check.status == "skip" and "at most one dial-back" in check.detail and "did not answer" in check.detail
    assert doctor.check_reachability([], [], NodeConfig()).status == "skip"  # no TCP port: nothing to dial


def test_clock_skew_passes_within_two_seconds_and_names_the_worst_peer() -> None:
    close = doctor.check_clock_skew([sample([], [1], skew=0.25, peer="a" * 12), sample([], [1], skew=-1.5)])
    assert close.status == "pass" and close.detail.startswith(f"-1.500 s against peer …{PEER[-8:]}")
    far = doctor.check_clock_skew([sample([], [1], skew=0.25, peer="a" * 12), sample([], [1], skew=7.0)])
    assert far.status == "fail" and "+7.000 s" in far.detail and "time sync" in far.fix
    assert doctor.check_clock_skew([]).status == "skip"


# --- the runner and the command ------------------------------------------------------------------------------
def test_without_bootstrap_peers_the_checks_that_need_one_are_skipped(tmp_path: Path, tiny: Manifest) -> None:
    corpus = write_text_corpus(tmp_path / "text.txt")
    config = NodeConfig(data=str(corpus), checkpoint_dir=str(tmp_path / "ck"))
    seen: List[str] = []
    checks = doctor.run_doctor(config, tiny, 5.0, emit=lambda c: seen.append(c.name),
                               locate_p2pd=lambda: tmp_path / "no-p2pd")  # fmt: skip
    assert seen == [c.name for c in checks] == [
        "p2p daemon", "listen port", "bootstrap peers", "reachable from outside", "clock skew", "identity",
        "checkpoint dir", "data", "device",
    ]  # fmt: skip
    status = {c.name: c.status for c in checks}
    assert status["p2p daemon"] == "fail"
    assert status["bootstrap peers"] == status["reachable from outside"] == status["clock skew"] == "skip"
    assert status["identity"] == status["checkpoint dir"] == status["data"] == "pass"
    assert "no --initial-peers" in checks[2].detail


def test_doctor_takes_the_options_of_node_start_and_public_or_private() -> None:
    parser = build_parser()
    args = parser.parse_args(["doctor", "--public", "--experts", "2", "--json", "--timeout", "3"])
    assert (args.reachability, args.experts, args.json, args.timeout) == ("public", 2, True, 3.0)
    assert parser.parse_args(["start", "--private"]).reachability == "private"
    assert parser.parse_args(["start"]).reachability is None  # left to the environment, the file, the default
    for clash in (["--public", "--private"], ["--public", "--reachability", "private"]):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(["doctor", *clash])
        assert exited.value.code == ConfigError.exit_code


def test_a_bad_timeout_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--timeout", "0"]) == ConfigError.exit_code
    assert capsys.readouterr().err == "node: error: --timeout must be > 0, got 0\n"
    assert ChecksFailed.exit_code == 6

