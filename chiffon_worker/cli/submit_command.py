"""``chiffon submit``: send one WorkRequest to a pool, or to the online agent that fits
``--needs`` best, and optionally wait for its WorkResult.

Routing by ``--needs`` reads the registry, so the handler imports the orchestrator extra
lazily (see :mod:`chiffon_worker.cli.orchestrator_extra`).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any

from chiffon_worker.cli.command_types import Subcommands
from chiffon_worker.cli.orchestrator_extra import needs_orchestrator_extra
from chiffon_worker.cli.output import emit
from chiffon_worker.config import Config
from chiffon_worker.errors import EXIT_ERROR, EXIT_OK, ChiffonError, ProtocolError, RoutingError


def add_submit_command(subcommands: Subcommands) -> None:
    """Register ``submit``."""
    submit = subcommands.add_parser(
        "submit", help="send a WorkRequest to a pool or to the best-fitting agent")
    submit.add_argument("work_type", metavar="WORK_TYPE")
    submit.add_argument("payload", metavar="PAYLOAD", nargs="?", default="{}",
                        help="JSON payload (default {})")
    submit.add_argument("--pool", help="pool queue (default: config agent_pool_name); with "
                                       "--needs, only agents of this pool are considered")
    submit.add_argument("--needs", metavar="NEEDS",
                        help="route to the online agent with the most headroom: JSON or "
                             "k=v,... with gpu_vram_gb, cores, memory_gb")
    submit.add_argument("--work-id", help="work id (default: a new UUID)")
    submit.add_argument("--wait", action="store_true", help="wait for and print the result")
    submit.add_argument("--timeout", type=float, default=60.0,
                        help="seconds --wait waits (default 60)")
    submit.set_defaults(handler=cmd_submit)


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


def cmd_submit(args: argparse.Namespace) -> int:
    """Publish one WorkRequest; with ``--wait`` print its WorkResult (exit 1 on error)."""
    with needs_orchestrator_extra("submit"):
        from chiffon_worker.orchestrator.routing import Router
    from chiffon_worker.protocol import WorkRequest

    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        raise ProtocolError("payload", f"is not valid JSON: {exc}") from None
    needs = parse_needs(args.needs) if args.needs else None
    if args.wait and args.timeout <= 0:
        raise ChiffonError("--timeout must be positive")
    request = WorkRequest(work_id=args.work_id or str(uuid.uuid4()), work_type=args.work_type,
                          payload=payload)
    with Router(Config()) as router:
        submission = router.submit(request, pool=args.pool, needs=needs)
        where = submission.queue + (f" (agent {submission.agent_id})"
                                    if submission.agent_id else "")
        if not args.wait:
            emit(json.dumps({"work_id": request.work_id, "queue": submission.queue,
                             "agent_id": submission.agent_id}))
            return EXIT_OK
        sys.stderr.write(f"submitted {request.work_id} to {where}; waiting up to "
                         f"{args.timeout:g} s\n")
        result = submission.wait(args.timeout)
    emit(result.to_json())
    return EXIT_OK if result.status == "success" else EXIT_ERROR
