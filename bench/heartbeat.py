"""Heartbeat benchmark: start-up, latency and idle footprint of the agent on a real broker.

Runs what users run, ``celery -A chiffon_worker worker -B`` (unique agent id and pool,
working directory in a temp dir), and measures:

- start -> first heartbeat on the broker (target <= 2 s), over several starts;
- heartbeat latency, ``collected_at`` (the agent's clock when it builds the snapshot) to
  receipt by a plain kombu consumer on the same machine (target p50 <= 10 ms);
- the idle footprint of the agent's process tree at the default 30 s interval: RSS, PSS
  and USS (shared pages of forked children count once in PSS) and CPU (target RSS
  <= 100 MiB in all, CPU <= 0.2 % of one core), per pool type and concurrency;
  ``--compare`` adds solo, prefork and a forked beat process (Celery's stock ``-B``).

Writes ``bench/results/heartbeat.json``.

    python bench/heartbeat.py              # ~3 minutes (~6 with --compare)
    python bench/heartbeat.py --quick      # ~40 s: fewer starts and samples, 20 s idle
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import psutil
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.message import Message
from kombu.messaging import Consumer

log = logging.getLogger("bench.heartbeat")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "heartbeat.json"
CELERY = Path(sys.executable).parent / "celery"
HEARTBEAT_QUEUE = "chiffon.heartbeats"
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
MIB = 1 << 20
FORKED_BEAT = "forked-beat"  # hidden sub-command: the agent with Celery's stock -B


@dataclass(frozen=True)
class Variant:
    """One way to run the agent: pool, concurrency, beat as a thread or a process."""

    pool: str
    concurrency: int
    beat: str  # "thread" (chiffon default) or "process" (Celery's stock -B)

    @property
    def name(self) -> str:
        return f"{self.pool}x{self.concurrency}, beat {self.beat}"


DEFAULT_VARIANT = Variant("threads", 1, "thread")
COMPARED = (Variant("solo", 1, "thread"), Variant("prefork", 1, "thread"),
            Variant("threads", 1, "process"))


class Tap:
    """A private queue bound to the heartbeat exchange: copies of one agent's heartbeats."""

    def __init__(self, broker: str, agent_id: str) -> None:
        self.agent_id = agent_id
        self.received: list[tuple[dict[str, Any], float]] = []
        self.connection = Connection(broker)
        exchange = Exchange(HEARTBEAT_QUEUE, type="direct", durable=True)
        queue = Queue(f"bench.heartbeats.{uuid.uuid4().hex[:10]}", exchange,
                      routing_key=HEARTBEAT_QUEUE, exclusive=True, auto_delete=True)
        Consumer(self.connection.channel(), [queue], callbacks=[self._on_message],
                 accept=["json"]).consume()

    def _on_message(self, body: Any, message: Message) -> None:
        received = time.time()
        message.ack()
        snapshot = body[0][0]
        if snapshot.get("agent_id") == self.agent_id:
            self.received.append((snapshot, received))

    def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and (left := deadline - time.monotonic()) > 0:
            with suppress(TimeoutError):
                self.connection.drain_events(timeout=min(left, 0.2))
        return len(self.received) >= count

    def close(self) -> None:
        self.connection.release()


@contextmanager
def agent(broker: str, variant: Variant, interval: float) -> Iterator[tuple[Any, Tap]]:
    """A running agent (its Popen) and a tap bound before it started."""
    agent_id = f"bench-{uuid.uuid4().hex[:10]}"
    pool = f"bench-pool-{uuid.uuid4().hex[:10]}"
    tmp = Path(tempfile.mkdtemp(prefix="chiffon-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHIFFON_")}
    env.update(HOME=str(tmp), XDG_STATE_HOME=str(tmp / "state"), CHIFFON_BROKER_URL=broker,
               CHIFFON_AGENT_ID=agent_id, CHIFFON_AGENT_POOL_NAME=pool,
               CHIFFON_HEARTBEAT_INTERVAL=f"{interval:g}",
               CHIFFON_HEARTBEAT_TIMEOUT_SECONDS=f"{max(90.0, 3 * interval):g}",
               CHIFFON_WORKER_POOL=variant.pool,
               CHIFFON_WORKER_CONCURRENCY=str(variant.concurrency),
               CHIFFON_LOG_LEVEL="WARNING")
    if variant.beat == "thread":
        command = [str(CELERY), "-A", "chiffon_worker", "worker", "-B"]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), FORKED_BEAT]
    tap = Tap(broker, agent_id)
    with (tmp / "agent.log").open("wb") as out:
        popen = subprocess.Popen(command, env=env, cwd=tmp, stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        yield popen, tap
    finally:
        popen.terminate()
        try:
            popen.wait(20)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(10)
        tap.close()
        with Connection(broker) as conn:
            channel = conn.default_channel
            for name in (pool, f"chiffon.agent.{agent_id}"):
                channel.queue_delete(name)
                channel.exchange_delete(name)
        leftovers = [p.name for p in tmp.iterdir() if p.name.startswith("celerybeat")]
        if leftovers:
            log.warning("beat left %s in the working directory", leftovers)
        shutil.rmtree(tmp, ignore_errors=True)


def measure_start(broker: str, starts: int) -> dict[str, Any]:
    """Seconds from spawning the agent to its first heartbeat arriving."""
    times: list[float] = []
    for _ in range(starts):
        began = time.time()
        with agent(broker, DEFAULT_VARIANT, 30.0) as (_, tap):
            if not tap.wait_for(1, 30):
                raise RuntimeError("no heartbeat within 30 s of start")
            snapshot, received = tap.received[0]
            if snapshot["seq"] != 1:
                raise RuntimeError(f"first heartbeat has seq {snapshot['seq']}")
            times.append(received - began)
    return {"starts": starts, "seconds_min": round(min(times), 3),
            "seconds_median": round(statistics.median(times), 3),
            "seconds_max": round(max(times), 3), "target_seconds": 2.0,
            "meets_target": max(times) <= 2.0}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_latency(broker: str, samples: int, interval: float) -> dict[str, Any]:
    """collected_at -> receipt, in ms, over ``samples`` heartbeats."""
    with agent(broker, DEFAULT_VARIANT, interval) as (_, tap):
        if not tap.wait_for(samples + 2, samples * interval * 3 + 30):
            raise RuntimeError(f"only {len(tap.received)} heartbeats arrived")
        beats = tap.received[2:samples + 2]  # skip start-up
    latencies = [(received - snap["collected_at"]) * 1000 for snap, received in beats]
    seqs = [snap["seq"] for snap, _ in beats]
    return {"samples": len(latencies), "heartbeat_interval_seconds": interval,
            "p50_ms": round(_percentile(latencies, 0.50), 2),
            "p99_ms": round(_percentile(latencies, 0.99), 2),
            "max_ms": round(max(latencies), 2),
            "seq_gaps": sum(b - a - 1 for a, b in pairwise(seqs)),
            "target_p50_ms": 10.0,
            "meets_target": _percentile(latencies, 0.50) <= 10.0,
            "note": "collected_at is rounded to 1 ms and taken before the metrics are "
                    "sampled, so this includes building the snapshot"}


def _tree(pid: int) -> list[psutil.Process]:
    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


def _memory(pid: int) -> dict[str, float]:
    totals = {"rss": 0, "pss": 0, "uss": 0}
    for proc in _tree(pid):
        info = proc.memory_full_info()
        for key in totals:
            totals[key] += getattr(info, key)
    return {f"{key}_mib": round(value / MIB, 1) for key, value in totals.items()}


def _cpu_seconds(pid: int) -> float:
    total = 0.0
    for proc in _tree(pid):
        times = proc.cpu_times()
        total += times.user + times.system
    return total


def measure_idle(broker: str, variant: Variant, seconds: float) -> dict[str, Any]:
    """The process tree at the default 30 s interval, idle for ``seconds``."""
    with agent(broker, variant, 30.0) as (popen, tap):
        if not tap.wait_for(1, 30):
            raise RuntimeError(f"{variant.name}: no heartbeat within 30 s")
        time.sleep(3)  # let start-up settle
        processes = len(_tree(popen.pid))
        cpu_before, wall_before = _cpu_seconds(popen.pid), time.monotonic()
        peak: dict[str, float] = {}
        deadline = wall_before + seconds
        while (left := deadline - time.monotonic()) > 0:
            sample = _memory(popen.pid)
            peak = {key: max(peak.get(key, 0.0), value) for key, value in sample.items()}
            tap.wait_for(len(tap.received) + 1, min(left, 10))
        cpu_percent = (_cpu_seconds(popen.pid) - cpu_before) / (
            time.monotonic() - wall_before) * 100
        peak = {key: max(peak[key], value) for key, value in _memory(popen.pid).items()}
        heartbeats = len(tap.received)
    return {"variant": variant.name, "pool": variant.pool,
            "concurrency": variant.concurrency, "beat": variant.beat,
            "processes": processes, "idle_seconds": seconds,
            "heartbeat_interval_seconds": 30.0, "heartbeats_seen": heartbeats, **peak,
            "cpu_percent_of_one_core": round(cpu_percent, 3),
            "meets_rss_target": peak["rss_mib"] <= 100.0,
            "meets_cpu_target": cpu_percent <= 0.2}


def forked_beat_worker() -> None:
    """The agent with Celery's stock ``-B`` (beat forked as its own process)."""
    from celery.bin.celery import main as celery_main

    from chiffon_worker.worker.beat import ThreadedBeat
    from chiffon_worker.worker.factory import Worker

    steps = set(Worker.Blueprint.default_steps)
    Worker.Blueprint.default_steps = (steps - {ThreadedBeat}) | {
        "celery.worker.components:Beat"}
    sys.argv = ["celery", "-A", "chiffon_worker", "worker", "-B"]
    celery_main()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default=os.environ.get("CHIFFON_BENCH_BROKER",
                                                          DEFAULT_BROKER))
    parser.add_argument("--quick", action="store_true", help="a shorter run (~40 s)")
    parser.add_argument("--compare", action="store_true",
                        help="also measure solo, prefork and a forked beat process")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    starts, samples, idle = (2, 50, 20.0) if args.quick else (5, 150, 60.0)
    masked = Connection(args.broker).as_uri()
    log.info("broker %s; %s run", masked, "quick" if args.quick else "full")

    log.info("start -> first heartbeat, %d starts", starts)
    start = measure_start(args.broker, starts)
    log.info("  %s", start)
    log.info("latency, %d heartbeats at 0.2 s", samples)
    latency = measure_latency(args.broker, samples, 0.2)
    log.info("  %s", latency)
    variants = [DEFAULT_VARIANT, *(COMPARED if args.compare else ())]
    footprint = []
    for variant in variants:
        log.info("idle footprint, %s, %g s", variant.name, idle)
        footprint.append(measure_idle(args.broker, variant, idle))
        log.info("  %s", footprint[-1])

    result = {
        "benchmark": "heartbeat",
        "quick": args.quick,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "broker": masked,
        "default": {"pool": DEFAULT_VARIANT.pool, "concurrency": DEFAULT_VARIANT.concurrency,
                    "beat": DEFAULT_VARIANT.beat},
        "start_to_first_heartbeat": start,
        "latency": latency,
        "idle_footprint": footprint,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == [FORKED_BEAT]:
        forked_beat_worker()
    else:
        sys.exit(main())
