"""The timings and limits the operator docs quote are the code's.

docs/operations.md, docs/orchestrator.md and docs/deploying.md tell operators how long
things take and how much they hold (back-offs, windows, batch sizes, defaults). Each row
of ``QUOTES`` is one such sentence: a regex over the doc (whitespace collapsed, so a
sentence may wrap), one group per number, and what the code says each must be. A number
changed in the code without the doc (or the other way round) fails here; a sentence
reworded so its regex no longer matches fails too, so the table follows the docs.

Numbers compare as numbers (``1,000`` is 1000) within ``rel_tol``; words ("a week",
"hour") compare as text.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"^\d[\d,]*(\.\d+)?$")


@dataclass(frozen=True)
class Quote:
    """One sentence of a doc that quotes numbers of the code."""

    id: str
    doc: str  # under docs/
    pattern: str  # one group per quoted value
    expected: Callable[[], tuple[float | str, ...]]  # the code's values, in group order
    rel_tol: float = 0.0  # for "about N s"


def _default(function: Callable[..., Any], parameter: str) -> Any:
    """The default of ``parameter`` of ``function`` (what production code gets)."""
    return inspect.signature(function).parameters[parameter].default


def _config_default(name: str) -> Any:
    from chiffon_worker.config import Config
    from chiffon_worker.settings_spec import declared_keys

    return declared_keys(Config)[name].default


def _config_check(name: str, value: Any) -> str | None:
    from chiffon_worker.config import Config
    from chiffon_worker.settings_spec import declared_keys

    check = declared_keys(Config)[name].spec.check
    assert check is not None, name
    return check(value)


def _unit_directive(unit: str, key: str) -> str:
    for line in (ROOT / "deploy" / unit).read_text().splitlines():
        name, _, value = line.strip().partition("=")
        if name == key:
            return value
    raise AssertionError(f"{unit} has no {key}=")


def _worker_reconnect_cap() -> tuple[float, ...]:
    from chiffon_worker.worker.consumer import RECONNECT_MAX_SECONDS

    return (RECONNECT_MAX_SECONDS,)


def _copy_queue_expiry() -> tuple[str, ...]:
    from chiffon_worker.wire import HEARTBEAT_COPY_EXPIRES_MS

    days = HEARTBEAT_COPY_EXPIRES_MS / 86_400_000
    return ("a week" if days == 7 else f"{days:g} days",)


def _event_window() -> tuple[float, ...]:
    from chiffon_worker.orchestrator.liveness import EVENT_EXPIRY_INTERVALS
    from chiffon_worker.orchestrator.worker_events import DEFAULT_EVENT_INTERVAL_SECONDS

    return EVENT_EXPIRY_INTERVALS, EVENT_EXPIRY_INTERVALS * DEFAULT_EVENT_INTERVAL_SECONDS


def _lost_after() -> tuple[float, ...]:
    return (_event_window()[1],)


def _event_interval() -> tuple[float, ...]:
    from chiffon_worker.orchestrator.worker_events import DEFAULT_EVENT_INTERVAL_SECONDS

    return (DEFAULT_EVENT_INTERVAL_SECONDS,)


def _signs_flush() -> tuple[float, ...]:
    from chiffon_worker.orchestrator.worker_events import WorkerEventListener

    return (_default(WorkerEventListener.__init__, "flush_seconds"),)


def _conflict_intervals() -> tuple[float, ...]:
    from chiffon_worker.orchestrator.liveness import CONFLICT_INTERVALS

    return (CONFLICT_INTERVALS,)


def _takeover_intervals() -> tuple[float, ...]:
    from chiffon_worker.orchestrator.liveness import TAKEOVER_INTERVALS

    return (TAKEOVER_INTERVALS,)


def _missed_seqs() -> tuple[float, ...]:
    from chiffon_worker.orchestrator.judge import MAX_MISSED_SEQS

    return (MAX_MISSED_SEQS,)


def _lead_poll() -> tuple[float, ...]:
    from chiffon_worker.orchestrator.leadership import Leadership

    return (_default(Leadership.__init__, "poll_seconds"),)


def _history_points() -> tuple[float, ...]:
    from chiffon_worker.orchestrator.registry import Registry

    return (_default(Registry.__init__, "history_points"),)


def _history_hours() -> tuple[float, ...]:
    interval = _config_default("heartbeat_interval_seconds")
    return round(_history_points()[0] * interval / 3600), interval


def _skew_floor() -> tuple[float, ...]:
    from chiffon_worker.orchestrator.liveness import MIN_SKEW_THRESHOLD_SECONDS

    return (MIN_SKEW_THRESHOLD_SECONDS,)


def _message_mib() -> tuple[float, ...]:
    from chiffon_worker.protocol import MAX_MESSAGE_BYTES

    return (MAX_MESSAGE_BYTES / 2**20,)


def _batch() -> tuple[float, ...]:
    from chiffon_worker.orchestrator.heartbeat_consumer import HeartbeatConsumer

    init = HeartbeatConsumer.__init__
    return _default(init, "batch_size"), _default(init, "max_delay_seconds")


def _write_retry_total() -> tuple[float, ...]:
    from chiffon_worker.orchestrator.heartbeat_consumer import HeartbeatConsumer

    return (sum(_default(HeartbeatConsumer.__init__, "write_retry_delays")),)


def _consumer_reconnect_backoff() -> tuple[float, ...]:
    from chiffon_worker.orchestrator.heartbeat_consumer import (
        RECONNECT_FIRST_DELAY_SECONDS,
        HeartbeatConsumer,
    )

    return (RECONNECT_FIRST_DELAY_SECONDS,
            _default(HeartbeatConsumer.__init__, "reconnect_max_seconds"))


def _reservation_ttl() -> tuple[float, ...]:
    from chiffon_worker.orchestrator.routing import DEFAULT_RESERVATION_TTL_SECONDS

    configured = _config_default("reservation_ttl_seconds")
    assert configured == DEFAULT_RESERVATION_TTL_SECONDS
    return (configured,)


def _drain_resend() -> tuple[float, ...]:
    from chiffon_worker.orchestrator.drain_enforcer import DrainEnforcer

    return (_default(DrainEnforcer.__init__, "resend_seconds"),)


def _magic_packet() -> tuple[float, ...]:
    from chiffon_worker.wake import MAGIC_PACKET_LENGTH

    return (MAGIC_PACKET_LENGTH,)


def _ended_window() -> tuple[str, ...]:
    from chiffon_worker.cli.work_command import DEFAULT_ENDED_WINDOW_SECONDS

    return ("hour" if DEFAULT_ENDED_WINDOW_SECONDS == 3600 else
            f"{DEFAULT_ENDED_WINDOW_SECONDS:g} s",)


def _status_width() -> tuple[float, ...]:
    from chiffon_worker.cli.status_table import NARROW_WIDTH, SHORT_ID

    return NARROW_WIDTH, SHORT_ID


def _wake_defaults() -> tuple[float | str, ...]:
    return _config_default("wake_broadcast_address"), _config_default("wake_port")


QUOTES = [
    # -- docs/operations.md -------------------------------------------------------------
    Quote("worker-reconnect-cap", "operations.md",
          r"\(work, backing off up to ([\d.,]+) s\)", _worker_reconnect_cap),
    Quote("heartbeat-retry-after-one-interval", "operations.md",
          r"heartbeat seq \d+ not sent; retrying in ([\d.,]+) s",
          lambda: (_config_default("heartbeat_interval_seconds"),)),
    Quote("interval-bounds-message", "operations.md",
          r"heartbeat_interval_seconds: (must be [^(]*?) \(got -1\.0\)",
          lambda: (str(_config_check("heartbeat_interval_seconds", -1.0)),)),
    Quote("agent-stop-timeout", "operations.md", r"up to `TimeoutStopSec=(\d+)`",
          lambda: (float(_unit_directive("chiffon-agent.service", "TimeoutStopSec")),)),
    Quote("copy-queue-expiry", "operations.md",
          r"A copy queue nobody consumes for (a week|[\d.]+ days)", _copy_queue_expiry),
    Quote("wake-defaults-operations", "operations.md", r"\(default `([\d.]+):(\d+)`",
          _wake_defaults),
    # -- docs/orchestrator.md -----------------------------------------------------------
    Quote("capacity-interval", "orchestrator.md",
          r"Capacity heartbeats come every ([\d.]+) s \(`heartbeat_interval_seconds`\)",
          lambda: (_config_default("heartbeat_interval_seconds"),)),
    Quote("dead-agent-online-for-the-timeout", "orchestrator.md",
          r"would call a dead agent online for ([\d.]+) s",
          lambda: (_config_default("heartbeat_timeout_seconds"),)),
    Quote("worker-event-interval", "orchestrator.md",
          r"`worker-heartbeat` every ([\d.]+) s", _event_interval),
    Quote("event-window", "orchestrator.md",
          r"events within (\d+) event intervals \(([\d.]+) s", _event_window),
    Quote("lost-after-the-event-window", "orchestrator.md",
          r"\| `lost` \| ([\d.]+) s after the last sign of life", _lost_after),
    Quote("signs-of-life-written", "orchestrator.md",
          r"\(`chiffon_signs_of_life`, written every ([\d.]+) s\)", _signs_flush),
    Quote("stopped-at-the-next-write", "orchestrator.md",
          r"at its next registry write, every ([\d.]+) s\)", _signs_flush),
    Quote("conflict-shown-for", "orchestrator.md",
          r"for ([\d.]+) capacity intervals after the last such heartbeat",
          _conflict_intervals),
    Quote("takeover-after", "orchestrator.md", r"goes silent for ([\d.]+) intervals",
          _takeover_intervals),
    Quote("metrics-port-default", "orchestrator.md",
          r"default: metrics_port, (\d+);", lambda: (_config_default("metrics_port"),)),
    Quote("metrics-port-default-prometheus", "orchestrator.md",
          r"`/metrics` on `metrics_port` \(default (\d+);",
          lambda: (_config_default("metrics_port"),)),
    Quote("missed-seqs-kept", "orchestrator.md",
          r"keeps its last (\d+) counted-missed sequence numbers", _missed_seqs),
    Quote("lead-poll", "orchestrator.md", r"try every ([\d.]+) s to take it", _lead_poll),
    Quote("history-points", "orchestrator.md", r"the last ([\d,]+) points per agent",
          _history_points),
    Quote("history-hours", "orchestrator.md",
          r"about (\d+) hours at the default ([\d.]+) s interval", _history_hours),
    Quote("skew-floor", "orchestrator.md", r"by more than max\(([\d.]+) s, interval\)",
          _skew_floor),
    Quote("heartbeat-size-limit", "orchestrator.md", r"negative numbers, over (\d+) MiB",
          _message_mib),
    Quote("work-request-size-limit", "orchestrator.md",
          r"at most (\d+) MiB \(the limit of a work request", _message_mib),
    Quote("batch", "orchestrator.md",
          r"up to ([\d,]+) messages or ([\d.]+) s per transaction", _batch),
    Quote("registry-write-retries", "orchestrator.md",
          r"the batch is retried for about (\d+) s", _write_retry_total, rel_tol=0.1),
    Quote("consumer-reconnect-backoff", "orchestrator.md",
          r"reconnects with backoff \(([\d.]+) s doubling to ([\d.]+) s\)",
          _consumer_reconnect_backoff),
    Quote("reservation-ttl", "orchestrator.md", r"`reservation_ttl_seconds` \(default (\d+)\)",
          _reservation_ttl),
    Quote("drain-resend", "orchestrator.md", r"\(at most once per (\d+) s\)", _drain_resend),
    Quote("magic-packet", "orchestrator.md", r"the MAC 16 times: (\d+) bytes", _magic_packet),
    Quote("work-ended-window", "orchestrator.md",
          r"`--ended \[SECONDS\]` adds what ended in the last (hour|[\d.]+ s)", _ended_window),
    Quote("status-width", "orchestrator.md",
          r"keeps to (\d+) columns: agent ids show their first (\d+) characters",
          _status_width),
    Quote("wake-defaults-orchestrator", "orchestrator.md", r"\(default `([\d.]+):(\d+)`\)",
          _wake_defaults),
    # -- docs/deploying.md --------------------------------------------------------------
    Quote("deploy-metrics-port", "deploying.md", r"config `metrics_port`, default (\d+)",
          lambda: (_config_default("metrics_port"),)),
    Quote("deploy-skew-floor", "deploying.md",
          r"by more than max\(([\d.]+) s, the agent's interval\)", _skew_floor),
    Quote("deploy-expiry-behind", "deploying.md",
          r"behind by more than `heartbeat_timeout_seconds`\*\* \(([\d.]+) s by default\)",
          lambda: (_config_default("heartbeat_timeout_seconds"),)),
    Quote("deploy-wake-port", "deploying.md", r"\| (\d+)/udp, outbound broadcast \| Wake-on-LAN",
          lambda: (_config_default("wake_port"),)),
]


@cache
def _doc_text(name: str) -> str:
    """The doc with every run of whitespace (line breaks included) as one space."""
    return " ".join((ROOT / "docs" / name).read_text(encoding="utf-8").split())


def _same(quoted: str, expected: float | str, rel_tol: float) -> bool:
    if isinstance(expected, str) or not NUMBER.match(quoted):
        return quoted == str(expected)
    return math.isclose(float(quoted.replace(",", "")), expected, rel_tol=rel_tol)


@pytest.mark.parametrize("quote", QUOTES, ids=[quote.id for quote in QUOTES])
def test_the_doc_quotes_the_codes_number(quote: Quote) -> None:
    found = re.findall(quote.pattern, _doc_text(quote.doc))
    assert found, f"docs/{quote.doc} no longer says /{quote.pattern}/: update QUOTES"
    expected = quote.expected()
    for match in found:
        quoted = match if isinstance(match, tuple) else (match,)
        assert len(quoted) == len(expected), quote.pattern
        wrong = [(said, code) for said, code in zip(quoted, expected, strict=True)
                 if not _same(said, code, quote.rel_tol)]
        assert not wrong, (f"docs/{quote.doc} says {quoted}, the code {expected} "
                           f"(/{quote.pattern}/)")


def test_the_table_ids_are_unique() -> None:
    ids = [quote.id for quote in QUOTES]
    assert len(ids) == len(set(ids))
