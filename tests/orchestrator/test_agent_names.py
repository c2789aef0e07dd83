"""How an operator names an agent: exact id, exact hostname, unique id prefix."""

from __future__ import annotations

import pytest

from chiffon_worker.errors import ChiffonError
from chiffon_worker.orchestrator.agent_names import resolve_agent
from chiffon_worker.orchestrator.registry import AgentRecord


def record(agent_id: str, hostname: str) -> AgentRecord:
    return AgentRecord(agent_id, hostname, "pool", 0.0, 0.0, "boot", 0.0, 1, 0, 0, (), 1, 0.0,
                       None, 30.0, 90.0, {"gpu_type": "none"})


FLEET = [record("rig-7f3a", "gpu-rig"), record("desk-91bc", "desk"),
         record("desk-92aa", "study"), record("desk", "attic")]


def test_an_exact_agent_id_wins_over_a_hostname_and_a_prefix() -> None:
    assert resolve_agent(FLEET, "desk").hostname == "attic"


def test_an_exact_hostname_names_its_agent() -> None:
    assert resolve_agent(FLEET, "gpu-rig").agent_id == "rig-7f3a"


def test_a_unique_id_prefix_names_its_agent() -> None:
    assert resolve_agent(FLEET, "desk-91").agent_id == "desk-91bc"


def test_an_ambiguous_prefix_lists_every_candidate_with_its_host() -> None:
    with pytest.raises(ChiffonError) as caught:
        resolve_agent(FLEET, "desk-9")
    message = str(caught.value)
    assert "'desk-9' matches 2 agents" in message
    assert "desk-91bc (desk)" in message and "desk-92aa (study)" in message


def test_a_hostname_shared_by_two_agents_is_ambiguous() -> None:
    fleet = [record("a-1", "shared"), record("a-2", "shared")]
    with pytest.raises(ChiffonError, match=r"'shared' matches 2 agents: a-1 \(shared\), "
                                           r"a-2 \(shared\)"):
        resolve_agent(fleet, "shared")


@pytest.mark.parametrize("name", ["nowhere", ""])
def test_an_unknown_name_is_no_agent_in_the_registry(name: str) -> None:
    with pytest.raises(ChiffonError, match=f"^no agent '{name}' in the registry$"):
        resolve_agent(FLEET, name)
