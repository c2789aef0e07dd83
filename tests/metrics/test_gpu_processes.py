"""Whose GPU processes are: the agent's own work, someone else's, or not visible here."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from chiffon_worker.metrics.gpu_processes import OwnerClassifier
from chiffon_worker.metrics.gpu_types import GpuDevice, GpuProcess

#: A process table: pid -> parent pid. 100 is the agent; 1 is init.
TABLE = {1: 0, 50: 1, 100: 50, 101: 100, 102: 101, 200: 50, 201: 200}


def classifier() -> OwnerClassifier:
    return OwnerClassifier(agent_pid=100, parent=TABLE.get)


@pytest.mark.parametrize(("pid", "owner"), [
    pytest.param(100, "agent", id="the agent process itself"),
    pytest.param(101, "agent", id="a pool child"),
    pytest.param(102, "agent", id="work started by a pool child"),
    pytest.param(201, "foreign", id="a game under the desktop session"),
    pytest.param(50, "foreign", id="the agent's own parent"),
    pytest.param(4242, "unknown", id="not visible here (another PID namespace)"),
])
def test_a_process_is_classified_by_its_parent_chain(pid: int, owner: str) -> None:
    assert classifier().owner(pid) == owner


def test_a_looping_process_table_ends_as_foreign() -> None:
    looping = OwnerClassifier(agent_pid=100, parent={7: 8, 8: 7}.get)
    assert looping.owner(7) == "foreign"


def test_classify_sets_the_owner_of_every_process_of_a_device() -> None:
    device = GpuDevice(index=0, vendor="nvidia", name="g", vram_total_gb=24.0,
                       vram_available_gb=20.0, utilization_percent=None, temperature_c=None,
                       source="nvml", processes=(GpuProcess(102, "python", 2.0),
                                                 GpuProcess(201, "game", 3.5)))
    owners = [p.owner for p in classifier().classify(device).processes or ()]
    assert owners == ["agent", "foreign"]


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=10)


def test_real_processes_a_child_of_this_process_is_the_agents_and_init_is_foreign(
        child: subprocess.Popen[bytes]) -> None:
    real = OwnerClassifier()
    assert real.agent_pid == os.getpid()
    assert (real.owner(child.pid), real.owner(1)) == ("agent", "foreign")
