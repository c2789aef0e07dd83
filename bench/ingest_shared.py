"""Several orchestrators on one heartbeat queue and one PostgreSQL registry, for
``bench/ingest.py``.

:func:`run_orchestrators` fills a fresh queue (the caller's publishers), creates a fresh
registry (a throwaway PostgreSQL schema), then starts ``count`` orchestrator processes
(``multiprocessing`` spawn), each running a real :class:`HeartbeatConsumer` with its own
:class:`HeartbeatJudge` (no agents known at start) and :class:`BatchWriter` (named
``bench-<i>``) on that queue. Each builds its pieces and signals ready; the clock starts
when all are told to go (each then connects to the broker: connecting is timed, as for
the single consumer) and stops at the last flush (commit and ack) after which the
processes together have judged every message. Each process publishes after every flush
how many messages it has judged (accepted + rejected + ignored) and when (monotonic
seconds, one clock for every process on Linux) through shared memory; the parent polls it.

Afterwards the registry's books are checked: every heartbeat is accepted exactly once
across orchestrators, so every agent must end with ``seq`` = ``history_count`` =
messages/agents and no ``missed`` or ``restarts`` (a heartbeat sequenced after a newer one
of its agent by another orchestrator comes back as *late* and takes its number back).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from multiprocessing.synchronize import Event
from typing import Any

from kombu.connection import Connection
from kombu.entity import Queue
from sqlalchemy import create_engine, func, select, text

from bench.cpu_use import measure_cpu
from bench.ingest_peers import queue_depth, spread, wait_for_depth

#: Seconds to wait for the orchestrator processes to start (imports, registry, consumer).
READY_SECONDS = 60.0
#: Seconds without a flush that judged anything after which a run is abandoned.
STALL_SECONDS = 60.0
#: Seconds between the parent's looks at the processes' progress.
POLL_SECONDS = 0.002
#: Seconds a process gets to flush, ack and report after being told to stop.
STOP_SECONDS = 30.0
#: The throughput of two orchestrators over one (median of the repeats) the issue asks for.
TWO_OVER_ONE = 1.5


# -- one orchestrator process ------------------------------------------------------------------

@dataclass(frozen=True)
class Signals:
    """What one orchestrator process shares with the parent: ``ready`` (set by it), ``go``
    and ``stop`` (set by the parent), ``progress`` (a shared array of doubles: messages
    judged and the monotonic seconds of the last flush, two per process) and the sending
    end of its ``report`` pipe."""

    ready: Event
    go: Event
    stop: Event
    progress: Any
    report: Pipe


def orchestrator_process(index: int, settings: dict[str, Any], signals: Signals) -> None:
    """The body of orchestrator process ``index``: consume ``settings["queue"]`` into the
    registry at ``settings["postgres"]`` / ``settings["schema"]`` from ``go`` until ``stop``;
    after every flush write (messages judged, monotonic seconds) to ``progress[2 index:]``;
    finally send its counts and seconds down ``report``."""
    from chiffon_worker.orchestrator.batch_writer import BatchWriter
    from chiffon_worker.orchestrator.heartbeat_consumer import HeartbeatConsumer
    from chiffon_worker.orchestrator.ingest_counters import IngestStats
    from chiffon_worker.orchestrator.judge import HeartbeatJudge
    from chiffon_worker.orchestrator.registry import Registry

    registry = Registry(settings["postgres"], schema=settings["schema"])
    stats = IngestStats()
    judge = HeartbeatJudge((), history_points=registry.history_points, stats=stats)
    writer = BatchWriter(registry, stats=stats, name=f"bench-{index}")
    consumer = HeartbeatConsumer(settings["broker"], judge, writer, queue=settings["queue"],
                                 batch_size=settings["batch_size"],
                                 prefetch_count=settings["prefetch"],
                                 connection_name=f"chiffon-bench-{index}")
    in_turn = _time_batch_steps(judge)
    flush, progress = HeartbeatConsumer._flush, signals.progress

    def flush_and_publish(self: HeartbeatConsumer) -> None:
        flush(self)
        progress[2 * index + 1] = time.monotonic()  # the time first: the parent reads
        progress[2 * index] = stats.accepted + stats.rejected_total + stats.ignored_total

    def stop_when_told() -> None:
        signals.stop.wait()
        consumer.stop()

    consuming: list[float] = []

    def note_consuming() -> None:
        if consumer.ready.wait(READY_SECONDS):
            consuming.append(time.monotonic())

    HeartbeatConsumer._flush = flush_and_publish  # type: ignore[method-assign]
    threading.Thread(target=stop_when_told, daemon=True).start()
    signals.ready.set()
    signals.go.wait()
    went = time.monotonic()
    threading.Thread(target=note_consuming, daemon=True).start()
    cpu_before = time.process_time()
    try:
        consumer.run()
    finally:
        registry.close()
    taking = in_turn["take_turn"]["seconds"]
    signals.report.send({
        "index": index, "accepted": stats.accepted, "late": stats.late,
        "rejected": dict(stats.rejected), "ignored": dict(stats.ignored), "gaps": stats.gaps,
        "missed": stats.missed, "restarts": stats.restarts, "batches": stats.batches,
        "reloads": int(in_turn["reload"]["calls"]),
        "cpu_seconds": round(time.process_time() - cpu_before, 3),
        "commit_seconds": round(stats.write_seconds, 3),
        "turn_held_seconds": round(stats.write_seconds - taking, 3),
        "in_turn_seconds": {name: round(t["seconds"], 3) for name, t in in_turn.items()},
        "consuming_after_go_seconds": round(consuming[0] - went, 3) if consuming else None,
        "last_flush_after_go_seconds": round(progress[2 * index + 1] - went, 3)})


def _time_batch_steps(judge: Any) -> dict[str, dict[str, float]]:
    """Count the calls and seconds of the steps of ``BatchWriter.commit`` that run once per
    batch (cheap to time: no per-message step is wrapped): taking the ingest turn (waiting
    for it included), reading the batch's agents, loading them into ``judge``, writing the
    rows. Returns the live totals by step."""
    from chiffon_worker.orchestrator.registry import IngestTurn, Registry

    return {"take_turn": _count_calls(Registry, "_take_turn"),
            "state_reads": _count_calls(IngestTurn, "agents"),
            "reload": _count_calls(judge, "reload"),
            "remember": _count_calls(judge, "remember"),
            "sql": _count_calls(Registry, "_write_rows")}


def _count_calls(owner: Any, name: str) -> dict[str, float]:
    """Replace ``owner.name`` by a wrapper counting its calls and their seconds; returns
    the live totals (``calls``, ``seconds``)."""
    original = getattr(owner, name)
    totals = {"calls": 0.0, "seconds": 0.0}

    def counted(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals["calls"] += 1
            totals["seconds"] += time.perf_counter() - started

    setattr(owner, name, counted)
    return totals


# -- the parent: fill, start, time, check --------------------------------------------------------

@contextlib.contextmanager
def declared(broker: str, declaration: Queue) -> Iterator[str]:
    """``declaration`` declared on ``broker`` for the block (its name), deleted after
    (with its exchange)."""
    with Connection(broker) as conn:
        bound = declaration(conn.default_channel)
        bound.declare()
        try:
            yield str(declaration.name)
        finally:
            bound.delete()
            bound.exchange.delete()


def drop_schema(postgres: str, schema: str) -> None:
    """Drop the PostgreSQL ``schema`` and everything in it."""
    engine = create_engine(postgres)
    try:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        engine.dispose()


def books(registry: Any, messages: int, agents: int) -> dict[str, Any]:
    """What the registry holds after the run, and whether it is every heartbeat accepted
    exactly once: ``agents`` agents, each with seq = history_count = messages/agents, no
    missed heartbeats and no restarts."""
    from chiffon_worker.orchestrator import sql_schema

    a, h = sql_schema.agents, sql_schema.history
    per_agent = messages // agents
    query = select(func.count(), func.min(a.c.seq), func.max(a.c.seq), func.sum(a.c.missed),
                   func.sum(a.c.restarts), func.min(a.c.history_count),
                   func.max(a.c.history_count), func.sum(a.c.history_count))
    with registry.engine.connect() as conn:
        row = conn.execute(query).one()
        history_rows = conn.execute(select(func.count()).select_from(h)).scalar()
    stored, min_seq, max_seq, missed, restarts, min_count, max_count, total = row
    held = {"agents": stored, "seq_min_max": [min_seq, max_seq],
            "missed_total": int(missed or 0), "restarts_total": int(restarts or 0),
            "history_count_min_max": [min_count, max_count],
            "history_count_total": int(total or 0), "history_rows": history_rows}
    held["books_match"] = (
        stored == agents and min_seq == max_seq == per_agent and not missed and not restarts
        and min_count == max_count == per_agent and total == messages
        and history_rows == agents * min(per_agent, registry.history_points))
    return held


def _start(count: int, settings: dict[str, Any]) -> tuple[list[Any], Event, Event, Any,
                                                           list[Pipe]]:
    """Start ``count`` orchestrator processes and wait until each is ready; returns
    (processes, go, stop, progress, report pipes)."""
    ctx = multiprocessing.get_context("spawn")
    go, stop = ctx.Event(), ctx.Event()
    progress = ctx.Array("d", 2 * count, lock=False)
    procs, pipes, readies = [], [], []
    for index in range(count):
        ready = ctx.Event()
        receiving, sending = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=orchestrator_process, name=f"bench-orchestrator-{index}",
                           args=(index, settings, Signals(ready, go, stop, progress, sending)))
        proc.start()
        sending.close()
        procs.append(proc)
        pipes.append(receiving)
        readies.append(ready)
    deadline = time.monotonic() + READY_SECONDS
    for proc, ready in zip(procs, readies, strict=True):
        while not ready.wait(0.1):
            if proc.exitcode is not None or time.monotonic() > deadline:
                raise SystemExit(f"{proc.name} did not start (exit code {proc.exitcode})")
    return procs, go, stop, progress, pipes


def _wait_for_all(procs: list[Any], progress: Any, messages: int, started: float) -> float:
    """Poll until the processes together judged ``messages``; returns the monotonic time
    (seconds) of the flush that completed them."""
    count = len(procs)
    last, moved = -1.0, time.monotonic()
    while True:
        judged = sum(progress[2 * i] for i in range(count))
        if judged >= messages:
            return float(max(progress[2 * i + 1] for i in range(count)))
        now = time.monotonic()
        if judged != last:
            last, moved = judged, now
        dead = [proc.name for proc in procs if proc.exitcode is not None]
        if dead or now - moved > STALL_SECONDS:
            raise SystemExit(f"{count} orchestrators: {judged:.0f} of {messages} messages "
                             f"judged after {now - started:.0f} s (exited: {dead or 'none'})")
        time.sleep(POLL_SECONDS)


def _stop(procs: list[Any], stop: Event, pipes: list[Pipe]) -> list[dict[str, Any]]:
    """Tell the processes to stop; returns their reports (in process order)."""
    stop.set()
    reports = []
    for proc, pipe in zip(procs, pipes, strict=True):
        if not pipe.poll(STOP_SECONDS):
            raise SystemExit(f"{proc.name} sent no report (exit code {proc.exitcode})")
        reports.append(pipe.recv())
        proc.join(STOP_SECONDS)
    return reports


def run_orchestrators(count: int, *, broker: str, postgres: str, declaration: Queue,
                      fill: Callable[[str], float], messages: int, agents: int,
                      batch_size: int, prefetch: int) -> dict[str, Any]:
    """Fill the fresh queue ``declaration`` (``fill(name)`` returns seconds), then time
    ``count`` orchestrator processes draining it into a fresh registry (heartbeats/s)."""
    from chiffon_worker.orchestrator.registry import Registry

    schema = f"chiffon_bench_{uuid.uuid4().hex[:8]}"
    procs: list[Any] = []
    with declared(broker, declaration) as queue:
        try:
            publish_seconds = fill(queue)
            depth = wait_for_depth(broker, queue, messages)
            if depth != messages:
                raise SystemExit(f"queue holds {depth} messages, expected {messages}")
            registry = Registry(postgres, schema=schema)  # created before the processes
            settings = {"broker": broker, "postgres": postgres, "schema": schema,
                        "queue": queue, "batch_size": batch_size, "prefetch": prefetch}
            try:
                procs, go, stop, progress, pipes = _start(count, settings)
                load_before = os.getloadavg()[0]
                with measure_cpu() as cpu:
                    started = time.monotonic()
                    go.set()
                    finished = _wait_for_all(procs, progress, messages, started)
                reports = _stop(procs, stop, pipes)
                held = books(registry, messages, agents)
            finally:
                registry.close()
            left = queue_depth(broker, queue)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
                    proc.join()
            drop_schema(postgres, schema)
    elapsed = finished - started
    accepted = sum(r["accepted"] for r in reports)
    held["books_match"] = bool(held["books_match"] and accepted == messages and left == 0)
    return {"orchestrators": count, "seconds": round(elapsed, 3),
            "heartbeats_per_second": round(messages / elapsed, 1),
            "accepted": accepted, "late": sum(r["late"] for r in reports),
            "messages_left_in_queue": left, "publish_seconds": round(publish_seconds, 3),
            "load_average_1min_before_after": [round(load_before, 2),
                                               round(os.getloadavg()[0], 2)],
            "machine_cpu_busy_percent": round(cpu.busy_fraction * 100, 1),
            "servers_cpu_us_per_heartbeat": {
                kind: round(seconds / messages * 1e6, 1)
                for kind, seconds in cpu.server_seconds.items()},
            "turn_held_percent": round(
                100 * sum(r["turn_held_seconds"] for r in reports) / elapsed, 1),
            "registry": held, "processes": reports}


# -- repeats and summary ---------------------------------------------------------------------------

def order_of(counts: list[int], index: int) -> list[int]:
    """The orchestrator counts repeat ``index`` (from 0) measures, in order: ``counts``
    rotated by ``index`` (with two counts: alternating)."""
    shift = index % len(counts)
    return counts[shift:] + counts[:shift]


def repeat_row(index: int, order: list[int], runs: dict[int, dict[str, Any]]
               ) -> dict[str, Any]:
    """One repeat's record: every count's run, and each count's heartbeats/s over the
    smallest count's (``<n>_over_<smallest>``)."""
    base = min(runs)
    rate = {n: float(run["heartbeats_per_second"]) for n, run in runs.items()}
    return {"repeat": index + 1, "order": order,
            "heartbeats_per_second": {str(n): rate[n] for n in sorted(runs)},
            "ratios": {f"{n}_over_{base}": round(rate[n] / rate[base], 3)
                       for n in sorted(runs) if n != base},
            "books_match": all(run["registry"]["books_match"] for run in runs.values()),
            "runs": {str(n): runs[n] for n in sorted(runs)}}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """min / median / max over the repeats of each count's heartbeats/s and of each ratio,
    and whether two orchestrators reach ``TWO_OVER_ONE`` x one (at the median; and at the
    worst repeat, ``*_every_repeat``)."""
    counts = rows[0]["heartbeats_per_second"].keys()
    result: dict[str, Any] = {
        "heartbeats_per_second": {n: spread([r["heartbeats_per_second"][n] for r in rows])
                                  for n in counts},
        "ratios": {key: spread([r["ratios"][key] for r in rows], 3)
                   for key in rows[0]["ratios"]},
        "books_match_every_run": all(r["books_match"] for r in rows),
    }
    two = [r["ratios"]["2_over_1"] for r in rows if "2_over_1" in r["ratios"]]
    if two:
        result["meets_two_orchestrators_1_5x"] = statistics.median(two) >= TWO_OVER_ONE
        result["meets_two_orchestrators_1_5x_every_repeat"] = min(two) >= TWO_OVER_ONE
    return result


def what(cpus: int | None) -> dict[str, Any]:
    """How the orchestrator runs are made, for the report."""
    return {
        "what": "PostgreSQL registry (a fresh schema per run). The same publishers fill a "
                "fresh queue with the same heartbeats; then N orchestrator processes, each a "
                "HeartbeatConsumer with HeartbeatJudge((), ...) and BatchWriter(name="
                "'bench-<i>'), drain it together into one registry (ingest turns). Clock "
                "from 'go' (every process ready; connecting is timed) to the flush (commit "
                "and ack) after which all processes together judged every message. The N "
                "rotate per repeat. books_match: every agent ends with seq = history_count "
                "= messages/agents, missed = restarts = 0, every message accepted once, "
                "queue empty.",
        "target_two_over_one": TWO_OVER_ONE,
        "cpus": cpus,
        "machine_note": f"{cpus} CPUs, shared by the orchestrator processes with RabbitMQ, "
                        "PostgreSQL and this parent (the publishers run before the clock)",
    }
