"""Unit tests for the coordinator-free parts of matchmaking: windows and groups."""

from __future__ import annotations

import hashlib
from typing import Dict

from node.averaging.matchmaking import (
    MAX_MESSAGE_GROWTH,
    MAX_WINDOW_FACTOR,
    Group,
    agreed_message_bytes,
    make_group,
    window_of,
)
from protocol.records import ReadyRecord

HASH_A = "a" * 32
HASH_B = "b" * 32
GATHER = 3.0


def _rec(posted_at: float, params_hash: str = HASH_A, numel: int = 10, window=None, ask=None) -> ReadyRecord:
    return ReadyRecord(
        posted_at=float(posted_at), params_hash=params_hash, numel=numel, window_seconds=window, message_bytes=ask
    )


# Two bursts of posts: p1..p3 within 3 s of p1, then p4..p5 after that window closed, then a late p6.
RECORDS: Dict[str, ReadyRecord] = {
    "p3": _rec(102.9),
    "p1": _rec(100.0),
    "p2": _rec(101.0),
    "p5": _rec(106.0),
    "p4": _rec(104.0),
    "p6": _rec(120.0),
}


def test_each_peer_gets_its_window() -> None:
    first, second, late = {"p1", "p2", "p3"}, {"p4", "p5"}, {"p6"}
    for window in (first, second, late):
        for peer in window:
            assert set(window_of(peer, RECORDS, GATHER)[0]) == window
    assert window_of("p4", RECORDS, GATHER)[0]["p5"] is RECORDS["p5"]


def test_window_opens_at_the_earliest_post_not_yet_in_a_window() -> None:
    # p4 is within 3 s of p3 but not of p1, who opened the first window: p4 opens the next one.
    records = {"p1": _rec(0.0), "p3": _rec(2.5), "p4": _rec(3.5), "p5": _rec(6.5), "p6": _rec(6.6)}
    assert set(window_of("p3", records, GATHER)[0]) == {"p1", "p3"}
    assert set(window_of("p4", records, GATHER)[0]) == {"p4", "p5"}
    assert set(window_of("p6", records, GATHER)[0]) == {"p6"}


def test_the_opening_record_sets_the_window_length_within_bounds() -> None:
    # a's steps are slow: it asks for 8 s, so b and c (7 s later) are in its window, d is not
    records = {"a": _rec(0.0, window=8.0), "b": _rec(7.0), "c": _rec(7.9, window=1.0), "d": _rec(8.5)}
    assert window_of("c", records, GATHER) == ({p: records[p] for p in "abc"}, 8.0)
    assert window_of("d", records, GATHER) == ({"d": records["d"]}, 8.5 + GATHER)  # d asked for nothing
    # only the opener's wish counts; a shorter one than gather_seconds, or a huge one, is clamped
    assert window_of("b", {"a": _rec(0.0, window=0.5), "b": _rec(2.0)}, GATHER)[1] == GATHER
    huge = {"a": _rec(0.0, window=1e9), "b": _rec(13.0)}
    assert window_of("b", huge, GATHER) == ({"b": huge["b"]}, 13.0 + GATHER)
    assert window_of("a", huge, GATHER)[1] == MAX_WINDOW_FACTOR * GATHER


def test_window_boundary_is_inclusive() -> None:
    records = {"a": _rec(10.0), "b": _rec(13.0), "c": _rec(13.000001)}
    assert set(window_of("b", records, GATHER)[0]) == {"a", "b"}
    assert set(window_of("c", records, GATHER)[0]) == {"c"}


def test_same_time_posts_share_a_window() -> None:
    records = {"b": _rec(5.0), "a": _rec(5.0)}
    assert set(window_of("a", records, GATHER)[0]) == set(window_of("b", records, GATHER)[0]) == {"a", "b"}


def test_peer_without_record_has_no_window() -> None:
    assert window_of("nobody", RECORDS, GATHER)[0] == {}
    assert window_of("p1", {}, GATHER)[0] == {}


def test_alone() -> None:
    only = {"p1": _rec(1.0)}
    assert window_of("p1", only, GATHER)[0] == only
    group = make_group("trunk", 0, only)
    assert group.members == ("p1",) and not group.needs_resync and group.index_of("p1") == 0


def test_make_group_is_deterministic_and_order_independent() -> None:
    window = {p: RECORDS[p] for p in ("p3", "p1", "p2")}
    reordered = {p: RECORDS[p] for p in ("p2", "p3", "p1")}
    a = make_group("expert.0.1", 4, window)
    b = make_group("expert.0.1", 4, reordered)
    assert a == b
    assert isinstance(a, Group)
    assert a.members == ("p1", "p2", "p3") and a.index_of("p3") == 2
    assert len(a.group_id) == 16 and int(a.group_id, 16) >= 0
    assert a.module == "expert.0.1" and a.round == 4


def test_group_id_depends_on_membership_module_round_and_hashes() -> None:
    window = {p: RECORDS[p] for p in ("p1", "p2", "p3")}
    base = make_group("trunk", 1, window).group_id
    fewer = make_group("trunk", 1, {p: RECORDS[p] for p in ("p1", "p2")}).group_id
    more = make_group("trunk", 1, dict(window, p4=RECORDS["p4"])).group_id
    other_peer = make_group("trunk", 1, {"p1": RECORDS["p1"], "p2": RECORDS["p2"], "p9": RECORDS["p3"]}).group_id
    other_module = make_group("expert.0.0", 1, window).group_id
    other_round = make_group("trunk", 2, window).group_id
    other_hash = make_group("trunk", 1, dict(window, p3=_rec(102.9, HASH_B))).group_id
    ids = [base, fewer, more, other_peer, other_module, other_round, other_hash]
    assert len(set(ids)) == len(ids)


def test_group_id_ignores_post_times() -> None:
    window = {"p1": _rec(1.0), "p2": _rec(2.0)}
    shifted = {"p1": _rec(1.5), "p2": _rec(2.5)}
    assert make_group("trunk", 0, window).group_id == make_group("trunk", 0, shifted).group_id


def test_needs_resync_iff_hashes_differ() -> None:
    same = {"p1": _rec(1.0, HASH_A), "p2": _rec(1.1, HASH_A), "p3": _rec(1.2, HASH_A)}
    assert not make_group("trunk", 0, same).needs_resync
    differ = dict(same, p2=_rec(1.1, HASH_B))
    group = make_group("trunk", 0, differ)
    assert group.needs_resync
    assert group.params_hashes == (HASH_A, HASH_B, HASH_A)


SMALLEST = 262_144  # the manifest's message size in these tests


def test_a_group_takes_its_smallest_message_ask_within_bounds() -> None:
    def agreed(*asks) -> int:
        return agreed_message_bytes([_rec(1.0, ask=a) for a in asks], SMALLEST)

    assert agreed(600_000, 900_000, 700_000) == 600_000
    assert agreed(600_000, None) == SMALLEST  # an older peer asks nothing: it only knows the manifest's size
    assert agreed(600_000, 1000) == SMALLEST  # below the manifest's size: the manifest's
    assert agreed(0, -5) == SMALLEST
    assert agreed(10**15, 10**12) == MAX_MESSAGE_GROWTH * SMALLEST  # a huge ask is capped
    assert agreed() == SMALLEST


def test_a_grown_message_size_is_part_of_the_group_and_its_id() -> None:
    asks = {"p1": _rec(1.0, ask=500_000), "p2": _rec(1.1, ask=800_000)}
    none = {"p1": _rec(1.0), "p2": _rec(1.1)}
    grown = make_group("trunk", 3, asks, SMALLEST)
    assert grown.message_bytes == 500_000
    # With no grown size, the id is the one older peers compute, and the group says "the manifest's".
    legacy = hashlib.sha256(f"trunk|3|p1|p2|{HASH_A}|{HASH_A}".encode()).hexdigest()[:16]
    for plain in (make_group("trunk", 3, none, SMALLEST), make_group("trunk", 3, asks), make_group("trunk", 3, none)):
        assert plain.message_bytes == 0 and plain.group_id == legacy
    assert grown.group_id != legacy
    # Members that read different asks form different groups, not one group cut two ways.
    other = make_group("trunk", 3, dict(asks, p1=_rec(1.0, ask=600_000)), SMALLEST)
    assert other.message_bytes == 600_000 and other.group_id not in (grown.group_id, legacy)
