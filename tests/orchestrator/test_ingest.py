"""Judging messages before they reach the registry (no broker: raw bodies in, outcomes and
rows out), and the batch writer that commits the rows."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from chiffon_worker.orchestrator import sql_schema
from chiffon_worker.orchestrator.agent_view import status_object
from chiffon_worker.orchestrator.batch_writer import BatchWriter
from chiffon_worker.orchestrator.heartbeat_consumer import HeartbeatConsumer
from chiffon_worker.orchestrator.judge import HeartbeatJudge
from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.signing import sign_snapshot

from .feeding import Feeder, feed
from .snapshots import make_snapshot

SECRET = "s3cret"
TASK = {"task": "chiffon.heartbeat", "id": "t-1"}


def task_body(snapshot: Any) -> bytes:
    return json.dumps([[snapshot], {}, {"callbacks": None}]).encode()


def judge(feeder: Feeder, body: bytes | str, headers: dict[str, Any] | None = None,
          content_type: str = "application/json", **kwargs: Any) -> tuple[str, str]:
    kwargs.setdefault("received_at", time.time())
    outcome = feeder.message(body, TASK if headers is None else headers, content_type,
                             "utf-8", **kwargs)
    assert (outcome.rows is not None) == (outcome.kind == "accepted")
    return outcome.kind, outcome.reason


@pytest.fixture
def ingestor(sqlite_registry: Registry) -> Feeder:
    return Feeder(sqlite_registry)


@pytest.fixture
def signed_ingestor(sqlite_registry: Registry) -> Feeder:
    return Feeder(sqlite_registry, secret=SECRET)


def test_a_celery_task_message_and_a_bare_snapshot_are_both_accepted(
        ingestor: Feeder) -> None:
    assert judge(ingestor, task_body(make_snapshot("a1"))) == ("accepted", "")
    assert judge(ingestor, json.dumps(make_snapshot("a2")), headers={}) == ("accepted", "")
    ingestor.commit()
    assert [r.agent_id for r in ingestor.registry.agents()] == ["a1", "a2"]


@pytest.mark.parametrize(("body", "headers", "content_type", "reason"), [
    pytest.param(b"\x80\x03}q\x00.", TASK, "application/x-python-serialize",
                 "unsupported_content", id="pickle is never read"),
    pytest.param(task_body(make_snapshot()), {**TASK, "compression": "application/x-gzip"},
                 "application/json", "unsupported_content", id="compressed"),
    pytest.param(b"{not json", TASK, "application/json", "not_json", id="not JSON"),
    pytest.param(b'{"a": NaN}', {}, "application/json", "not_json", id="NaN is not JSON"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, {}, "application/json", "not_json",
                 id="absurd nesting"),
    pytest.param(task_body(make_snapshot()), {**TASK, "task": "celery.ping"},
                 "application/json", "wrong_task", id="another task"),
    pytest.param(json.dumps([[make_snapshot(), 2], {}, {}]).encode(), TASK,
                 "application/json", "bad_envelope", id="two arguments"),
    pytest.param(b'"just a string"', {}, "application/json", "bad_envelope",
                 id="a JSON string"),
    pytest.param(b"x" * (2 << 20), {}, "application/json", "too_large", id="2 MiB"),
    pytest.param(task_body(make_snapshot(schema=2)), TASK, "application/json",
                 "schema_version", id="a newer schema"),
    pytest.param(task_body({k: v for k, v in make_snapshot().items() if k != "seq"}), TASK,
                 "application/json", "invalid", id="missing key"),
    pytest.param(task_body(make_snapshot(cpu_cores_physical="8")), TASK, "application/json",
                 "invalid", id="wrong type"),
    pytest.param(task_body(make_snapshot(memory_available_gb=-1.0)), TASK,
                 "application/json", "invalid", id="negative number"),
    pytest.param(task_body(make_snapshot(hostname="evil\x00host")), TASK,
                 "application/json", "invalid", id="NUL in a text column"),
    pytest.param(task_body(make_snapshot(boot_id="\ud800")), TASK, "application/json",
                 "not_json", id="lone surrogate in a text column"),  # not UTF-8 text
    pytest.param(task_body(make_snapshot(seq=1 << 63)), TASK, "application/json",
                 "invalid", id="seq beyond 64 bits"),
    pytest.param(task_body(make_snapshot(cpu_cores_physical=1 << 31)), TASK,
                 "application/json", "invalid", id="cores beyond 32 bits"),
])
def test_a_malformed_message_is_rejected_with_its_reason_and_counted(
        ingestor: Feeder, body: bytes, headers: dict[str, Any], content_type: str,
        reason: str) -> None:
    assert judge(ingestor, body, headers, content_type) == ("rejected", reason)
    assert ingestor.stats.rejected[reason] == 1
    assert ingestor.writer.pending == 0


def test_rejections_are_logged_once_per_message_but_rate_limited(
        ingestor: Feeder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "chiffon_worker.orchestrator.judge")
    for _ in range(50):
        judge(ingestor, b"{not json")
    assert ingestor.stats.rejected["not_json"] == 50
    assert 1 <= len(caplog.records) <= 10
    assert "rejected (not_json)" in caplog.records[0].getMessage()


def test_stale_heartbeats_are_ignored_not_rejected(ingestor: Feeder) -> None:
    now = time.time()
    # first seen at seq 15: well into its life, so no earlier heartbeat is awaited
    assert judge(ingestor, task_body(make_snapshot(seq=15)), received_at=now)[0] == "accepted"
    assert judge(ingestor, task_body(make_snapshot(seq=15))) == ("ignored", "duplicate")
    assert judge(ingestor, task_body(make_snapshot(seq=13))) == ("ignored", "out_of_order")
    assert judge(ingestor, task_body(make_snapshot(seq=14)), redelivered=True) == (
        "ignored", "redelivered")
    expired = {**TASK, "expires": "2020-01-01T00:00:00+00:00"}
    assert judge(ingestor, task_body(make_snapshot(seq=16)), expired) == ("ignored", "expired")
    assert ingestor.stats.accepted == 1
    assert sum(ingestor.stats.ignored.values()) == 4


def test_an_expired_heartbeat_is_dropped_with_a_warning_naming_the_queue_or_a_clock_behind(
        ingestor: Feeder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "chiffon_worker.orchestrator.judge")
    now = time.time()
    # an agent whose clock is 200 s behind: its heartbeat expires (timeout 90 s) by ours
    expires = datetime.fromtimestamp(now - 110, tz=UTC).isoformat()
    body = task_body(make_snapshot("behind-1", seq=20, collected_at=now - 200))
    assert judge(ingestor, body, {**TASK, "expires": expires}, received_at=now) == (
        "ignored", "expired")
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "'behind-1' dropped: it expired 110 s before it arrived" in warning
    assert "waited that long in the queue, or the agent's clock is behind" in warning


def test_a_restart_is_counted_and_the_old_boot_is_superseded(ingestor: Feeder) -> None:
    now = time.time()
    judge(ingestor, task_body(make_snapshot(seq=9, boot_id="old")), received_at=now)
    assert judge(ingestor, task_body(make_snapshot(seq=1, boot_id="new", started_at=2e9)),
                 received_at=now + 1) == ("accepted", "")
    assert ingestor.stats.restarts == 1
    ingestor.commit()
    [record] = ingestor.registry.agents()
    assert (record.boot_id, record.past_boot_ids) == ("new", ("old",))


def test_the_old_boot_still_sending_beside_the_new_one_is_a_conflict_naming_its_host(
        ingestor: Feeder) -> None:
    now = time.time()
    judge(ingestor, task_body(make_snapshot(seq=9, boot_id="old", hostname="clone-a")),
          received_at=now)
    judge(ingestor, task_body(make_snapshot(seq=1, boot_id="new", started_at=2e9,
                                            hostname="clone-b")), received_at=now + 1)
    assert judge(ingestor, task_body(make_snapshot(seq=10, boot_id="old", hostname="clone-a")),
                 received_at=now + 2) == ("ignored", "conflict")
    assert ingestor.stats.conflicts == 1
    ingestor.commit()
    [record] = ingestor.registry.agents()
    assert record.hostname == "clone-b", "the row stays with the current boot"
    assert record.conflict is not None
    assert (record.conflict.hostname, record.conflict.boot_id) == ("clone-a", "old")
    assert record.liveness(now + 3) == "conflict"
    assert record.state(now + 3) == "online", "alive, in the coarse form"


def test_a_conflict_ends_when_the_second_process_goes_quiet(ingestor: Feeder) -> None:
    now = time.time()
    interval = 30.0
    judge(ingestor, task_body(make_snapshot(seq=9, boot_id="old")), received_at=now)
    judge(ingestor, task_body(make_snapshot(seq=1, boot_id="new", started_at=2e9)),
          received_at=now + 1)
    judge(ingestor, task_body(make_snapshot(seq=10, boot_id="old")), received_at=now + 2)
    for n in range(1, 5):  # the new boot keeps sending; the old one was stopped
        judge(ingestor, task_body(make_snapshot(seq=1 + n, boot_id="new", started_at=2e9)),
              received_at=now + 1 + n * interval)
    ingestor.commit()
    [record] = ingestor.registry.agents()
    assert record.liveness(now + 1 + 4 * interval) == "online"


def test_a_superseded_boot_takes_over_once_the_superseder_went_silent(
        ingestor: Feeder) -> None:
    now = time.time()
    judge(ingestor, task_body(make_snapshot(seq=9, boot_id="live", hostname="rig")),
          received_at=now)
    # a one-off: a second process (or a forged heartbeat) with a new boot, then nothing
    judge(ingestor, task_body(make_snapshot(seq=1, boot_id="intruder", started_at=2e9,
                                            hostname="elsewhere")), received_at=now + 1)
    assert judge(ingestor, task_body(make_snapshot(seq=10, boot_id="live", hostname="rig")),
                 received_at=now + 30) == ("ignored", "conflict")
    assert judge(ingestor, task_body(make_snapshot(seq=11, boot_id="live", hostname="rig")),
                 received_at=now + 60) == ("accepted", "")
    ingestor.commit()
    [record] = ingestor.registry.agents()
    assert (record.boot_id, record.hostname) == ("live", "rig")


def skew_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "clock off by" in r.getMessage()]


def test_a_heartbeat_that_waited_in_the_queue_warns_of_no_clock_skew(
        ingestor: Feeder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="chiffon_worker.orchestrator.judge")
    now = time.time()
    judge(ingestor, task_body(make_snapshot(seq=1, collected_at=now - 49)), received_at=now)
    judge(ingestor, task_body(make_snapshot(seq=2, collected_at=now + 0.5)),
          received_at=now + 1)
    assert skew_warnings(caplog) == []
    assert ingestor.stats.clock_skewed == 1


def test_a_clock_behind_warns_on_its_second_heartbeat_and_one_ahead_at_once(
        ingestor: Feeder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="chiffon_worker.orchestrator.judge")
    now = time.time()
    for seq in (1, 2, 3):
        judge(ingestor, task_body(make_snapshot("behind", seq=seq,
                                                collected_at=now + seq * 30 - 60)),
              received_at=now + seq * 30)
    judge(ingestor, task_body(make_snapshot("ahead", seq=1, collected_at=now + 90)),
          received_at=now)
    assert skew_warnings(caplog) == [
        "agent behind: clock off by -60.0 s (collected_at vs receipt, two heartbeats in a "
        "row); liveness uses the receipt time",
        "agent ahead: clock off by +90.0 s (collected_at vs receipt); liveness uses the "
        "receipt time"]


def test_gaps_count_the_missed_sequence_numbers(ingestor: Feeder) -> None:
    for seq in (1, 2, 5, 6, 10):
        judge(ingestor, task_body(make_snapshot(seq=seq)))
    assert (ingestor.stats.gaps, ingestor.stats.missed) == (2, 5)


def test_clock_skew_is_kept_but_liveness_uses_the_receipt_time(ingestor: Feeder) -> None:
    now = time.time()
    judge(ingestor, task_body(make_snapshot(collected_at=now + 120)), received_at=now)
    ingestor.commit()
    [record] = ingestor.registry.agents()
    assert record.clock_skew_seconds == pytest.approx(120)
    assert record.last_seen == now
    assert ingestor.stats.clock_skewed == 1


def test_with_a_secret_only_correctly_signed_heartbeats_are_accepted(
        signed_ingestor: Feeder) -> None:
    good = sign_snapshot(make_snapshot(seq=1), SECRET)
    assert judge(signed_ingestor, task_body(make_snapshot(seq=2))) == ("rejected", "unsigned")
    forged = {**sign_snapshot(make_snapshot(seq=2), "guess"), "seq": 2}
    assert judge(signed_ingestor, task_body(forged)) == ("rejected", "forged")
    tampered = {**sign_snapshot(make_snapshot(seq=2), SECRET), "gpu_vram_available_gb": 23.0}
    assert judge(signed_ingestor, task_body(tampered)) == ("rejected", "forged")
    assert judge(signed_ingestor, task_body(good)) == ("accepted", "")
    assert judge(signed_ingestor, task_body(good)) == ("rejected", "replayed")
    assert signed_ingestor.stats.accepted == 1
    signed_ingestor.commit()
    [record] = signed_ingestor.registry.agents(with_snapshot=True)
    assert record.snapshot == good, "stored as received, verifiable later"
    assert "signature" not in status_object(record, time.time()), "but not shown"


def test_a_replayed_old_boot_is_rejected_when_signing_is_on(signed_ingestor: Feeder) -> None:
    old = sign_snapshot(make_snapshot(seq=50, boot_id="old"), SECRET)
    new = sign_snapshot(make_snapshot(seq=1, boot_id="new", started_at=2e9), SECRET)
    assert judge(signed_ingestor, task_body(old))[0] == "accepted"
    assert judge(signed_ingestor, task_body(new))[0] == "accepted"
    assert judge(signed_ingestor, task_body(old)) == ("rejected", "replayed")
    assert signed_ingestor.stats.rejected["replayed"] == 1


def test_with_signing_on_a_superseded_boot_still_sending_new_seqs_is_a_conflict_not_a_replay(
        signed_ingestor: Feeder) -> None:
    old = [sign_snapshot(make_snapshot(seq=n, boot_id="old"), SECRET) for n in (50, 51)]
    new = sign_snapshot(make_snapshot(seq=1, boot_id="new", started_at=2e9), SECRET)
    assert judge(signed_ingestor, task_body(old[0]))[0] == "accepted"
    assert judge(signed_ingestor, task_body(new))[0] == "accepted"
    # seq 51 of the old boot was never seen: signed, it comes from a live process
    assert judge(signed_ingestor, task_body(old[1])) == ("ignored", "conflict")
    assert judge(signed_ingestor, task_body(old[1])) == ("rejected", "replayed")
    assert signed_ingestor.stats.rejected["replayed"] == 1


def test_without_a_secret_a_signature_is_ignored(ingestor: Feeder) -> None:
    signed = sign_snapshot(make_snapshot(seq=1), "whatever")
    assert judge(ingestor, task_body(signed)) == ("accepted", "")


# -- the judge's rows and the batch writer ----------------------------------------------------

def test_the_judge_needs_no_registry_and_its_rows_fill_every_column() -> None:
    judge = HeartbeatJudge([], history_points=5)
    outcome = judge.judge_snapshot(make_snapshot("a1"), received_at=time.time())
    assert outcome.rows is not None
    assert set(outcome.rows.agent) == {c.name for c in sql_schema.agents.columns}
    assert set(outcome.rows.history) == {c.name for c in sql_schema.history.columns}


def test_history_points_go_round_the_ring_of_history_points_slots() -> None:
    judge = HeartbeatJudge([], history_points=2)
    slots = []
    for seq in (1, 2, 3):
        rows = judge.judge_snapshot(make_snapshot(seq=seq), received_at=time.time()).rows
        assert rows is not None
        slots.append(rows.history["slot"])
    assert slots == [0, 1, 0]


def test_the_writer_keeps_only_the_newest_rows_of_an_agent_until_taken(
        sqlite_registry: Registry) -> None:
    judge = HeartbeatJudge([], history_points=1)
    writer = BatchWriter(sqlite_registry)
    for seq in (1, 2):
        rows = judge.judge_snapshot(make_snapshot("a1", seq=seq), received_at=time.time()).rows
        assert rows is not None
        writer.add(rows)
    batch = writer.take_batch()
    assert batch is not None
    assert [row["seq"] for row in batch.agent_rows] == [2]
    assert [json.loads(row["snapshot"])["seq"] for row in batch.agent_rows] == [2]
    assert len(batch.history_rows) == 1
    assert writer.pending == 1, "taken but not yet committed"
    writer.write(batch)
    assert (writer.pending, writer.take_batch()) == (0, None)


def test_a_batch_names_as_stored_only_agents_whose_row_the_registry_already_holds(
        sqlite_registry: Registry) -> None:
    feed(sqlite_registry, make_snapshot("old", seq=1), start=time.time())
    judge = HeartbeatJudge(sqlite_registry.agents(), history_points=5)
    writer = BatchWriter(sqlite_registry)
    # "new" twice: its second heartbeat is known to the judge, but its row is not stored
    for name, seq in (("old", 2), ("new", 1), ("new", 2)):
        writer.keep(judge.judge_snapshot(make_snapshot(name, seq=seq), received_at=time.time()))
    batch = writer.take_batch()
    assert batch is not None
    assert batch.stored == {"old"}
    writer.write(batch)
    writer.keep(judge.judge_snapshot(make_snapshot("new", seq=3), received_at=time.time()))
    later = writer.take_batch()
    assert later is not None and later.stored == {"new"}


def test_a_consumer_refuses_a_judge_and_a_writer_that_count_apart(
        sqlite_registry: Registry) -> None:
    with pytest.raises(ValueError, match="one IngestStats"):
        HeartbeatConsumer("memory://", HeartbeatJudge([], history_points=1),
                          BatchWriter(sqlite_registry))
