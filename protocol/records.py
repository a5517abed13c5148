"""DHT records: their keys (namespaced by swarm id) and strict schemas.

Every value a peer reads from the DHT went through ``parse_*`` here: a malformed record is
dropped (and counted by the caller), never half-used.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Type, TypeVar

from pydantic.v1 import (
    BaseModel,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    conint,
    conlist,
    constr,
    validator,
)

from protocol.version import PROTOCOL_VERSION

KEY_PREFIX = "commons"
MODULE_PATTERN = r"^(trunk|expert\.[0-9]{1,4}\.[0-9]{1,4})\Z"  # \Z: "$" would accept a trailing newline
MAX_MODULES_PER_PEER = 4096
DATA_COMMITMENT_PATTERN = r"^sha256:[0-9a-f]{64}\Z"


def peers_key(swarm_id: str) -> str:
    """One key per swarm; subkey = peer id, value = that peer's PeerRecord."""
    return f"{KEY_PREFIX}/{swarm_id}/peers"


def ready_key(swarm_id: str, module: str, round_number: int) -> str:
    """One key per module and round; subkey = peer id, value = ReadyRecord."""
    return f"{KEY_PREFIX}/{swarm_id}/ready/{module}/{round_number}"


def revocations_key(swarm_id: str) -> str:
    """One key per swarm; subkey = peer id, value = the founders' revocations that peer knows (a list of
    protocol/membership.py Revocation JSON strings): every member passes on what it has."""
    return f"{KEY_PREFIX}/{swarm_id}/revocations"


MAX_REVOCATIONS = 1024  # in one record


def contributions_key(swarm_id: str) -> str:
    """One key per swarm (members-only swarms); subkey = peer id, value = that peer's summary: the latest vouch
    about it from each voucher, and its receipt log's length and head (node/swarm/contributions.py)."""
    return f"{KEY_PREFIX}/{swarm_id}/contributions"


def receipts_key(swarm_id: str, peer_id: str) -> str:
    """One key per member (members-only swarms); subkey = a voucher's peer id, value = the voucher's newest
    receipts for that member and its vouch (protocol/contributions.py). DHT values stay small: hivemind hands
    them between processes through a pipe."""
    return f"{KEY_PREFIX}/{swarm_id}/receipts/{peer_id}"


class RecordError(ValueError):
    """A record read from the DHT does not match its schema."""


def _finite(value: Optional[float]) -> Optional[float]:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be finite")
    return value


class PeerRecord(BaseModel):
    """What a node says about itself, refreshed every few seconds with a short expiration."""

    peer_id: constr(min_length=1, max_length=128, strict=True)  # type: ignore[valid-type]
    protocol_version: StrictInt = PROTOCOL_VERSION
    modules: conlist(constr(regex=MODULE_PATTERN, strict=True), max_items=MAX_MODULES_PER_PEER)  # type: ignore
    outer_round: StrictInt
    local_steps: StrictInt
    loss: Optional[StrictFloat] = None
    samples_per_second: Optional[StrictFloat] = None
    maddrs: conlist(constr(max_length=512, strict=True), max_items=16) = []  # type: ignore[valid-type]
    device: StrictStr = "cpu"
    version: StrictStr = ""
    leaving: StrictBool = False  # set in the last record a node stores as it leaves
    # A commitment to the data this node trains on: a hash over its files' relative names and sizes
    # (node/training/data.py), never names or content; older peers send none.
    data: Optional[constr(regex=DATA_COMMITMENT_PATTERN, strict=True)] = None  # type: ignore[valid-type]
    # Whether others can dial this node (node/swarm/reachability.py); older peers send none (unknown).
    reachability: Optional[Literal["public", "private", "unknown"]] = None
    # Members-only swarms: the founders' invite of this peer (protocol/membership.py, JSON); a founder's own
    # node has none. Readers check it and leave out peers whose invite does not admit them.
    invite: Optional[constr(max_length=4096, strict=True)] = None  # type: ignore[valid-type]
    # Experts this node will stop hosting once the notice has run (node/swarm/placement.py, SwapNotice): readers
    # do not count it as a host that stays. Older peers send none.
    dropping: conlist(constr(regex=MODULE_PATTERN, strict=True), max_items=MAX_MODULES_PER_PEER) = []  # type: ignore

    class Config:
        extra = "ignore"  # newer peers may add fields; older peers read what they know

    _loss_finite = validator("loss", "samples_per_second", allow_reuse=True)(_finite)

    @validator("outer_round", "local_steps")
    def _non_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be >= 0")
        return value


class ReadyRecord(BaseModel):
    """A peer is ready to average ``module`` for one round; used to form groups."""

    posted_at: StrictFloat
    params_hash: constr(regex=r"^[0-9a-f]{16,64}\Z", strict=True)  # type: ignore[valid-type]
    numel: StrictInt
    protocol_version: StrictInt = PROTOCOL_VERSION
    # How long a window this peer opens if its post is the first: its step time makes the others'
    # posts spread wider than gather_seconds. Readers clamp it (node/averaging/matchmaking.py).
    window_seconds: Optional[StrictFloat] = None
    # The size of averaging messages this peer asks for, from the rate of its last round. A group
    # uses the smallest ask of its members, clamped by the readers (node/averaging/matchmaking.py); older
    # peers ask nothing, which counts as the manifest's size, the only size they know.
    message_bytes: Optional[StrictInt] = None
    # False: this peer cannot be dialed (behind NAT) and reduces no slice; it sends its parts and takes the
    # results on streams it opens itself. Older peers send none, which counts as True.
    reduces: Optional[StrictBool] = None
    # Members-only swarms: the samples this peer trained on since its last round, as it claims them; the members
    # that reduce its parts sign receipts for it, capped at what one round allows (protocol/contributions.py).
    samples: Optional[conint(ge=0, lt=1 << 53, strict=True)] = None  # type: ignore[valid-type]

    class Config:
        extra = "ignore"

    _posted_finite = validator("posted_at", allow_reuse=True)(_finite)
    _window_finite = validator("window_seconds", allow_reuse=True)(_finite)

    @validator("numel")
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be > 0")
        return value


RecordT = TypeVar("RecordT", PeerRecord, ReadyRecord)


def parse_record(model: Type[RecordT], value: object) -> RecordT:
    """Validate a DHT value against ``model``; raise RecordError with a one-line reason."""
    if not isinstance(value, dict):
        raise RecordError(f"{model.__name__} must be a mapping, got {type(value).__name__}")
    if not all(isinstance(key, str) for key in value):  # msgpack hands bytes keys through
        raise RecordError(f"{model.__name__} must have text keys only")
    try:
        record = model.parse_obj(value)
    except ValidationError as e:
        first = e.errors()[0]
        raise RecordError(f"{model.__name__}.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if record.protocol_version != PROTOCOL_VERSION:
        raise RecordError(f"{model.__name__} speaks protocol {record.protocol_version}, not {PROTOCOL_VERSION}")
    return record
