"""``chiffon wake AGENT``: send a Wake-on-LAN packet to an agent's machine.

AGENT is an agent id, a hostname or a unique id prefix
(:func:`~chiffon_worker.orchestrator.agent_names.resolve_agent`). The MAC address is the
one the agent's heartbeats last reported (``mac_address``: the interface that reaches the
broker); the packet goes to ``wake_broadcast_address:wake_port`` unless ``--broadcast`` or
``--port`` says otherwise (:func:`chiffon_worker.wake.send_wake`). Sending is all it does:
a magic packet has no answer, so whether the machine wakes shows in ``chiffon status``.

It needs the orchestrator extra (the registry), imported under
:func:`~chiffon_worker.cli.orchestrator_extra.needs_orchestrator_extra`.
"""

from __future__ import annotations

import argparse

from chiffon_worker.cli.agent_admin_commands import AGENT_HELP
from chiffon_worker.cli.command_types import Subcommands
from chiffon_worker.cli.orchestrator_extra import needs_orchestrator_extra
from chiffon_worker.cli.output import emit
from chiffon_worker.config import Config
from chiffon_worker.errors import EXIT_OK, ChiffonError
from chiffon_worker.orchestrator.agent_names import resolve_agent
from chiffon_worker.wake import BadMacAddress, format_mac, parse_mac, send_wake


def add_wake_command(subcommands: Subcommands) -> None:
    """Register ``wake``."""
    wake = subcommands.add_parser(
        "wake", help="send a Wake-on-LAN packet to an agent's machine",
        description="Send a Wake-on-LAN magic packet for the MAC address the agent's "
                    "heartbeats last reported, to wake_broadcast_address:wake_port.")
    wake.add_argument("agent", metavar="AGENT", help=AGENT_HELP)
    wake.add_argument("--broadcast", metavar="ADDRESS",
                      help="where to send the packet (default: wake_broadcast_address)")
    wake.add_argument("--port", type=int, metavar="PORT",
                      help="UDP port (default: wake_port)")
    wake.set_defaults(handler=cmd_wake)


def cmd_wake(args: argparse.Namespace) -> int:
    """Look the agent's MAC address up in the registry and send the magic packet."""
    with needs_orchestrator_extra("wake"):
        from chiffon_worker.orchestrator.registry import Registry

    config = Config()
    with Registry.from_config(config, read_only=True) as registry:
        record = resolve_agent(registry.agents(), args.agent)
    stored = record.metrics.get("mac_address")
    if not stored:
        raise ChiffonError(f"no MAC address known for {record.agent_id} ({record.hostname}): "
                           f"the agent must have sent a heartbeat once with a network "
                           f"interface that reaches the broker (not loopback)")
    try:
        mac = format_mac(parse_mac(str(stored)))
    except BadMacAddress as exc:
        raise ChiffonError(f"{record.agent_id} ({record.hostname}) reported a bad MAC "
                           f"address: {exc}") from None
    address = config.wake_broadcast_address if args.broadcast is None else args.broadcast
    port = config.wake_port if args.port is None else args.port
    send_wake(mac, address, port)
    emit(f"sent a Wake-on-LAN packet for {record.agent_id} ({record.hostname}, {mac}) to "
         f"{address}:{port}")
    return EXIT_OK
