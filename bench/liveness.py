"""Liveness benchmark: seconds from an agent going away to chiffon, and to Flower, saying so.

On a private virtual host of the machine's RabbitMQ, with one real ``chiffon orchestrator``
(SQLite registry) and one real Flower (started first, so it sees every agent come online),
each run starts one fresh agent at DEFAULT settings (capacity heartbeat every 30 s, timeout
90 s: neither variable is set), waits until chiffon (``online``, with signs of life) and
Flower (worker online) both see it, then sends SIGTERM, SIGKILL or SIGSTOP and polls both,
side by side, until each says the agent is gone:

- chiffon: ``Registry(url).agent(agent_id, with_snapshot=False).liveness(time.time())``
  every 0.05 s, until ``stopped`` or ``lost`` (``chiffon status --json`` computes the same;
  each run checks it once the agent is gone);
- Flower: ``/api/workers?status=1`` every 0.1 s, until the worker is not alive.

The clock starts when the process has exited (SIGTERM: ``popen.wait()`` returned) or when
the signal was sent (SIGKILL, SIGSTOP). Also measured: the Celery worker events per agent
per minute (and their size) that this fast liveness relies on, over a 20 s idle window.

Targets: ``stopped`` <= 1 s after a clean stop; ``lost`` <= 10 s after a kill or a freeze
(median); chiffon/Flower <= 1.05 for SIGKILL and SIGSTOP (median).

Writes ``bench/results/liveness.json``.

    python bench/liveness.py               # 3 runs per signal, ~3 minutes
    python bench/liveness.py --quick       # 1 run per signal, ~1.5 minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celery
import flower
from kombu import Exchange
from kombu.connection import Connection
from kombu.entity import Queue
from kombu.message import Message
from kombu.messaging import Consumer

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``tests`` and ``chiffon_worker`` importable
    sys.path.insert(0, str(ROOT))

from chiffon_worker.orchestrator.liveness import (  # noqa: E402
    EVENT_EXPIRY_INTERVALS,
)
from chiffon_worker.orchestrator.registry import AgentRecord, Registry  # noqa: E402
from tests.integration.helpers import (  # noqa: E402
    CELERY,
    READY_TIMEOUT_S,
    Agent,
    agent_environment,
    delete_agent_queues,
    unique,
)
from tests.integration.private_rabbit import free_port, port_open  # noqa: E402
from tests.orchestrator_process import (  # noqa: E402
    CHIFFON,
    orchestrator_on,
    private_vhost,
)

log = logging.getLogger("bench.liveness")

RESULTS = ROOT / "bench" / "results" / "liveness.json"
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
SIGNALS = (signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP)
CHIFFON_POLL_S = 0.05
FLOWER_POLL_S = 0.1
GONE_TIMEOUT_S = 60.0
TRAFFIC_WINDOW_S = 20.0
#: Celery's worker event heartbeat (``worker-heartbeat`` every 2 s, the default ``freq``).
EVENT_INTERVAL_S = 2.0
#: How long after the last event each tool still calls the worker alive.
CHIFFON_WINDOW_S = EVENT_INTERVAL_S * EVENT_EXPIRY_INTERVALS
FLOWER_WINDOW_S = EVENT_INTERVAL_S * 2.0  # celery.events.state HEARTBEAT_EXPIRE_WINDOW 200 %
STOPPED_TARGET_S = 1.0
LOST_TARGET_S = 10.0
RATIO_TARGET = 1.05  # the same rule as Flower: equal but for polling


@dataclass
class Bench:
    """One vhost, one orchestrator, one Flower, for the whole benchmark."""

    url: str
    env: dict[str, str]  # the orchestrator's (and ``chiffon status``'s) environment
    registry: Registry
    flower: str  # Flower's base URL
    tmp: Path

    def spawn(self) -> Agent:
        """``celery -A chiffon_worker worker -B`` at default heartbeat settings."""
        agent_id, pool = unique("bench-live"), unique("bench-live-pool")
        home, cwd = self.tmp / f"home-{agent_id}", self.tmp / f"cwd-{agent_id}"
        home.mkdir(parents=True)
        cwd.mkdir(parents=True)
        env = agent_environment(home, {"CHIFFON_BROKER_URL": self.url,
                                       "CHIFFON_AGENT_ID": agent_id,
                                       "CHIFFON_AGENT_POOL_NAME": pool})
        log_path = self.tmp / f"{agent_id}.log"
        spawned_at = time.time()
        with log_path.open("wb") as out:
            popen = subprocess.Popen([str(CELERY), "-A", "chiffon_worker", "worker", "-B"],
                                     env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        return Agent(popen, agent_id, pool, self.url, cwd, log_path, spawned_at)

    def chiffon(self, agent: Agent) -> tuple[str | None, AgentRecord | None]:
        record = self.registry.agent(agent.agent_id, with_snapshot=False)
        return (None if record is None else record.liveness(time.time())), record

    def flower_alive(self, nodename: str) -> bool | None:
        """Flower's ``alive`` for the worker (None: not known to Flower, or no answer)."""
        try:
            answer = _get_json(f"{self.flower}/api/workers?status=1")
        except (OSError, ValueError):
            return None
        return answer.get(nodename) if isinstance(answer, dict) else None

    def status_json(self, agent: Agent) -> str | None:
        """The agent's ``liveness`` in ``chiffon status --json``."""
        shown = subprocess.run([str(CHIFFON), "status", "--json"], env=self.env,
                               capture_output=True, text=True, timeout=60, check=False)
        if shown.returncode != 0:
            log.warning("chiffon status --json failed: %s", shown.stderr.strip())
            return None
        entries = {entry["agent_id"]: entry for entry in json.loads(shown.stdout)}
        return entries.get(agent.agent_id, {}).get("liveness")

    def start_online(self) -> Agent:
        """A fresh agent, once chiffon and Flower both show it online."""
        agent = self.spawn()
        try:
            agent.wait_ready()
            nodename = agent.nodename
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                liveness, record = self.chiffon(agent)
                if (liveness == "online" and record is not None and record.signs is not None
                        and self.flower_alive(nodename) is True):
                    return agent
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{agent.agent_id} not online in chiffon ({liveness}) "
                                       f"and Flower after {READY_TIMEOUT_S:g} s")
                time.sleep(CHIFFON_POLL_S)
        except BaseException:
            self.dispose(agent)
            raise

    def dispose(self, agent: Agent) -> None:
        """Kill the agent if still there (thawing it first) and delete its queues."""
        if agent.alive:
            with suppress(ProcessLookupError):
                agent.popen.send_signal(signal.SIGCONT)
            agent.kill()
        delete_agent_queues(self.url, agent.pool, agent.agent_queue)
        shutil.rmtree(self.tmp / f"home-{agent.agent_id}", ignore_errors=True)
        shutil.rmtree(self.tmp / f"cwd-{agent.agent_id}", ignore_errors=True)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


class Watch(threading.Thread):
    """Calls ``gone()`` every ``period`` s until it returns a value other than None;
    ``at`` is the time.time() when that answer came back, ``said`` the value."""

    def __init__(self, gone: Callable[[], Any], period: float, deadline: float) -> None:
        super().__init__(daemon=True)
        self.gone, self.period, self.deadline = gone, period, deadline
        self.at: float | None = None
        self.said: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        began = time.monotonic()
        ticks = 0
        try:
            while time.time() < self.deadline:
                said = self.gone()
                if said is not None:
                    self.at, self.said = time.time(), said
                    return
                ticks += 1
                time.sleep(max(0.0, began + ticks * self.period - time.monotonic()))
        except BaseException as exc:  # noqa: BLE001  (re-raised by the caller)
            self.error = exc


def _wait_for_phase(bench: Bench, agent: Agent, phase: float) -> None:
    """Sleep until ``phase`` s after one of the agent's worker events (as the orchestrator
    received them: events come every 2 s), at least 1 s from now."""
    _, record = bench.chiffon(agent)
    assert record is not None and record.signs is not None
    last = record.signs.last_event_at
    now = time.time()
    target = last + phase
    while target < now + 1.0:
        target += EVENT_INTERVAL_S
    time.sleep(target - now)


def measure(bench: Bench, sig: signal.Signals, phase: float) -> dict[str, Any]:
    """One run: a fresh agent, the signal, and when each tool said it was gone."""
    agent = bench.start_online()
    try:
        nodename = agent.nodename
        _, record = bench.chiffon(agent)
        assert record is not None
        settings = {"heartbeat_interval_seconds": record.heartbeat_interval_seconds,
                    "heartbeat_timeout_seconds": record.heartbeat_timeout_seconds}
        _wait_for_phase(bench, agent, phase)

        def chiffon_gone() -> str | None:
            liveness, _ = bench.chiffon(agent)
            return liveness if liveness in ("stopped", "lost") else None

        def flower_gone() -> str | None:
            return "offline" if bench.flower_alive(nodename) is False else None

        deadline = time.time() + GONE_TIMEOUT_S + 30
        watches = [Watch(chiffon_gone, CHIFFON_POLL_S, deadline),
                   Watch(flower_gone, FLOWER_POLL_S, deadline)]
        for watch in watches:
            watch.start()
        signalled = time.time()
        agent.popen.send_signal(sig)
        exited = None
        if sig == signal.SIGTERM:
            agent.popen.wait(30)
            exited = time.time()
        started = exited if exited is not None else signalled
        for watch in watches:
            watch.deadline = started + GONE_TIMEOUT_S
            watch.join(GONE_TIMEOUT_S + 30)
            if watch.error is not None:
                raise watch.error
        chiffon, flower_ = watches
        _, record = bench.chiffon(agent)
        last_event = record.signs.last_event_at if record and record.signs else None
        status = bench.status_json(agent)
        registry_now, _ = bench.chiffon(agent)
    finally:
        bench.dispose(agent)

    def since(at: float | None, start: float | None) -> float | None:
        return None if at is None or start is None else round(at - start, 3)

    return {
        "signal": sig.name, "agent_id": agent.agent_id, "worker": nodename,
        "agent_settings": settings,
        "clock_start": "process exited" if exited is not None else "signal sent",
        "exit_seconds_after_signal": since(exited, signalled),
        "signal_seconds_after_last_event": since(signalled, last_event)
        if sig != signal.SIGTERM else None,
        "chiffon_said": chiffon.said, "chiffon_seconds": since(chiffon.at, started),
        "chiffon_seconds_from_signal": since(chiffon.at, signalled),
        "chiffon_seconds_after_last_event": since(chiffon.at, last_event)
        if sig != signal.SIGTERM else None,
        "flower_seconds": since(flower_.at, started),
        "flower_seconds_from_signal": since(flower_.at, signalled),
        "ratio_chiffon_to_flower": _ratio(since(chiffon.at, started),
                                          since(flower_.at, started)),
        "chiffon_status_json_liveness": status,
        "chiffon_status_json_agrees": status == registry_now,
    }


def _ratio(chiffon: float | None, flower_: float | None) -> float | None:
    if chiffon is None or flower_ is None or flower_ <= 0:
        return None
    return round(chiffon / flower_, 3)


def _spread(values: list[float | None]) -> dict[str, Any]:
    seen = [v for v in values if v is not None]
    if not seen:
        return {"runs": len(values), "never": len(values), "min": None, "median": None,
                "max": None}
    return {"runs": len(values), "never": len(values) - len(seen), "min": min(seen),
            "median": round(statistics.median(seen), 3), "max": max(seen)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for sig in SIGNALS:
        rows = [row for row in runs if row["signal"] == sig.name]
        chiffon = _spread([row["chiffon_seconds"] for row in rows])
        flower_ = _spread([row["flower_seconds"] for row in rows])
        results[sig.name] = {
            "clock_start": rows[0]["clock_start"] if rows else None,
            "chiffon_says": sorted({str(row["chiffon_said"]) for row in rows}),
            "chiffon_seconds": chiffon,
            "flower_seconds": flower_,
            "ratio_of_medians": _ratio(chiffon["median"], flower_["median"]),
        }
        if sig != signal.SIGTERM:
            results[sig.name]["paired_ratio"] = _spread(
                [row["ratio_chiffon_to_flower"] for row in rows])
            continue
        chiffon_signal = _spread([row["chiffon_seconds_from_signal"] for row in rows])
        flower_signal = _spread([row["flower_seconds_from_signal"] for row in rows])
        results[sig.name].update({
            "chiffon_seconds_from_signal": chiffon_signal,
            "flower_seconds_from_signal": flower_signal,
            "ratio_of_medians_from_signal": _ratio(chiffon_signal["median"],
                                                   flower_signal["median"]),
            "exit_seconds_after_signal": _spread(
                [row["exit_seconds_after_signal"] for row in rows]),
            "note": "negative seconds: the tool said so before the process had exited (the "
                    "worker sends worker-offline early in its warm shutdown); Flower drops "
                    "the worker on that event at once, chiffon at the listener's next "
                    "registry write (every 0.25 s). No ratio from the exit when Flower's "
                    "seconds are not positive; ratio_of_medians_from_signal compares from "
                    "the signal",
        })
    return results


class EventTap:
    """Celery worker events (``celeryev``, ``worker.#``) by worker: count, bytes, types."""

    def __init__(self, url: str) -> None:
        self.connection = Connection(url)
        queue = Queue(f"bench.celeryev.{uuid.uuid4().hex[:10]}",
                      Exchange("celeryev", type="topic"), routing_key="worker.#",
                      auto_delete=True, exclusive=True)
        self.events: list[tuple[str, str, int]] = []  # (hostname, type, body bytes)
        Consumer(self.connection.channel(), [queue], callbacks=[self._on_message],
                 accept=["json"]).consume()

    def _on_message(self, body: Any, message: Message) -> None:
        raw = message.body
        size = len(raw if isinstance(raw, (bytes, bytearray)) else str(raw).encode())
        self.events.append((body.get("hostname", "?"), body.get("type", "?"), size))

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            with suppress(TimeoutError):
                self.connection.drain_events(timeout=min(left, 0.2))

    def close(self) -> None:
        self.connection.release()


def measure_traffic(bench: Bench, seconds: float) -> dict[str, Any]:
    """Worker events received per agent per minute over an idle window, and their size."""
    agent = bench.start_online()
    try:
        nodename = agent.nodename
        tap = EventTap(bench.url)
        try:
            tap.drain(seconds)
        finally:
            tap.close()
    finally:
        bench.dispose(agent)
    mine = [(kind, size) for host, kind, size in tap.events if host == nodename]
    kinds = {kind: sum(1 for k, _ in mine if k == kind) for kind in sorted({k for k, _ in mine})}
    others = len(tap.events) - len(mine)
    return {
        "window_seconds": seconds, "agents_running": 1,
        "exchange": "celeryev (topic, durable)", "routing_key": "worker.#",
        "events": len(mine), "events_by_type": kinds,
        "events_per_agent_per_minute": round(len(mine) / seconds * 60, 2),
        "mean_body_bytes": round(statistics.mean(s for _, s in mine), 1) if mine else None,
        "bytes_per_agent_per_minute": round(sum(s for _, s in mine) / seconds * 60, 1),
        "events_of_other_workers": others,
        "note": "message bodies as sent (JSON, before AMQP framing); every agent already "
                "sends these for Flower (worker_send_task_events is on), so chiffon's fast "
                "liveness adds no agent traffic, only one more consumer queue",
    }


@contextmanager
def fleet(broker: str) -> Iterator[Bench]:
    """A private vhost with the orchestrator and Flower; all gone afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="chiffon-bench-liveness-"))
    try:
        with private_vhost(broker) as url, orchestrator_on(url, tmp) as running, \
                Registry(running.registry_url) as registry, flower_on(url, tmp) as base:
            yield Bench(url, running.env, registry, base, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def flower_on(url: str, tmp: Path) -> Iterator[str]:
    """A real Flower on broker ``url``, answering its HTTP API; yields its base URL."""
    port = free_port()
    flower_env = agent_environment(tmp / "flower-home", {
        "CHIFFON_BROKER_URL": url, "CHIFFON_AGENT_ID": unique("bench-flower"),
        "FLOWER_UNAUTHENTICATED_API": "true"})
    flower_log = tmp / "flower.log"
    with flower_log.open("wb") as out:
        flower_proc = subprocess.Popen(
            [str(CELERY), "-A", "chiffon_worker", "--broker", url, "flower",
             "--address=127.0.0.1", f"--port={port}"],
            env=flower_env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if flower_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Flower not answering:\n{flower_log.read_text()}")
            if port_open(port):
                with suppress(OSError, ValueError):
                    if isinstance(_get_json(f"{base}/api/workers?status=1"), dict):
                        break
            time.sleep(0.1)
        yield base
    finally:
        if flower_proc.poll() is None:
            flower_proc.send_signal(signal.SIGTERM)
            try:
                flower_proc.wait(15)
            except subprocess.TimeoutExpired:
                flower_proc.kill()
                flower_proc.wait(15)


def targets(results: dict[str, Any]) -> dict[str, Any]:
    def target(value: float | None, text: str, met: Callable[[float], bool]) -> dict[str, Any]:
        return {"value": value, "target": text, "met": value is not None and met(value)}

    term, kill, stop = (results[s.name] for s in SIGNALS)
    return {
        "stopped_after_sigterm_median_seconds": target(
            term["chiffon_seconds"]["median"], f"<= {STOPPED_TARGET_S:g}",
            lambda v: v <= STOPPED_TARGET_S),
        "lost_after_sigkill_median_seconds": target(
            kill["chiffon_seconds"]["median"], f"<= {LOST_TARGET_S:g}",
            lambda v: v <= LOST_TARGET_S),
        "lost_after_sigstop_median_seconds": target(
            stop["chiffon_seconds"]["median"], f"<= {LOST_TARGET_S:g}",
            lambda v: v <= LOST_TARGET_S),
        "ratio_to_flower_sigkill_median": target(
            kill["ratio_of_medians"], f"<= {RATIO_TARGET:g}", lambda v: v <= RATIO_TARGET),
        "ratio_to_flower_sigstop_median": target(
            stop["ratio_of_medians"], f"<= {RATIO_TARGET:g}", lambda v: v <= RATIO_TARGET),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default=os.environ.get("CHIFFON_BENCH_BROKER",
                                                          DEFAULT_BROKER))
    parser.add_argument("--runs", type=int, default=3, help="runs per signal")
    parser.add_argument("--quick", action="store_true", help="1 run per signal")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs_per_signal = 1 if args.quick else args.runs
    masked = Connection(args.broker).as_uri()
    log.info("broker %s; %d run(s) per signal", masked, runs_per_signal)

    runs: list[dict[str, Any]] = []
    with fleet(args.broker) as bench:
        log.info("worker events over a %g s idle window", TRAFFIC_WINDOW_S)
        traffic = measure_traffic(bench, TRAFFIC_WINDOW_S)
        log.info("  %s", {k: v for k, v in traffic.items() if k != "note"})
        for index in range(runs_per_signal):
            # the signal lands at a spread of phases of the 2 s event heartbeat
            phase = (index + 0.5) / runs_per_signal * EVENT_INTERVAL_S
            for sig in SIGNALS:
                row = measure(bench, sig, phase)
                row["run"] = index + 1
                row["target_phase_after_event_seconds"] = round(phase, 3)
                runs.append(row)
                log.info("%s run %d: chiffon %s after %s s, Flower offline after %s s",
                         sig.name, index + 1, row["chiffon_said"], row["chiffon_seconds"],
                         row["flower_seconds"])

    results = summarize(runs)
    goals = targets(results)
    result = {
        "benchmark": "liveness",
        "quick": args.quick,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "broker": masked,
        "versions": {"celery": celery.__version__, "flower": flower.__version__},
        "settings": {
            "agent": "defaults: CHIFFON_HEARTBEAT_INTERVAL and "
                     "CHIFFON_HEARTBEAT_TIMEOUT_SECONDS not set (capacity heartbeat every "
                     "30 s, timeout 90 s; each run records what the registry got)",
            "runs_per_signal": runs_per_signal,
            "chiffon_poll_seconds": CHIFFON_POLL_S,
            "chiffon_poll": "in process: Registry(url).agent(agent_id, with_snapshot=False)"
                            ".liveness(time.time()); `chiffon status --json` computes the "
                            "same (checked once per run after the agent was gone: "
                            "chiffon_status_json_agrees)",
            "flower_poll_seconds": FLOWER_POLL_S,
            "flower_poll": "GET /api/workers?status=1 (FLOWER_UNAUTHENTICATED_API=true), "
                           "gone when the worker's value is false",
            "gone_timeout_seconds": GONE_TIMEOUT_S,
            "clock_start": {"SIGTERM": "process exited (popen.wait() returned), for both "
                                       "tools",
                            "SIGKILL": "signal sent", "SIGSTOP": "signal sent"},
            "signal_phase": "each run's signal is sent at a chosen phase after one of the "
                            "agent's 2 s worker-heartbeat events ((run - 0.5) / runs x 2 s), "
                            "so the runs spread over the event interval",
            "windows": {
                "celery_event_heartbeat_seconds": EVENT_INTERVAL_S,
                "chiffon_seconds": CHIFFON_WINDOW_S,
                "flower_seconds": FLOWER_WINDOW_S,
                "note": f"chiffon calls an agent lost {CHIFFON_WINDOW_S:g} s after its last "
                        "worker event (2 event intervals, on the orchestrator's receipt "
                        f"time); Flower {FLOWER_WINDOW_S:g} s after it (freq x "
                        "HEARTBEAT_EXPIRE_WINDOW 200 %; celery.events.state keeps "
                        "local_received, the receipt time, in Worker.heartbeats, and the "
                        "sender's timestamp only for the drift warning): the same rule, so "
                        "the ratio is 1 but for polling (chiffon's registry every 0.05 s, "
                        "Flower's API every 0.1 s)",
            },
        },
        "traffic": traffic,
        "results": results,
        "targets": goals,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", args.output)
    for name, row in results.items():
        log.info("%s: chiffon %s; Flower %s; ratio of medians %s", name,
                 row["chiffon_seconds"], row["flower_seconds"], row["ratio_of_medians"])
    return 0 if all(goal["met"] for goal in goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
