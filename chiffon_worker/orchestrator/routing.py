"""Routing work: to a pool queue, or to the online agent with the most headroom.

Python API::

    from chiffon_worker.orchestrator.routing import Router
    from chiffon_worker.protocol import WorkRequest

    with Router() as router:                       # Config() -> broker, backend, registry
        job = router.submit(WorkRequest("job-1", "echo", {"x": 1}), pool="desktop_pool_1")
        big = router.submit(WorkRequest("job-2", "train", {}), needs={"gpu_vram_gb": 8})
        result = big.wait(timeout=600)             # a WorkResult

Work is published as the Celery task ``chiffon.execute_work`` with the request dict as its
one argument, JSON-serialised, with task id = ``work_id`` (so the result can be fetched
through the result backend by id). A pool submit goes to the queue named like the pool;
a capacity submit goes to ``chiffon.agent.<agent_id>`` of the chosen agent. Both queues
are durable with a direct exchange of the same name and routing key = queue name, and work
is published through that exchange (not Celery's default-exchange shortcut: write on
``amq.default`` would let a submitter put messages into *any* queue, heartbeats included;
docs/security.md). Publishes are confirmed by the broker, so one it refuses (a user
without write permission) fails the submit instead of vanishing.

Capacity routing (``needs``, in the snapshot's units): ``gpu_vram_gb`` (GiB free VRAM on
the primary GPU), ``cores`` (``cpu_cores_available``), ``memory_gb`` (GiB available
memory). Among online agents (of ``pool`` if given) that meet every need, the one with
the most headroom wins: the largest ``min(available / needed)`` over the requested
resources (with no positive need: the most free cores); ties go to the lowest agent id.
An agent whose free VRAM is unknown (``gpu_vram_known`` false) never meets a positive
``gpu_vram_gb`` need: it is neither free nor full, so nothing can be promised there. The
flat VRAM figures come from the primary GPU that is not unhealthy, so a faulted GPU is
never routed to.

A capacity placement reserves what it asked for on the chosen agent, in the registry
transaction that chose it, under a lock every submitter takes: two submitters (threads,
processes, hosts; SQLite or PostgreSQL) never both take the last room on an agent, and
ten 8 GiB submits at once spread over the agents that have room instead of landing on
one. What an agent can still be promised, and how long a reservation lasts, is
:mod:`.reservations`. Work that fits nowhere fails with :class:`NoFitError`, or, with
``wait_for_room_seconds``, waits (in the submitter) for room to free.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from amqp.exceptions import AMQPError
from kombu.entity import Queue
from kombu.exceptions import OperationalError

from chiffon_worker.broker_tls import BrokerTls
from chiffon_worker.config import Config, mask_url
from chiffon_worker.errors import ChiffonError, ProtocolError, RegistryError, RoutingError
from chiffon_worker.orchestrator.registry import AgentRecord, Registry
from chiffon_worker.orchestrator.reservations import (
    HeartbeatTiming,
    Held,
    Reservation,
    WorkState,
    held_by_agent,
    promisable,
)
from chiffon_worker.protocol import WorkRequest, WorkResult
from chiffon_worker.snapshot import NEED_FIELDS
from chiffon_worker.wire import (
    CLASSIC_QUEUE,
    EXECUTE_WORK_TASK,
    agent_queue_name,
    declared_queue,
    is_queue_name,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Need:
    """A routable resource: the registry attribute holding what is free of it, the one
    holding the agent's whole capacity (reservations count against it), and how to say
    it."""

    attribute: str
    total: str
    unit: str
    noun: str


#: ``needs`` keys -> the agent attributes they are compared with (the snapshot fields
#: declared with a ``Need``).
NEEDS: dict[str, Need] = {
    f.need.key: Need(f.name, f.need.total, f.unit_suffix, f.need.noun) for f in NEED_FIELDS
    if f.need is not None}


def submitter() -> str:
    """Who places work (``<host>:<pid>``), stored with each reservation."""
    return f"{socket.gethostname()}:{os.getpid()}"


#: The reservation lifetime when no Config is given (seconds; Config's default).
DEFAULT_RESERVATION_TTL_SECONDS = 3600.0


class NoFitError(RoutingError):
    """No online agent has room for the needs right now (others may free some)."""


class NoAgentOnline(RoutingError):
    """No agent of the pool is online and takes work right now (one may come)."""


def work_queue(name: str, queue_type: str = CLASSIC_QUEUE) -> Queue:
    """A work queue as agents declare it: durable, direct exchange named like the queue,
    of ``queue_type`` (the config key: a pool's agents and its submitters must agree)."""
    if not is_queue_name(name):
        raise RoutingError(f"{name!r} is not a valid queue name")
    return declared_queue(name, queue_type)


def check_needs(needs: Mapping[str, Any]) -> dict[str, float]:
    """Validate ``needs`` (known keys, finite non-negative numbers); returns floats."""
    checked: dict[str, float] = {}
    for key, value in needs.items():
        if key not in NEEDS:
            raise RoutingError(f"unknown need {key!r}; known: {', '.join(NEEDS)}")
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or value < 0:
            raise RoutingError(f"need {key} must be a non-negative number, got {value!r}")
        checked[key] = float(value)
    return checked


def _fmt(value: float) -> str:
    return f"{round(value, 1):g}"


#: Needs whose figure can be unknown, and the flag that says it is known.
KNOWN_FLAGS = {"gpu_vram_gb": "gpu_vram_known"}


def available(record: AgentRecord, key: str, held: Held | None = None) -> float | None:
    """What can be promised to new work of need ``key`` on ``record``: its heartbeat
    figure less what ``held`` (its active reservations) takes (see
    :mod:`.reservations`); ``None`` when the agent does not know (free VRAM of an Intel
    GPU, a runtime-suspended one): it cannot be promised."""
    flag = KNOWN_FLAGS.get(key)
    if flag is not None and record.metrics.get(flag) is False:
        return None
    need = NEEDS[key]
    return promisable(record.number(need.attribute), record.number(need.total), held, key)


class _Choice:
    """One agent's standing for some needs, given what its reservations hold."""

    def __init__(self, record: AgentRecord, needs: Mapping[str, float], held: Held | None
                 ) -> None:
        self.record = record
        self.have = {key: available(record, key, held) for key in needs}
        self.short = [key for key, need in needs.items()
                      if need > 0 and ((self.have[key] or 0.0) < need
                                       or self.have[key] is None)]
        ratios = [(self.have[key] or 0.0) / need for key, need in needs.items() if need > 0]
        self.headroom = min(ratios) if ratios else record.number("cpu_cores_available")

    def says(self, key: str) -> str:
        have = self.have[key]
        if have is None:
            return f"unknown {NEEDS[key].noun}"
        return f"{_fmt(have)}{NEEDS[key].unit} {NEEDS[key].noun}"


def pick_agent(records: Iterable[AgentRecord], needs: Mapping[str, Any], *,
               pool: str | None = None, now: float | None = None,
               held: Mapping[str, Held] | None = None) -> AgentRecord:
    """The online agent (of ``pool``) with the most headroom meeting ``needs``.

    ``now`` is unix seconds (default: the current time); ``held``: what each agent's
    active reservations hold (by agent id). Raises RoutingError when no agent is online,
    and NoFitError naming the pool, the needs and the closest candidate when none fits.
    """
    wanted = check_needs(needs)
    moment = time.time() if now is None else now
    where = f" in pool {pool}" if pool else ""
    known = [r for r in records if pool is None or r.pool == pool]
    alive = [r for r in known if r.liveness(moment) == "online"]
    online = [r for r in alive if r.takes_work(moment)]
    if not online:
        if alive:
            raise NoAgentOnline(f"no online agent{where} takes work: {len(alive)} online "
                                "but drained or not accepting work")
        detail = f" ({len(known)} known, all offline)" if known else ""
        raise NoAgentOnline(f"no online agent{where}{detail}")
    holding = held or {}
    ranked = sorted((_Choice(r, wanted, holding.get(r.agent_id)) for r in online),
                    key=lambda c: (-c.headroom, c.record.agent_id))
    for choice in ranked:
        if not choice.short:
            return choice.record
    best = ranked[0]
    asked = " and ".join(f"{_fmt(v)}{NEEDS[k].unit} {NEEDS[k].noun}" for k, v in wanted.items())
    has = ", ".join(best.says(k) for k in best.short)
    reserved = holding.get(best.record.agent_id)
    note = f", {reserved.count} placement(s) holding part of it" if reserved else ""
    raise NoFitError(f"no online agent{where} has {asked}; best has {has} "
                     f"({best.record.agent_id}{note})")


def best_fit(candidates: Iterable[tuple[AgentRecord, list[Reservation]]],
             needs: Mapping[str, float], now: float) -> AgentRecord | None:
    """The first of ``candidates`` (each agent with its active reservations, ranked best
    first by what it can still be promised) that takes work and, its reservations
    subtracted, meets ``needs``; None when none does."""
    for record, reservations in candidates:
        if not record.takes_work(now):
            continue
        held = held_by_agent(reservations, timing_of([record]), now).get(record.agent_id) \
            if reservations else None
        if not _Choice(record, needs, held).short:
            return record
    return None


def timing_of(records: Iterable[AgentRecord]) -> dict[str, HeartbeatTiming]:
    """Each agent's newest heartbeat collection time and interval, by agent id."""
    return {r.agent_id: HeartbeatTiming(r.collected_at, r.heartbeat_interval_seconds)
            for r in records}


class Submission:
    """A submitted work request: where it went, and a way to wait for its result."""

    def __init__(self, request: WorkRequest, queue: str, agent_id: str | None,
                 async_result: Any, *,
                 on_result: Callable[[WorkResult], None] | None = None) -> None:
        self.request = request
        self.queue = queue
        self.agent_id = agent_id
        self.async_result = async_result
        self._on_result = on_result

    @property
    def work_id(self) -> str:
        """The request's ``work_id`` (also the Celery task id)."""
        return self.request.work_id

    def wait(self, timeout: float) -> WorkResult:
        """The WorkResult, waiting up to ``timeout`` seconds; ChiffonError on timeout."""
        from celery.exceptions import TimeoutError as CeleryTimeout

        try:
            value = self.async_result.get(timeout=timeout, propagate=False)
        except CeleryTimeout:
            raise ChiffonError(f"no result for work {self.work_id} within {timeout:g} s "
                               f"(it may still be queued on {self.queue} or running)") from None
        if isinstance(value, BaseException):
            result = WorkResult.failure(self.work_id, f"{type(value).__name__}: {value}",
                                        self.agent_id or "")
        else:
            try:
                result = WorkResult.from_json(value)
            except ProtocolError as exc:
                raise ChiffonError(f"work {self.work_id} returned an invalid result: {exc}"
                                   ) from None
        if self._on_result is not None:
            self._on_result(result)
        return result


class Router:
    """Submits work through a Celery client app (JSON only); reads the registry to route.

    Arguments default to ``Config()``: ``effective_broker_url``,
    ``effective_result_backend`` and the registry at ``effective_database_url`` (opened
    on the first capacity submit).
    """

    def __init__(self, config: Config | None = None, *, registry: Registry | None = None,
                 broker_url: str | None = None, result_backend: str | None = None,
                 reservation_ttl_seconds: float | None = None) -> None:
        if config is None and not (broker_url and result_backend):
            config = Config()
        self._config = config
        self._registry = registry
        self._owns_registry = False
        self.broker_url = broker_url or (config.effective_broker_url if config else "")
        self.result_backend = result_backend or (
            config.effective_result_backend if config else "")
        #: how long a placement holds its reservation at most (seconds)
        self.reservation_ttl_seconds = reservation_ttl_seconds or (
            config.reservation_ttl_seconds if config else DEFAULT_RESERVATION_TTL_SECONDS)
        self._app: Any = None
        #: TLS to the broker (and a rediss:// result backend): the config's, else defaults
        self.tls = config.tls_to_broker if config else BrokerTls()

    @property
    def app(self) -> Any:
        """The Celery client app (created on first use)."""
        if self._app is None:
            from celery import Celery

            app = Celery("chiffon-orchestrator", broker=self.broker_url,
                         backend=self.result_backend, set_as_current=False)
            app.conf.update(
                task_serializer="json", result_serializer="json", accept_content=["json"],
                result_accept_content=["json"], task_protocol=2,
                broker_connection_retry_on_startup=True, task_publish_retry=True,
                # a publish the broker refuses (ACCESS_REFUSED) raises instead of vanishing
                broker_transport_options={"confirm_publish": True},
                **self.tls.celery_settings(self.broker_url, self.result_backend),
            )
            self._app = app
        return self._app

    @property
    def registry(self) -> Registry:
        """The registry used for capacity routing."""
        if self._registry is None:
            self._registry = Registry.from_config(self._config or Config())
            self._owns_registry = True
        return self._registry

    def submit(self, request: WorkRequest, *, pool: str | None = None,
               needs: Mapping[str, Any] | None = None,
               wait_for_room_seconds: float = 0.0) -> Submission:
        """Publish ``request``: to the best agent for ``needs``, else to ``pool``'s queue.

        Without ``needs`` or ``pool`` the configured ``agent_pool_name`` is used. With
        ``needs`` the placement reserves them on the chosen agent (see
        :mod:`.reservations`); when no online agent has room, NoFitError, or, with
        ``wait_for_room_seconds``, the placement is tried again every second until one
        has (work ending releases what it held) or that time is up.
        """
        agent_id: str | None = None
        on_result: Callable[[WorkResult], None] | None = None
        if needs is not None:
            agent_id = self._place(request, needs, pool, wait_for_room_seconds)
            queue = agent_queue_name(agent_id)
            on_result = self._releaser(request.work_id)
        else:
            queue = pool or (self._config or Config()).agent_pool_name
        declaration = work_queue(queue, self._config.queue_type if self._config
                                 else CLASSIC_QUEUE)
        try:
            async_result = self.app.send_task(
                EXECUTE_WORK_TASK, args=[request.to_dict()], task_id=request.work_id,
                queue=declaration, exchange=declaration.exchange.name,
                routing_key=declaration.routing_key, serializer="json")
        except (OSError, OperationalError) as exc:
            if agent_id is not None:
                self.registry.cancel_reservation(request.work_id)
            raise RoutingError(f"cannot publish to {queue} on {mask_url(self.broker_url)}: "
                               f"{exc}") from None
        except AMQPError:  # refused by the broker (a permission): the caller says why
            if agent_id is not None:
                self.registry.cancel_reservation(request.work_id)
            raise
        log.info("work %s (%s) -> %s", request.work_id, request.work_type, queue)
        return Submission(request, queue, agent_id, async_result, on_result=on_result)

    def _place(self, request: WorkRequest, needs: Mapping[str, Any], pool: str | None,
               wait_for_room_seconds: float) -> str:
        """Choose an agent and reserve ``needs`` on it in one locked transaction; returns
        the agent id (retrying for up to ``wait_for_room_seconds`` while nothing fits, or
        no agent is online: one may come, a woken one say)."""
        wanted = check_needs(needs)
        deadline = time.monotonic() + wait_for_room_seconds
        while True:
            try:
                return self.place(request, wanted, pool)
            except (NoFitError, NoAgentOnline):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                time.sleep(min(1.0, left))

    def place(self, request: WorkRequest, needs: Mapping[str, float], pool: str | None,
              now: float | None = None) -> str:
        """One placement attempt (see :meth:`submit`); returns the chosen agent's id.

        The database ranks the agents by what they can still be promised (reservations
        subtracted in SQL) and hands them over a page at a time; the first that takes
        work and fits is chosen. When none fits, every agent is read to name the closest
        one in the error."""
        registry = self.registry
        moment = time.time() if now is None else now
        with registry.placement() as conn:
            if registry.work_known(conn, request.work_id):
                raise RoutingError(f"work {request.work_id} is already placed; give each "
                                   "piece of work its own id")
            chosen = best_fit(registry.candidates(
                conn, pool=pool, now=moment,
                needs={k: (NEEDS[k].attribute, NEEDS[k].total, v)
                       for k, v in needs.items() if v > 0},
                not_false=["accepting", *(KNOWN_FLAGS[k] for k, v in needs.items()
                                          if v > 0 and k in KNOWN_FLAGS)],
                default_rank=NEEDS["cores"].attribute), needs, moment)
            if chosen is None:
                records = registry.agents_on(conn, pool)
                held = held_by_agent(registry.active_reservations(conn, moment),
                                     timing_of(records), moment)
                chosen = pick_agent(records, needs, pool=pool, now=moment, held=held)
            registry.reserve(conn, Reservation(
                work_id=request.work_id, agent_id=chosen.agent_id, pool=chosen.pool,
                work_type=request.work_type,
                needs={key: amount for key, amount in needs.items() if amount > 0},
                state="placed", placed_at=moment,
                expires_at=moment + self.reservation_ttl_seconds, submitter=submitter()))
        return chosen.agent_id

    def _releaser(self, work_id: str) -> Callable[[WorkResult], None]:
        def release(result: WorkResult) -> None:
            state: WorkState = "succeeded" if result.status == "success" else "failed"
            try:
                self.registry.end_work(work_id, state, time.time())
            except RegistryError as exc:  # the agent's task events end it too
                log.warning("work %s: reservation not released: %s", work_id, exc)
        return release

    def close(self) -> None:
        """Close broker connections (and the registry if this router opened it).

        With the ``rpc://`` backend this router's reply queue is deleted too: nobody can
        wait on it any more, and RabbitMQ would otherwise keep it for a day."""
        if self._app is not None:
            if self.result_backend.startswith("rpc"):
                self._delete_reply_queue()
            self._app.close()
            self._app = None
        if self._owns_registry and self._registry is not None:
            self._registry.close()
            self._registry = None

    def _delete_reply_queue(self) -> None:
        app = self._app
        conn = app.connection_for_write()
        try:
            with conn:
                app.backend.binding(conn.default_channel).delete()
        except (OperationalError, OSError, *conn.connection_errors) as exc:
            log.debug("reply queue not deleted (it expires by itself): %s", exc)

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def submit(work_request: WorkRequest, *, pool: str | None = None,
           needs: Mapping[str, Any] | None = None, router: Router | None = None,
           wait_for_room_seconds: float = 0.0) -> Submission:
    """Submit with ``router`` or a new :class:`Router` from ``Config()``.

    Keep the router open while waiting on the result: with the ``rpc://`` backend the
    result comes back to the app that sent the task.
    """
    return (router or Router()).submit(work_request, pool=pool, needs=needs,
                                       wait_for_room_seconds=wait_for_room_seconds)
