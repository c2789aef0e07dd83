"""The heartbeat route (exchange, queue and binding ``chiffon.heartbeats``), declared only
by whoever may: least privilege for agents.

The heartbeat exchange and queue share one name, and RabbitMQ's permissions are regexes
over names: binding the queue to the exchange needs *read* on the exchange, which is read
on the queue too. So a broker user that may declare the whole route may also consume (and,
with *configure*, delete) everyone's heartbeats. An agent's least-privilege user therefore
gets *write* only on ``chiffon.heartbeats`` (publish), and the orchestrator declares the
route, durably, on its start (docs/security.md, "Broker users and permissions").

Before the first heartbeat on each connection the sender asks :func:`declarations`:

- On RabbitMQ the exchange and the queue are looked up with passive declares (RabbitMQ
  checks no permission for them). Both there: nothing to declare, the heartbeat is
  published (write on the exchange is all it takes).
- Either missing: the whole route is declared, as before this module (a user allowed to,
  guest in a test or a lab, sees no difference). Refused (``ACCESS_REFUSED``: a
  least-privilege agent on a vhost where no orchestrator ever started):
  :class:`HeartbeatRouteMissing`, and that heartbeat is not sent (it would be dropped as
  unroutable, or refused by a missing exchange); the next one asks again. Heartbeats are
  transient and expire anyway, so none is worth keeping until an orchestrator comes.
- Other transports (Redis) have no permissions: the route is declared as before.

Each refused or failed declare closes only the channel it was made on (a channel of its
own, closed here), never the connection the heartbeat is published on.
"""

from __future__ import annotations

import logging
from typing import Any

from amqp.exceptions import AccessRefused, NotFound
from kombu.entity import Queue

from chiffon_worker.errors import ChiffonError

log = logging.getLogger(__name__)


class HeartbeatRouteMissing(ChiffonError):
    """The heartbeat exchange or queue does not exist and this user may not declare it."""


def declarations(connection: Any, route: Queue) -> list[Any]:
    """What to declare when publishing heartbeats on ``connection`` (kombu, connected or
    not) to ``route`` (``wire.heartbeat_queue``): nothing on RabbitMQ once the route exists
    (declared here when it is missing and the user may), ``[route]`` elsewhere.

    Raises HeartbeatRouteMissing when the route is missing and declaring it was refused;
    connection errors propagate."""
    if connection.transport.driver_type != "amqp":
        return [route]
    # connect as the publish would (the retry policy of the connection's transport options)
    connection.default_channel  # noqa: B018
    if _exists(connection, route):
        return []
    channel = connection.channel()
    try:
        route(channel).declare()
    except AccessRefused as exc:
        raise HeartbeatRouteMissing(
            f"the broker has no {route.name} queue and exchange yet, and this agent's user "
            f"may not declare them ({exc.reply_text}); an orchestrator declares them when it "
            "starts (least privilege: docs/security.md)") from None
    finally:
        _close(channel)
    log.info("declared the heartbeat route %s (it did not exist yet)", route.name)
    return []


def _exists(connection: Any, route: Queue) -> bool:
    """Whether the exchange and the queue of ``route`` exist (passive declares, which
    need no permission)."""
    channel = connection.channel()
    try:
        channel.exchange_declare(route.exchange.name, route.exchange.type, passive=True)
        channel.queue_declare(route.name, passive=True)
    except NotFound:
        return False  # the broker closed the channel
    finally:
        _close(channel)
    return True


def _close(channel: Any) -> None:
    """Close ``channel`` unless the broker already did."""
    if getattr(channel, "is_open", False):
        channel.close()
