"""``chiffon signing-key AGENT_ID``: print one agent's heartbeat signing key.

Run on the orchestrator's host, which holds the lab secret (``heartbeat_lab_secret``); the
key is :func:`~chiffon_worker.signing.derive_agent_key` of it and the agent id, and goes
into that agent's config as ``heartbeat_key`` (docs/security.md, "Signed heartbeats").
The key alone is printed, so that it can be piped or captured
(``CHIFFON_HEARTBEAT_KEY=$(chiffon signing-key rig-7)``); the lab secret never is.
"""

from __future__ import annotations

import argparse

from chiffon_worker.cli.command_types import Subcommands
from chiffon_worker.cli.output import emit
from chiffon_worker.config import Config
from chiffon_worker.errors import EXIT_OK, ChiffonError, ConfigError
from chiffon_worker.settings_spec import nonblank_name
from chiffon_worker.signing import derive_agent_key


def add_signing_command(subcommands: Subcommands) -> None:
    """Register ``signing-key``."""
    command = subcommands.add_parser(
        "signing-key", help="print an agent's heartbeat signing key (orchestrator's host)",
        description="Print the heartbeat_key of agent AGENT_ID, derived from this host's "
                    "heartbeat_lab_secret. Put it in that agent's agent.yml as "
                    "heartbeat_key (chmod 600): it signs for that agent id only.")
    command.add_argument("agent_id", metavar="AGENT_ID",
                         help="the agent's exact agent_id (`chiffon config show` on the "
                              "agent prints it; pin it in its agent.yml)")
    command.set_defaults(handler=cmd_signing_key)


def cmd_signing_key(args: argparse.Namespace) -> int:
    """Print the signing key of ``args.agent_id`` (64 hex digits, one line)."""
    problem = nonblank_name(args.agent_id)
    if problem:
        raise ChiffonError(f"agent id {args.agent_id!r} {problem}")
    config = Config()
    if not config.heartbeat_lab_secret:
        raise ConfigError(config.sources.get("heartbeat_lab_secret", "default"),
                          "heartbeat_lab_secret", "is not set on this host: run this on the "
                          "orchestrator's host (`chiffon init-config --with-secret` makes "
                          "a config with a new lab secret)")
    emit(derive_agent_key(config.heartbeat_lab_secret, args.agent_id))
    return EXIT_OK
