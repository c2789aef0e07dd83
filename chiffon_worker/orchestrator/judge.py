"""Judging heartbeat messages: raw body in, an :class:`Outcome` (and rows to write) out.

:class:`HeartbeatJudge` is pure: no broker, no database, no clock (the receipt time is
passed in). It keeps every agent's sequencing state in memory, seeded from the
registry's records at start (the orchestrator is the registry's only writer), so judging
a heartbeat costs no query. Per message: decode (:mod:`.decoding`), check the signature
(:class:`~chiffon_worker.signing.HeartbeatVerifier`: per-agent keys derived from the lab
secret, the shared secret; :func:`verifier_of` builds it from the config), validate
(``protocol.validate_snapshot``), check that the registry can store it, sequence
(:mod:`.liveness`), and build the agent row and history point an accepted heartbeat
writes (:class:`Rows`; :mod:`.batch_writer` writes them).

Judging is two steps. :meth:`HeartbeatJudge.check` needs no state: decode, signature,
validation, storability; it gives a :class:`Checked` heartbeat or a final outcome (a
rejection, an expired message). :meth:`HeartbeatJudge.sequence` decides a checked
heartbeat against the agent's state. Several orchestrators may share one registry: the
consumer checks each message as it arrives and sequences a batch inside the registry's
ingest turn (:meth:`~.registry.Registry.ingest_turn`), after :meth:`~HeartbeatJudge.reload`
when another orchestrator wrote since, so the database decides the order.
:meth:`~HeartbeatJudge.judge_message` does both at once.

Outcomes: *accepted* (rows to write), *rejected* (not a valid heartbeat, or unsigned,
forged or replayed when signatures are required: counted by reason, logged, dropped) and *ignored*
(a valid but stale heartbeat: duplicate, out of order, from a superseded boot, expired,
or a redelivery after a broker reconnect). A heartbeat older than the newest one whose
sequence number was counted missed is *late* (another orchestrator took the newer one
first, or its first consumer died before acking it): it is accepted as a history point
and takes its number back from ``missed``; the agent's row keeps the newer snapshot.
Counts go to :class:`.IngestStats`; log lines are rate-limited per kind.
"""

from __future__ import annotations

import json
import logging
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chiffon_worker.errors import ConfigError, ProtocolError
from chiffon_worker.orchestrator import decoding, liveness
from chiffon_worker.orchestrator.decoding import HeartbeatRejected
from chiffon_worker.orchestrator.ingest_counters import CONFLICT, IngestStats
from chiffon_worker.orchestrator.log_limiter import LimitedLog
from chiffon_worker.orchestrator.sql_schema import (
    HISTORY_METRICS,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    check_storable,
)
from chiffon_worker.protocol import validate_snapshot
from chiffon_worker.signing import (
    HeartbeatVerifier,
    KeyUsed,
    SignatureError,
)

if TYPE_CHECKING:
    from chiffon_worker.config import Config
    from chiffon_worker.orchestrator.registry import AgentRecord, SequencingState

    Stored = AgentRecord | SequencingState

log = logging.getLogger(__name__)

ACCEPTED = "accepted"
REJECTED = "rejected"
IGNORED = "ignored"
#: The reason of an accepted heartbeat that arrived after a newer one and fills its gap.
LATE = "late"
#: How far back (in sequence numbers) an agent's not-received numbers are remembered, so
#: that their heartbeats, arriving late, are recognised: positive numbers were counted
#: in ``missed``; negative ones, ``-n``, came before the first heartbeat seen of a
#: process that had sent at most :data:`FIRST_SEQS_AWAITED` (its first heartbeats,
#: overtaken: one orchestrator would have seen them first), and are not counted.
MAX_MISSED_SEQS = 64
FIRST_SEQS_AWAITED = 8
#: Superseded boots per agent whose highest seq is remembered (to tell a replay from a
#: live process when signatures are required).
_SUPERSEDED_KEPT = 4
#: How often (seconds) an agent still signing with an old key (the previous lab secret's,
#: the shared secret) is named in the log, so an operator sees who is left to re-key.
OLD_KEY_LOG_SECONDS = 3600.0


def verifier_of(config: Config) -> HeartbeatVerifier:
    """The orchestrator's :class:`HeartbeatVerifier` from ``config``: ``heartbeat_lab_secret``
    (then ``heartbeat_lab_secret_previous``), ``heartbeat_secret`` and
    ``require_signed_heartbeats`` (``auto``: required when any of those is set, as before
    per-agent keys; ``yes``; ``no``). Raises ConfigError for keys that cannot work
    together (a previous secret without a current one, ``yes`` with nothing to verify
    with; a lab secret too short is refused when the config loads)."""
    lab, previous = config.heartbeat_lab_secret, config.heartbeat_lab_secret_previous
    sources = config.sources
    if previous and not lab:
        raise ConfigError(sources.get("heartbeat_lab_secret_previous", "default"),
                          "heartbeat_lab_secret_previous", "is set but heartbeat_lab_secret "
                          "is not: during a rotation the new lab secret is "
                          "heartbeat_lab_secret and the old one the previous")
    lab_secrets = tuple(secret for secret in (lab, previous) if secret)
    mode = config.require_signed_heartbeats
    verifying = bool(lab_secrets or config.heartbeat_secret)
    if mode == "yes" and not verifying:
        raise ConfigError(sources.get("require_signed_heartbeats", "default"),
                          "require_signed_heartbeats", "is yes, but neither "
                          "heartbeat_lab_secret nor heartbeat_secret is set to verify with")
    return HeartbeatVerifier(lab_secrets, config.heartbeat_secret,
                             required=verifying and mode != "no")


#: The required columns' and the history metrics' values of a snapshot, in column order.
_REQUIRED = operator.itemgetter(*REQUIRED_COLUMNS)
_HISTORY = operator.itemgetter(*HISTORY_METRICS)


def _await_first_seqs(memory: _AgentMemory, seq: int) -> None:
    """A process's first heartbeat seen is ``seq``: remember its earlier ones (when at most
    :data:`FIRST_SEQS_AWAITED`) as awaited, not missed."""
    memory.missed_seqs = [-n for n in range(1, seq)] if seq <= FIRST_SEQS_AWAITED else []


def _json_list(values: list[Any]) -> str:
    """``values`` as a JSON list (missed seqs, past boot ids: almost always empty)."""
    return json.dumps(values) if values else "[]"


def legacy_vram_known(snap: Mapping[str, Any]) -> bool:
    """Whether an older agent's (no ``gpu_vram_known`` key) free VRAM is a fact: its
    primary GPU (the listed one with the most VRAM) gives ``vram_available_gb`` (older
    agents sent 0 where it was null); true without GPUs."""
    gpus = [g for g in snap.get("gpus", ()) if isinstance(g, dict)]
    if not gpus:
        return True
    main = max(gpus, key=lambda g: (isinstance(g.get("vram_total_gb"), int | float),
                                    g.get("vram_total_gb") or 0))
    return isinstance(main.get("vram_available_gb"), int | float)


@dataclass(frozen=True, slots=True)
class Rows:
    """What one accepted heartbeat writes: its agent's row (every column of
    ``chiffon_agents``; ``snapshot`` is the JSON text as received, or the dict to
    serialise) and one history point (every column of ``chiffon_history``)."""

    agent: dict[str, Any]
    history: dict[str, Any]
    #: a late heartbeat: ``agent`` holds only ``agent_id`` and the columns a late
    #: heartbeat changes (:data:`LATE_COLUMNS`); the row keeps the newer snapshot
    late: bool = False
    #: the judge's memory of the agent came from the registry or an earlier accepted
    #: heartbeat (its row is stored, or is in the same batch); False for a new agent
    known: bool = False


#: The columns of ``chiffon_agents`` a late heartbeat updates.
LATE_COLUMNS = ("missed", "missed_seqs", "history_count")


@dataclass(frozen=True, slots=True)
class Checked:
    """A heartbeat that passed :meth:`HeartbeatJudge.check`: the validated snapshot, its
    JSON text as received (None: serialise when written), its receipt time (unix
    seconds) and whether the broker redelivered it."""

    snapshot: dict[str, Any]
    text: str | None
    received_at: float
    redelivered: bool

    @property
    def agent_id(self) -> str:
        """The agent that sent it."""
        return str(self.snapshot["agent_id"])


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one message: ``kind`` is accepted/rejected/ignored, ``reason``
    a short label (empty when accepted), ``rows`` what an accepted heartbeat writes."""

    kind: str
    reason: str = ""
    rows: Rows | None = None
    #: a second live process claiming the agent's id (every column of ``chiffon_conflicts``)
    conflict: dict[str, Any] | None = None


class _AgentMemory:
    """Per-agent state the judge needs between heartbeats."""

    __slots__ = ("first_seen", "history_count", "hostname", "interval", "last_received",
                 "missed", "missed_seqs", "past_json", "restarts", "seq", "skew_warned",
                 "skewed", "superseded")

    def __init__(self, seq: liveness.SeqState, *, first_seen: float, restarts: int, missed: int,
                 history_count: int, skewed: bool, hostname: str, last_received: float,
                 interval: float, missed_seqs: tuple[int, ...] = ()) -> None:
        self.seq = seq
        self.hostname = hostname
        self.last_received = last_received
        self.interval = interval
        self.first_seen = first_seen
        self.restarts = restarts
        self.missed = missed
        self.history_count = history_count
        self.skewed = skewed
        self.skew_warned = False  # the clock-skew warning was logged and still holds
        self.past_json = _json_list(list(seq.past_boot_ids))
        #: sequence numbers of the current process counted missed (newest last)
        self.missed_seqs = list(missed_seqs)
        #: superseded boot id -> the highest seq seen from it (this process's memory only):
        #: with signatures required, a superseded boot's heartbeat beyond it is a live
        #: process (a conflict), one at or below it a replay
        self.superseded: dict[str, int] = {}

    @classmethod
    def of(cls, record: Stored) -> _AgentMemory:
        """What the registry's ``record`` says of an agent."""
        return cls(liveness.SeqState(record.boot_id, record.started_at, record.seq,
                                     record.past_boot_ids),
                   first_seen=record.first_seen, restarts=record.restarts,
                   missed=record.missed, history_count=record.history_count,
                   skewed=record.clock_skew_seconds is not None, hostname=record.hostname,
                   last_received=record.last_seen,
                   interval=record.heartbeat_interval_seconds,
                   missed_seqs=record.missed_seqs)


class HeartbeatJudge:
    """Judges heartbeats (see the module docstring).

    ``known``: the registry's records at start (``Registry.agents()``);
    ``history_points``: the registry's ring size per agent; ``verifier``: the keys
    signatures are checked with and whether one is required (:func:`verifier_of`);
    ``secret``: short for a verifier with only this shared secret, required (empty, and no
    verifier: unsigned heartbeats are accepted); ``stats``: where the counts go (shared
    with the batch writer and the consumer).
    """

    def __init__(self, known: Iterable[AgentRecord], *, history_points: int,
                 secret: str = "", verifier: HeartbeatVerifier | None = None,
                 stats: IngestStats | None = None) -> None:
        if history_points < 1:
            raise ValueError("history_points must be at least 1")
        self.verifier = verifier if verifier is not None else HeartbeatVerifier(
            shared_secret=secret, required=bool(secret))
        #: agent id -> when it was last named for signing with an old key (unix seconds)
        self._old_key_logged: dict[str, float] = {}
        self.stats = stats if stats is not None else IngestStats()
        self.history_points = history_points
        self._log = LimitedLog(log)
        self._agents: dict[str, _AgentMemory] = {}
        self.reload(known)

    def reload(self, records: Iterable[Stored]) -> None:
        """Forget every agent's state, then take it from ``records`` (the registry's, read
        in the ingest turn: what another orchestrator committed is the truth)."""
        self._agents = {record.agent_id: _AgentMemory.of(record) for record in records}

    def remember(self, records: Iterable[Stored]) -> None:
        """Take these agents' state from the registry's ``records`` (others are kept)."""
        for record in records:
            self._agents[record.agent_id] = _AgentMemory.of(record)

    def unknown(self, agent_ids: Iterable[str]) -> set[str]:
        """Those of ``agent_ids`` whose state the judge does not hold."""
        return {agent_id for agent_id in agent_ids if agent_id not in self._agents}

    def judge_message(self, body: bytes | str, headers: Mapping[str, Any] | None,
                      content_type: str | None, content_encoding: str | None = None, *,
                      received_at: float, redelivered: bool = False) -> Outcome:
        """Judge one raw message received at ``received_at`` (unix seconds).

        Never raises for bad input (it is counted and logged).
        """
        checked = self.check(body, headers, content_type, content_encoding,
                             received_at=received_at, redelivered=redelivered)
        return checked if isinstance(checked, Outcome) else self.sequence(checked)

    def judge_snapshot(self, snapshot: Mapping[str, Any], *, received_at: float,
                       redelivered: bool = False, text: str | None = None) -> Outcome:
        """Judge one decoded snapshot received at ``received_at`` (unix seconds).

        ``text``: the snapshot's JSON as received, stored as is (else it is serialised
        when written).
        """
        checked = self.check_snapshot(snapshot, received_at=received_at,
                                      redelivered=redelivered, text=text)
        return checked if isinstance(checked, Outcome) else self.sequence(checked)

    def check(self, body: bytes | str, headers: Mapping[str, Any] | None,
              content_type: str | None, content_encoding: str | None = None, *,
              received_at: float, redelivered: bool = False) -> Checked | Outcome:
        """The stateless step for one raw message: a :class:`Checked` heartbeat to
        sequence, or the final outcome (rejected, or ignored as expired)."""
        try:
            expiry = decoding.expires_at(headers)
            decoded = decoding.decode_heartbeat(body, headers, content_type, content_encoding)
        except HeartbeatRejected as exc:
            return self._reject(exc, received_at)
        if expiry is not None and expiry < received_at:
            agent_id = decoded.snapshot.get("agent_id")
            self._log.log(logging.WARNING, "expired", received_at,
                          "heartbeat from %r dropped: it expired %.0f s before it arrived "
                          "(by this machine's clock); it waited that long in the queue, or "
                          "the agent's clock is behind this one (check both are synced: "
                          "chrony or systemd-timesyncd)", agent_id, received_at - expiry)
            return self._ignore("expired", agent_id, received_at)
        return self.check_snapshot(decoded.snapshot, received_at=received_at,
                                   redelivered=redelivered, text=decoded.text)

    def check_snapshot(self, snapshot: Mapping[str, Any], *, received_at: float,
                       redelivered: bool = False, text: str | None = None
                       ) -> Checked | Outcome:
        """The stateless step for one decoded snapshot (see :meth:`check`)."""
        raw_id = snapshot.get("agent_id")
        agent_id = raw_id if isinstance(raw_id, str) else None
        try:
            used = self.verifier.verify(snapshot)
            snap = validate_snapshot(snapshot)
            check_storable(snap)
        except SignatureError as exc:
            return self._reject(HeartbeatRejected(exc.reason, str(exc), agent_id), received_at)
        except ProtocolError as exc:
            reason = decoding.SCHEMA_VERSION if exc.field == "schema" else decoding.INVALID
            return self._reject(HeartbeatRejected(reason, str(exc), agent_id), received_at)
        if used == "previous agent key" or (used == "shared secret"
                                            and self.verifier.lab_secrets):
            self._note_old_key(snap["agent_id"], used, received_at)
        return Checked(snap, text, received_at, redelivered)

    def _note_old_key(self, agent_id: str, used: KeyUsed, now: float) -> None:
        """Name an agent that signs with the previous lab secret's key or the shared
        secret (at most once per :data:`OLD_KEY_LOG_SECONDS` per agent)."""
        if now - self._old_key_logged.get(agent_id, -OLD_KEY_LOG_SECONDS) \
                < OLD_KEY_LOG_SECONDS:
            return
        self._old_key_logged[agent_id] = now
        what, old = (("its key from the previous lab secret", "heartbeat_lab_secret_previous")
                     if used == "previous agent key"
                     else ("the shared heartbeat_secret", "heartbeat_secret"))
        log.info("agent %s signs with %s; give it its key from the current lab secret "
                 "(heartbeat_key: `chiffon signing-key %s`) before %s is dropped",
                 agent_id, what, agent_id, old)

    def sequence(self, checked: Checked) -> Outcome:
        """Decide a checked heartbeat against its agent's state (and advance the state)."""
        snap, received_at = checked.snapshot, checked.received_at
        redelivered, text = checked.redelivered, checked.text
        agent_id: str = snap["agent_id"]
        memory = self._agents.get(agent_id)
        prev = memory.seq if memory is not None else None
        boot_id, started_at, seq = snap["boot_id"], float(snap["started_at"]), snap["seq"]
        verdict = liveness.sequence(prev, boot_id, started_at, seq)
        if memory is not None and prev is not None \
                and verdict.verdict is liveness.Verdict.OUT_OF_ORDER \
                and (boot_id, started_at) == (prev.boot_id, prev.started_at) \
                and (seq in memory.missed_seqs or -seq in memory.missed_seqs):
            return self._late(agent_id, memory, snap, received_at)
        if verdict.verdict is liveness.Verdict.STALE_BOOT and memory is not None \
                and not redelivered:
            if liveness.superseder_went_silent(memory.last_received, memory.interval,
                                               received_at):
                # the process that superseded this boot is gone: this one is the live one
                verdict = liveness.Sequencing(liveness.Verdict.RESTART)
            elif not self.verifier.required:
                return self._conflict(snap, memory, received_at)
            elif seq > memory.superseded.get(boot_id, seq):
                # signed, and newer than anything that boot sent before: not a replay of
                # a captured message but a live process that holds the agent's key
                memory.superseded[boot_id] = seq
                return self._conflict(snap, memory, received_at)
        if not verdict.accepted:
            if redelivered:
                return self._ignore("redelivered", agent_id, received_at)
            if self.verifier.required:
                return self._reject(HeartbeatRejected(
                    decoding.REPLAYED, f"{verdict.verdict.value}: seq {seq} of boot {boot_id} "
                    f"after seq {prev.seq if prev else '-'}", agent_id), received_at)
            if verdict.verdict is liveness.Verdict.STALE_BOOT:
                self._log.log(logging.WARNING, "stale_boot", received_at,
                              "agent %s: heartbeat from superseded boot %s ignored "
                              "(do two machines share this agent id?)", agent_id, boot_id)
            return self._ignore(verdict.verdict.value, agent_id, received_at)
        known = memory is not None
        new_seq = liveness.advance(prev, boot_id, started_at, seq)
        skew = liveness.clock_skew(float(snap["collected_at"]), received_at,
                                   float(snap["heartbeat_interval_seconds"]))
        if memory is None:
            memory = _AgentMemory(new_seq, first_seen=received_at, restarts=0, missed=0,
                                  history_count=0, skewed=False, hostname=snap["hostname"],
                                  last_received=received_at,
                                  interval=float(snap["heartbeat_interval_seconds"]))
            self._agents[agent_id] = memory
            _await_first_seqs(memory, seq)
            log.debug("new agent %s (%s, pool %s)", agent_id, snap["hostname"], snap["pool"])
        else:
            before, memory.seq = memory.seq, new_seq
            self._note_sequence(memory, verdict, before, snap, received_at)
            if memory.missed_seqs:  # forget what is too old to come
                memory.missed_seqs = [n for n in memory.missed_seqs
                                      if abs(n) > seq - MAX_MISSED_SEQS]
        memory.hostname = snap["hostname"]
        memory.last_received = received_at
        memory.interval = float(snap["heartbeat_interval_seconds"])
        self._note_skew(memory, agent_id, skew, received_at)
        self.stats.accepted += 1
        return Outcome(ACCEPTED, "", self._rows(agent_id, memory, snap, received_at=received_at,
                                                skew=skew, text=text, known=known))

    def _note_sequence(self, memory: _AgentMemory, verdict: liveness.Sequencing,
                       prev: liveness.SeqState, snap: dict[str, Any], now: float) -> None:
        """Count a restart or a gap of a known agent (``prev``: its state before this
        heartbeat; ``memory.seq`` already holds the new one)."""
        agent_id, seq = snap["agent_id"], snap["seq"]
        if verdict.verdict is liveness.Verdict.RESTART:
            _await_first_seqs(memory, seq)
            memory.superseded[prev.boot_id] = prev.seq
            while len(memory.superseded) > _SUPERSEDED_KEPT:
                del memory.superseded[next(iter(memory.superseded))]
            memory.restarts += 1
            self.stats.restarts += 1
            memory.past_json = json.dumps(list(memory.seq.past_boot_ids))
            self._log.log(logging.INFO, "restart", now,
                          "agent %s restarted (boot %s seq %s -> boot %s seq %d)", agent_id,
                          prev.boot_id, prev.seq, snap["boot_id"], seq)
        elif verdict.missed:
            memory.missed_seqs.extend(range(max(seq - verdict.missed, seq - MAX_MISSED_SEQS),
                                            seq))
            del memory.missed_seqs[:-MAX_MISSED_SEQS]
            memory.missed += verdict.missed
            self.stats.gaps += 1
            self.stats.missed += verdict.missed
            self._log.log(logging.INFO, "gap", now,
                          "agent %s: %d heartbeat(s) missed (seq %d -> %d)", agent_id,
                          verdict.missed, seq - verdict.missed - 1, seq)

    def _note_skew(self, memory: _AgentMemory, agent_id: str, skew: float | None,
                   now: float) -> None:
        """Count a skewed heartbeat; warn once the skew is a clock's, not a queue's: a clock
        ahead at once (a message cannot arrive before it was taken), one behind only on the
        second heartbeat in a row (one that merely waited in the queue, as after an
        orchestrator restart, is followed by fresh ones)."""
        if skew is not None:
            self.stats.clock_skewed += 1
            if (skew > 0 or memory.skewed) and not memory.skew_warned:
                memory.skew_warned = True
                self._log.log(logging.WARNING, "skew", now,
                              "agent %s: clock off by %+.1f s (collected_at vs receipt%s); "
                              "liveness uses the receipt time", agent_id, skew,
                              "" if skew > 0 else ", two heartbeats in a row")
        elif memory.skew_warned:
            memory.skew_warned = False
            self._log.log(logging.INFO, "unskew", now,
                          "agent %s: clock skew back within bounds", agent_id)
        memory.skewed = skew is not None

    def _rows(self, agent_id: str, memory: _AgentMemory, snap: dict[str, Any], *,
              received_at: float, skew: float | None, text: str | None, known: bool) -> Rows:
        row = dict(zip(REQUIRED_COLUMNS, _REQUIRED(snap), strict=True))
        # None where an older agent leaves one out
        row.update(zip(OPTIONAL_COLUMNS, map(snap.get, OPTIONAL_COLUMNS), strict=True))
        if "gpu_vram_known" not in snap:
            row["gpu_vram_known"] = legacy_vram_known(snap)
        row["first_seen"] = memory.first_seen
        row["last_seen"] = received_at
        row["restarts"] = memory.restarts
        row["missed"] = memory.missed
        row["past_boot_ids"] = memory.past_json
        row["missed_seqs"] = _json_list(memory.missed_seqs)
        row["clock_skew_seconds"] = skew
        row["snapshot"] = snap if text is None else text
        point = self._point(agent_id, memory, snap, received_at)
        row["history_count"] = memory.history_count
        return Rows(row, point, known=known)

    def _point(self, agent_id: str, memory: _AgentMemory, snap: Mapping[str, Any],
               received_at: float) -> dict[str, Any]:
        """The history point of an accepted heartbeat, in the agent's next ring slot."""
        point = dict(zip(HISTORY_METRICS, _HISTORY(snap), strict=True))
        point["agent_id"] = agent_id
        point["slot"] = memory.history_count % self.history_points
        point["received_at"] = received_at
        memory.history_count += 1
        return point

    def _late(self, agent_id: str, memory: _AgentMemory, snap: dict[str, Any],
              now: float) -> Outcome:
        """A heartbeat whose number was counted missed arrived after all: a history point,
        one fewer missed; the agent's row keeps its newer snapshot."""
        seq = snap["seq"]
        if seq in memory.missed_seqs:
            memory.missed_seqs.remove(seq)
            memory.missed -= 1
        else:  # one of a process's first heartbeats: never counted missed
            memory.missed_seqs.remove(-seq)
        self.stats.accepted += 1
        self.stats.late += 1
        self._log.log(logging.DEBUG, "late", now, "agent %s: seq %d arrived late (after %d)",
                      agent_id, snap["seq"], memory.seq.seq)
        point = self._point(agent_id, memory, snap, now)
        row = {"agent_id": agent_id, "missed": memory.missed,
               "missed_seqs": _json_list(memory.missed_seqs),
               "history_count": memory.history_count}
        return Outcome(ACCEPTED, LATE, Rows(row, point, late=True))

    def _conflict(self, snap: dict[str, Any], memory: _AgentMemory, now: float) -> Outcome:
        """A superseded boot still sends while the current one does: two live processes."""
        agent_id = snap["agent_id"]
        self.stats.ignored[CONFLICT] += 1
        self._log.log(logging.ERROR, "conflict:" + agent_id, now,
                      "agent id %s is claimed by two live processes: on %s (boot %s) and on "
                      "%s (boot %s); give each machine its own agent_id (agent.yml or "
                      "CHIFFON_AGENT_ID), or give a cloned machine a new machine id "
                      "(systemd-machine-id-setup), then restart its agent", agent_id,
                      memory.hostname, memory.seq.boot_id, snap["hostname"], snap["boot_id"])
        return Outcome(IGNORED, CONFLICT, conflict={
            "agent_id": agent_id, "hostname": snap["hostname"], "boot_id": snap["boot_id"],
            "seen_at": now})

    # -- counting and logging ---------------------------------------------------------------

    def _reject(self, exc: HeartbeatRejected, now: float) -> Outcome:
        self.stats.rejected[exc.reason] += 1
        self._log.log(logging.WARNING, "reject:" + exc.reason, now, "%s", str(exc)[:300])
        return Outcome(REJECTED, exc.reason)

    def _ignore(self, reason: str, agent_id: Any, now: float) -> Outcome:
        self.stats.ignored[reason] += 1
        self._log.log(logging.DEBUG, "ignore:" + reason, now,
                      "heartbeat from %r ignored (%s)", agent_id, reason)
        return Outcome(IGNORED, reason)
