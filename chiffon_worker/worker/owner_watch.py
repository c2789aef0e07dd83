"""Watching the owner rules: stop taking pool work while they say no, resume when yes.

:class:`OwnerWatch` checks the rules (``agents/owner_rules.py``) every
``owner_check_seconds`` in a thread of its own. When they say no, the owner hold goes on
the agent's :class:`~chiffon_worker.agents.intake.WorkIntake` (``accepting: false`` with
the reason, in the next heartbeat) and the worker stops consuming its pool queue, exactly
as a drain does (``worker/drain.py``): running work finishes, the agent's own queue keeps
its consumer. With ``owner_returns: requeue`` the running work is then asked to stop and
go back to the pool queue (``WorkIntake.hand_back``). When they say yes again the hold
goes and, unless a drain still holds the queue, the worker consumes it again by itself.

:class:`OwnerWatchStep` is the consumer bootstep that runs it (nothing runs when every
rule is off, the default).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps

from chiffon_worker.agents.intake import OWNER, WorkIntake
from chiffon_worker.agents.owner_rules import OwnerFacts, OwnerRules
from chiffon_worker.worker import drain
from chiffon_worker.worker.runtime import get_agent, get_config

log = logging.getLogger(__name__)


class OwnerWatch:
    """Checks ``rules`` against ``facts()`` and holds or lets go of the pool queue.

    ``stop_consuming`` / ``resume_consuming``: what the worker does when the agent stops
    or starts accepting pool work (they run the change in the consumer's loop).
    """

    def __init__(self, rules: OwnerRules, intake: WorkIntake,
                 facts: Callable[[], OwnerFacts], *, stop_consuming: Callable[[], None],
                 resume_consuming: Callable[[], None]) -> None:
        self.rules = rules
        self.intake = intake
        self.facts = facts
        self.stop_consuming = stop_consuming
        self.resume_consuming = resume_consuming

    def check(self) -> str | None:
        """Check the rules once; returns the reason not to take work (None: take it)."""
        reason = self.rules.verdict(self.facts())
        held = self.intake.held_by(OWNER)
        if reason is not None:
            if self.intake.stop(reason, OWNER):
                self.stop_consuming()
            if held is None:
                log.info("owner rules: taking no pool work: %s", reason)
        elif held is not None:
            if self.intake.resume(OWNER):
                self.resume_consuming()
                log.info("owner rules: taking pool work again")
            else:
                log.info("owner rules allow pool work again; the agent stays drained")
        return reason

    def run(self, stop: threading.Event, interval_seconds: float) -> None:
        """Check at once, then every ``interval_seconds`` until ``stop`` is set. A check
        whose facts cannot be read is logged and the next one tries again."""
        while True:
            try:
                self.check()
            except (OSError, ValueError, RuntimeError) as exc:
                log.warning("owner rules: cannot check them now: %s", exc)
            if stop.wait(interval_seconds):
                return


def hand_back(intake: WorkIntake) -> None:
    """Ask the running work to go back to the pool queue (``owner_returns: requeue``)."""
    asked = intake.hand_back()
    if asked:
        log.info("owner rules: handing %d running work item(s) back to the pool queue", asked)


class OwnerWatchStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: runs an :class:`OwnerWatch` thread while the consumer runs."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self, c: Any) -> None:
        config = get_config()
        rules = OwnerRules.from_config(config)
        if not rules.active:
            return
        agent, pool = get_agent(), config.agent_pool_name
        requeue = config.owner_returns == "requeue"

        def stop_consuming() -> None:
            c.call_soon(drain.stop_consuming, c, pool, "owner rules")
            if requeue:  # after the pool consumer is gone: the broker delivers elsewhere
                c.call_soon(hand_back, agent.intake)

        watch = OwnerWatch(
            rules, agent.intake, agent.owner_facts, stop_consuming=stop_consuming,
            resume_consuming=lambda: c.call_soon(drain.resume_consuming, c, pool,
                                                 "owner rules"))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=watch.run, args=(self._stop, config.owner_check_seconds), daemon=True,
            name="chiffon-owner-watch")
        self._thread.start()

    def stop(self, c: Any) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)
