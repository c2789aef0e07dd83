"""Announcing sleep: the agent's last heartbeat before the machine suspends says so.

When logind signals ``PrepareForSleep(true)`` (:class:`~.sleep_watch.SleepWatch`), the
agent marks itself asleep and sends a heartbeat at once with ``asleep: true``: the
orchestrator then shows the agent ``asleep`` (not ``lost``) until it hears from it again,
and ``chiffon wake`` / ``chiffon submit --wake`` know they may wake it. On
``PrepareForSleep(false)`` (resumed) it sends a heartbeat at once with ``asleep: false``,
without waiting for the next beat.

The announcement goes through a :class:`~.heartbeat_sender.HeartbeatSender` of its own
(its own short-lived broker connection), so it never waits on the beat thread.
:class:`SleepStep` is the consumer bootstep that runs the watch.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from chiffon_worker.agents.desktop import DesktopAgent
from chiffon_worker.worker.heartbeat_sender import HeartbeatSender
from chiffon_worker.worker.runtime import get_agent, get_config
from chiffon_worker.worker.sleep_watch import SleepWatch

log = logging.getLogger(__name__)


class SleepAnnouncer:
    """The callback of a :class:`SleepWatch`: marks ``agent`` asleep or awake and sends
    a heartbeat through ``sender`` at once."""

    def __init__(self, agent: DesktopAgent, sender: HeartbeatSender) -> None:
        self.agent = agent
        self.sender = sender

    def __call__(self, going_to_sleep: bool) -> None:
        self.agent.asleep = going_to_sleep
        sent = self.sender.send()
        log.info("%s: %s", "the machine suspends" if going_to_sleep else "the machine woke",
                 "announced in a heartbeat" if sent else "the heartbeat could not be sent")
        if going_to_sleep:
            self.sender.close()  # a connection held across sleep is dead on waking


class SleepStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: watches logind for sleep while the consumer runs."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._watch: SleepWatch | None = None
        self._sender: HeartbeatSender | None = None

    def start(self, c: Any) -> None:
        if self._watch is not None:
            return  # a consumer restart (broker reconnect): the watch runs on
        agent = get_agent()
        self._sender = HeartbeatSender(c.app, get_config(), agent.snapshot)
        self._watch = SleepWatch(SleepAnnouncer(agent, self._sender))
        self._watch.start()

    def shutdown(self, c: Any) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self._sender is not None:
            self._sender.close()
            self._sender = None
