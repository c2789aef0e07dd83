"""``BaseAgent``: identity, the heartbeat envelope and the contract every agent kind meets."""

from __future__ import annotations

import abc
import itertools
import logging
import os
import threading
import time
import uuid
from typing import Any

from chiffon_worker._version import __version__
from chiffon_worker.agents.intake import WorkIntake
from chiffon_worker.config import Config
from chiffon_worker.protocol import SNAPSHOT_SCHEMA, WorkRequest, WorkResult

log = logging.getLogger(__name__)

#: Set by the worker at start so every process of one agent run shares one boot_id.
BOOT_ID_ENV = "CHIFFON_BOOT_ID"


class BaseAgent(abc.ABC):
    """An agent: an id, a type, a config, and a snapshot of what the machine can take on.

    ``boot_id`` changes on every start of the agent (the orchestrator uses it to detect
    restarts); ``seq`` counts heartbeats of this boot, from 1, without gaps.
    """

    def __init__(self, agent_id: str, agent_type: str, config: Config) -> None:
        self.agent_id = agent_id
        self.agent_type = agent_type
        self.config = config
        self.boot_id = os.environ.get(BOOT_ID_ENV) or str(uuid.uuid4())
        self.started_at = time.time()
        self._seq = itertools.count(1)
        self._seq_lock = threading.Lock()
        #: whether it takes pool work and what runs now (prefork: work runs elsewhere)
        self.intake = WorkIntake(counted=config.worker_pool != "prefork")

    def next_seq(self) -> int:
        """The next heartbeat sequence number (thread-safe)."""
        with self._seq_lock:
            return next(self._seq)

    def envelope(self, seq: int) -> dict[str, Any]:
        """The identity and timing keys every snapshot carries."""
        return {
            "schema": SNAPSHOT_SCHEMA,
            "agent_id": self.agent_id,
            "agent_type": self.agent_type,
            "hostname": self.config.hostname,
            "pool": self.config.agent_pool_name,
            "boot_id": self.boot_id,
            "seq": seq,
            "started_at": round(self.started_at, 3),
            "collected_at": round(time.time(), 3),
            "heartbeat_interval_seconds": self.config.heartbeat_interval_seconds,
            "heartbeat_timeout_seconds": self.config.heartbeat_timeout_seconds,
            "capabilities": self.get_agent_capabilities(),
            "version": __version__,
        }

    def snapshot(self, *, heartbeat: bool = True) -> dict[str, Any]:
        """A complete snapshot (schema 1). ``heartbeat=False`` reports ``seq`` 0 and
        leaves the heartbeat sequence untouched (for ad-hoc views such as inspect)."""
        seq = self.next_seq() if heartbeat else 0
        snap = self.envelope(seq)
        snap.update(self._get_resource_metrics())
        snap.update(self.intake.snapshot_keys())
        return snap

    @abc.abstractmethod
    def _get_resource_metrics(self) -> dict[str, Any]:
        """CPU, memory and GPU keys of the snapshot."""

    @abc.abstractmethod
    def _get_gpu_metrics(self) -> dict[str, Any]:
        """The GPU keys of the snapshot (flat summary, ``gpus``, ``gpu_probe``)."""

    @abc.abstractmethod
    def get_agent_capabilities(self) -> dict[str, Any]:
        """What kinds of work this agent accepts."""

    @abc.abstractmethod
    def execute_work(self, request: WorkRequest,
                     handed_back: threading.Event | None = None) -> WorkResult:
        """Run one work request and return its result; never raises for bad work. Work
        that can stop early watches ``handed_back`` and, once it is set, raises
        :class:`~chiffon_worker.errors.WorkHandedBack` (its work goes back to the pool)."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release resources (probe threads, library handles)."""
