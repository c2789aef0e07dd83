"""Whose GPU processes are: this agent's work, or someone else's (a game, an ollama).

A process is the agent's when it is the agent process itself or one of its descendants
(prefork children, and whatever work they start): its parent chain, read through psutil,
reaches the agent's pid. It is ``foreign`` when the chain ends elsewhere, and ``unknown``
when the process is not visible here (another PID namespace, as when NVML reports host
pids to an agent in a container) or vanished while being looked at.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

import psutil

from chiffon_worker.metrics.gpu_types import GpuDevice, ProcessOwner

#: Longest parent chain followed (a guard against loops in a changing process table).
MAX_DEPTH = 64

ParentOf = Callable[[int], int | None]


def parent_of(pid: int) -> int | None:
    """``pid``'s parent pid; ``None`` when the process is not visible or gone."""
    try:
        return psutil.Process(pid).ppid()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


class OwnerClassifier:
    """Classifies pids against one agent pid, remembering answers for one probe.

    ``agent_pid``: the agent process (default: this process, read at construction, so a
    forked child classifies against itself). ``parent``: how a parent pid is found.
    """

    def __init__(self, agent_pid: int | None = None, parent: ParentOf = parent_of) -> None:
        self.agent_pid = os.getpid() if agent_pid is None else agent_pid
        self._parent = parent
        self._known: dict[int, ProcessOwner] = {}

    def owner(self, pid: int) -> ProcessOwner:
        """``agent``, ``foreign`` or ``unknown`` for ``pid``."""
        found = self._known.get(pid)
        if found is None:
            found = self._walk(pid)
            self._known[pid] = found
        return found

    def _walk(self, pid: int) -> ProcessOwner:
        if pid == self.agent_pid:
            return "agent"
        parent = self._parent(pid)
        if parent is None:
            return "unknown"  # not visible from here, or gone
        for _ in range(MAX_DEPTH):
            if parent == self.agent_pid:
                return "agent"
            if parent is None or parent in (0, 1):
                return "foreign"
            parent = self._parent(parent)
        return "foreign"

    def classify(self, device: GpuDevice) -> GpuDevice:
        """The device with each of its processes' ``owner`` set."""
        if not device.processes:
            return device
        processes = tuple(replace(p, owner=self.owner(p.pid)) for p in device.processes)
        return replace(device, processes=processes)

