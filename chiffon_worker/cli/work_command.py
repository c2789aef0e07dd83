"""``chiffon work``: what is placed and running, from the registry (placements and the
agents' task events). Needs the orchestrator extra, imported when it runs."""

from __future__ import annotations

import argparse
import json
import time

from chiffon_worker.cli.command_types import Subcommands
from chiffon_worker.cli.orchestrator_extra import needs_orchestrator_extra
from chiffon_worker.cli.output import emit
from chiffon_worker.cli.work_view import render_work, work_object
from chiffon_worker.config import Config
from chiffon_worker.errors import EXIT_OK

#: How far back ``--ended`` looks by default (seconds).
DEFAULT_ENDED_WINDOW_SECONDS = 3600.0


def add_work_command(subcommands: Subcommands) -> None:
    """Register ``work``."""
    work = subcommands.add_parser(
        "work", help="work placed and running: id, agent, what it holds, age, state")
    work.add_argument("--json", action="store_true", help="a JSON array, one object each")
    work.add_argument("--ended", nargs="?", type=float, const=DEFAULT_ENDED_WINDOW_SECONDS,
                      default=None, metavar="SECONDS",
                      help="also work that ended in the last SECONDS (default 3600)")
    work.set_defaults(handler=cmd_work)


def cmd_work(args: argparse.Namespace) -> int:
    """Print the work in the registry."""
    with needs_orchestrator_extra("work"):
        from chiffon_worker.orchestrator.registry import Registry

    now = time.time()
    since = None if args.ended is None else now - args.ended
    with Registry.from_config(Config(), read_only=True) as registry:
        work = registry.work(ended_since=since)
        hostnames = {r.agent_id: r.hostname for r in registry.agents()}
    if args.json:
        emit(json.dumps([work_object(w, now) for w in work], indent=2))
    else:
        emit(render_work(work, hostnames, now))
    return EXIT_OK
