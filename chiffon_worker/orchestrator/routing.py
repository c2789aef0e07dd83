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
are durable with a direct exchange of the same name and routing key = queue name.

Capacity routing (``needs``, in the snapshot's units): ``gpu_vram_gb`` (GiB free VRAM on
the primary GPU), ``cores`` (``cpu_cores_available``), ``memory_gb`` (GiB available
memory). Among online agents (of ``pool`` if given) that meet every need, the one with
the most headroom wins: the largest ``min(available / needed)`` over the requested
resources (with no positive need: the most free cores); ties go to the lowest agent id.
An agent whose free VRAM is unknown (``gpu_vram_known`` false) never meets a positive
``gpu_vram_gb`` need: it is neither free nor full, so nothing can be promised there. The
flat VRAM figures come from the primary GPU that is not unhealthy, so a faulted GPU is
never routed to. Nothing is reserved: two quick submits may pick the same agent until
its next heartbeat shows the load.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kombu.entity import Queue
from kombu.exceptions import OperationalError

from chiffon_worker.config import Config, mask_url
from chiffon_worker.errors import ChiffonError, ProtocolError, RoutingError
from chiffon_worker.orchestrator.registry import AgentRecord, Registry
from chiffon_worker.protocol import WorkRequest, WorkResult
from chiffon_worker.snapshot import NEED_FIELDS
from chiffon_worker.wire import EXECUTE_WORK_TASK, agent_queue_name, declared_queue, is_queue_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Need:
    """A routable resource: the registry attribute holding it and how to say it."""

    attribute: str
    unit: str
    noun: str


#: ``needs`` keys -> the agent attribute they are compared with (the snapshot fields
#: declared with a ``Need``).
NEEDS: dict[str, Need] = {
    f.need.key: Need(f.name, f.unit_suffix, f.need.noun) for f in NEED_FIELDS
    if f.need is not None}


def work_queue(name: str) -> Queue:
    """A work queue as agents declare it: durable, direct exchange named like the queue."""
    if not is_queue_name(name):
        raise RoutingError(f"{name!r} is not a valid queue name")
    return declared_queue(name)


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


def available(record: AgentRecord, key: str) -> float | None:
    """What ``record`` has free of need ``key``; ``None`` when the agent does not know
    (free VRAM of an Intel GPU, a runtime-suspended one): it cannot be promised."""
    flag = KNOWN_FLAGS.get(key)
    if flag is not None and record.metrics.get(flag) is False:
        return None
    return record.number(NEEDS[key].attribute)


def _headroom(record: AgentRecord, needs: Mapping[str, float]) -> float:
    ratios = [(available(record, key) or 0.0) / need for key, need in needs.items() if need > 0]
    return min(ratios) if ratios else record.number("cpu_cores_available")


def _fits(record: AgentRecord, needs: Mapping[str, float]) -> bool:
    for key, need in needs.items():
        have = available(record, key)
        if need > 0 and (have is None or have < need):
            return False
    return True


def _has(record: AgentRecord, key: str) -> str:
    have = available(record, key)
    if have is None:
        return f"unknown {NEEDS[key].noun}"
    return f"{_fmt(have)}{NEEDS[key].unit} {NEEDS[key].noun}"


def pick_agent(records: Iterable[AgentRecord], needs: Mapping[str, Any], *,
               pool: str | None = None, now: float | None = None) -> AgentRecord:
    """The online agent (of ``pool``) with the most headroom meeting ``needs``.

    ``now`` is unix seconds (default: the current time). Raises RoutingError naming the
    pool, the needs, and the closest candidate when none fits.
    """
    wanted = check_needs(needs)
    moment = time.time() if now is None else now
    where = f" in pool {pool}" if pool else ""
    known = [r for r in records if pool is None or r.pool == pool]
    online = [r for r in known if r.liveness(moment) == "online"]
    if not online:
        detail = f" ({len(known)} known, all offline)" if known else ""
        raise RoutingError(f"no online agent{where}{detail}")
    ranked = sorted(online, key=lambda r: (-_headroom(r, wanted), r.agent_id))
    for record in ranked:
        if _fits(record, wanted):
            return record
    best = ranked[0]
    asked = " and ".join(f"{_fmt(v)}{NEEDS[k].unit} {NEEDS[k].noun}" for k, v in wanted.items())
    short = [k for k, v in wanted.items() if not _fits(best, {k: v})]
    has = ", ".join(_has(best, k) for k in short)
    raise RoutingError(f"no online agent{where} has {asked}; best has {has} "
                       f"({best.agent_id})")


class Submission:
    """A submitted work request: where it went, and a way to wait for its result."""

    def __init__(self, request: WorkRequest, queue: str, agent_id: str | None,
                 async_result: Any) -> None:
        self.request = request
        self.queue = queue
        self.agent_id = agent_id
        self.async_result = async_result

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
            return WorkResult.failure(self.work_id, f"{type(value).__name__}: {value}",
                                      self.agent_id or "")
        try:
            return WorkResult.from_json(value)
        except ProtocolError as exc:
            raise ChiffonError(f"work {self.work_id} returned an invalid result: {exc}"
                               ) from None


class Router:
    """Submits work through a Celery client app (JSON only); reads the registry to route.

    Arguments default to ``Config()``: ``effective_broker_url``,
    ``effective_result_backend`` and the registry at ``effective_database_url`` (opened
    on the first capacity submit).
    """

    def __init__(self, config: Config | None = None, *, registry: Registry | None = None,
                 broker_url: str | None = None, result_backend: str | None = None) -> None:
        if config is None and not (broker_url and result_backend):
            config = Config()
        self._config = config
        self._registry = registry
        self._owns_registry = False
        self.broker_url = broker_url or (config.effective_broker_url if config else "")
        self.result_backend = result_backend or (
            config.effective_result_backend if config else "")
        self._app: Any = None

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
               needs: Mapping[str, Any] | None = None) -> Submission:
        """Publish ``request``: to the best agent for ``needs``, else to ``pool``'s queue.

        Without ``needs`` or ``pool`` the configured ``agent_pool_name`` is used.
        """
        agent_id: str | None = None
        if needs is not None:
            chosen = pick_agent(self.registry.agents(pool), needs, pool=pool)
            agent_id = chosen.agent_id
            queue = agent_queue_name(agent_id)
        else:
            queue = pool or (self._config or Config()).agent_pool_name
        declaration = work_queue(queue)
        try:
            async_result = self.app.send_task(
                EXECUTE_WORK_TASK, args=[request.to_dict()], task_id=request.work_id,
                queue=declaration, serializer="json")
        except (OSError, OperationalError) as exc:
            raise RoutingError(f"cannot publish to {queue} on {mask_url(self.broker_url)}: "
                               f"{exc}") from None
        log.info("work %s (%s) -> %s", request.work_id, request.work_type, queue)
        return Submission(request, queue, agent_id, async_result)

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
           needs: Mapping[str, Any] | None = None, router: Router | None = None
           ) -> Submission:
    """Submit with ``router`` or a new :class:`Router` from ``Config()``.

    Keep the router open while waiting on the result: with the ``rpc://`` backend the
    result comes back to the app that sent the task.
    """
    return (router or Router()).submit(work_request, pool=pool, needs=needs)
