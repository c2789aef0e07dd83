"""Heartbeat ingest: heartbeats/s the consumer + registry sustain in one process.

For each registry backend (SQLite in a temporary directory; PostgreSQL in a throwaway
schema), separate publisher processes first fill a private queue on the real RabbitMQ
with ``--messages`` heartbeats from ``--agents`` distinct agent ids, sent exactly as
agents send them (Celery ``send_task("chiffon.heartbeat", args=[snapshot])``, JSON,
``expires`` set). Then one :class:`HeartbeatConsumer` drains the queue; the clock runs
from the consumer's start to the moment every message is judged, committed and acked.

The run also times where the consumer's time goes (JSON decode, validation, sequencing,
batch preparation, registry SQL, acks; the rest is the broker client: socket reads, AMQP
frame and header parsing, kombu messages). Target: >= 5,000 heartbeats/s. Writes
``bench/results/ingest.json``.

    python bench/ingest.py [--messages 50000] [--agents 10000] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kombu import Connection  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from chiffon_worker.orchestrator import decoding, ingest  # noqa: E402
from chiffon_worker.orchestrator.consumer import HeartbeatConsumer, heartbeat_queue  # noqa: E402
from chiffon_worker.orchestrator.ingest import Ingestor  # noqa: E402
from chiffon_worker.orchestrator.registry import Registry  # noqa: E402
from tests.orchestrator.snapshots import random_snapshot  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TARGET_PER_SECOND = 5000.0
BROKER = "amqp://guest:guest@127.0.0.1:5672//"
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TIMEOUT_SECONDS = 900.0  # the heartbeats' own timeout and message expiry: outlives the run


# -- the publisher process -------------------------------------------------------------------

def publish(queue: str, messages: int, agents: int, part: int, parts: int, *,
            seed: int, short_argsrepr: bool) -> None:
    """Send this part's share of the heartbeats (agents ``i % parts == part``), in seq order
    per agent, interleaved across agents as a lab's beats would be."""
    from celery import Celery

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
        clock = time.perf_counter
        self.seconds[name] = 0.0

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += clock() - started

        return timed


def drain(registry: Registry, queue: str, messages: int, *, batch_size: int, prefetch: int
          ) -> dict[str, Any]:
    """Consume ``messages`` from ``queue`` into ``registry``; returns the measurements."""
    timers = Timers()
    patched = [(decoding, "decode_heartbeat", "json_decode"),
               (ingest, "validate_snapshot", "validation"),
               (Ingestor, "_sequence", "sequencing_and_rows"),
               (Ingestor, "handle_message", "judging_total"),
               (Ingestor, "take_batch", "batch_preparation"),
               (registry, "write_batch", "sql"),
               (HeartbeatConsumer, "_flush", "flush_total")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    for owner, name, label in patched:
        setattr(owner, name, timers.wrap(label, getattr(owner, name)))
    try:
        ingestor = Ingestor(registry)
        consumer = HeartbeatConsumer(BROKER, ingestor, queue=queue, batch_size=batch_size,
                                     prefetch_count=prefetch)
        stats = ingestor.stats
        finished: dict[str, float] = {}

        def watch() -> None:
            while not consumer.stopping:
                judged = stats.accepted + stats.rejected_total + stats.ignored_total
                if judged >= messages and ingestor.pending == 0:
                    finished["at"] = time.perf_counter()
                    consumer.stop()
                    return
                time.sleep(0.002)

        watcher = threading.Thread(target=watch, daemon=True)
        started = time.perf_counter()
        watcher.start()
        consumer.run()
        watcher.join()
        elapsed = finished["at"] - started
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    seconds = timers.seconds
    judging_other = (seconds["judging_total"] - seconds["json_decode"] - seconds["validation"]
                     - seconds["sequencing_and_rows"])
    breakdown = {
        "json_decode": seconds["json_decode"],
        "validation": seconds["validation"],
        "sequencing_and_rows": seconds["sequencing_and_rows"],
        "judging_other": judging_other,
        "batch_preparation": seconds["batch_preparation"],
        "sql": seconds["sql"],
        "acks": seconds["flush_total"] - seconds["sql"] - seconds["batch_preparation"],
    }
    breakdown["broker_client"] = elapsed - sum(breakdown.values())
    return {
        "seconds": round(elapsed, 3),
        "heartbeats_per_second": round(messages / elapsed, 1),
        "accepted": stats.accepted,
        "rejected": stats.rejected_total,
        "ignored": stats.ignored_total,
        "batches": stats.batches,
        "time_breakdown_seconds": {k: round(v, 3) for k, v in breakdown.items()},
        "time_breakdown_us_per_heartbeat": {k: round(v / messages * 1e6, 1)
                                            for k, v in breakdown.items()},
    }


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    queue = f"chiffon.bench.{uuid.uuid4().hex}"
    schema = f"chiffon_bench_{uuid.uuid4().hex[:8]}"
    workdir = tempfile.mkdtemp(prefix="chiffon-bench-")
    try:
        heartbeat_queue(queue)(Connection(BROKER).default_channel).declare()
        publish_seconds = fill_queue(queue, args.messages, args.agents, args.publishers,
                                     args.short_argsrepr)
        depth = queue_depth(queue)
        if depth != args.messages:
            raise SystemExit(f"queue holds {depth} messages, expected {args.messages}")
        if backend == "sqlite":
            registry = Registry(f"sqlite:///{Path(workdir) / 'registry.sqlite3'}")
        else:
            registry = Registry(POSTGRES, schema=schema)
        try:
            load_before = os.getloadavg()[0]
            result = drain(registry, queue, args.messages, batch_size=args.batch_size,
                           prefetch=args.prefetch)
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
            engine = create_engine(POSTGRES)
            with engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            engine.dispose()
        for path in Path(workdir).glob("*"):
            path.unlink()
        os.rmdir(workdir)


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
    parser.add_argument("--repeat", type=int, default=1, help="runs per backend (best kept)")
    parser.add_argument("--output", type=Path, default=RESULTS / "ingest.json")
    parser.add_argument("--publish", metavar="QUEUE", help=argparse.SUPPRESS)
    parser.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--parts", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish:
        publish(args.publish, args.messages, args.agents, args.part, args.parts, seed=5,
                short_argsrepr=args.short_argsrepr)
        return
    if args.messages % args.agents:
        raise SystemExit("--messages must be a multiple of --agents")
    results = []
    for backend in args.backends.split(","):
        runs = [run_backend(backend, args) for _ in range(args.repeat)]
        best = max(runs, key=lambda r: r["heartbeats_per_second"])
        best["all_runs_heartbeats_per_second"] = [r["heartbeats_per_second"] for r in runs]
        results.append(best)
        print(f"{backend}: {best['heartbeats_per_second']:.0f} heartbeats/s "
              f"({args.messages} in {best['seconds']:.2f} s; runs "
              f"{best['all_runs_heartbeats_per_second']})", file=sys.stderr)
    import celery
    import kombu
    import psycopg
    import sqlalchemy

    report = {
        "benchmark": "heartbeat ingest: RabbitMQ queue -> HeartbeatConsumer -> registry",
        "target_heartbeats_per_second": TARGET_PER_SECOND,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "celery": celery.__version__,
                    "kombu": kombu.__version__, "sqlalchemy": sqlalchemy.__version__,
                    "psycopg": psycopg.__version__},
        "settings": {"batch_size": args.batch_size, "prefetch_count": args.prefetch,
                     "short_argsrepr": args.short_argsrepr,
                     "publishers": args.publishers, "repeat": args.repeat},
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
