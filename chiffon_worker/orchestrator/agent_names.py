"""How an operator names an agent on the command line: its id, its host, or an id prefix.

:func:`resolve_agent` tries, in order: an exact agent id; an exact hostname; a prefix of
exactly one agent id. A name that matches nothing, or more than one agent at the first
rule that matches at all, is a :class:`~chiffon_worker.errors.ChiffonError` (one line; an
ambiguous name lists the candidates, id and host).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from chiffon_worker.errors import ChiffonError

if TYPE_CHECKING:
    from chiffon_worker.orchestrator.registry import AgentRecord


def resolve_agent(records: Sequence[AgentRecord], name: str) -> AgentRecord:
    """The one agent of ``records`` that ``name`` designates (see the module docstring)."""
    if name:
        for record in records:
            if record.agent_id == name:
                return record
        by_host = [r for r in records if r.hostname == name]
        by_prefix = [r for r in records if r.agent_id.startswith(name)]
        for matches in (by_host, by_prefix):
            matches.sort(key=lambda r: r.agent_id)
            if len(matches) == 1:
                return matches[0]
            if matches:
                candidates = ", ".join(f"{r.agent_id} ({r.hostname})" for r in matches)
                raise ChiffonError(f"{name!r} matches {len(matches)} agents: {candidates}; "
                                   f"give the agent id")
    raise ChiffonError(f"no agent {name!r} in the registry")
