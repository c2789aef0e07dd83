"""Peers of the heartbeat consumer for ``bench/ingest.py``, measured in the same run.

- :func:`kombu_floor`: a bare kombu consumer that only acknowledges (same prefetch, acks
  with ``multiple=True`` every ``batch_size`` messages and at the end), no socket tuning:
  the floor of what the AMQP client costs per message.
- :func:`celery_event_state`: Celery ``worker-heartbeat`` events, sent as workers send them
  (an app's ``EventDispatcher``), consumed the way Flower does (``app.events.Receiver`` with
  ``handlers={"*": state.event}`` into ``app.events.State()``), on a private vhost.

Both are timed like the consumer: queue filled first, clock from consumer start (connect
included) to the last message handled. Rates are messages (events) per second.

Run as a script, this module is the event publisher process (``--publish-events``).
"""

from __future__ import annotations

import argparse
import logging
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kombu.connection import Connection
from kombu.entity import Queue
from kombu.messaging import Consumer

#: Seconds without a message after which a peer's drain gives up (the queue was full).
STALL_SECONDS = 60.0
#: Seconds to wait for the broker to report every published message in the queue.
DEPTH_WAIT_SECONDS = 30.0
#: A Celery worker's default heartbeat interval (``freq`` of its events), seconds.
HEARTBEAT_FREQ_SECONDS = 2.0
#: Where the peer's receiver reads events (its ``node_id``; the queue is ``celeryev.<id>``).
RECEIVER_NODE_ID = "chiffon-bench-ingest"


# -- the shared pieces ---------------------------------------------------------------------------

def spread(values: list[float], digits: int = 1) -> dict[str, Any]:
    """min / median / max of ``values`` (same unit), and every value, rounded."""
    return {"min": round(min(values), digits),
            "median": round(statistics.median(values), digits),
            "max": round(max(values), digits), "runs": [round(v, digits) for v in values]}


def queue_depth(broker: str, queue: str) -> int:
    """Messages ready in ``queue`` (passive declare), on the vhost of ``broker``."""
    with Connection(broker) as conn:
        _, count, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
        return int(count)


def wait_for_depth(broker: str, queue: str, expected: int) -> int:
    """Poll until ``queue`` holds ``expected`` messages (publishes are asynchronous) or
    ``DEPTH_WAIT_SECONDS`` pass; returns the last depth seen (messages)."""
    deadline = time.monotonic() + DEPTH_WAIT_SECONDS
    depth = queue_depth(broker, queue)
    while depth < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        depth = queue_depth(broker, queue)
    return depth


class Stall:
    """Watchdog: if ``progress()`` stops moving for ``STALL_SECONDS``, call ``abort()`` (to
    break a blocking drain) and remember it."""

    def __init__(self, progress: Callable[[], int], abort: Callable[[], None]) -> None:
        self.progress = progress
        self.abort = abort
        self.stalled = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Stall:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        last = -1
        while not self._done.wait(STALL_SECONDS):
            now = self.progress()
            if now == last:
                self.stalled = True
                self.abort()
                return
            last = now


# -- the kombu floor ---------------------------------------------------------------------------

def kombu_floor(broker: str, declaration: Queue, messages: int, *, batch_size: int,
                prefetch: int) -> dict[str, Any]:
    """Drain ``messages`` from the filled ``declaration`` with a plain kombu consumer that
    only acks (``multiple=True`` on every ``batch_size``-th message and the last).

    Returns seconds from connecting to the last ack, and messages per second.
    """
    from bench.cpu_use import measure_cpu  # imported here: the publisher runs without bench

    received = 0
    finished = 0.0
    with measure_cpu() as cpu:
        started = time.perf_counter()
        conn = Connection(broker)
        try:
            channel = conn.channel()

            def on_message(message: Any) -> None:
                nonlocal received, finished
                received += 1
                if received % batch_size == 0 or received == messages:
                    message.ack(multiple=True)
                if received == messages:
                    finished = time.perf_counter()

            consumer = Consumer(channel, queues=[declaration], on_message=on_message,
                                prefetch_count=prefetch, no_ack=False)
            consumer.consume()
            with Stall(lambda: received, lambda: _shutdown(conn)) as stall:
                try:
                    while received < messages:
                        conn.drain_events()
                except (OSError, *conn.connection_errors) as exc:
                    if not stall.stalled:
                        raise
                    raise SystemExit(f"kombu floor: {received} of {messages} messages in "
                                     f"{STALL_SECONDS:.0f} s ({exc})") from None
            consumer.cancel()
        finally:
            conn.release()
    elapsed = finished - started
    return {"seconds": round(elapsed, 3), "messages_per_second": round(messages / elapsed, 1),
            "messages": received, "prefetch_count": prefetch, "ack_every": batch_size,
            "drain_timeout": None, "cpu": cpu.per_message(messages)}


def _shutdown(conn: Connection) -> None:
    """Break a blocking ``drain_events`` on ``conn`` (its socket is shut down)."""
    sock = getattr(conn.connection, "sock", None)
    if sock is not None:
        sock.shutdown(socket.SHUT_RDWR)


# -- Celery's event state (what Flower runs) ----------------------------------------------------

def event_app(broker: str) -> Any:
    """A Celery app on ``broker`` whose event receiver queue outlives the fill: not exclusive
    (it is declared before the receiver connects), no message TTL (Celery's default drops
    events older than 5 s), no idle expiry. Nothing else differs from Celery's defaults."""
    from celery import Celery

    app = Celery("chiffon-bench-events", broker=broker, set_as_current=False)
    app.conf.update(event_queue_exclusive=False, event_queue_ttl=None,
                    event_queue_expires=None)
    return app


def publish_events(broker: str, messages: int, agents: int, part: int, parts: int, *,
                   seed: int) -> None:
    """Send this part's share of ``worker-heartbeat`` events (hostnames ``i % parts == part``)
    as a worker's heart does (``celery/worker/heartbeat.py``), interleaved across hosts."""
    from celery.worker.state import SOFTWARE_INFO

    app = event_app(broker)
    rng = random.Random(seed + part)
    mine = [f"celery@bench-agent-{i:05d}" for i in range(agents) if i % parts == part]
    with app.connection_for_write() as conn:
        dispatcher = app.events.Dispatcher(conn, enabled=True)
        for seq in range(1, messages // agents + 1):
            for hostname in mine:
                dispatcher.hostname = hostname  # one dispatcher, many workers' names
                dispatcher.send("worker-heartbeat", freq=HEARTBEAT_FREQ_SECONDS, active=0,
                                processed=seq * 3, retry=True,
                                loadavg=[round(rng.uniform(0, 8), 2) for _ in range(3)],
                                **SOFTWARE_INFO)
        dispatcher.close()
    app.close()


def fill_events(broker: str, messages: int, agents: int, publishers: int) -> float:
    """Run ``publishers`` event publisher processes; returns their wall time in seconds."""
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--publish-events", broker,
                               "--messages", str(messages), "--agents", str(agents),
                               "--part", str(part), "--parts", str(publishers)])
             for part in range(publishers)]
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"event publisher exited with {proc.returncode}")
    return time.perf_counter() - started


class _DriftCount(logging.Filter):
    """Counts (and drops) Celery's clock-drift warnings: events older than 16 s when read,
    which only a fill that outlasts 16 s produces here."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.count += 1
        return False


@contextmanager
def _drift_warnings() -> Iterator[_DriftCount]:
    """Count Celery's drift warnings instead of printing one per worker."""
    logger = logging.getLogger("celery.events.state")
    counter = _DriftCount()
    logger.addFilter(counter)
    try:
        yield counter
    finally:
        logger.removeFilter(counter)


def celery_event_state(broker: str, messages: int, agents: int, publishers: int
                       ) -> dict[str, Any]:
    """Fill a receiver queue on ``broker`` (a private vhost) with ``messages`` heartbeat
    events from ``agents`` hostnames, then time ``app.events.Receiver`` feeding
    ``app.events.State()`` from connecting until State has processed every event.

    Returns seconds, events per second, and what State holds afterwards.
    """
    from bench.cpu_use import measure_cpu  # imported here: the publisher runs without bench

    app = event_app(broker)
    state = app.events.State(max_workers_in_memory=max(agents, 5000))  # default keeps 5000
    handled = 0
    finished = 0.0
    with app.connection_for_read() as conn:
        receiver: Any = None

        def on_event(event: dict[str, Any]) -> None:
            nonlocal handled, finished
            state.event(event)
            handled += 1
            if handled == messages:
                finished = time.perf_counter()
                receiver.should_stop = True

        receiver = app.events.Receiver(conn, handlers={"*": on_event},
                                       node_id=RECEIVER_NODE_ID)
        queue_name = str(receiver.queue.name)
        receiver.queue(conn.default_channel).declare()
        publish_seconds = fill_events(broker, messages, agents, publishers)
        depth = wait_for_depth(broker, queue_name, messages)
        if depth != messages:
            raise SystemExit(f"event queue holds {depth} events, expected {messages}")
        with _drift_warnings() as drift, measure_cpu() as cpu:
            started = time.perf_counter()
            try:
                receiver.capture(limit=None, timeout=STALL_SECONDS, wakeup=False)
            except TimeoutError:
                raise SystemExit(f"celery event state: {handled} of {messages} events in "
                                 f"{STALL_SECONDS:.0f} s") from None
    elapsed = finished - started
    if state.event_count != messages or len(state.workers) != agents:
        raise SystemExit(f"celery event state: {state.event_count} events from "
                         f"{len(state.workers)} workers, expected {messages} from {agents}")
    return {"seconds": round(elapsed, 3), "events_per_second": round(messages / elapsed, 1),
            "events": state.event_count, "workers_in_state": len(state.workers),
            "publish_seconds": round(publish_seconds, 3),
            "drift_warnings": drift.count, "cpu": cpu.per_message(messages)}


def run_kombu_floor(broker: str, declaration: Queue, fill: Callable[[str], float],
                    messages: int, *, batch_size: int, prefetch: int) -> dict[str, Any]:
    """Declare the fresh queue ``declaration``, ``fill`` it (the consumer's publisher),
    drain it with :func:`kombu_floor`, delete it. ``fill(queue_name)`` returns seconds."""
    name = str(declaration.name)
    with Connection(broker) as conn:
        bound = declaration(conn.default_channel)
        bound.declare()
        try:
            publish_seconds = fill(name)
            depth = wait_for_depth(broker, name, messages)
            if depth != messages:
                raise SystemExit(f"queue holds {depth} messages, expected {messages}")
            result = kombu_floor(broker, declaration, messages, batch_size=batch_size,
                                 prefetch=prefetch)
            result["publish_seconds"] = round(publish_seconds, 3)
            result["messages_left_in_queue"] = queue_depth(broker, name)
            return result
        finally:
            bound.delete()
            bound.exchange.delete()


def bench_queue_name() -> str:
    """A fresh queue name for one kombu-floor run."""
    return f"chiffon.bench.floor.{uuid.uuid4().hex}"


def main() -> None:
    """The event publisher process (started by :func:`fill_events`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publish-events", metavar="BROKER", required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, default=1)
    args = parser.parse_args()
    publish_events(args.publish_events, args.messages, args.agents, args.part, args.parts,
                   seed=11)


if __name__ == "__main__":
    main()
