"""Liveness and sequencing rules, as tables of (previous state, heartbeat) -> verdict."""

from __future__ import annotations

import pytest

from chiffon_worker.orchestrator.liveness import (
    MAX_PAST_BOOT_IDS,
    SeqState,
    SignsOfLife,
    Verdict,
    advance,
    clock_skew,
    is_online,
    liveness_of,
    sequence,
    skew_threshold,
)

T0 = 1_764_000_000.0
PREV = SeqState("boot-a", T0, 10, ("boot-old",))


@pytest.mark.parametrize(("prev", "boot_id", "started_at", "seq", "verdict", "missed"), [
    pytest.param(None, "boot-a", T0, 1, Verdict.FIRST, 0, id="first heartbeat ever"),
    pytest.param(None, "boot-a", T0, 57, Verdict.FIRST, 0,
                 id="first heartbeat seen mid-run counts no gap"),
    pytest.param(PREV, "boot-a", T0, 11, Verdict.NEXT, 0, id="next seq"),
    pytest.param(PREV, "boot-a", T0, 14, Verdict.GAP, 3, id="three heartbeats lost"),
    pytest.param(PREV, "boot-a", T0, 10, Verdict.DUPLICATE, 0, id="same seq again"),
    pytest.param(PREV, "boot-a", T0, 7, Verdict.OUT_OF_ORDER, 0, id="older seq late"),
    pytest.param(PREV, "boot-b", T0 + 60, 1, Verdict.RESTART, 0, id="new boot id"),
    pytest.param(PREV, "boot-b", T0 - 60, 1, Verdict.RESTART, 0,
                 id="new boot id even with an earlier clock"),
    pytest.param(PREV, "boot-a", T0 + 60, 1, Verdict.RESTART, 0,
                 id="seq reset under the same boot id by a later process"),
    pytest.param(PREV, "boot-a", T0 + 60, 12, Verdict.RESTART, 0,
                 id="a later process of the same boot id is a restart whatever its seq"),
    pytest.param(PREV, "boot-a", T0 - 60, 11, Verdict.OUT_OF_ORDER, 0,
                 id="an earlier process of the same boot id is stale"),
    pytest.param(PREV, "boot-old", T0 - 600, 99, Verdict.STALE_BOOT, 0,
                 id="heartbeat of a superseded boot"),
])
def test_sequence_classifies_a_heartbeat_against_the_last_accepted_one(
        prev: SeqState | None, boot_id: str, started_at: float, seq: int, verdict: Verdict,
        missed: int) -> None:
    result = sequence(prev, boot_id, started_at, seq)
    assert result.verdict is verdict
    assert result.missed == missed
    assert result.accepted is (verdict in {Verdict.FIRST, Verdict.NEXT, Verdict.GAP,
                                           Verdict.RESTART})


def test_advance_remembers_superseded_boots_newest_first_and_bounded() -> None:
    state = advance(None, "boot-0", T0, 1)
    for n in range(1, MAX_PAST_BOOT_IDS + 3):
        state = advance(state, f"boot-{n}", T0 + n, 1)
    assert state.boot_id == f"boot-{MAX_PAST_BOOT_IDS + 2}"
    assert state.past_boot_ids[0] == f"boot-{MAX_PAST_BOOT_IDS + 1}"
    assert len(state.past_boot_ids) == MAX_PAST_BOOT_IDS
    assert "boot-0" not in state.past_boot_ids


def test_advance_within_a_boot_keeps_the_past_and_takes_the_new_seq() -> None:
    assert advance(PREV, "boot-a", T0, 11) == SeqState("boot-a", T0, 11, ("boot-old",))


@pytest.mark.parametrize(("last", "timeout", "now", "online"), [
    pytest.param(T0, 90.0, T0, True, id="just received"),
    pytest.param(T0, 90.0, T0 + 89.9, True, id="younger than the timeout"),
    pytest.param(T0, 90.0, T0 + 90.0, False, id="exactly the timeout is offline"),
    pytest.param(T0, 90.0, T0 + 3600, False, id="long gone"),
    pytest.param(T0, 5.0, T0 + 6, False, id="the agent's own short timeout counts"),
    pytest.param(T0, 600.0, T0 + 300, True, id="the agent's own long timeout counts"),
])
def test_an_agent_is_online_while_its_newest_heartbeat_is_younger_than_its_timeout(
        last: float, timeout: float, now: float, online: bool) -> None:
    assert is_online(last, timeout, now) is online
    assert liveness_of(last, timeout, None, now) == ("online" if online else "lost")


@pytest.mark.parametrize(("collected", "received", "interval", "flagged"), [
    pytest.param(T0, T0 + 0.2, 30.0, None, id="normal transit"),
    pytest.param(T0 + 25, T0, 30.0, None, id="within the interval"),
    pytest.param(T0 + 31, T0, 30.0, 31.0, id="agent clock ahead"),
    pytest.param(T0 - 120, T0, 30.0, -120.0, id="agent clock behind"),
    pytest.param(T0 + 6, T0, 1.0, 6.0, id="five seconds is the floor for short intervals"),
    pytest.param(T0 + 4.9, T0, 1.0, None, id="under the five second floor"),
])
def test_clock_skew_is_flagged_beyond_max_of_five_seconds_and_the_interval(
        collected: float, received: float, interval: float, flagged: float | None) -> None:
    assert clock_skew(collected, received, interval) == flagged
    assert skew_threshold(interval) == max(5.0, interval)


# -- liveness: online, stopped, lost from capacity heartbeats and worker events -----------


TIMEOUT = 90.0  # the default capacity timeout
EVENTS = 2.0  # Celery's worker-heartbeat interval


def _signs(last_event_at: float, offline_at: float | None = None) -> SignsOfLife:
    return SignsOfLife("agent@host", last_event_at, EVENTS, offline_at)


@pytest.mark.parametrize(("last_seen", "signs", "now", "expected"), [
    pytest.param(T0, None, T0 + 89, "online", id="no events: capacity heartbeat within timeout"),
    pytest.param(T0, None, T0 + 90, "lost", id="no events: capacity heartbeat timed out"),
    pytest.param(T0, _signs(T0 + 20), T0 + 24, "online", id="events within their window"),
    pytest.param(T0, _signs(T0 + 20), T0 + 25.5, "lost",
                 id="events stopped past 2 intervals, capacity still fresh"),
    pytest.param(T0 + 23, _signs(T0 + 20), T0 + 25.5, "online",
                 id="events lag a capacity heartbeat received after them: still alive"),
    pytest.param(T0 + 23, _signs(T0 + 20), T0 + 27.5, "lost",
                 id="nothing for the event window after that capacity heartbeat"),
    pytest.param(T0, _signs(T0 + 20, offline_at=T0 + 21), T0 + 21.1, "stopped",
                 id="worker-offline after the last event"),
    pytest.param(T0, _signs(T0 + 20, offline_at=T0 + 21), T0 + 3600, "stopped",
                 id="stopped stays stopped"),
    pytest.param(T0, _signs(T0 + 30, offline_at=T0 + 21), T0 + 31, "online",
                 id="restarted: an event after the stop"),
    pytest.param(T0 + 60, _signs(T0 + 20, offline_at=T0 + 21), T0 + 61, "online",
                 id="restart the listener missed: a capacity heartbeat long after the stop"),
    pytest.param(T0 + 60, _signs(T0 + 20), T0 + 61, "online",
                 id="events dried up long before the newest heartbeat: capacity decides"),
    pytest.param(T0 + 60, _signs(T0 + 20), T0 + 150, "lost",
                 id="events dried up, capacity heartbeat timed out too"),
])
def test_liveness_from_capacity_heartbeats_and_worker_events(
        last_seen: float, signs: SignsOfLife | None, now: float, expected: str) -> None:
    assert liveness_of(last_seen, TIMEOUT, signs, now) == expected


def test_the_event_window_is_two_event_intervals_as_in_flower() -> None:
    assert _signs(T0).window_seconds == 2 * EVENTS
