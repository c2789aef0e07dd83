"""Heartbeat ingest: heartbeats/s the consumer + registry sustain in one process.

For each registry backend (SQLite in a temporary directory; PostgreSQL in a throwaway
schema), separate publisher processes first fill a private queue on the real RabbitMQ
with ``--messages`` heartbeats from ``--agents`` distinct agent ids, sent exactly as
agents send them (Celery ``send_task("chiffon.heartbeat", args=[snapshot])``, JSON,
``expires`` set). Then one :class:`HeartbeatConsumer` drains the queue; the clock runs
from the consumer's start to the moment every message is judged, committed and acked.

The run also times where the consumer's time goes (JSON decode, validation, sequencing,
batch preparation, registry SQL, acks; the rest is the broker client: socket reads, AMQP
frame and header parsing, kombu messages). Target: >= 5,000 heartbeats/s.

Then, without broker or database, the per-heartbeat cost of the two CPU-bound steps, in
microseconds, for this tree ("after") and for ``--baseline-rev`` ("before", the last
commit with the hand-written validator, extracted with ``git archive``), each measured
``--validation-runs`` times in alternating fresh processes (the machine is shared):
``validate_snapshot`` on realistic decoded snapshots, and the judge step (one raw Celery
heartbeat message -> decode, validate, sequence, rows queued for the writer).

Writes ``bench/results/ingest.json``; ``--compare-with`` embeds the throughput of an
earlier report (e.g. one taken before a change) for a side-by-side view.

    python bench/ingest.py [--messages 50000] [--agents 10000] [--backends sqlite,postgresql]
    python bench/ingest.py --backends "" --validation-runs 5   # only the per-heartbeat costs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kombu import Connection
from sqlalchemy import create_engine, text

# chiffon_worker is imported inside the functions that use it: a --measure-steps child
# must first put the tree it measures (the baseline's or this one) on sys.path.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
    from chiffon_worker.orchestrator import decoding, judge
    from chiffon_worker.orchestrator.batch_writer import BatchWriter
    from chiffon_worker.orchestrator.heartbeat_consumer import HeartbeatConsumer
    from chiffon_worker.orchestrator.ingest_counters import IngestStats
    from chiffon_worker.orchestrator.judge import HeartbeatJudge

    timers = Timers()
    patched = [(decoding, "decode_heartbeat", "json_decode"),
               (judge, "validate_snapshot", "validation"),
               (HeartbeatJudge, "_sequence", "sequencing_and_rows"),
               (HeartbeatJudge, "judge_message", "judging_total"),
               (BatchWriter, "take_batch", "batch_preparation"),
               (registry, "write_batch", "sql"),
               (HeartbeatConsumer, "_flush", "flush_total")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    for owner, name, label in patched:
        setattr(owner, name, timers.wrap(label, getattr(owner, name)))
    try:
        stats = IngestStats()
        writer = BatchWriter(registry, stats=stats)
        consumer = HeartbeatConsumer(
            BROKER, HeartbeatJudge(registry.agents(), history_points=registry.history_points,
                                   stats=stats),
            writer, queue=queue, batch_size=batch_size, prefetch_count=prefetch)
        finished: dict[str, float] = {}

        def watch() -> None:
            while not consumer.stopping:
                judged = stats.accepted + stats.rejected_total + stats.ignored_total
                if judged >= messages and writer.pending == 0:
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
    from chiffon_worker.orchestrator.registry import Registry
    from chiffon_worker.wire import heartbeat_queue

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


# -- the per-heartbeat cost of validation and judging (no broker, no database) ---------------

def step_inputs(seed: int) -> tuple[list[dict[str, Any]], list[bytes], dict[str, Any]]:
    """Realistic decoded snapshots, the same as Celery heartbeat bodies, and their headers:
    ``STEP_AGENTS`` agents x ``STEP_SEQS`` heartbeats, in seq order, interleaved."""
    from tests.orchestrator.snapshots import random_snapshot

    rng = random.Random(seed)
    base = [random_snapshot(rng, f"bench-agent-{i:05d}", 1) for i in range(STEP_AGENTS)]
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
        from chiffon_worker.orchestrator.ingest import Ingestor

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


def measure_steps() -> dict[str, Any]:
    """One run in this process: microseconds per ``validate_snapshot`` call and per judged
    message, for the ``chiffon_worker`` first on sys.path (after a warm-up pass each)."""
    import chiffon_worker
    from chiffon_worker.protocol import validate_snapshot

    snapshots, bodies, headers = step_inputs(seed=7)
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


def baseline_tree(rev: str, into: Path) -> Path:
    """``chiffon_worker`` as of ``rev`` (``git archive``), extracted under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev,
                              "chiffon_worker"], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"cannot extract the baseline {rev}: "
                         f"{archive.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def _spread(values: list[float]) -> dict[str, Any]:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2),
            "max": round(max(values), 2), "runs": [round(v, 2) for v in values]}


def step_costs(baseline_rev: str, runs: int) -> dict[str, Any]:
    """``runs`` alternating before/after runs, each in a fresh process; min/median/max."""
    samples: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="chiffon-baseline-") as workdir:
        trees = {"before": baseline_tree(baseline_rev, Path(workdir)), "after": ROOT}
        for _ in range(runs):
            for label, tree in trees.items():
                done = subprocess.run([sys.executable, __file__, "--measure-steps", str(tree)],
                                      capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"measuring {label}: {done.stderr.strip()[-2000:]}")
                sample = json.loads(done.stdout)
                if Path(sample["tree"]).resolve() != tree.resolve():
                    raise SystemExit(f"{label} measured {sample['tree']}, not {tree}")
                samples[label].append(sample)
    report: dict[str, Any] = {
        "what": "microseconds per heartbeat, no broker or database: validate_snapshot on a "
                "decoded realistic snapshot; judge_step = one raw Celery heartbeat message "
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
            "before": _spread(before), "after": _spread(after),
            "after_over_before": {
                "min": round(min(after) / min(before), 3),
                "median": round(statistics.median(after) / statistics.median(before), 3)},
        }
    return report


def _throughput(path: Path) -> dict[str, Any]:
    """The per-backend throughput and time breakdown of an earlier report."""
    earlier = json.loads(path.read_text())
    return {"when": earlier.get("when"), "settings": earlier.get("settings"),
            "results": [{key: row.get(key) for key in (
                "backend", "messages", "heartbeats_per_second",
                "all_runs_heartbeats_per_second", "time_breakdown_us_per_heartbeat")}
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
    parser.add_argument("--repeat", type=int, default=1, help="runs per backend (best kept)")
    parser.add_argument("--output", type=Path, default=RESULTS / "ingest.json")
    parser.add_argument("--validation-runs", type=int, default=3,
                        help="before/after runs of the per-heartbeat measure (0: skip it)")
    parser.add_argument("--baseline-rev", default=BASELINE_REV,
                        help="git revision measured as 'before' (default: %(default)s)")
    parser.add_argument("--compare-with", type=Path, metavar="REPORT",
                        help="an earlier ingest.json whose throughput to embed as 'before'")
    parser.add_argument("--measure-steps", metavar="TREE", help=argparse.SUPPRESS)
    parser.add_argument("--publish", metavar="QUEUE", help=argparse.SUPPRESS)
    parser.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--parts", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_steps:
        sys.path.insert(0, args.measure_steps)
        json.dump(measure_steps(), sys.stdout)
        return
    if args.publish:
        publish(args.publish, args.messages, args.agents, args.part, args.parts, seed=5,
                short_argsrepr=args.short_argsrepr)
        return
    if args.messages % args.agents:
        raise SystemExit("--messages must be a multiple of --agents")
    if args.compare_with and not args.compare_with.is_file():
        raise SystemExit(f"--compare-with {args.compare_with}: no such report")
    results = []
    for backend in filter(None, args.backends.split(",")):
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
