"""The ``chiffon`` command: its parser and entry point.

Subcommands live in modules named for what they hold: :mod:`.agent_commands` (metrics,
config show, init-config), :mod:`.fleet_commands` (orchestrator, status, history) and
:mod:`.submit_command` (submit); all write through :mod:`.output`. Every subcommand reads
the same :class:`~chiffon_worker.config.Config`.

Errors print one line ``chiffon: error: ...`` on stderr and exit with the statuses of
:mod:`chiffon_worker.errors`: a ConfigError or a broker's refused login
(BrokerLoginRefused) exits ``EXIT_CONFIG`` (2), any other ChiffonError ``EXIT_ERROR`` (1),
Ctrl-C ``EXIT_INTERRUPTED`` (130). No tracebacks for expected faults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from chiffon_worker._version import __version__
from chiffon_worker.cli.agent_admin_commands import add_agent_admin_commands
from chiffon_worker.cli.agent_commands import add_agent_commands
from chiffon_worker.cli.command_types import Handler
from chiffon_worker.cli.fleet_commands import add_fleet_commands
from chiffon_worker.cli.signing_command import add_signing_command
from chiffon_worker.cli.submit_command import add_submit_command
from chiffon_worker.cli.wake_command import add_wake_command
from chiffon_worker.cli.work_command import add_work_command
from chiffon_worker.errors import (
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    BrokerLoginRefused,
    ChiffonError,
    ConfigError,
    MissingExtra,
    one_line,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``chiffon``, every subcommand included.

    Building it imports no optional dependency: commands that need the orchestrator extra
    import it when they run.
    """
    parser = argparse.ArgumentParser(prog="chiffon", description="Chiffon homelab agent")
    parser.add_argument("--version", action="version", version=f"chiffon {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    subcommands.required = True
    add_agent_commands(subcommands)
    add_signing_command(subcommands)
    add_fleet_commands(subcommands)
    add_agent_admin_commands(subcommands)
    add_wake_command(subcommands)
    add_submit_command(subcommands)
    add_work_command(subcommands)
    return parser


def exit_status(exc: ChiffonError) -> int:
    """The exit status for ``exc``: ``EXIT_CONFIG`` (2) when the configuration or the
    installation is at fault (a ConfigError, a broker that refuses the login, a missing
    extra), else ``EXIT_ERROR`` (1)."""
    return EXIT_CONFIG if isinstance(exc, ConfigError | BrokerLoginRefused | MissingExtra) \
        else EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``chiffon`` with ``argv`` (default: the process's arguments); returns the exit
    status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except ChiffonError as exc:
        sys.stderr.write(f"chiffon: error: {one_line(str(exc))}\n")
        return exit_status(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (``chiffon status --watch | head``): stop quietly; stdout
        # is pointed at /dev/null so the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
