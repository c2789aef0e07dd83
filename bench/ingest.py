"""Heartbeat ingest: heartbeats/s the consumer + registry sustain in one process.

For each registry backend (SQLite in a temporary directory; PostgreSQL in a throwaway
schema), separate publisher processes first fill a private queue on the real RabbitMQ
with ``--messages`` heartbeats from ``--agents`` distinct agent ids, sent exactly as
agents send them (Celery ``send_task("chiffon.heartbeat", args=[snapshot])``, JSON,
``expires`` set). Then one :class:`HeartbeatConsumer` drains the queue; the clock runs
from the consumer's start to the moment every message is judged, committed and acked.

One more run per backend (``timed_run`` in the report; its rate counts in no ratio, as the
wrappers cost a few µs per heartbeat) times where the consumer's time goes, by wrapping
the functions its pipeline calls (see :func:`timed_steps` and :func:`breakdown`): per
message ``HeartbeatJudge.check`` (JSON decode, validation, the rest of the check); per
batch ``BatchWriter.commit`` in the registry's ingest turn (taking the turn, reading the
batch's agents and loading them into the judge, sequencing and rows, batch preparation,
registry SQL, the rest of the transaction), then the acks; the rest is the broker client
(socket reads, cutting AMQP frames into deliveries and reading their headers:
``amqp_deliveries.DeliveryReader``, the consumer loop). Target: >= 5,000 heartbeats/s.

With the postgresql backend, each repeat also times ``--orchestrators`` (default 1,2)
orchestrator processes draining one queue, filled by the same publishers, into one fresh
registry (``bench/ingest_shared.py``; counts rotate per repeat), checks the registry's
books (every heartbeat accepted exactly once) and reports N=2 over N=1 (min/median/max;
target >= 1.5x at the median).

Then, without broker or database, the per-heartbeat cost of the two CPU-bound steps, in
microseconds, for this tree ("after") and for ``--baseline-rev`` ("before", the last
commit with the hand-written validator, extracted with ``git archive``), each measured
``--validation-runs`` times in alternating fresh processes (the machine is shared):
``validate_snapshot`` on realistic decoded snapshots, and the judge step (one raw Celery
heartbeat message -> decode, validate, sequence, rows queued for the writer).

Peers, measured in the same run and alternating with the consumer in every repeat (the
order rotates from one repeat to the next, so the machine's noise hits all three alike;
see ``bench/ingest_peers.py``): the kombu floor (a bare kombu consumer that only acks, on a
queue filled by the same publishers with the same heartbeats) and Celery's event state
(what Flower runs: ``app.events.Receiver`` into ``app.events.State()``, fed the same number
of ``worker-heartbeat`` events from ``--agents`` hostnames, on a private vhost). Target:
ours >= 0.8x the kombu floor and ahead of Celery's event state (medians over ``--repeat``).
``--no-peers`` skips them.

Writes ``--output`` (default ``bench/results/ingest.json``); ``--compare-with`` embeds the
throughput of an earlier report (e.g. one taken before a change) for a side-by-side view.

    python bench/ingest.py [--messages 50000] [--agents 10000] [--backends sqlite,postgresql]
                           [--orchestrators 1,2] [--repeat 3]
    python bench/ingest.py --backends "" --validation-runs 5   # only the per-heartbeat costs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kombu.connection import Connection

# chiffon_worker is imported inside the functions that use it: a --measure-steps child
# must first put the tree it measures (the baseline's or this one) on sys.path.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cpu_use import cpu_model, measure_cpu  # noqa: E402
from bench.trees import baseline_tree  # noqa: E402

if TYPE_CHECKING:
    from chiffon_worker.orchestrator.registry import Registry

RESULTS = ROOT / "bench" / "results"
TARGET_PER_SECOND = 5000.0
BROKER = "amqp://guest:guest@127.0.0.1:5672//"
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TIMEOUT_SECONDS = 900.0  # the heartbeats' own timeout and message expiry: outlives the run
#: The last commit with the hand-written snapshot validator and the one-piece Ingestor.
BASELINE_REV = "ef93ee3"
STEP_AGENTS = 2000  # distinct agents in the per-heartbeat measure
STEP_SEQS = 5  # heartbeats per agent there (all accepted: seq 1..5)
#: ours / kombu floor (heartbeats/s over messages/s) the issue asks for, at the median.
KOMBU_FLOOR_RATIO = 0.8
#: What one repeat measures, in the order of the first repeat (later ones rotate it).
MEASURES = ("ours", "kombu_floor", "celery_event_state")


# -- the publisher process -------------------------------------------------------------------

def publish(queue: str, messages: int, agents: int, part: int, parts: int, *,
            seed: int, short_argsrepr: bool) -> None:
    """Send this part's share of the heartbeats (agents ``i % parts == part``), in seq order
    per agent, interleaved across agents as a lab's beats would be."""
    from celery import Celery

    from chiffon_worker.wire import heartbeat_queue
    from tests.orchestrator.snapshots import random_snapshot

    app = Celery("bench-agents", broker=BROKER, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    target = heartbeat_queue(queue)
    rng = random.Random(seed + part)
    mine = [i for i in range(agents) if i % parts == part]
    per_agent = messages // agents
    base = {i: random_snapshot(rng, f"bench-agent-{i:05d}", 1) for i in mine}
    with app.producer_or_acquire() as producer:
        for seq in range(1, per_agent + 1):
            for i in mine:
                snap = dict(base[i])
                snap.update(seq=seq, collected_at=time.time(),
                            heartbeat_timeout_seconds=TIMEOUT_SECONDS,
                            cpu_load_1min=round(rng.uniform(0, 8), 2))
                extra = {"argsrepr": "(snapshot,)"} if short_argsrepr else {}
                app.send_task("chiffon.heartbeat", args=[snap], queue=target,
                              expires=TIMEOUT_SECONDS, producer=producer, **extra)
    app.close()


def fill_queue(queue: str, messages: int, agents: int, publishers: int,
               short_argsrepr: bool = False) -> float:
    """Run the publisher processes; returns their wall time in seconds."""
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--publish", queue,
                               "--messages", str(messages), "--agents", str(agents),
                               "--part", str(part), "--parts", str(publishers),
                               *(["--short-argsrepr"] if short_argsrepr else [])])
             for part in range(publishers)]
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"publisher exited with {proc.returncode}")
    return time.perf_counter() - started


def queue_depth(queue: str) -> int:
    with Connection(BROKER) as conn:
        _, count, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
        return int(count)


def delete_queue(queue: str) -> None:
    from chiffon_worker.wire import heartbeat_queue

    with Connection(BROKER) as conn:
        bound = heartbeat_queue(queue)(conn.default_channel)
        bound.delete()
        bound.exchange.delete()


# -- timing the consumer ----------------------------------------------------------------------

class Timers:
    """Accumulated seconds per step, by wrapping the functions the consumer calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed into ``seconds[name]`` (several functions may share a name)."""
        clock = time.perf_counter
        self.seconds.setdefault(name, 0.0)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += clock() - started

        return timed

    def reset(self) -> None:
        """Zero every step (what ran before the clock started does not count)."""
        for name in self.seconds:
            self.seconds[name] = 0.0


def timed_steps() -> list[tuple[Any, str, str]]:
    """(owner, attribute, step) for each function of the consumer's pipeline that is timed.

    Per message, in ``HeartbeatConsumer._receive``: ``HeartbeatJudge.check`` (stateless),
    which calls ``decoding.decode_heartbeat`` and ``judge.validate_snapshot``. Per batch,
    in ``HeartbeatConsumer._flush``: ``BatchWriter.commit`` (then the acks), which inside
    ``Registry.ingest_turn`` takes the turn (``Registry._take_turn``), reads the batch's
    agents (``IngestTurn.agents``) into the judge (``reload``/``remember``), sequences each
    heartbeat (``HeartbeatJudge.sequence``) into the writer (``keep``, ``take_batch``) and
    writes the rows (``Registry._write_rows``, through ``IngestTurn.write``).
    """
    from chiffon_worker.orchestrator import decoding, judge
    from chiffon_worker.orchestrator.batch_writer import BatchWriter
    from chiffon_worker.orchestrator.heartbeat_consumer import HeartbeatConsumer
    from chiffon_worker.orchestrator.judge import HeartbeatJudge
    from chiffon_worker.orchestrator.registry import IngestTurn, Registry

    return [(decoding, "decode_heartbeat", "json_decode"),
            (judge, "validate_snapshot", "validation"),
            (HeartbeatJudge, "check", "check_total"),
            (HeartbeatJudge, "sequence", "sequencing_and_rows"),
            (HeartbeatJudge, "reload", "state_reload"),
            (HeartbeatJudge, "remember", "state_reload"),
            (IngestTurn, "agents", "state_reads"),
            (BatchWriter, "keep", "batch_preparation"),
            (BatchWriter, "take_batch", "batch_preparation"),
            (Registry, "_write_rows", "sql"),
            (Registry, "_take_turn", "turn_take"),
            (BatchWriter, "commit", "commit_total"),
            (HeartbeatConsumer, "_flush", "flush_total")]


@contextlib.contextmanager
def patched_timers(timers: Timers, steps: list[tuple[Any, str, str]]) -> Iterator[list[str]]:
    """``steps`` wrapped into ``timers`` for the block, restored after; yields the steps
    that could not be timed (their function is gone: the pipeline changed)."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in steps
                 if hasattr(owner, name)]
    missing = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name, _ in steps
               if not hasattr(owner, name)]
    for owner, name, label in steps:
        timers.seconds.setdefault(label, 0.0)
        if hasattr(owner, name):
            setattr(owner, name, timers.wrap(label, getattr(owner, name)))
    try:
        yield missing
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)


#: The steps of the breakdown, each a part of the run that no other step includes.
BREAKDOWN_STEPS = ("json_decode", "validation", "checking_other", "state_reads",
                   "state_reload", "sequencing_and_rows", "batch_preparation", "sql",
                   "turn_take", "transaction_other", "acks", "broker_client")


def breakdown(seconds: dict[str, float], elapsed: float) -> dict[str, float]:
    """Seconds per disjoint step of the run (``elapsed`` seconds) from the timers' totals.

    ``checking_other``: the rest of ``check`` (expiry header, storability, the result);
    ``transaction_other``: the rest of ``commit`` (connection, BEGIN, COMMIT, bookkeeping);
    ``acks``: the rest of ``_flush``; ``broker_client``: everything else (socket reads,
    AMQP frame and header parsing, kombu messages, the consumer loop).
    """
    inside_commit = ("state_reads", "state_reload", "sequencing_and_rows",
                     "batch_preparation", "sql", "turn_take")
    parts = {name: seconds[name] for name in
             ("json_decode", "validation", *inside_commit)}
    parts["checking_other"] = (seconds["check_total"] - seconds["json_decode"]
                               - seconds["validation"])
    parts["transaction_other"] = seconds["commit_total"] - sum(seconds[n] for n in inside_commit)
    parts["acks"] = seconds["flush_total"] - seconds["commit_total"]
    parts["broker_client"] = elapsed - sum(parts.values())
    return {name: parts[name] for name in BREAKDOWN_STEPS}


def drain(registry: Registry, queue: str, messages: int, *, batch_size: int, prefetch: int,
          timed: bool = True) -> dict[str, Any]:
    """Consume ``messages`` from ``queue`` into ``registry``; returns the measurements.

    The clock stops after the flush (commit, then ack) once every message is judged and
    nothing is left to commit. ``timed``: the steps of :func:`timed_steps` are wrapped in
    timers, read at that moment, for the time breakdown (the wrappers cost a few µs per
    heartbeat themselves); without them the run is the consumer as it runs in production.
    """
    from chiffon_worker.orchestrator.batch_writer import BatchWriter
    from chiffon_worker.orchestrator.heartbeat_consumer import HeartbeatConsumer
    from chiffon_worker.orchestrator.ingest_counters import IngestStats
    from chiffon_worker.orchestrator.judge import HeartbeatJudge

    timers = Timers()
    finished: dict[str, Any] = {}
    with patched_timers(timers, timed_steps() if timed else []) as untimed:
        stats = IngestStats()
        writer = BatchWriter(registry, stats=stats)
        consumer = HeartbeatConsumer(
            BROKER, HeartbeatJudge(registry.agents(), history_points=registry.history_points,
                                   stats=stats),
            writer, queue=queue, batch_size=batch_size, prefetch_count=prefetch)
        flush = HeartbeatConsumer._flush  # timed: outside it, no timed step is running

        def flush_and_check(self: HeartbeatConsumer) -> None:
            flush(self)
            judged = stats.accepted + stats.rejected_total + stats.ignored_total
            if "at" not in finished and judged >= messages and writer.pending == 0:
                finished["at"] = time.perf_counter()
                finished["seconds"] = dict(timers.seconds)
                consumer.stop()

        HeartbeatConsumer._flush = flush_and_check  # type: ignore[method-assign]
        try:
            timers.reset()
            started = time.perf_counter()
            consumer.run()
        finally:
            HeartbeatConsumer._flush = flush  # type: ignore[method-assign]
    elapsed = finished["at"] - started
    result: dict[str, Any] = {
        "seconds": round(elapsed, 3),
        "heartbeats_per_second": round(messages / elapsed, 1),
        "step_timers": timed,
        "accepted": stats.accepted,
        "rejected": stats.rejected_total,
        "ignored": stats.ignored_total,
        "batches": stats.batches,
    }
    if timed:
        parts = breakdown(finished["seconds"], elapsed)
        result.update(untimed_steps=untimed,
                      time_breakdown_seconds={k: round(v, 3) for k, v in parts.items()},
                      time_breakdown_us_per_heartbeat={k: round(v / messages * 1e6, 1)
                                                       for k, v in parts.items()})
    return result


def run_backend(backend: str, args: argparse.Namespace, *, timed: bool = False
                ) -> dict[str, Any]:
    from chiffon_worker.orchestrator.registry import Registry
    from chiffon_worker.wire import heartbeat_queue

    queue = f"chiffon.bench.{uuid.uuid4().hex}"
    schema = f"chiffon_bench_{uuid.uuid4().hex[:8]}"
    workdir = tempfile.mkdtemp(prefix="chiffon-bench-")
    try:
        heartbeat_queue(queue)(Connection(BROKER).default_channel).declare()
        publish_seconds = fill_queue(queue, args.messages, args.agents, args.publishers,
                                     args.short_argsrepr)
        from bench.ingest_peers import wait_for_depth

        depth = wait_for_depth(BROKER, queue, args.messages)  # publishes are asynchronous
        if depth != args.messages:
            raise SystemExit(f"queue holds {depth} messages, expected {args.messages}")
        if backend == "sqlite":
            registry = Registry(f"sqlite:///{Path(workdir) / 'registry.sqlite3'}")
        else:
            registry = Registry(POSTGRES, schema=schema)
        try:
            load_before = os.getloadavg()[0]
            with measure_cpu() as cpu:
                result = drain(registry, queue, args.messages, batch_size=args.batch_size,
                               prefetch=args.prefetch, timed=timed)
            result["cpu"] = cpu.per_message(args.messages)
            result["load_average_1min_before_after"] = [round(load_before, 2),
                                                        round(os.getloadavg()[0], 2)]
            agents_stored = len(registry.agents())
        finally:
            registry.close()
        if agents_stored != args.agents:
            raise SystemExit(f"{backend}: {agents_stored} agents stored, expected {args.agents}")
        left = queue_depth(queue)
        result.update(backend=backend, messages=args.messages, agents=args.agents,
                      agents_stored=agents_stored, messages_left_in_queue=left,
                      publish_seconds=round(publish_seconds, 3),
                      meets_target=result["heartbeats_per_second"] >= TARGET_PER_SECOND)
        return result
    finally:
        delete_queue(queue)
        if backend == "postgresql":
            from bench.ingest_shared import drop_schema

            drop_schema(POSTGRES, schema)
        for path in Path(workdir).glob("*"):
            path.unlink()
        os.rmdir(workdir)


# -- the peers: kombu floor and Celery's event state, alternating with ours -----------------

@contextlib.contextmanager
def event_vhost(wanted: bool) -> Iterator[str | None]:
    """The broker URL of a private vhost for the Celery event peer (deleted afterwards;
    other programs may send Celery events on the default vhost), or None if not ``wanted``."""
    if not wanted:
        yield None
        return
    from tests.orchestrator_process import private_vhost

    with private_vhost(BROKER) as url:
        yield url


def repeat_order(index: int, peers: bool) -> list[str]:
    """What repeat ``index`` (from 0) measures, in order: ``MEASURES`` rotated by ``index``."""
    if not peers:
        return ["ours"]
    shift = index % len(MEASURES)
    return list(MEASURES[shift:] + MEASURES[:shift])


def measure_kombu_floor(args: argparse.Namespace) -> dict[str, Any]:
    """The kombu floor on a fresh queue filled by :func:`fill_queue` (messages/s)."""
    from bench.ingest_peers import bench_queue_name, run_kombu_floor
    from chiffon_worker.wire import heartbeat_queue

    def fill(queue: str) -> float:
        return fill_queue(queue, args.messages, args.agents, args.publishers,
                          args.short_argsrepr)

    return run_kombu_floor(BROKER, heartbeat_queue(bench_queue_name()), fill, args.messages,
                           batch_size=args.batch_size, prefetch=args.prefetch)


def measure_celery_state(args: argparse.Namespace, event_broker: str) -> dict[str, Any]:
    """Celery's event state fed ``--messages`` heartbeat events (events/s)."""
    from bench.ingest_peers import celery_event_state

    return celery_event_state(event_broker, args.messages, args.agents, args.publishers)


def one_repeat(backend: str, args: argparse.Namespace, event_broker: str | None,
               index: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Repeat ``index``: ours (heartbeats/s) and, with ``event_broker``, both peers, in
    :func:`repeat_order`. Returns (ours, the peers' row or None)."""
    order = repeat_order(index, event_broker is not None)
    measured: dict[str, dict[str, Any]] = {}
    for what in order:
        if what == "ours":
            measured[what] = run_backend(backend, args)
        elif what == "kombu_floor":
            measured[what] = measure_kombu_floor(args)
        elif event_broker is not None:
            measured[what] = measure_celery_state(args, event_broker)
    ours = measured["ours"]
    if event_broker is None:
        return ours, None
    hb = ours["heartbeats_per_second"]
    floor = measured["kombu_floor"]["messages_per_second"]
    events = measured["celery_event_state"]["events_per_second"]
    row = {"repeat": index + 1, "order": order, "ours_heartbeats_per_second": hb,
           "kombu_floor_messages_per_second": floor,
           "celery_event_state_events_per_second": events,
           "ours_over_kombu_floor": round(hb / floor, 3),
           "ours_over_celery_event_state": round(hb / events, 3),
           "cpu_us_per_message": cpu_row(ours, measured),
           "kombu_floor": measured["kombu_floor"],
           "celery_event_state": measured["celery_event_state"]}
    print(f"{backend} repeat {index + 1}/{args.repeat}: ours {hb:.0f} heartbeats/s, "
          f"kombu floor {floor:.0f} msgs/s (ours x{row['ours_over_kombu_floor']:.2f}), "
          f"celery event state {events:.0f} events/s "
          f"(ours x{row['ours_over_celery_event_state']:.2f}); order {', '.join(order)}",
          file=sys.stderr)
    return ours, row


def cpu_row(ours: dict[str, Any], peers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each consumer's CPU µs per message and the servers' beside it (see
    ``bench/cpu_use.py``), and the kombu floor's consumer CPU over ours: on a machine
    whose cores are all busy, about the rate ratio ``ours_over_kombu_floor``."""
    runs = {"ours": ours, **{name: peers[name] for name in ("kombu_floor",
                                                            "celery_event_state")}}
    row: dict[str, Any] = {name: run["cpu"] for name, run in runs.items()}
    row["kombu_floor_cpu_over_ours_cpu"] = round(
        runs["kombu_floor"]["cpu"]["consumer_cpu_us_per_message"]
        / ours["cpu"]["consumer_cpu_us_per_message"], 3)
    return row


def peers_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """min / median / max over the repeats of each rate (per second) and ratio, and whether
    the targets are met at the median (``*_every_repeat``: at the worst repeat too)."""
    from bench.ingest_peers import spread

    def column(key: str) -> list[float]:
        return [float(row[key]) for row in rows]

    kombu_ratio = column("ours_over_kombu_floor")
    celery_ratio = column("ours_over_celery_event_state")
    return {
        "ours_heartbeats_per_second": spread(column("ours_heartbeats_per_second")),
        "kombu_floor_messages_per_second": spread(column("kombu_floor_messages_per_second")),
        "celery_event_state_events_per_second":
            spread(column("celery_event_state_events_per_second")),
        "ours_over_kombu_floor": spread(kombu_ratio, 3),
        "ours_over_celery_event_state": spread(celery_ratio, 3),
        "consumer_cpu_us_per_message": {
            name: spread([row["cpu_us_per_message"][name]["consumer_cpu_us_per_message"]
                          for row in rows]) for name in MEASURES},
        "kombu_floor_cpu_over_ours_cpu": spread(
            [row["cpu_us_per_message"]["kombu_floor_cpu_over_ours_cpu"] for row in rows], 3),
        "machine_busy_percent_during_ours": spread(
            [row["cpu_us_per_message"]["ours"]["machine_busy_percent"] for row in rows]),
        "meets_kombu_ratio_0_8": statistics.median(kombu_ratio) >= KOMBU_FLOOR_RATIO,
        "ahead_of_celery_state": statistics.median(celery_ratio) > 1.0,
        "meets_kombu_ratio_0_8_every_repeat": min(kombu_ratio) >= KOMBU_FLOOR_RATIO,
        "ahead_of_celery_state_every_repeat": min(celery_ratio) > 1.0,
    }


PEERS_WHAT = (
    "Same run, alternating per repeat (order rotates). ours: HeartbeatConsumer + registry, "
    "heartbeats/s, without step timers (as in production; the time breakdown comes from one"
    " more run per backend, 'timed_run'). kombu_floor: a bare kombu Consumer (same "
    "prefetch_count, no_ack=False, no socket tuning, drain_events without timeout) on a "
    "queue filled by the same publishers with the same heartbeats, doing nothing but ack "
    "(multiple=True every batch_size messages and at the end), messages/s from connect to "
    "last ack. celery_event_state: the same number of Celery worker-heartbeat events from "
    "--agents hostnames sent by an app's EventDispatcher, consumed by app.events.Receiver "
    "(handlers={'*': state.event}, as Flower) into app.events.State(), events/s from "
    "connect until State processed the last one; on a private vhost; the receiver queue is "
    "not exclusive and has no TTL so it can be filled first. cpu_us_per_message: for each "
    "timed drain, CPU microseconds per message of the consumer's process, of RabbitMQ and "
    "of PostgreSQL, and the share of the machine's cores busy (bench/cpu_use.py). "
    "Booleans: at the median ratio.")


# -- several orchestrators on one queue and one PostgreSQL registry ---------------------------

def measure_orchestrators(count: int, args: argparse.Namespace) -> dict[str, Any]:
    """``count`` orchestrator processes draining one queue filled by :func:`fill_queue`
    into one fresh PostgreSQL registry (heartbeats/s; see ``bench/ingest_shared.py``)."""
    from bench.ingest_peers import bench_queue_name
    from bench.ingest_shared import run_orchestrators
    from chiffon_worker.wire import heartbeat_queue

    def fill(queue: str) -> float:
        return fill_queue(queue, args.messages, args.agents, args.publishers,
                          args.short_argsrepr)

    return run_orchestrators(count, broker=BROKER, postgres=POSTGRES,
                             declaration=heartbeat_queue(bench_queue_name()), fill=fill,
                             messages=args.messages, agents=args.agents,
                             batch_size=args.batch_size, prefetch=args.prefetch)


def orchestrators_repeat(args: argparse.Namespace, index: int) -> dict[str, Any]:
    """Repeat ``index`` of the orchestrator counts (``--orchestrators``, rotating order)."""
    from bench.ingest_shared import order_of, repeat_row

    order = order_of(args.orchestrators, index)
    runs = {count: measure_orchestrators(count, args) for count in order}
    row = repeat_row(index, order, runs)
    rates = ", ".join(f"{n}: {rate:.0f}" for n, rate in row["heartbeats_per_second"].items())
    print(f"postgresql repeat {index + 1}/{args.repeat}: orchestrators {rates} heartbeats/s, "
          f"{row['ratios']}, books match {row['books_match']}; order {order}",
          file=sys.stderr)
    return row


def parse_counts(value: str) -> list[int]:
    """``--orchestrators``: comma-separated process counts ("" for none)."""
    counts = [int(part) for part in value.split(",") if part.strip()]
    if any(count < 1 for count in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError("distinct counts of at least 1, e.g. 1,2")
    return counts


# -- the per-heartbeat cost of validation and judging (no broker, no database) ---------------

def step_agents(seed: int) -> list[dict[str, Any]]:
    """``STEP_AGENTS`` realistic snapshots (today's agent's shape), made by this tree: the
    before and after runs measure the same heartbeats."""
    from tests.orchestrator.snapshots import random_snapshot

    rng = random.Random(seed)
    return [random_snapshot(rng, f"bench-agent-{i:05d}", 1) for i in range(STEP_AGENTS)]


def step_inputs(base: list[dict[str, Any]]
                ) -> tuple[list[dict[str, Any]], list[bytes], dict[str, Any]]:
    """``base`` as decoded snapshots, the same as Celery heartbeat bodies, and their
    headers: ``STEP_SEQS`` heartbeats per agent, in seq order, interleaved."""
    expires = (datetime.now(UTC) + timedelta(seconds=TIMEOUT_SECONDS)).isoformat()
    headers = {"lang": "py", "task": "chiffon.heartbeat", "id": str(uuid.uuid4()),
               "expires": expires, "retries": 0, "argsrepr": "(snapshot,)",
               "kwargsrepr": "{}", "origin": "gen1@bench"}
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    snapshots, bodies = [], []
    for seq in range(1, STEP_SEQS + 1):
        for snap in base:
            beat = dict(snap, seq=seq, collected_at=time.time(),
                        heartbeat_timeout_seconds=TIMEOUT_SECONDS)
            snapshots.append(beat)
            bodies.append(json.dumps([[beat], {}, embed]).encode())
    return snapshots, bodies, headers


def _judge_step() -> tuple[Callable[[bytes, dict[str, Any], float], Any], Callable[[], int]]:
    """(judge one message and queue its rows, accepted count) with whichever pipeline the
    tree on sys.path has: judge + batch writer, or the baseline's one-piece Ingestor."""
    from chiffon_worker.orchestrator.registry import Registry

    registry = Registry("sqlite://")
    try:
        from chiffon_worker.orchestrator.batch_writer import BatchWriter
        from chiffon_worker.orchestrator.judge import HeartbeatJudge
    except ImportError:  # the baseline
        from chiffon_worker.orchestrator.ingest import Ingestor  # type: ignore[import-not-found]

        ingestor = Ingestor(registry)

        def handle(body: bytes, headers: dict[str, Any], now: float) -> Any:
            return ingestor.handle_message(body, headers, "application/json", "utf-8",
                                           received_at=now)

        return handle, lambda: int(ingestor.stats.accepted)
    judge = HeartbeatJudge([], history_points=registry.history_points)
    writer = BatchWriter(registry, stats=judge.stats)

    def judge_one(body: bytes, headers: dict[str, Any], now: float) -> Any:
        outcome = judge.judge_message(body, headers, "application/json", "utf-8",
                                      received_at=now)
        writer.keep(outcome)
        return outcome

    return judge_one, lambda: judge.stats.accepted


def measure_steps(agents_file: Path) -> dict[str, Any]:
    """One run in this process: microseconds per ``validate_snapshot`` call and per judged
    message, for the ``chiffon_worker`` first on sys.path (after a warm-up pass each), on
    the agents' snapshots in ``agents_file`` (JSON, from :func:`step_agents`)."""
    import chiffon_worker
    from chiffon_worker.protocol import validate_snapshot

    snapshots, bodies, headers = step_inputs(json.loads(agents_file.read_text()))
    clock = time.perf_counter
    for snap in snapshots[:1000]:
        validate_snapshot(snap)
    started = clock()
    for snap in snapshots:
        validate_snapshot(snap)
    validation = (clock() - started) / len(snapshots) * 1e6
    now = time.time()
    warm, _ = _judge_step()
    for body in bodies[:1000]:
        warm(body, headers, now)
    judge_one, accepted = _judge_step()
    started = clock()
    for body in bodies:
        judge_one(body, headers, now)
    judging = (clock() - started) / len(bodies) * 1e6
    if accepted() != len(bodies):
        raise SystemExit(f"only {accepted()} of {len(bodies)} heartbeats were accepted")
    return {"validate_snapshot_us": validation, "judge_step_us": judging,
            "tree": str(Path(chiffon_worker.__file__).parent.parent)}


def step_costs(baseline_rev: str, runs: int) -> dict[str, Any]:
    """``runs`` alternating before/after runs, each in a fresh process; min/median/max."""
    from bench.ingest_peers import spread

    samples: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="chiffon-baseline-") as workdir:
        trees = {"before": baseline_tree(baseline_rev, Path(workdir)), "after": ROOT}
        agents_file = Path(workdir) / "agents.json"
        agents_file.write_text(json.dumps(step_agents(seed=7)))
        for _ in range(runs):
            for label, tree in trees.items():
                done = subprocess.run([sys.executable, __file__, "--measure-steps", str(tree),
                                       "--step-agents", str(agents_file)],
                                      capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"measuring {label}: {done.stderr.strip()[-2000:]}")
                sample = json.loads(done.stdout)
                if Path(sample["tree"]).resolve() != tree.resolve():
                    raise SystemExit(f"{label} measured {sample['tree']}, not {tree}")
                samples[label].append(sample)
    report: dict[str, Any] = {
        "what": "microseconds per heartbeat, no broker or database: validate_snapshot on a "
                "decoded realistic snapshot (today's agent's shape, made once by this tree and "
                "given to both); judge_step = one raw Celery heartbeat message "
                "decoded, validated, sequenced and its rows queued for the writer",
        "before": f"git {baseline_rev} (hand-written validator, one-piece Ingestor)",
        "after": "this tree (validator compiled from chiffon_worker.snapshot; "
                 "HeartbeatJudge + BatchWriter)",
        "heartbeats_per_run": STEP_AGENTS * STEP_SEQS,
        "runs": runs,
    }
    for key in ("validate_snapshot_us", "judge_step_us"):
        before = [s[key] for s in samples["before"]]
        after = [s[key] for s in samples["after"]]
        report[key] = {
            "before": spread(before, 2), "after": spread(after, 2),
            "after_over_before": {
                "min": round(min(after) / min(before), 3),
                "median": round(statistics.median(after) / statistics.median(before), 3)},
        }
    return report


def _throughput(path: Path) -> dict[str, Any]:
    """The per-backend throughput and time breakdown of an earlier report."""
    earlier = json.loads(path.read_text())
    return {"when": earlier.get("when"), "settings": earlier.get("settings"),
            "results": [{**{key: row.get(key) for key in (
                "backend", "messages", "heartbeats_per_second",
                "all_runs_heartbeats_per_second")},
                # reports before step_timers: the breakdown came from the rated runs
                "time_breakdown_us_per_heartbeat": row.get(
                    "time_breakdown_us_per_heartbeat",
                    (row.get("timed_run") or {}).get("time_breakdown_us_per_heartbeat"))}
                for row in earlier.get("results", [])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--prefetch", type=int, default=2000)
    parser.add_argument("--short-argsrepr", action="store_true",
                        help="publish with argsrepr='(snapshot,)' instead of Celery's repr of "
                             "the snapshot (a smaller header table to decode)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per backend (best kept in 'results'; every one in 'peers')")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip the kombu floor and Celery event state peers")
    parser.add_argument("--orchestrators", type=parse_counts, default=[1, 2],
                        metavar="N,N", help="orchestrator process counts draining one queue "
                        "into one PostgreSQL registry, per repeat of the postgresql backend "
                        "('' to skip; default: 1,2)")
    parser.add_argument("--output", type=Path, default=RESULTS / "ingest.json",
                        help="where to write the report (default: %(default)s)")
    parser.add_argument("--validation-runs", type=int, default=3,
                        help="before/after runs of the per-heartbeat measure (0: skip it)")
    parser.add_argument("--baseline-rev", default=BASELINE_REV,
                        help="git revision measured as 'before' (default: %(default)s)")
    parser.add_argument("--compare-with", type=Path, metavar="REPORT",
                        help="an earlier ingest.json whose throughput to embed as 'before'")
    parser.add_argument("--measure-steps", metavar="TREE", help=argparse.SUPPRESS)
    parser.add_argument("--step-agents", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--publish", metavar="QUEUE", help=argparse.SUPPRESS)
    parser.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--parts", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_steps:
        sys.path.insert(0, args.measure_steps)
        json.dump(measure_steps(Path(args.step_agents)), sys.stdout)
        return
    if args.publish:
        publish(args.publish, args.messages, args.agents, args.part, args.parts, seed=5,
                short_argsrepr=args.short_argsrepr)
        return
    if args.messages % args.agents:
        raise SystemExit("--messages must be a multiple of --agents")
    if args.compare_with and not args.compare_with.is_file():
        raise SystemExit(f"--compare-with {args.compare_with}: no such report")
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    backends = list(filter(None, args.backends.split(",")))
    results = []
    peers: dict[str, Any] = {}
    shared_rows: list[dict[str, Any]] = []
    with event_vhost(bool(backends) and not args.no_peers) as event_broker:
        for backend in backends:
            runs, rows = [], []
            for index in range(args.repeat):
                ours, row = one_repeat(backend, args, event_broker, index)
                runs.append(ours)
                if row is not None:
                    rows.append(row)
                if backend == "postgresql" and args.orchestrators:
                    shared_rows.append(orchestrators_repeat(args, index))
            best = max(runs, key=lambda r: r["heartbeats_per_second"])
            best["all_runs_heartbeats_per_second"] = [r["heartbeats_per_second"] for r in runs]
            # where the time goes: one more run with the step timers (not in the rates above)
            timed = run_backend(backend, args, timed=True)
            best["timed_run"] = {key: timed[key] for key in (
                "heartbeats_per_second", "untimed_steps", "time_breakdown_seconds",
                "time_breakdown_us_per_heartbeat")}
            results.append(best)
            print(f"{backend}: {best['heartbeats_per_second']:.0f} heartbeats/s "
                  f"({args.messages} in {best['seconds']:.2f} s; runs "
                  f"{best['all_runs_heartbeats_per_second']})", file=sys.stderr)
            if rows:
                peers[backend] = {"repeats": rows, "summary": peers_summary(rows)}
    import celery
    import kombu
    import psycopg
    import sqlalchemy

    report: dict[str, Any] = {
        "benchmark": "heartbeat ingest: RabbitMQ queue -> HeartbeatConsumer -> registry",
        "target_heartbeats_per_second": TARGET_PER_SECOND,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(),
                    "python": platform.python_version(),
                    "platform": platform.platform(), "celery": celery.__version__,
                    "kombu": kombu.__version__, "sqlalchemy": sqlalchemy.__version__,
                    "psycopg": psycopg.__version__},
        "settings": {"batch_size": args.batch_size, "prefetch_count": args.prefetch,
                     "short_argsrepr": args.short_argsrepr,
                     "publishers": args.publishers, "repeat": args.repeat,
                     "orchestrators": args.orchestrators},
        "results": results,
    }
    if peers:
        report["peers"] = {"what": PEERS_WHAT, "target_ours_over_kombu_floor": KOMBU_FLOOR_RATIO,
                           "backends": peers}
    if shared_rows:
        from bench.ingest_shared import summary, what

        report["orchestrators"] = {**what(os.cpu_count()), "counts": args.orchestrators,
                                   "summary": summary(shared_rows), "repeats": shared_rows}
        print(f"orchestrators: {report['orchestrators']['summary']['ratios']}", file=sys.stderr)
    if args.compare_with:
        report["throughput_before"] = _throughput(args.compare_with)
    if args.validation_runs > 0:
        steps = step_costs(args.baseline_rev, args.validation_runs)
        report["per_heartbeat"] = steps
        for key in ("validate_snapshot_us", "judge_step_us"):
            print(f"{key}: before median {steps[key]['before']['median']}, after median "
                  f"{steps[key]['after']['median']} (x{steps[key]['after_over_before']['median']})",
                  file=sys.stderr)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
