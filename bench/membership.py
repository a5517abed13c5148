"""What membership checks and receipts cost (issue 23): per stream request, per DHT request, per receipt, and bytes.

Measured in one process on one clock (time.perf_counter), each figure over ``--repeats`` batches of ``--batch``
calls: per-call median, mean and worst of the batches. Side by side, an open swarm's cost of the same path is
zero (no check runs), so the figures are the whole added cost.

    python -m bench.membership [--repeats 30] [--batch 2000] [--out bench-results/membership]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

from hivemind.proto import dht_pb2

from node.faces import members
from node.net import Admission, read_identity, verify
from node.net.admission import INVITE_MARK
from node.net.hivemind import InviteAuthorizer
from protocol.contributions import Receipt, add
from protocol.manifest import load_manifest
from protocol.membership import Invite


def timed(call: Callable[[], object], repeats: int, batch: int) -> Dict[str, float]:
    per_call: List[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batch):
            call()
        per_call.append((time.perf_counter() - start) / batch * 1e6)
    return {"median_us": statistics.median(per_call), "mean_us": statistics.fmean(per_call), "worst_us": max(per_call)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--out", default="bench-results/membership")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="commons-bench-membership-"))
    founder = members.keygen(str(root / "founder.key"))
    manifest_path = root / "manifest.yaml"
    manifest_path.write_text(f"membership: {{founders: [{founder['public_key']}]}}\n")
    manifest = load_manifest(str(manifest_path))
    member = members.keygen(str(root / "member.key"))
    members.invite(str(manifest_path), str(root / "founder.key"), member["peer_id"], "Example University", "30d",
                   str(root / "member.invite"))  # fmt: skip
    blob = (root / "member.invite").read_bytes().strip()
    founders, swarm_id, peer = manifest.membership.rules(), manifest.swarm_id, member["peer_id"]

    results: Dict[str, Dict[str, float]] = {}
    # A stream's first request from a peer whose invite we have not seen: parse, check the founder's signature.
    results["stream: new invite (parse + signature)"] = timed(
        lambda: Admission(founders, swarm_id, None).check(peer, blob), args.repeats, max(1, args.batch // 10)
    )
    seen = Admission(founders, swarm_id, None)
    seen.check(peer, blob)
    results["stream: new stream, invite seen before"] = timed(lambda: seen.check(peer, blob), args.repeats, args.batch)
    results["stream: each request on an admitted stream"] = timed(lambda: seen.still_admitted(peer), args.repeats,
                                                                  args.batch)  # fmt: skip

    # A DHT request: the sender signs it (with its invite); the receiver checks invite, time, nonce, signature.
    sender = InviteAuthorizer(Admission(None, swarm_id, blob), str(root / "member.key"))
    receiver = InviteAuthorizer(Admission(founders, swarm_id, None), str(root / "founder.key"))
    loop = asyncio.new_event_loop()

    def request() -> dht_pb2.StoreRequest:
        return dht_pb2.StoreRequest(keys=[b"k" * 20], subkeys=[b"s" * 40], values=[b"v" * 600], expiration_time=[1e9],
                                    in_cache=[False], peer=dht_pb2.NodeInfo(node_id=b"n" * 20))  # fmt: skip

    signed: List[dht_pb2.StoreRequest] = []

    def sign() -> None:
        message = request()
        loop.run_until_complete(sender.sign_request(message, None))
        signed.append(message)

    results["dht: sign a request (sender)"] = timed(sign, args.repeats, max(1, args.batch // 10))
    queue = iter(signed)

    def validate() -> None:
        assert loop.run_until_complete(receiver.validate_request(next(queue)))

    results["dht: check a request (receiver)"] = timed(validate, args.repeats, max(1, args.batch // 10))
    # A round's receipts: the reducer signs one per member whose parts it reduced, per module; the member checks it.
    voucher = read_identity(str(root / "founder.key"))
    member_id = read_identity(str(root / "member.key")).peer_id
    base = Receipt(swarm_id, "trunk", 7, member_id, voucher.peer_id, "ab" * 32, 1 << 20, 1 << 18, 3 << 18, 800)
    made: List[Receipt] = []
    results["receipt: sign (reducer, per member and module)"] = timed(
        lambda: made.append(base.signed(voucher.public, voucher.sign)), args.repeats, max(1, args.batch // 10)
    )
    blobs = iter([r.to_bytes() for r in made])
    results["receipt: parse and check (member)"] = timed(lambda: Receipt.from_bytes(next(blobs)).check(verify),
                                                       args.repeats, max(1, args.batch // 10))  # fmt: skip
    unsigned = request().ByteSize()
    one = request()
    loop.run_until_complete(sender.sign_request(one, None))
    wire = {
        "invite bytes": len(blob),
        "stream preamble bytes (once per new stream)": len(INVITE_MARK) + len(blob) + 8,
        "dht request bytes added": one.ByteSize() - unsigned,
        "peer record bytes added (its invite)": len(json.dumps(blob.decode())),
        "receipt bytes": len(made[0].to_bytes()),
        "vouch bytes": len(add(None, made[0]).signed(voucher.public, voucher.sign).to_bytes()),
    }
    identity = read_identity(str(root / "member.key"))
    assert Invite.from_bytes(blob).peer_id == identity.peer_id
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"per_call": results, "wire": wire}
    (out / "membership.json").write_text(json.dumps(report, indent=2))
    lines = ["| path | median µs | mean µs | worst µs |", "|---|---|---|---|"]
    for name, figures in results.items():
        lines.append(f"| {name} | {figures['median_us']:.1f} | {figures['mean_us']:.1f} | {figures['worst_us']:.1f} |")
    lines += ["", "| bytes | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in wire.items()]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
