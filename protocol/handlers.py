"""The names of the request handlers a node serves over p2p streams: the only place they are spelled.

The hello and dial-back handlers are not namespaced, so that peers of any swarm can ask who we are; the others carry
the swarm id, so peers of different manifests never reach each other's handlers.
"""

from __future__ import annotations

HELLO = "commons/hello"
# Not namespaced either: `node doctor` asks a bootstrap peer before it knows the swarm's manifest.
DIALBACK = "commons/dialback"


def averaging(swarm_id: str) -> str:
    """Averaging parts and results (protocol/wire.py: TensorPart, answered by Ack)."""
    return f"commons/{swarm_id}/avg"


def state(swarm_id: str) -> str:
    """Module state for newcomers (StateRequest, answered by StateReply)."""
    return f"commons/{swarm_id}/state"
