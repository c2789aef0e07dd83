"""The orchestrator host's commands: ``chiffon orchestrator`` (run the service),
``chiffon status`` and ``chiffon history`` (read the registry).

``status`` and ``history`` read only the registry (never the broker): their faults are
RegistryErrors, one line and exit status 1. ``orchestrator`` exits 2 with one line when the
broker refuses its login (BrokerLoginRefused); other broker faults it retries.

They need the orchestrator extra, which each handler imports lazily under
:func:`~chiffon_worker.cli.orchestrator_extra.needs_orchestrator_extra`; the views they
print (``status_table``, ``history_charts``, ``orchestrator.agent_view``) do not.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from chiffon_worker.cli.command_types import Subcommands
from chiffon_worker.cli.history_charts import TOTALS, render_history, save_png
from chiffon_worker.cli.orchestrator_extra import needs_orchestrator_extra
from chiffon_worker.cli.output import emit, json_array
from chiffon_worker.cli.status_table import render_status
from chiffon_worker.config import Config
from chiffon_worker.errors import EXIT_OK, ChiffonError
from chiffon_worker.orchestrator.agent_names import resolve_agent
from chiffon_worker.orchestrator.agent_view import status_json, status_object

if TYPE_CHECKING:
    from chiffon_worker.orchestrator.registry import Registry

#: Clears the terminal and homes the cursor before each ``status --watch`` refresh.
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def add_fleet_commands(subcommands: Subcommands) -> None:
    """Register ``orchestrator``, ``status`` and ``history``."""
    orch = subcommands.add_parser(
        "orchestrator", help="run the heartbeat consumer, registry and /metrics",
        description="Consume heartbeats into the registry and serve Prometheus /metrics "
                    "until SIGTERM or SIGINT.")
    orch.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                      help="port for /metrics (0 disables; default: config metrics_port)")
    orch.add_argument("--metrics-addr", default="0.0.0.0", metavar="ADDR",
                      help="address /metrics listens on (default 0.0.0.0)")
    orch.add_argument("--copy", action="store_true",
                      help="fill this registry from a copy of every heartbeat, through a "
                           "queue of its own named after the registry, taking nothing from "
                           "the orchestrators of other registries")
    orch.add_argument("--queue", default=None, metavar="NAME",
                      help="like --copy, with this name for the copy queue (it is bound to "
                           "the chiffon.heartbeats exchange agents publish to)")
    orch.set_defaults(handler=cmd_orchestrator)

    status = subcommands.add_parser("status", help="the agents in the registry")
    status.add_argument("--json", action="store_true",
                        help="a JSON array, one object per agent: indented on a terminal, "
                             "else compact (one line, for programs)")
    status.add_argument("--pool", help="only agents of this pool")
    status.add_argument("--wide", action="store_true",
                        help="every column and whole agent ids (default: 80 characters "
                             "wide, ids cut to 12 characters)")
    status.add_argument("--watch", nargs="?", type=float, const=2.0, default=None,
                        metavar="SECONDS", help="refresh every SECONDS (default 2) until Ctrl-C")
    status.set_defaults(handler=cmd_status)

    history = subcommands.add_parser("history", help="plot one agent's load, memory and VRAM")
    history.add_argument("agent", metavar="AGENT",
                         help="agent id, hostname or a unique prefix of the id")
    history.add_argument("--png", type=Path, metavar="PATH",
                         help="write a PNG instead (needs matplotlib)")
    history.add_argument("--width", type=int, default=60, help="sparkline width (characters)")
    history.set_defaults(handler=cmd_history)


# -- chiffon orchestrator ---------------------------------------------------------------------

def cmd_orchestrator(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; exits 0 on a clean stop, 2 (through main) when the broker
    refuses the login."""
    with needs_orchestrator_extra("orchestrator"):
        from chiffon_worker.orchestrator.service import Orchestrator, run_orchestrator
    from chiffon_worker.wire import HEARTBEAT_QUEUE, is_queue_name

    config = Config()
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ChiffonError(f"--metrics-port {args.metrics_port} is not a port (0-65535)")
    package_logger = logging.getLogger("chiffon_worker")
    if package_logger.getEffectiveLevel() > logging.getLevelName(config.log_level):
        package_logger.setLevel(config.log_level)
    if args.queue is not None and not is_queue_name(args.queue):
        raise ChiffonError(f"--queue {args.queue!r} is not a valid queue name")
    run_orchestrator(Orchestrator(config, metrics_port=args.metrics_port,
                                  queue=args.queue or HEARTBEAT_QUEUE,
                                  metrics_addr=args.metrics_addr, copy=args.copy))
    return EXIT_OK


# -- chiffon status -------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    """Print the registry once, or every ``--watch`` seconds until Ctrl-C (then exit 0)."""
    with needs_orchestrator_extra("status"):
        from chiffon_worker.orchestrator.registry import Registry

    if args.watch is not None and args.watch <= 0:
        raise ChiffonError("--watch needs a positive number of seconds")
    with Registry.from_config(Config(), read_only=True) as registry:
        if args.watch is None:
            _print_status(registry, args)
            return EXIT_OK
        try:
            while True:
                emit(f"{CLEAR_SCREEN}chiffon status, every {args.watch:g} s  "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                _print_status(registry, args)
                time.sleep(args.watch)
        except KeyboardInterrupt:
            return EXIT_OK


def _print_status(registry: Registry, args: argparse.Namespace) -> None:
    """The table, or with ``--json`` the JSON array: indented (2 spaces) when stdout is a
    terminal, else compact, its objects written from the stored snapshots' text without
    decoding them (:func:`~chiffon_worker.orchestrator.agent_view.status_json`; at 10,000
    agents decoding and indenting took most of the command's time)."""
    now = time.time()
    if not args.json:
        records = registry.agents(args.pool)
        pools = sorted({r.pool for r in registry.agents()}) if args.pool and not records \
            else []
        emit(render_status(records, now, pool=args.pool, pools=pools, wide=args.wide))
    elif sys.stdout.isatty():
        records = registry.agents(args.pool, with_snapshot=True)
        emit(json.dumps([status_object(r, now) for r in records], indent=2))
    else:
        rows = registry.agents_with_snapshot_text(args.pool)
        emit(json_array(status_json(record, text, now) for record, text in rows))


# -- chiffon history ------------------------------------------------------------------------

def cmd_history(args: argparse.Namespace) -> int:
    """Sparklines of an agent's history, or a PNG with ``--png``."""
    with needs_orchestrator_extra("history"):
        from chiffon_worker.orchestrator.registry import Registry

    if args.width < 10:
        raise ChiffonError("--width must be at least 10")
    with Registry.from_config(Config(), read_only=True) as registry:
        record = registry.agent(args.agent, with_snapshot=False) \
            or resolve_agent(registry.agents(), args.agent)
        points = registry.history(record.agent_id)
    title = f"{record.agent_id} ({record.hostname}, pool {record.pool})"
    if args.png:
        if not points:
            raise ChiffonError(f"{title} has no history yet")
        save_png(title, points, args.png,
                 totals=[_number(record.metrics.get(name)) for name in TOTALS],
                 interval_seconds=record.heartbeat_interval_seconds)
        emit(f"wrote {args.png}")
    else:
        emit(render_history(title, points, args.width))
    return EXIT_OK


def _number(value: object) -> float | None:
    """A stored total as a float (None: not a number, e.g. unknown)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None
