"""The per-process agent used by tasks, beat and remote control.

One ``DesktopAgent`` per process, created on first use and shared by its threads: the
embedded beat (a thread of the worker, see ``chiffon_worker.app``), remote control and
``execute_work``. A forked child (a prefork pool process, or Celery's stock forked beat)
gets its own, because probe threads and NVML handles do not survive ``fork``.
"""

from __future__ import annotations

import os
import threading

from chiffon_worker.agents.desktop import DesktopAgent
from chiffon_worker.config import Config

_lock = threading.Lock()
_agent: DesktopAgent | None = None
_pid: int | None = None


def current_agent(config: Config) -> DesktopAgent:
    """This process's agent for ``config`` (created lazily, once per process)."""
    global _agent, _pid
    with _lock:
        if _agent is None or _pid != os.getpid():
            _agent = DesktopAgent(config.agent_id, "desktop", config)
            _pid = os.getpid()
        return _agent
