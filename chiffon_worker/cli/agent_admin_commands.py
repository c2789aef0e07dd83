"""Taking agents out of service: ``chiffon drain``, ``chiffon undrain``, ``chiffon forget``.

AGENT is an agent id, a hostname or a unique id prefix
(:func:`~chiffon_worker.orchestrator.agent_names.resolve_agent`).

- ``drain``: record the request in the registry (routing skips the agent), then tell the
  agent (Celery remote control, 2 s for an answer): it finishes its running work and takes
  no new work from its pool queue; it keeps the drain across restarts. An agent that does
  not answer is told again by the orchestrator once its heartbeats show it back
  (:mod:`~chiffon_worker.orchestrator.drain_enforcer`).
- ``undrain``: delete the request and tell the agent to take pool work again.
- ``forget``: remove a retired agent and its history from the registry; refused for an
  agent that is alive unless ``--force`` (its next heartbeat would add it back).

They need the orchestrator extra (the registry), imported under
:func:`~chiffon_worker.cli.orchestrator_extra.needs_orchestrator_extra`.
"""

from __future__ import annotations

import argparse
import getpass
import socket
import time
from typing import TYPE_CHECKING

from chiffon_worker.cli.command_types import Subcommands
from chiffon_worker.cli.orchestrator_extra import needs_orchestrator_extra
from chiffon_worker.cli.output import emit
from chiffon_worker.config import Config
from chiffon_worker.errors import EXIT_OK, ChiffonError
from chiffon_worker.orchestrator.agent_names import resolve_agent

if TYPE_CHECKING:
    from chiffon_worker.orchestrator.agent_control import ControlAnswer
    from chiffon_worker.orchestrator.registry import AgentRecord

AGENT_HELP = "agent id, hostname, or a unique prefix of the agent id"


def add_agent_admin_commands(subcommands: Subcommands) -> None:
    """Register ``drain``, ``undrain`` and ``forget``."""
    drain = subcommands.add_parser(
        "drain", help="take an agent out of service (it finishes its running work)",
        description="Record a drain request and tell the agent: it finishes its running "
                    "work and takes no new work from its pool queue, across restarts, "
                    "until `chiffon undrain`.")
    drain.add_argument("agent", metavar="AGENT", help=AGENT_HELP)
    drain.set_defaults(handler=cmd_drain)

    undrain = subcommands.add_parser("undrain", help="put a drained agent back in service")
    undrain.add_argument("agent", metavar="AGENT", help=AGENT_HELP)
    undrain.set_defaults(handler=cmd_undrain)

    forget = subcommands.add_parser("forget", help="remove a retired agent from the registry")
    forget.add_argument("agent", metavar="AGENT", help=AGENT_HELP)
    forget.add_argument("--force", action="store_true",
                        help="forget it even though it is online")
    forget.set_defaults(handler=cmd_forget)


def operator_name() -> str:
    """Who is asking: ``user@host`` (``unknown@host`` where the user has no name)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _refused(record: AgentRecord, command: str, answer: ControlAnswer) -> ChiffonError:
    return ChiffonError(f"{command} recorded for {record.agent_id}, but the agent refused "
                        f"the command ({answer.refusal}; does it run an older chiffon?)")


def _not_answering(answer: ControlAnswer) -> str:
    return f"the agent is not answering ({answer.error})" if answer.error \
        else "the agent is not answering"


# -- chiffon drain ----------------------------------------------------------------------------

def cmd_drain(args: argparse.Namespace) -> int:
    """Record the drain, then tell the agent; exits 0 once the request is recorded."""
    with needs_orchestrator_extra("drain"):
        from chiffon_worker.orchestrator.agent_control import AgentControl
        from chiffon_worker.orchestrator.registry import Registry

    config, by = Config(), operator_name()
    with Registry.from_config(config) as registry:
        record = resolve_agent(registry.agents(), args.agent)
        requested_at = registry.drain(record.agent_id, by)
    with AgentControl(config.effective_broker_url, tls=config.tls_to_broker) as control:
        answer = control.drain(record, by=by, at=requested_at)
    if answer.fatal is not None:  # a refused login or permission, a failed TLS handshake
        raise answer.fatal
    if answer.refusal is not None:
        raise _refused(record, "drain", answer)
    if answer.answered:
        emit(f"draining {record.agent_id} ({record.hostname}): it finishes its running work "
             f"and takes no new work from pool {record.pool}")
    else:
        emit(f"drain recorded for {record.agent_id}; {_not_answering(answer)}: it stays out "
             f"of service once it is back")
    return EXIT_OK


# -- chiffon undrain --------------------------------------------------------------------------

def cmd_undrain(args: argparse.Namespace) -> int:
    """Delete the drain request, then tell the agent."""
    with needs_orchestrator_extra("undrain"):
        from chiffon_worker.orchestrator.agent_control import AgentControl
        from chiffon_worker.orchestrator.registry import Registry

    config = Config()
    with Registry.from_config(config) as registry:
        record = resolve_agent(registry.agents(), args.agent)
        had_request = registry.undrain(record.agent_id)
    with AgentControl(config.effective_broker_url, tls=config.tls_to_broker) as control:
        answer = control.undrain(record)
    if answer.fatal is not None:  # a refused login or permission, a failed TLS handshake
        raise answer.fatal
    if answer.refusal is not None:
        raise _refused(record, "undrain", answer)
    if not answer.answered:
        emit(f"undrain recorded for {record.agent_id}; {_not_answering(answer)}: it takes "
             f"work from pool {record.pool} again once it is back")
    elif had_request or (answer.answer or {}).get("was_drained"):
        emit(f"undrained {record.agent_id} ({record.hostname}): it takes new work from pool "
             f"{record.pool} again")
    else:
        emit(f"{record.agent_id} ({record.hostname}) was not drained")
    return EXIT_OK


# -- chiffon forget ---------------------------------------------------------------------------

def cmd_forget(args: argparse.Namespace) -> int:
    """Remove the agent, its history and its drain request; an alive agent needs
    ``--force``."""
    with needs_orchestrator_extra("forget"):
        from chiffon_worker.orchestrator.registry import Registry

    with Registry.from_config(Config()) as registry:
        now = time.time()
        record = resolve_agent(registry.agents(), args.agent)
        alive = record.state(now) == "online"
        if alive and not args.force:
            raise ChiffonError(f"agent {record.agent_id} ({record.hostname}) is "
                               f"{record.liveness(now)}: stop it first, or use --force")
        registry.forget(record.agent_id)
    suffix = "; it is still running: its next heartbeat adds it back" if alive else ""
    emit(f"forgot {record.agent_id} ({record.hostname}){suffix}")
    return EXIT_OK
