"""From received heartbeat messages to batched registry writes (no broker code here).

:class:`Ingestor` keeps every agent's sequencing state in memory (loaded from the
registry at start; the orchestrator is the registry's only writer), so judging a
heartbeat costs no query. Per message: decode, check the signature (when a secret is
set), validate, sequence (:mod:`liveness`), and queue the agent row and a history point.
:meth:`Ingestor.flush` writes everything queued in one transaction; the caller acks the
messages only after it returns.

Outcomes: *accepted* (registry updated), *rejected* (not a valid heartbeat, or unsigned,
forged or replayed when signing is on: counted by reason, logged, dropped) and *ignored*
(a valid but stale heartbeat: duplicate, out of order, from a superseded boot, expired,
or a redelivery after a broker reconnect).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chiffon_worker.errors import ProtocolError, RegistryError
from chiffon_worker.orchestrator import decoding, liveness, tables
from chiffon_worker.orchestrator.decoding import HeartbeatRejected
from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.orchestrator.stats import IngestStats
from chiffon_worker.protocol import validate_snapshot
from chiffon_worker.signing import SignatureError, verify_snapshot

log = logging.getLogger(__name__)

ACCEPTED = "accepted"
REJECTED = "rejected"
IGNORED = "ignored"
_LOG_BURST = 5  # lines per kind (reason, restart, gap, ...) per window before suppressing
_LOG_WINDOW_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one message: ``kind`` is accepted/rejected/ignored."""

    kind: str
    reason: str = ""


_ACCEPT = Outcome(ACCEPTED)


_TEXT_COLUMNS = ("agent_id", "hostname", "pool", "boot_id")
_INT_LIMITS = {"seq": (1 << 63) - 1, "cpu_cores_physical": (1 << 31) - 1}


def check_storable(snap: Mapping[str, Any]) -> None:
    """Refuse values a valid snapshot may carry but a registry column cannot hold.

    A NUL character or a lone surrogate in a text column, or an integer beyond the
    column's range, would fail the whole batch's transaction on every retry (a poison
    message); such a heartbeat is rejected as invalid instead.
    """
    for key in _TEXT_COLUMNS:
        value: str = snap[key]
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ProtocolError(key, "is not valid Unicode text") from None
        if "\x00" in value:
            raise ProtocolError(key, "must not contain NUL characters")
    for key, limit in _INT_LIMITS.items():
        if snap[key] > limit:
            raise ProtocolError(key, f"is larger than {limit}")


class _AgentMemory:
    """Per-agent state the ingestor needs between heartbeats."""

    __slots__ = ("first_seen", "history_count", "missed", "past_json", "restarts", "seq",
                 "skewed")

    def __init__(self, seq: liveness.SeqState, *, first_seen: float, restarts: int, missed: int,
                 history_count: int, skewed: bool) -> None:
        self.seq = seq
        self.first_seen = first_seen
        self.restarts = restarts
        self.missed = missed
        self.history_count = history_count
        self.skewed = skewed
        self.past_json = json.dumps(list(seq.past_boot_ids))


class _LogLimiter:
    """At most ``_LOG_BURST`` lines per key per window; then one line with the count."""

    def __init__(self) -> None:
        self._windows: dict[str, tuple[float, int]] = {}

    def allow(self, key: str, now: float) -> tuple[bool, int]:
        """(may log now, lines suppressed since the last allowed one)."""
        start, count = self._windows.get(key, (now, 0))
        if now - start >= _LOG_WINDOW_SECONDS:
            self._windows[key] = (now, 1)
            return True, max(0, count - _LOG_BURST)
        self._windows[key] = (start, count + 1)
        return count < _LOG_BURST, 0


class Ingestor:
    """Judges heartbeats and batches their registry writes (see the module docstring).

    ``secret``: the HMAC key heartbeats must be signed with; empty accepts unsigned ones.
    """

    def __init__(self, registry: Registry, *, secret: str = "",
                 stats: IngestStats | None = None) -> None:
        self.registry = registry
        self.secret = secret
        self.stats = stats if stats is not None else IngestStats()
        self._points = registry.history_points
        self._agents: dict[str, _AgentMemory] = {}
        self._pending_agents: dict[str, dict[str, Any]] = {}
        self._pending_history: dict[tuple[str, int], dict[str, Any]] = {}
        self._limiter = _LogLimiter()
        for record in registry.agents():
            self._agents[record.agent_id] = _AgentMemory(
                liveness.SeqState(record.boot_id, record.started_at, record.seq,
                                  record.past_boot_ids),
                first_seen=record.first_seen, restarts=record.restarts, missed=record.missed,
                history_count=record.history_count,
                skewed=record.clock_skew_seconds is not None)
        log.info("registry %s: %d agents known", registry.masked_url, len(self._agents))

    @property
    def pending(self) -> int:
        """Agent rows waiting for :meth:`flush`."""
        return len(self._pending_agents)

    # -- judging ----------------------------------------------------------------------------

    def handle_message(self, body: bytes | str, headers: Mapping[str, Any] | None,
                       content_type: str | None, content_encoding: str | None = None, *,
                       received_at: float | None = None, redelivered: bool = False) -> Outcome:
        """Judge one raw message; never raises for bad input (it is counted and logged)."""
        now = time.time() if received_at is None else received_at
        try:
            expiry = decoding.expires_at(headers)
            decoded = decoding.decode_heartbeat(body, headers, content_type, content_encoding)
        except HeartbeatRejected as exc:
            return self._reject(exc, now)
        if expiry is not None and expiry < now:
            return self._ignore("expired", decoded.snapshot.get("agent_id"), now)
        return self.handle_snapshot(decoded.snapshot, received_at=now, redelivered=redelivered,
                                    text=decoded.text)

    def handle_snapshot(self, snapshot: Mapping[str, Any], *, received_at: float,
                        redelivered: bool = False, text: str | None = None) -> Outcome:
        """Judge one decoded snapshot received at ``received_at`` (unix seconds).

        ``text``: the snapshot's JSON as received, stored as is (else it is serialised).
        """
        raw_id = snapshot.get("agent_id")
        agent_id = raw_id if isinstance(raw_id, str) else None
        try:
            if self.secret:
                verify_snapshot(snapshot, self.secret)
            snap = validate_snapshot(snapshot)
            check_storable(snap)
        except SignatureError as exc:
            return self._reject(HeartbeatRejected(exc.reason, str(exc), agent_id), received_at)
        except ProtocolError as exc:
            reason = decoding.SCHEMA_VERSION if exc.field == "schema" else decoding.INVALID
            return self._reject(HeartbeatRejected(reason, str(exc), agent_id), received_at)
        return self._sequence(snap, received_at, redelivered, text)

    def _sequence(self, snap: dict[str, Any], received_at: float, redelivered: bool,
                  text: str | None) -> Outcome:
        agent_id: str = snap["agent_id"]
        memory = self._agents.get(agent_id)
        prev = memory.seq if memory is not None else None
        boot_id, started_at, seq = snap["boot_id"], float(snap["started_at"]), snap["seq"]
        verdict = liveness.sequence(prev, boot_id, started_at, seq)
        if not verdict.accepted:
            if redelivered:
                return self._ignore("redelivered", agent_id, received_at)
            if self.secret:
                return self._reject(HeartbeatRejected(
                    decoding.REPLAYED, f"{verdict.verdict.value}: seq {seq} of boot {boot_id} "
                    f"after seq {prev.seq if prev else '-'}", agent_id), received_at)
            if verdict.verdict is liveness.Verdict.STALE_BOOT:
                self._log_limited(logging.WARNING, "stale_boot", received_at,
                                  "agent %s: heartbeat from superseded boot %s ignored "
                                  "(do two machines share this agent id?)", agent_id, boot_id)
            return self._ignore(verdict.verdict.value, agent_id, received_at)
        new_seq = liveness.advance(prev, boot_id, started_at, seq)
        skew = liveness.clock_skew(float(snap["collected_at"]), received_at,
                                   float(snap["heartbeat_interval_seconds"]))
        if memory is None:
            memory = _AgentMemory(new_seq, first_seen=received_at, restarts=0, missed=0,
                                  history_count=0, skewed=False)
            self._agents[agent_id] = memory
            log.debug("new agent %s (%s, pool %s)", agent_id, snap["hostname"], snap["pool"])
        else:
            if verdict.verdict is liveness.Verdict.RESTART:
                memory.restarts += 1
                self.stats.restarts += 1
                memory.past_json = json.dumps(list(new_seq.past_boot_ids))
                self._log_limited(logging.INFO, "restart", received_at,
                                  "agent %s restarted (boot %s seq %s -> boot %s seq %d)",
                                  agent_id, prev.boot_id if prev else "-",
                                  prev.seq if prev else "-", boot_id, seq)
            elif verdict.missed:
                memory.missed += verdict.missed
                self.stats.gaps += 1
                self.stats.missed += verdict.missed
                self._log_limited(logging.INFO, "gap", received_at,
                                  "agent %s: %d heartbeat(s) missed (seq %d -> %d)", agent_id,
                                  verdict.missed, seq - verdict.missed - 1, seq)
            memory.seq = new_seq
        self._note_skew(memory, agent_id, skew, received_at)
        self._queue(agent_id, memory, snap, received_at=received_at, skew=skew, text=text)
        self.stats.accepted += 1
        return _ACCEPT

    def _note_skew(self, memory: _AgentMemory, agent_id: str, skew: float | None,
                   now: float) -> None:
        if skew is not None:
            self.stats.clock_skewed += 1
            if not memory.skewed:
                self._log_limited(logging.WARNING, "skew", now,
                                  "agent %s: clock off by %+.1f s (collected_at vs receipt; "
                                  "or the message waited that long in the queue); liveness "
                                  "uses the receipt time", agent_id, skew)
        elif memory.skewed:
            self._log_limited(logging.INFO, "unskew", now,
                              "agent %s: clock skew back within bounds", agent_id)
        memory.skewed = skew is not None

    def _queue(self, agent_id: str, memory: _AgentMemory, snap: dict[str, Any], *,
               received_at: float, skew: float | None, text: str | None) -> None:
        row = {name: snap[name] for name in tables.SNAPSHOT_COLUMNS}
        row["agent_id"] = agent_id
        row["first_seen"] = memory.first_seen
        row["last_seen"] = received_at
        row["restarts"] = memory.restarts
        row["missed"] = memory.missed
        row["past_boot_ids"] = memory.past_json
        row["clock_skew_seconds"] = skew
        slot = memory.history_count % self._points
        memory.history_count += 1
        row["history_count"] = memory.history_count
        row["snapshot"] = snap if text is None else text  # a dict is serialised at flush
        self._pending_agents[agent_id] = row
        self._pending_history[(agent_id, slot)] = {
            "agent_id": agent_id, "slot": slot, "received_at": received_at,
            "cpu_load_1min": snap["cpu_load_1min"],
            "cpu_cores_available": snap["cpu_cores_available"],
            "memory_available_gb": snap["memory_available_gb"],
            "gpu_vram_available_gb": snap["gpu_vram_available_gb"],
        }

    # -- counting and logging ---------------------------------------------------------------

    def _reject(self, exc: HeartbeatRejected, now: float) -> Outcome:
        self.stats.rejected[exc.reason] += 1
        self._log_limited(logging.WARNING, "reject:" + exc.reason, now, "%s", str(exc)[:300])
        return Outcome(REJECTED, exc.reason)

    def _ignore(self, reason: str, agent_id: Any, now: float) -> Outcome:
        self.stats.ignored[reason] += 1
        self._log_limited(logging.DEBUG, "ignore:" + reason, now,
                          "heartbeat from %r ignored (%s)", agent_id, reason)
        return Outcome(IGNORED, reason)

    def _log_limited(self, level: int, key: str, now: float, msg: str, *args: Any) -> None:
        if not log.isEnabledFor(level):
            return
        allowed, suppressed = self._limiter.allow(key, now)
        if not allowed:
            return
        if suppressed:
            msg += " (%d similar lines suppressed)"
            args = (*args, suppressed)
        log.log(level, msg, *args)

    # -- writing ------------------------------------------------------------------------------

    def take_batch(self) -> Batch | None:
        """Everything queued, as one batch to write (None when nothing is queued).

        The ingestor forgets the rows: write the batch with :meth:`write` (any thread).
        """
        if not self._pending_agents and not self._pending_history:
            return None
        rows = []
        for row in self._pending_agents.values():
            snap = row["snapshot"]
            if not isinstance(snap, str):
                row["snapshot"] = json.dumps(snap, separators=(",", ":"))
            rows.append(row)
        batch = Batch(rows, list(self._pending_history.values()))
        self._pending_agents = {}
        self._pending_history = {}
        return batch

    def write(self, batch: Batch) -> None:
        """Commit ``batch`` in one transaction (RegistryError: nothing of it is stored)."""
        started = time.perf_counter()
        try:
            self.registry.write_batch(batch.agent_rows, batch.history_rows)
        except RegistryError:
            self.stats.write_errors += 1
            raise
        self.stats.write_seconds += time.perf_counter() - started
        self.stats.batches += 1

    def flush(self) -> int:
        """Write everything queued now, in one transaction; returns the agent rows written.

        On :class:`~chiffon_worker.errors.RegistryError` nothing of the batch is stored and
        it stays queued, so a later ``flush`` retries it.
        """
        batch = self.take_batch()
        if batch is None:
            return 0
        try:
            self.write(batch)
        except RegistryError:
            self._requeue(batch)
            raise
        return len(batch.agent_rows)

    def _requeue(self, batch: Batch) -> None:
        """Put a failed batch back, behind anything queued since (which is newer)."""
        for row in batch.agent_rows:
            self._pending_agents.setdefault(row["agent_id"], row)
        for point in batch.history_rows:
            self._pending_history.setdefault((point["agent_id"], point["slot"]), point)


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows for one registry transaction: agent rows (one per agent) and history points."""

    agent_rows: list[dict[str, Any]]
    history_rows: list[dict[str, Any]]
