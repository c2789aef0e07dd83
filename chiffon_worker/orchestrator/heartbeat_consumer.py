"""The heartbeat consumer: ``chiffon.heartbeats`` -> judge -> batch writer -> registry.

A plain kombu consumer (no Celery worker) reading raw message bodies, so every message,
however broken, is judged (:class:`~.judge.HeartbeatJudge`) and never crashes the loop.
Messages are taken with a large prefetch and checked one by one as they arrive (decode,
validation: no state); the checked heartbeats of a batch are sequenced and written by
the :class:`~.batch_writer.BatchWriter` in one registry transaction, the registry's ingest
turn, per ``batch_size`` messages or ``max_delay_seconds``, whichever comes first. So
several orchestrators can consume one heartbeat queue for one registry: each batch is
sequenced against the agents' state as the registry holds it.
Messages are acknowledged only after their batch is committed (on AMQP with one
``multiple=True`` ack), so a crash loses nothing: unacked messages are redelivered.
Rejected messages are acknowledged too (dropped, never requeued).

The broker may go away at any time: the consumer reconnects with exponential backoff
(1 s doubling to ``reconnect_max_seconds``) until :meth:`HeartbeatConsumer.stop`. A broker
that refuses the login (AMQP ``ACCESS_REFUSED``, Redis ``AuthenticationError``), or a
TLS handshake that fails (:class:`~chiffon_worker.errors.BrokerTlsFailed`), is a
configuration problem, not an outage: :meth:`~HeartbeatConsumer.run` raises
:class:`~chiffon_worker.errors.BrokerLoginRefused` at once instead of retrying; so does a
permission the broker refuses (declaring, binding or consuming the heartbeat queue):
:class:`~chiffon_worker.errors.BrokerPermissionRefused`, one line naming the role
(orchestrator) and the permission. If the
registry cannot be written, the batch is retried after each of ``write_retry_delays``
seconds and then :class:`~chiffon_worker.errors.RegistryError` ends :meth:`run` (the
unacked messages go back to the queue).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from kombu.connection import Connection
from kombu.entity import Queue
from kombu.messaging import Consumer

from chiffon_worker.broker_permissions import ORCHESTRATOR, permission_refused
from chiffon_worker.broker_tls import BrokerTls
from chiffon_worker.config import mask_url
from chiffon_worker.errors import RegistryError
from chiffon_worker.orchestrator.amqp_deliveries import Delivery, DeliveryReader
from chiffon_worker.orchestrator.batch_writer import BatchWriter
from chiffon_worker.orchestrator.decoding import HEADERS_READ
from chiffon_worker.orchestrator.judge import Checked, HeartbeatJudge
from chiffon_worker.wire import HEARTBEAT_QUEUE, heartbeat_queue

log = logging.getLogger(__name__)

DEFAULT_PREFETCH = 2000
DEFAULT_BATCH_SIZE = 1000
DEFAULT_MAX_DELAY_SECONDS = 0.25
DEFAULT_WRITE_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)
#: The first wait before reconnecting to the broker (seconds); it doubles per failure up
#: to ``reconnect_max_seconds``.
RECONNECT_FIRST_DELAY_SECONDS = 1.0
_AMQP_HEARTBEAT_SECONDS = 30
_CONNECT_TIMEOUT_SECONDS = 5
_READ_AHEAD_BYTES = 1 << 16


class HeartbeatConsumer:
    """Consume heartbeats from ``queue`` on ``broker_url``: ``judge`` judges each message,
    ``writer`` commits the accepted ones' rows. Counts go to ``judge.stats`` (give the
    writer the same :class:`~.IngestStats`).

    ``prefetch_count``: unacked messages the broker may send ahead (messages);
    ``batch_size``: messages per registry transaction (at most half the prefetch);
    ``max_delay_seconds``: the longest a received heartbeat waits for its commit;
    ``poll_seconds``: how often an idle loop wakes to flush and check :meth:`stop`;
    ``declaration``: the queue as declared (default: ``heartbeat_queue(queue)``; a copy
    queue from :func:`~chiffon_worker.wire.heartbeat_copy_queue`);
    ``tls``: TLS to an ``amqps://``/``rediss://`` broker (default: the system's CAs);
    a failed handshake ends :meth:`run` like a refused login.
    """

    def __init__(self, broker_url: str, judge: HeartbeatJudge, writer: BatchWriter, *,
                 queue: str = HEARTBEAT_QUEUE, declaration: Queue | None = None,
                 prefetch_count: int = DEFAULT_PREFETCH, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_delay_seconds: float = DEFAULT_MAX_DELAY_SECONDS,
                 poll_seconds: float = 0.25, reconnect_max_seconds: float = 30.0,
                 write_retry_delays: Sequence[float] = DEFAULT_WRITE_RETRY_DELAYS,
                 connection_name: str = "chiffon-orchestrator",
                 tls: BrokerTls | None = None) -> None:
        if prefetch_count < 2 or not 1 <= batch_size <= prefetch_count // 2:
            raise ValueError("need prefetch_count >= 2 and 1 <= batch_size <= prefetch/2")
        if writer.stats is not judge.stats:
            raise ValueError("the judge and the writer must count into one IngestStats")
        self.broker_url = broker_url
        self.masked_url = mask_url(broker_url)
        self.tls = tls or BrokerTls()
        self.judge = judge
        self.writer = writer
        self.stats = judge.stats
        self.queue_name = queue if declaration is None else str(declaration.name)
        self.declaration = declaration if declaration is not None else heartbeat_queue(queue)
        self.prefetch_count = prefetch_count
        self.batch_size = batch_size
        self.max_delay_seconds = max_delay_seconds
        self.poll_seconds = poll_seconds
        self.reconnect_max_seconds = reconnect_max_seconds
        self.write_retry_delays = tuple(write_retry_delays)
        self.connection_name = connection_name
        #: set while consuming (connected, queue declared, consumer registered)
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._messages: list[Any] = []
        self._held: list[Checked] = []  # checked heartbeats of the messages not yet acked
        self._first_pending_at = 0.0
        self._multiple_ack = False
        self._ack_channel: Any = None  # py-amqp's channel: acks by delivery tag

    def stop(self) -> None:
        """Ask :meth:`run` to flush, ack and return (safe from signal handlers, any thread)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    def _connection(self) -> Connection:
        options: dict[str, Any] = {}
        if urlsplit(self.broker_url).scheme in ("amqp", "amqps", "pyamqp"):
            options["client_properties"] = {"connection_name": self.connection_name}
        return Connection(self.broker_url, connect_timeout=_CONNECT_TIMEOUT_SECONDS,
                          heartbeat=_AMQP_HEARTBEAT_SECONDS, transport_options=options,
                          ssl=self.tls.kombu_ssl(self.broker_url))

    def run(self) -> None:
        """Consume until :meth:`stop`; reconnects on broker loss. Raises RegistryError, and
        BrokerLoginRefused when the broker refuses the login (retrying cannot fix that)."""
        delay = RECONNECT_FIRST_DELAY_SECONDS
        while not self._stop.is_set():
            conn = self._connection()
            recoverable = (*conn.connection_errors, *conn.channel_errors, OSError)
            try:
                conn.connect()
                # the URL connected to: one node of a failover list (password masked)
                log.info("consuming %s on %s", self.queue_name, mask_url(conn.as_uri()))
                delay = RECONNECT_FIRST_DELAY_SECONDS
                self._consume(conn)
            except recoverable as exc:
                self.ready.clear()
                self._stop_if_refused(exc, conn.as_uri())
                self.stats.connection_losses += 1
                log.warning("broker %s: %s: %s; reconnecting in %.0f s", self.masked_url,
                            type(exc).__name__, str(exc)[:200] or "connection lost", delay)
                self._salvage()
                self._stop.wait(delay)
                delay = min(delay * 2, self.reconnect_max_seconds)
            finally:
                self.ready.clear()
                _release(conn)
        self._salvage()

    def _stop_if_refused(self, exc: BaseException, node_url: str) -> None:
        """Raise BrokerLoginRefused if ``exc`` is a refused login, a refused permission
        (BrokerPermissionRefused) or a failed TLS handshake (BrokerTlsFailed) with
        ``node_url``, after committing what was judged (the unacked deliveries go back to
        the queue)."""
        refused = permission_refused("chiffon orchestrator", ORCHESTRATOR, exc) \
            or self.tls.refusal(self.masked_url, exc, node_url)
        if refused is not None:
            self._salvage()
            raise refused from None

    def _consume(self, conn: Connection) -> None:
        channel = conn.channel()
        queue = self.declaration(channel)
        queue.declare()
        self._multiple_ack = conn.transport.driver_type == "amqp"
        if self._multiple_ack:
            # py-amqp's own messages, without a kombu Message made for each (~10% of the
            # per-heartbeat time): the consumer reads body, properties and delivery tag
            channel.basic_qos(0, self.prefetch_count, False)
            tag = channel.basic_consume(queue=self.queue_name, no_ack=False,
                                        callback=self._on_amqp_message)
            self._ack_channel = channel
            cancel: Any = lambda: channel.basic_cancel(tag)  # noqa: E731
        else:
            consumer = Consumer(channel, queues=[queue], on_message=self._on_message,
                                prefetch_count=self.prefetch_count, no_ack=False,
                                auto_declare=False)
            consumer.consume()
            cancel = consumer.cancel
        tuned = self._tune_amqp_socket(conn)
        drain_timeout = None if tuned else self.poll_seconds
        reader = DeliveryReader(conn.connection, channel.channel_id, self._on_delivery,
                                HEADERS_READ) if tuned and self._multiple_ack else None
        read: Any = reader.read if reader is not None \
            else lambda: conn.drain_events(timeout=drain_timeout)
        self.ready.set()
        last_beat = time.monotonic()
        if reader is not None:
            reader.attach()
        try:
            while not self._stop.is_set():
                try:
                    read()
                except TimeoutError:
                    self._flush()
                now = time.monotonic()
                if self._messages and now - self._first_pending_at >= self.max_delay_seconds:
                    self._flush()
                if now - last_beat >= 1.0:
                    conn.heartbeat_check()
                    last_beat = now
        finally:
            if reader is not None:
                reader.detach()  # py-amqp reads the connection again (to cancel)
        self._flush()
        cancel()

    def _tune_amqp_socket(self, conn: Connection) -> bool:
        """Cut the per-message system calls of py-amqp (about 15% more heartbeats/s).

        py-amqp reads each frame with two ``recv`` calls of exactly the bytes it needs and,
        when ``drain_events`` has a timeout, sets the socket timeout before and after every
        frame: about a dozen system calls per message. Here reads ask for up to 64 KiB (py-amqp
        keeps the surplus in its read buffer) and the socket keeps one timeout of
        ``poll_seconds``, so ``drain_events`` runs without one and still wakes when idle.
        Returns False (nothing changed) where the transport is not py-amqp's.
        """
        transport = getattr(getattr(conn, "connection", None), "transport", None)
        sock = getattr(transport, "sock", None)
        recv = getattr(transport, "_quick_recv", None)
        if conn.transport.driver_type != "amqp" or transport is None or sock is None \
                or recv is None:
            return False

        def read_ahead(size: int, _recv: Any = recv) -> Any:
            return _recv(max(size, _READ_AHEAD_BYTES))

        transport._quick_recv = read_ahead
        sock.settimeout(self.poll_seconds)
        return True

    def _on_message(self, message: Any) -> None:
        """A kombu message (transports other than py-amqp's)."""
        self._receive(message, message.body, message.headers, message.content_type,
                      message.content_encoding,
                      redelivered=bool(message.delivery_info.get("redelivered", False)))

    def _on_delivery(self, delivery: Delivery) -> None:
        """A delivery cut from the frames by the :class:`DeliveryReader`."""
        self._receive(delivery.tag, delivery.body, delivery.headers, delivery.content_type,
                      delivery.content_encoding, redelivered=delivery.redelivered)

    def _on_amqp_message(self, message: Any) -> None:
        """A py-amqp message: acknowledged by its delivery tag."""
        properties = message.properties
        self._receive(message.delivery_tag, message.body,
                      properties.get("application_headers"), properties.get("content_type"),
                      properties.get("content_encoding"),
                      redelivered=bool(message.delivery_info.get("redelivered", False)))

    def _receive(self, handle: Any, body: bytes | str, headers: Any, content_type: str | None,
                 content_encoding: str | None, *, redelivered: bool) -> None:
        """Check one message and hold it (``handle``: what acknowledges it) until its
        batch is committed."""
        if not self._messages:
            self._first_pending_at = time.monotonic()
        self._messages.append(handle)
        checked = self.judge.check(body, headers, content_type, content_encoding,
                                   received_at=time.time(), redelivered=redelivered)
        if isinstance(checked, Checked):
            self._held.append(checked)
        if len(self._messages) >= self.batch_size:
            self._flush()

    def _write(self) -> None:
        """Sequence and commit the held heartbeats, retrying per ``write_retry_delays``."""
        for attempt, delay in enumerate((*self.write_retry_delays, None), start=1):
            try:
                self.writer.commit(self._held, self.judge)
                self._held = []
                return
            except RegistryError as exc:
                if delay is None or self._stop.is_set():
                    raise
                log.error("%s (attempt %d; retrying in %.0f s)", exc, attempt, delay)
                self._stop.wait(delay)

    def _flush(self) -> None:
        """Commit the batch, then acknowledge its messages (in delivery order).

        Commits run in this thread: a writer thread was measured slower here (the GIL
        makes the two threads take turns rather than overlap).
        """
        if not self._messages and not self._held:
            return
        self._write()
        messages, self._messages = self._messages, []
        if not messages:
            return
        if self._multiple_ack and self._ack_channel is not None:
            self._ack_channel.basic_ack(messages[-1], multiple=True)
        else:
            for message in messages:
                message.ack()

    def _salvage(self) -> None:
        """After losing the broker: keep the judged heartbeats, forget the dead deliveries.

        The broker redelivers the unacked messages; they come back as ``redelivered``
        duplicates and are acked then.
        """
        self._messages = []
        if self._held:
            self._write()


def _release(conn: Connection) -> None:
    try:
        conn.release()
    except (OSError, *conn.connection_errors) as exc:
        log.debug("closing the broker connection: %s", exc)
