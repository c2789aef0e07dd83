"""``chiffon submit``: send one WorkRequest to a pool, or to the online agent that fits
``--needs`` best, and optionally wait for its WorkResult.

PAYLOAD is JSON text, ``@path`` (a file of JSON) or ``-`` (JSON on stdin), at most the
protocol's :data:`~chiffon_worker.protocol.MAX_MESSAGE_BYTES`. Before anything is sent the
broker is reached once (a refused login is exit status 2, as a bad config file), and a
pool submit checks that the pool has an online agent (``--queue-anyway`` skips that), so
work never waits for ever in a queue nobody consumes. Broker faults are one line; a
declare or publish the broker refuses for want of a permission (publishes are confirmed)
is exit status 2 and one line naming the role (submitter) and the missing permission.

Routing reads the registry, so the handler imports the orchestrator extra lazily (see
:mod:`chiffon_worker.cli.orchestrator_extra`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from chiffon_worker.broker_permissions import SUBMITTER, permission_refused
from chiffon_worker.broker_tls import BrokerTls
from chiffon_worker.cli.command_types import Subcommands
from chiffon_worker.cli.orchestrator_extra import needs_orchestrator_extra
from chiffon_worker.cli.output import emit
from chiffon_worker.config import Config, mask_url
from chiffon_worker.errors import (
    EXIT_ERROR,
    EXIT_OK,
    ChiffonError,
    ProtocolError,
    RoutingError,
)
from chiffon_worker.protocol import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from chiffon_worker.orchestrator.routing import Router, Submission
    from chiffon_worker.protocol import WorkRequest

#: How long one attempt to reach the broker may take before submit gives up (seconds).
BROKER_CONNECT_TIMEOUT_SECONDS = 5.0
#: Bytes read at a time from a payload file or stdin.
_READ_CHUNK_BYTES = 1 << 16


def add_submit_command(subcommands: Subcommands) -> None:
    """Register ``submit``."""
    submit = subcommands.add_parser(
        "submit", help="send a WorkRequest to a pool or to the best-fitting agent")
    submit.add_argument("work_type", metavar="WORK_TYPE")
    submit.add_argument("payload", metavar="PAYLOAD", nargs="?", default="{}",
                        help="JSON payload, @FILE to read it from a file, or - to read it "
                             f"from stdin; at most {_size_label(MAX_MESSAGE_BYTES)} "
                             "(default {})")
    submit.add_argument("--pool", help="pool queue (default: config agent_pool_name); with "
                                       "--needs, only agents of this pool are considered")
    submit.add_argument("--needs", metavar="NEEDS",
                        help="route to the online agent with the most headroom: JSON or "
                             "k=v,... with gpu_vram_gb, cores, memory_gb")
    submit.add_argument("--queue-anyway", action="store_true",
                        help="without --needs: queue the work even if no agent of the pool is "
                             "online now; it waits in the durable pool queue until one "
                             "consumes it")
    submit.add_argument("--wait-for-room", type=float, default=0.0, metavar="SECONDS",
                        help="with --needs: when no online agent has room (or none is "
                             "online), try again every second for up to SECONDS (work "
                             "ending frees room) instead of failing at once")
    submit.add_argument("--wake", type=float, default=0.0, metavar="SECONDS",
                        help="with --needs: when no awake agent fits, wake the sleeping "
                             "agent that fits best (Wake-on-LAN, wake_broadcast_address and "
                             "wake_port) and wait up to SECONDS for it to take the work")
    submit.add_argument("--work-id", help="work id (default: a new UUID)")
    submit.add_argument("--wait", action="store_true", help="wait for and print the result")
    submit.add_argument("--timeout", type=float, default=60.0,
                        help="seconds --wait waits (default 60)")
    submit.set_defaults(handler=cmd_submit)


# -- the payload ------------------------------------------------------------------------------

def _size_label(size: int) -> str:
    """``1 MiB (1048576 bytes)`` for a size in bytes."""
    return f"{size / (1 << 20):g} MiB ({size} bytes)"


def _read_capped(stream: IO[bytes]) -> tuple[bytes | None, int]:
    """Read ``stream`` to its end: its bytes (None when over ``MAX_MESSAGE_BYTES``, which
    are then counted but not kept) and its size in bytes."""
    chunks: list[bytes] = []
    size = 0
    while chunk := stream.read(_READ_CHUNK_BYTES):
        size += len(chunk)
        if size <= MAX_MESSAGE_BYTES:
            chunks.append(chunk)
    return (b"".join(chunks) if size <= MAX_MESSAGE_BYTES else None), size


def _payload_bytes(argument: str) -> tuple[str, bytes | None, int]:
    """PAYLOAD's label for messages, its bytes (None when too big) and its size (bytes)."""
    if argument == "-":
        stdin = getattr(sys.stdin, "buffer", None)
        if stdin is None:  # a text-only stand-in for stdin
            return ("payload from stdin", *_capped_text(sys.stdin.read()))
        return ("payload from stdin", *_read_capped(stdin))
    if argument.startswith("@"):
        path = Path(argument[1:]).expanduser()
        try:
            with path.open("rb") as stream:
                return (f"payload {argument}", *_read_capped(stream))
        except OSError as exc:
            raise ProtocolError("payload", f"cannot read {path}: {exc.strerror or exc}"
                                ) from None
    return ("payload", *_capped_text(argument))


def _capped_text(text: str) -> tuple[bytes | None, int]:
    """``text`` as UTF-8 bytes (None when over ``MAX_MESSAGE_BYTES``) and its size (bytes)."""
    data = text.encode("utf-8", "surrogateescape")
    return (data if len(data) <= MAX_MESSAGE_BYTES else None), len(data)


def read_payload(argument: str) -> Any:
    """The JSON value PAYLOAD stands for: JSON text, ``@path`` or ``-`` (stdin).

    Raises ProtocolError (one line) for an unreadable file, a payload over
    ``MAX_MESSAGE_BYTES`` (stating the limit and the size) or invalid JSON.
    """
    label, data, size = _payload_bytes(argument)
    if data is None:
        raise ProtocolError(label, f"{size} bytes is more than the "
                                   f"{_size_label(MAX_MESSAGE_BYTES)} a work request may carry")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError(label, "is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(label, f"is not valid JSON: {exc}") from None


# -- --needs ------------------------------------------------------------------------------------

def parse_needs(text: str) -> dict[str, float]:
    """``{"gpu_vram_gb": 8}`` or ``gpu_vram_gb=8,cores=4`` -> a dict of floats."""
    with needs_orchestrator_extra("submit"):
        from chiffon_worker.orchestrator.routing import check_needs

    raw: Any
    if text.strip().startswith("{"):
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise RoutingError(f"--needs is not valid JSON: {exc}") from None
    else:
        raw = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise RoutingError(f"--needs: {part!r} is not key=value")
            try:
                raw[key.strip()] = float(value)
            except ValueError:
                raise RoutingError(f"--needs: {key.strip()} must be a number, got {value!r}"
                                   ) from None
    if not isinstance(raw, dict) or not raw:
        raise RoutingError("--needs must name at least one resource")
    return check_needs(raw)


# -- the broker and the pool ------------------------------------------------------------------

def _broker_error_types() -> tuple[type[BaseException], ...]:
    """What kombu, py-amqp and redis-py raise when the broker fails or refuses."""
    from amqp.exceptions import AMQPError
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    return (OperationalError, AMQPError, RedisError, OSError)


def _describe(exc: BaseException) -> str:
    """A broker error in words: the AMQP reply text, else the message, else the class."""
    reply = getattr(exc, "reply_text", None)
    return reply if isinstance(reply, str) and reply else str(exc) or type(exc).__name__


@contextmanager
def broker_faults(broker_url: str, tls: BrokerTls | None = None) -> Iterator[None]:
    """Turn broker errors raised in the block into one-line ChiffonErrors: a permission
    the broker refused into BrokerPermissionRefused (role submitter), a refused login or a
    failed TLS handshake (also one wrapped in a ChiffonError) into BrokerLoginRefused or
    BrokerTlsFailed (all exit 2), anything else into ``broker <url>: <what happened>``
    (exit 1). The URL is shown masked; ``tls`` names the TLS files at fault."""
    errors = _broker_error_types()
    masked = mask_url(broker_url)
    tls = tls or BrokerTls()
    try:
        yield
    except ChiffonError as exc:
        refused = permission_refused("chiffon submit", SUBMITTER, exc) \
            or tls.refusal(masked, exc)
        if refused is None:
            raise
        raise refused from None
    except errors as exc:
        refused = permission_refused("chiffon submit", SUBMITTER, exc) \
            or tls.refusal(masked, exc)
        raise refused or ChiffonError(f"broker {masked}: {_describe(exc)}") from None


def connect_broker(broker_url: str, tls: BrokerTls | None = None) -> None:
    """Open one connection to the broker and close it: a refused login, a failed TLS
    handshake or an unreachable broker fails here, before anything is reserved or
    published. Each URL of a failover list is tried once, for up to
    ``BROKER_CONNECT_TIMEOUT_SECONDS`` each; ``tls``: TLS to an amqps:// or rediss://
    broker."""
    from kombu.connection import Connection

    conn = Connection(broker_url, connect_timeout=BROKER_CONNECT_TIMEOUT_SECONDS,
                      ssl=(tls or BrokerTls()).kombu_ssl(broker_url))
    try:
        conn.ensure_connection(max_retries=max(len(conn.alt), 1) - 1)
    finally:
        conn.release()


def check_pool_online(config: Config, pool: str) -> None:
    """RoutingError unless ``pool`` has an online agent in the registry of ``config``."""
    with needs_orchestrator_extra("submit"):
        from chiffon_worker.orchestrator.pools import check_pool
        from chiffon_worker.orchestrator.registry import Registry

    with Registry.from_config(config, read_only=True) as registry:
        records = registry.agents()
    try:
        check_pool(records, pool, time.time())
    except RoutingError as exc:
        raise RoutingError(f"{exc}; --queue-anyway queues the work for an agent of {pool} "
                           f"that comes later") from None


# -- chiffon submit ---------------------------------------------------------------------------

def submit_waking(router: Router, config: Config, request: WorkRequest,
                  needs: dict[str, float], *, pool: str | None, seconds: float,
                  why: RoutingError) -> Submission:
    """Wake the sleeping agent that fits ``needs`` best, then place the work, waiting up to
    ``seconds`` for it (or another agent) to take it; RoutingError when none sleeps that
    fits (saying ``why`` no awake one did)."""
    from chiffon_worker.orchestrator.waking import sleeper_for, wake_agent

    sleeper = sleeper_for(router.registry.agents(pool), needs, pool=pool, now=time.time())
    if sleeper is None:
        raise RoutingError(f"{why}; and no sleeping agent with a known MAC address fits")
    mac = wake_agent(sleeper, config.wake_broadcast_address, config.wake_port)
    sys.stderr.write(f"woke {sleeper.agent_id} ({sleeper.hostname}, {mac}); waiting up to "
                     f"{seconds:g} s for it to take the work\n")
    return router.submit(request, pool=pool, needs=needs, wait_for_room_seconds=seconds)


def cmd_submit(args: argparse.Namespace) -> int:
    """Publish one WorkRequest; with ``--wait`` print its WorkResult (exit 1 on error)."""
    with needs_orchestrator_extra("submit"):
        from chiffon_worker.orchestrator.routing import NoAgentOnline, NoFitError, Router
    from chiffon_worker.protocol import WorkRequest

    payload = read_payload(args.payload)
    needs = parse_needs(args.needs) if args.needs else None
    if args.wait and args.timeout <= 0:
        raise ChiffonError("--timeout must be positive")
    if args.wait_for_room < 0 or (args.wait_for_room and needs is None):
        raise ChiffonError("--wait-for-room needs --needs and a number of seconds >= 0")
    if args.wake < 0 or (args.wake and needs is None):
        raise ChiffonError("--wake needs --needs and a number of seconds >= 0")
    request = WorkRequest(work_id=args.work_id or str(uuid.uuid4()), work_type=args.work_type,
                          payload=payload)
    config = Config()
    pool = args.pool if needs is not None else args.pool or config.agent_pool_name
    router = Router(config)
    with broker_faults(router.broker_url, router.tls), router:
        connect_broker(router.broker_url, router.tls)
        if needs is None and not args.queue_anyway:
            check_pool_online(config, pool)
        try:
            submission = router.submit(request, pool=pool, needs=needs,
                                       wait_for_room_seconds=args.wait_for_room)
        except RoutingError as exc:
            if not args.wake or not isinstance(exc, NoFitError | NoAgentOnline):
                raise
            assert needs is not None  # checked with --wake above
            submission = submit_waking(router, config, request, needs, pool=pool,
                                       seconds=args.wake, why=exc)
        if args.wait:
            where = submission.queue + (f" (agent {submission.agent_id})"
                                        if submission.agent_id else "")
            sys.stderr.write(f"submitted {request.work_id} to {where}; waiting up to "
                             f"{args.timeout:g} s\n")
            result = submission.wait(args.timeout)
    if not args.wait:
        emit(json.dumps({"work_id": request.work_id, "queue": submission.queue,
                         "agent_id": submission.agent_id}))
        return EXIT_OK
    emit(result.to_json())
    return EXIT_OK if result.status == "success" else EXIT_ERROR
