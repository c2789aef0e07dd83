"""A permission the broker refused, as one line naming the role and the permission.

RabbitMQ checks three permissions per user and vhost, each a regex over resource names
(queues and exchanges alike): *configure* (declare, delete), *write* (publish to an
exchange; bind a queue), *read* (consume, get, purge a queue; bind to an exchange). A
logged-in user that lacks one gets its channel closed with ``ACCESS_REFUSED`` (403)::

    ACCESS_REFUSED - access to queue 'x' in vhost 'y' refused for user 'z'        (3.x)
    ACCESS_REFUSED - write access to exchange 'x' in vhost 'y' refused for user 'z'

RabbitMQ 3.10 does not say which permission it refused; the AMQP method the channel was
closed for does (py-amqp keeps it in ``method_sig``), so :func:`denial_in` reads both.
:func:`permission_refused` turns such an error into
:class:`~chiffon_worker.errors.BrokerPermissionRefused` (a ``BrokerLoginRefused``: every
entry point stops on it with exit status 2 and one line, no retry). The roles and their
permissions are in docs/security.md, "Broker users and permissions", and
``deploy/rabbitmq-users.sh``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from chiffon_worker.errors import BrokerPermissionRefused, refusal_in_chain

#: The roles, as deploy/rabbitmq-users.sh names them.
AGENT = "agent"
ORCHESTRATOR = "orchestrator"
SUBMITTER = "submitter"
FLOWER = "flower"

_DENIAL = re.compile(
    r"^(?:ACCESS_REFUSED - )?(?:(?P<permission>configure|write|read) )?access to "
    r"(?P<kind>queue|exchange|topic) '(?P<name>.*)' in vhost '(?P<vhost>.*)' "
    r"refused for user '(?P<user>.*)'$", re.DOTALL)

#: The permission each AMQP method (class id, method id) needs, by the kind of resource
#: refused: a binding needs write on the queue (or destination) and read on the exchange.
_NEEDED: dict[tuple[int, int], dict[str, str]] = {
    (40, 10): {"exchange": "configure"},                    # exchange.declare
    (40, 20): {"exchange": "configure"},                    # exchange.delete
    (40, 30): {"exchange": "write or read"},                # exchange.bind
    (40, 40): {"exchange": "write or read"},                # exchange.unbind
    (50, 10): {"queue": "configure"},                       # queue.declare
    (50, 20): {"queue": "write", "exchange": "read"},       # queue.bind
    (50, 30): {"queue": "read"},                            # queue.purge
    (50, 40): {"queue": "configure"},                       # queue.delete
    (50, 50): {"queue": "write", "exchange": "read"},       # queue.unbind
    (60, 20): {"queue": "read"},                            # basic.consume
    (60, 40): {"exchange": "write"},                        # basic.publish
    (60, 70): {"queue": "read"},                            # basic.get
}


@dataclass(frozen=True)
class Denial:
    """What the broker refused: ``permission`` (``configure``, ``write``, ``read``; or
    ``configure, write or read`` when neither the text nor the method tells) on the
    ``kind`` (``queue``, ``exchange``) named ``name`` in ``vhost``, to ``user``."""

    permission: str
    kind: str
    name: str
    vhost: str
    user: str


def parse_denial(reply_text: str, method_sig: tuple[int, int] | None = None
                 ) -> Denial | None:
    """The denial a RabbitMQ ``ACCESS_REFUSED`` reply text describes (with the method that
    was refused, ``(class id, method id)``, when the text does not name the permission);
    None for other texts (a refused login, a refused vhost)."""
    match = _DENIAL.match(reply_text)
    if match is None:
        return None
    kind = match["kind"]
    permission = match["permission"] or _NEEDED.get(method_sig or (0, 0), {}).get(
        kind, "configure, write or read")
    return Denial(permission, kind, match["name"], match["vhost"], match["user"])


def denial_in(exc: BaseException) -> Denial | None:
    """The permission denial ``exc`` carries (itself, or its cause/context chain), or None
    when it is another fault (a refused login, an outage, a missing queue...)."""
    refusal = refusal_in_chain(exc)
    reply = getattr(refusal, "reply_text", None)
    if not isinstance(reply, str):
        return None
    sig = getattr(refusal, "method_sig", None)
    return parse_denial(reply, sig if isinstance(sig, tuple) and len(sig) == 2 else None)


def permission_refused(what: str, role: str, exc: BaseException
                       ) -> BrokerPermissionRefused | None:
    """``exc`` as the one-line error of ``what`` (``chiffon submit``, ``the agent``...)
    run in ``role`` when it is a permission the broker refused; else None."""
    denial = denial_in(exc)
    if denial is None:
        return None
    return BrokerPermissionRefused(what, role, permission=denial.permission,
                                   kind=denial.kind, name=denial.name, vhost=denial.vhost,
                                   user=denial.user)
