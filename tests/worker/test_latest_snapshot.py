"""The agent's latest snapshot: the one its last heartbeat carried is reused by views
while recent; an old one (or none) is replaced by one taken then, and kept."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from chiffon_worker.worker.latest_snapshot import LatestSnapshot


def _counting_snapshots() -> tuple[Callable[[], dict[str, Any]], list[int]]:
    """A snapshot taker that numbers its snapshots (``seq`` 0: ad hoc) and the list of
    numbers it handed out."""
    taken: list[int] = []
    numbers = itertools.count(1)

    def take() -> dict[str, Any]:
        taken.append(next(numbers))
        return {"seq": 0, "taken": taken[-1]}

    return take, taken


def test_a_recent_heartbeat_snapshot_is_reused_without_taking_one() -> None:
    latest = LatestSnapshot()
    latest.record({"seq": 7})
    take, taken = _counting_snapshots()
    assert latest.recent(60.0, take).snapshot == {"seq": 7}
    assert taken == []


def test_before_any_heartbeat_a_snapshot_is_taken_and_kept_for_the_next_view() -> None:
    latest = LatestSnapshot()
    take, taken = _counting_snapshots()
    first = latest.recent(60.0, take)
    second = latest.recent(60.0, take)
    assert first.snapshot == second.snapshot == {"seq": 0, "taken": 1}
    assert taken == [1]


def test_a_snapshot_older_than_the_limit_is_replaced_by_a_fresh_one() -> None:
    latest = LatestSnapshot()
    latest.record({"seq": 7}, now=time.monotonic() - 61.0)
    take, taken = _counting_snapshots()
    kept = latest.recent(60.0, take)
    assert kept.snapshot == {"seq": 0, "taken": 1} and taken == [1]
    assert kept.age_seconds() < 60.0


def test_a_newer_heartbeat_replaces_the_kept_snapshot() -> None:
    latest = LatestSnapshot()
    latest.record({"seq": 7})
    latest.record({"seq": 8})
    take, _ = _counting_snapshots()
    assert latest.recent(60.0, take).snapshot == {"seq": 8}


def test_the_age_counts_from_when_it_was_kept() -> None:
    latest = LatestSnapshot()
    latest.record({"seq": 7}, now=100.0)
    kept = latest.latest()
    assert kept is not None and kept.age_seconds(now=112.5) == 12.5
