"""Orchestrator subcommands of ``chiffon``: orchestrator, status, history, submit.

``chiffon_worker.cli`` calls :func:`add_commands`. Handlers take the parsed arguments and
return an exit status; expected failures raise ChiffonError subclasses, which the CLI
prints as one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from chiffon_worker.config import Config
from chiffon_worker.errors import ChiffonError, ProtocolError, RoutingError

EXIT_OK = 0
EXIT_FAILED = 1


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def add_commands(subparsers: Any) -> None:
    """Register the orchestrator subcommands on ``chiffon``'s subparsers."""
    orch = subparsers.add_parser(
        "orchestrator", help="run the heartbeat consumer, registry and /metrics",
        description="Consume heartbeats into the registry and serve Prometheus /metrics "
                    "until SIGTERM or SIGINT.")
    orch.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                      help="port for /metrics (0 disables; default: config metrics_port)")
    orch.add_argument("--metrics-addr", default="0.0.0.0", metavar="ADDR",
                      help="address /metrics listens on (default 0.0.0.0)")
    orch.add_argument("--queue", default=None, metavar="NAME",
                      help="heartbeat queue to consume (default chiffon.heartbeats)")
    orch.set_defaults(handler=cmd_orchestrator)

    status = subparsers.add_parser("status", help="the agents in the registry")
    status.add_argument("--json", action="store_true", help="a JSON array, one object per agent")
    status.add_argument("--pool", help="only agents of this pool")
    status.add_argument("--watch", nargs="?", type=float, const=2.0, default=None,
                        metavar="SECONDS", help="refresh every SECONDS (default 2) until Ctrl-C")
    status.set_defaults(handler=cmd_status)

    history = subparsers.add_parser("history", help="plot one agent's load, memory and VRAM")
    history.add_argument("agent", metavar="AGENT", help="agent id")
    history.add_argument("--png", type=Path, metavar="PATH",
                         help="write a PNG instead (needs matplotlib)")
    history.add_argument("--width", type=int, default=60, help="sparkline width (characters)")
    history.set_defaults(handler=cmd_history)

    submit = subparsers.add_parser(
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


# -- chiffon orchestrator ---------------------------------------------------------------------

def cmd_orchestrator(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; exits 0 on a clean stop."""
    from chiffon_worker.orchestrator.service import Orchestrator, run_orchestrator
    from chiffon_worker.wire import HEARTBEAT_QUEUE

    config = Config()
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ChiffonError(f"--metrics-port {args.metrics_port} is not a port (0-65535)")
    package_logger = logging.getLogger("chiffon_worker")
    if package_logger.getEffectiveLevel() > logging.getLevelName(config.log_level):
        package_logger.setLevel(config.log_level)
    run_orchestrator(Orchestrator(config, metrics_port=args.metrics_port,
                                  queue=args.queue or HEARTBEAT_QUEUE,
                                  metrics_addr=args.metrics_addr))
    return EXIT_OK


# -- chiffon status -------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    """Print the registry once, or every ``--watch`` seconds until Ctrl-C."""
    from chiffon_worker.orchestrator.registry import Registry

    if args.watch is not None and args.watch <= 0:
        raise ChiffonError("--watch needs a positive number of seconds")
    with Registry.from_config(Config()) as registry:
        if args.watch is None:
            _print_status(registry, args)
            return EXIT_OK
        try:
            while True:
                sys.stdout.write("\x1b[H\x1b[2J")
                _out(f"chiffon status, every {args.watch:g} s  "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                _print_status(registry, args)
                time.sleep(args.watch)
        except KeyboardInterrupt:
            return EXIT_OK


def _print_status(registry: Any, args: argparse.Namespace) -> None:
    from chiffon_worker.orchestrator.status import render_status, status_object

    now = time.time()
    records = registry.agents(args.pool, with_snapshot=args.json)
    if args.json:
        _out(json.dumps([status_object(r, now) for r in records], indent=2))
    else:
        _out(render_status(records, now))


# -- chiffon history ------------------------------------------------------------------------

def cmd_history(args: argparse.Namespace) -> int:
    """Sparklines of an agent's history, or a PNG with ``--png``."""
    from chiffon_worker.orchestrator.charts import render_history, save_png
    from chiffon_worker.orchestrator.registry import Registry

    if args.width < 10:
        raise ChiffonError("--width must be at least 10")
    with Registry.from_config(Config()) as registry:
        record = registry.agent(args.agent, with_snapshot=False)
        if record is None:
            raise ChiffonError(f"no agent {args.agent!r} in the registry")
        points = registry.history(args.agent)
    title = f"{record.agent_id} ({record.hostname}, pool {record.pool})"
    if args.png:
        if not points:
            raise ChiffonError(f"{title} has no history yet")
        save_png(title, points, args.png)
        _out(f"wrote {args.png}")
    else:
        _out(render_history(title, points, args.width))
    return EXIT_OK


# -- chiffon submit -------------------------------------------------------------------------

def parse_needs(text: str) -> dict[str, float]:
    """``{"gpu_vram_gb": 8}`` or ``gpu_vram_gb=8,cores=4`` -> a dict of floats."""
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
            _out(json.dumps({"work_id": request.work_id, "queue": submission.queue,
                             "agent_id": submission.agent_id}))
            return EXIT_OK
        sys.stderr.write(f"submitted {request.work_id} to {where}; waiting up to "
                         f"{args.timeout:g} s\n")
        result = submission.wait(args.timeout)
    _out(result.to_json())
    return EXIT_OK if result.status == "success" else EXIT_FAILED
