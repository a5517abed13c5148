"""Multiaddrs as users give them: the one parser (py-multiaddr) for flags, config and peer ids.

Addresses stay strings everywhere else (hivemind takes strings); this module only checks them and
reads the peer id out of them. Every refusal is a ConfigError naming the flag it came from.
"""

from __future__ import annotations

from typing import Optional

import multiaddr

from node.errors import ConfigError

EXAMPLE = "/ip4/127.0.0.1/tcp/31337/p2p/Qm..."


def _parse(text: str, what: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as e:  # py-multiaddr raises several unrelated types for bad input
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{what}: {text!r} is not a valid multiaddr ({reason}); expected e.g. {EXAMPLE}") from None


def _last_peer_id(address: multiaddr.Multiaddr) -> Optional[str]:
    """The value of the last /p2p/ component: after a relay's /p2p-circuit, the peer behind the relay."""
    ids = [value for protocol, value in address.items() if protocol.name == "p2p"]
    return ids[-1] if ids else None


def validate_maddr(text: str, what: str) -> str:
    """``text`` unchanged if it parses as a multiaddr; else ConfigError naming ``what`` (e.g. a flag)."""
    _parse(text, what)
    return text


def validate_peer_maddr(text: str, what: str) -> str:
    """A peer to dial: a valid multiaddr that names the peer (/p2p/<id>). ``text`` unchanged, or ConfigError."""
    peer_id_of(text, what)
    return text


def peer_id_of(maddr: str, what: str = "peer multiaddr") -> str:
    """The peer id a multiaddr names: its last /p2p/ part. ConfigError naming ``what`` if it has none."""
    peer_id = _last_peer_id(_parse(maddr, what))
    if peer_id is None:
        raise ConfigError(
            f"{what}: {maddr!r} has no /p2p/<peer id> part; copy the whole multiaddr a running node printed"
        )
    return peer_id


def ip_and_port(maddr: str) -> "tuple[Optional[str], Optional[int]]":
    """The IP address and TCP port a multiaddr names, each None when it names none (or does not parse):
    ``/ip4/10.0.0.2/tcp/4001/p2p/Qm...`` -> ("10.0.0.2", 4001)."""
    try:
        address = multiaddr.Multiaddr(maddr)
    except Exception:  # py-multiaddr raises several unrelated types for bad input
        return None, None
    ip: Optional[str] = None
    port: Optional[int] = None
    for protocol, value in address.items():
        if protocol.name in ("ip4", "ip6") and ip is None:
            ip = str(value)
        elif protocol.name == "tcp" and port is None:
            port = int(value)
    return ip, port
