"""The agent's Celery settings as ``celery inspect conf`` and Flower's Config tab show them.

Celery's own ``conf`` reply has two faults for an operator: its hidden-settings filter
masks every setting whose name contains KEY, PASS, API, DATABASE... (so
``task_default_routing_key`` and a route's ``routing_key`` read ``********``), and values
it cannot turn into JSON come out as Python reprs (``<class '...Consumer'>``,
``<function ...>``). :func:`shown_settings` shows instead:

- secrets masked, nothing else: a URL's password (``amqp://user:**@host/vhost``, in any
  string holding ``://``, each URL of a failover list) and the value of a setting whose
  name says it is a secret (:data:`SECRET_NAME`: password, secret such as
  ``heartbeat_secret``, token, API/access/private key, credentials, signature, connection
  string, ``security_key``) as ``**``; an empty secret shows as it is (not set);
- classes and functions by import path (``chiffon_worker.worker.consumer:Consumer``, the
  form Celery settings accept), enumerations by name (``CERT_REQUIRED``), queues as their
  name, exchange, routing key, durability and arguments, exchanges by name, durations in
  seconds; anything else as its text (``<freq: 30.00 seconds>`` without the brackets), or
  its type's import path where that text is Python's default ``<... object at 0x...>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta
from enum import Enum
from typing import Any

from kombu.entity import Exchange, Queue

from chiffon_worker.config import mask_url

#: What a masked secret shows as (as ``chiffon config show`` masks them).
MASK = "**"
#: Setting names whose values are secrets (matched anywhere in the name, any case).
SECRET_NAME = re.compile(
    r"passw|secret|token|api_?key|access_?key|private_?key|credential|signature"
    r"|connection_?string|^security_key$",
    re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Whether a setting called ``name`` holds a secret (its value is never shown)."""
    return bool(SECRET_NAME.search(name))


def import_path(thing: Any) -> str:
    """``module:qualname`` of a class or function (Celery's notation for both)."""
    module = getattr(thing, "__module__", None) or "?"
    name = getattr(thing, "__qualname__", None) or getattr(thing, "__name__", None) \
        or type(thing).__qualname__
    return f"{module}:{name}"


def queue_view(queue: Queue) -> dict[str, Any]:
    """A queue as an operator reads it: where it is bound and how it is declared."""
    exchange = queue.exchange
    return {"name": queue.name,
            "exchange": exchange.name if exchange is not None else None,
            "exchange_type": exchange.type if exchange is not None else None,
            "routing_key": queue.routing_key,
            "durable": queue.durable,
            "queue_arguments": shown_value("queue_arguments",
                                           getattr(queue, "queue_arguments", None))}


def shown_value(name: str, value: Any) -> Any:
    """``value`` of the setting (or nested key) ``name``, as JSON that shows no secret and
    no Python repr (see the module docstring)."""
    if is_secret_name(name) and value not in (None, ""):
        return MASK
    if isinstance(value, Enum):  # ssl.CERT_REQUIRED, ssl.TLSVersion.TLSv1_2: by name
        return value.name
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return mask_url(value) if "://" in value else value
    if isinstance(value, Mapping):
        return {str(key): shown_value(str(key), item) for key, item in value.items()}
    if isinstance(value, Queue):
        return queue_view(value)
    if isinstance(value, Exchange):
        return value.name
    if isinstance(value, list | tuple | set | frozenset):
        return [shown_value(name, item) for item in value]
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, type) or callable(value):
        return import_path(value)
    text = str(value)
    if not text.startswith("<"):
        return text
    if " at 0x" in text:  # object's default repr: says nothing but its type
        return import_path(type(value))
    return text.strip("<>")  # a repr that says something: "<freq: 30.00 seconds>"


def shown_settings(table: Mapping[Any, Any]) -> dict[str, Any]:
    """Celery's settings table (``app.conf.table(censored=False)``) as it may be shown;
    names that are not text or start with ``_`` are left out, as Celery does."""
    return {key: shown_value(key, value) for key, value in table.items()
            if isinstance(key, str) and not key.startswith("_")}
