"""Telling one agent to drain or undrain: Celery remote control, addressed to its worker.

:class:`AgentControl` sends ``chiffon_drain`` / ``chiffon_undrain`` (names in
:mod:`chiffon_worker.wire`) to exactly one worker, ``<agent_id>@<hostname>`` or the
``worker_name`` its Celery events gave, and waits a short while for the answer. An agent
that is offline gets nothing (remote-control messages are not queued for absent workers);
``chiffon drain`` records the request in the registry first, and
:mod:`~chiffon_worker.orchestrator.drain_enforcer` sends it again once the agent is back.
Used by the CLI and the orchestrator; JSON only, like every chiffon client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kombu.exceptions import OperationalError

from chiffon_worker.broker_permissions import permission_refused
from chiffon_worker.broker_tls import BrokerTls
from chiffon_worker.config import mask_url
from chiffon_worker.errors import BrokerLoginRefused
from chiffon_worker.wire import DRAIN_CONTROL_COMMAND, UNDRAIN_CONTROL_COMMAND

if TYPE_CHECKING:
    from chiffon_worker.orchestrator.registry import AgentRecord

log = logging.getLogger(__name__)

#: How long to wait for an agent's answer (seconds).
REPLY_TIMEOUT_SECONDS = 2.0
#: How long to try reaching the broker before giving up (seconds).
CONNECT_TIMEOUT_SECONDS = 4.0


@dataclass(frozen=True, slots=True)
class ControlAnswer:
    """What came back: the agent's answer (None: it did not answer within the timeout),
    or why nothing could be sent (``error``: the broker could not be reached)."""

    answer: dict[str, Any] | None = None
    error: str | None = None
    worker: str = ""
    #: a fault retrying cannot fix (a refused login or permission, a failed TLS
    #: handshake), as the one-line error the command stops with
    fatal: BrokerLoginRefused | None = None

    @property
    def answered(self) -> bool:
        """Whether the agent answered (and did not refuse the command)."""
        return self.answer is not None and "error" not in self.answer

    @property
    def refusal(self) -> str | None:
        """The agent's error when it answered with one (an older chiffon: no such command)."""
        if self.answer is None:
            return None
        error = self.answer.get("error")
        return None if error is None else str(error)


def worker_name(record: AgentRecord) -> str:
    """The Celery node name of ``record``'s worker (the name its events gave, else the
    agent's default, ``<agent_id>@<hostname>``)."""
    if record.signs is not None and record.signs.worker_name:
        return record.signs.worker_name
    return f"{record.agent_id}@{record.hostname}"


class AgentControl:
    """Sends remote-control commands to single agents through ``broker_url``."""

    def __init__(self, broker_url: str, *,
                 reply_timeout_seconds: float = REPLY_TIMEOUT_SECONDS,
                 tls: BrokerTls | None = None) -> None:
        self.broker_url = broker_url
        #: TLS to an amqps:// or rediss:// broker (default: the system's CAs)
        self.tls = tls or BrokerTls()
        self.reply_timeout_seconds = reply_timeout_seconds
        self._app: Any = None

    @property
    def app(self) -> Any:
        """The Celery client app (created on first use; JSON only)."""
        if self._app is None:
            from celery import Celery

            app = Celery("chiffon-control", broker=self.broker_url, set_as_current=False)
            app.conf.update(accept_content=["json"], task_serializer="json",
                            result_serializer="json",
                            broker_connection_timeout=CONNECT_TIMEOUT_SECONDS,
                            **self.tls.celery_settings(self.broker_url))
            self._app = app
        return self._app

    def drain(self, record: AgentRecord, *, by: str, at: float) -> ControlAnswer:
        """Tell ``record``'s agent to stop taking pool work (``by``: who asked; ``at``:
        when, unix seconds)."""
        return self.send(record, DRAIN_CONTROL_COMMAND,
                         {"requested_by": by, "requested_at": at})

    def undrain(self, record: AgentRecord) -> ControlAnswer:
        """Tell ``record``'s agent to take pool work again."""
        return self.send(record, UNDRAIN_CONTROL_COMMAND, {})

    def send(self, record: AgentRecord, command: str, arguments: dict[str, Any]
             ) -> ControlAnswer:
        """Send ``command`` to ``record``'s worker alone and wait for its answer."""
        name = worker_name(record)
        connection = self.app.connection_for_write()
        errors = (OperationalError, OSError, *connection.connection_errors,
                  *connection.channel_errors)
        try:
            connection.ensure_connection(max_retries=1, interval_start=0.2,
                                         timeout=CONNECT_TIMEOUT_SECONDS)
            replies = self.app.control.broadcast(
                command, arguments=arguments, destination=[name], reply=True,
                timeout=self.reply_timeout_seconds, connection=connection)
        except errors as exc:
            log.debug("cannot send %s to %s: %s", command, name, exc)
            masked = mask_url(self.broker_url)
            fatal = permission_refused(f"chiffon {command.removeprefix('chiffon_')}",
                                       "submitter", exc) or self.tls.refusal(masked, exc)
            return ControlAnswer(error=str(fatal) if fatal else
                                 f"cannot reach the broker at {masked}: {exc}",
                                 worker=name, fatal=fatal)
        finally:
            connection.release()
        for reply in replies or ():
            if isinstance(reply, dict) and name in reply:
                answer = reply[name]
                return ControlAnswer(answer if isinstance(answer, dict) else {"ok": answer},
                                     worker=name)
        return ControlAnswer(worker=name)

    def close(self) -> None:
        """Close the client app's connections."""
        if self._app is not None:
            self._app.close()
            self._app = None

    def __enter__(self) -> AgentControl:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
