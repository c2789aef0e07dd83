"""This process's config and agent: the state every part of the worker shares.

Both are :class:`~chiffon_worker.process_local.ProcessLocal`: made on first use, made
again in a forked child (prefork pool processes get their own agent; the config is
re-read there, which gives the same values). ``set_config`` pins a config (tests and
embedding code); ``get_config`` ends the process with one line and exit status 2 when the
config is bad, which is how a worker refuses to start half-configured.
"""

from __future__ import annotations

import sys
import threading

from chiffon_worker.agents.desktop import DesktopAgent
from chiffon_worker.config import Config
from chiffon_worker.errors import EXIT_CONFIG, ConfigError
from chiffon_worker.process_local import ProcessLocal

#: The ``agent_type`` of the agents this worker runs.
AGENT_TYPE = "desktop"


def load_config_or_exit() -> Config:
    """``Config()``, or one line ``chiffon: error: FILE: KEY: PROBLEM`` and exit 2."""
    try:
        return Config()
    except ConfigError as exc:
        sys.stderr.write(f"chiffon: error: {exc}\n")
        sys.stderr.flush()
        raise SystemExit(EXIT_CONFIG) from None


def _new_agent() -> DesktopAgent:
    config = get_config()
    return DesktopAgent(config.agent_id, AGENT_TYPE, config)


_config: ProcessLocal[Config] = ProcessLocal(load_config_or_exit)
_agent: ProcessLocal[DesktopAgent] = ProcessLocal(_new_agent)
_ready: ProcessLocal[threading.Event] = ProcessLocal(threading.Event)
_stopping: ProcessLocal[threading.Event] = ProcessLocal(threading.Event)


def mark_ready() -> None:
    """The worker is consuming (its queues, and its remote-control queue, are its own)."""
    _ready.get().set()


def mark_stopping() -> None:
    """The worker is stopping: a pending first heartbeat is not sent."""
    _stopping.get().set()
    _ready.get().set()  # wakes a waiting first heartbeat


def wait_ready(timeout_seconds: float) -> bool:
    """Wait up to ``timeout_seconds`` for :func:`mark_ready`; False when the worker is
    stopping instead (the wait ends at once then)."""
    _ready.get().wait(timeout_seconds)
    return not _stopping.get().is_set()


def get_config() -> Config:
    """The process's config (loaded once; a bad one exits with status 2)."""
    return _config.get()


def set_config(config: Config) -> None:
    """Use ``config`` in this process; the agent is rebuilt from it on next use."""
    reset()
    _config.set(config)


def get_agent() -> DesktopAgent:
    """The process's agent (made on first use from :func:`get_config`)."""
    return _agent.get()


def reset() -> None:
    """Forget this process's config and agent (closing the agent); both are made anew on
    next use."""
    old = _agent.peek()
    _agent.reset()
    _config.reset()
    if old is not None:
        old.close()
