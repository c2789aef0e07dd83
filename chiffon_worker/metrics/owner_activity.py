"""Owner activity: seconds since the machine's owner last touched the keyboard or mouse.

Two sources, tried in order; the reading names the one that answered (``source``):

* ``"logind"``: systemd-logind's seat-wide idle hint over the system D-Bus
  (:mod:`chiffon_worker.metrics.logind`). Not idle: 0 s. Idle: ``now - IdleSinceHint``,
  never negative. An idle hint without a time (``IdleSinceHint`` 0: no session since boot)
  is no answer. logind only knows what the desktop tells it: a desktop sets the hint after
  its own idle delay (minutes), and one that never sets it looks active for ever.
* ``"input"``: as HTCondor does, the newest access time of ``<dev_root>/input/event*``
  (``stat`` needs no read permission on the devices). None where none can be stat'ed.

A logind read is bounded by ``timeout_s`` seconds. After logind fails (no bus, no logind,
no answer in time), it is not asked again for ``retry_s`` seconds: a hung bus costs one
bounded wait per ``retry_s``, not one per heartbeat. Units: seconds; ``now`` is wall-clock
(``time.time()``), the clock of both ``IdleSinceHint`` and file access times.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from chiffon_worker.metrics.logind import CALL_TIMEOUT_S, LogindClient, LogindUnavailable

log = logging.getLogger(__name__)

#: ``source`` when logind's idle hint answered.
SOURCE_LOGIND: Final = "logind"
#: ``source`` when the access times of the input devices answered.
SOURCE_INPUT: Final = "input"
#: Seconds logind is left alone after a failed read before it is asked again.
LOGIND_RETRY_S = 30.0

OwnerSource = Literal["logind", "input"]


@dataclass(frozen=True)
class OwnerReading:
    """Seconds since the owner's last input (None: unknown) and the source that said so."""

    idle_seconds: float | None
    source: OwnerSource | None


def input_idle_seconds(dev_root: str, now: float) -> float | None:
    """Seconds from the newest access time of ``<dev_root>/input/event*`` to ``now`` (wall
    clock, s), never negative; None where the directory or every device is unreadable."""
    newest: float | None = None
    try:
        with os.scandir(Path(dev_root) / "input") as entries:
            for entry in entries:
                if not entry.name.startswith("event"):
                    continue
                try:
                    atime = entry.stat().st_atime
                except OSError as exc:
                    log.debug("input device %s: %s", entry.path, exc)
                    continue
                newest = atime if newest is None else max(newest, atime)
    except OSError as exc:
        log.debug("input devices under %s: %s", dev_root, exc)
        return None
    return None if newest is None else max(0.0, now - newest)


def logind_idle_seconds(idle: bool, since_us: int, now: float) -> float | None:
    """Idle seconds from logind's hint: 0 when active, ``now - since`` (>= 0) when idle,
    None when idle without a time (``since_us`` 0)."""
    if not idle:
        return 0.0
    if since_us <= 0:
        return None
    return max(0.0, now - since_us / 1e6)


class OwnerActivity:
    """Reads how long the owner has been away; every read bounded, each source failing alone.

    ``bus_address`` defaults to ``DBUS_SYSTEM_BUS_ADDRESS`` or the standard system bus
    socket. ``clock`` is monotonic seconds (``time.monotonic``), used only for ``retry_s``.
    Call :meth:`close` when done: it ends the bus connection and its thread.
    """

    def __init__(self, dev_root: str = "/dev", *, bus_address: str | None = None,
                 timeout_s: float = CALL_TIMEOUT_S, retry_s: float = LOGIND_RETRY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.dev_root = dev_root
        self._logind = LogindClient(bus_address, timeout_s=timeout_s)
        self._retry_s = retry_s
        self._clock = clock
        self._logind_skip_until = float("-inf")
        self._logind_failure: str | None = None

    def read(self, now: float) -> OwnerReading:
        """Seconds since the owner's last input at wall-clock ``now`` (``time.time()``), and
        which source answered; ``OwnerReading(None, None)`` when neither could."""
        seconds = self._from_logind(now)
        if seconds is not None:
            return OwnerReading(seconds, SOURCE_LOGIND)
        seconds = input_idle_seconds(self.dev_root, now)
        if seconds is not None:
            return OwnerReading(seconds, SOURCE_INPUT)
        return OwnerReading(None, None)

    def close(self) -> None:
        """End the bus connection and its thread; a later :meth:`read` opens them again."""
        self._logind.close()

    def _from_logind(self, now: float) -> float | None:
        """Idle seconds from logind, or None (failed, backing off, or no time to give)."""
        started = self._clock()
        if started < self._logind_skip_until:
            return None
        try:
            hint = self._logind.idle_hint()
        except LogindUnavailable as exc:
            self._logind_skip_until = self._clock() + self._retry_s
            if self._logind_failure is None:
                log.info("owner idle time: logind unavailable (%s); using input devices, "
                         "retrying every %g s", exc, self._retry_s)
            else:
                log.debug("owner idle time: logind still unavailable: %s", exc)
            self._logind_failure = str(exc)
            return None
        if self._logind_failure is not None:
            log.info("owner idle time: logind answers again")
            self._logind_failure = None
        return logind_idle_seconds(hint.idle, hint.since_us, now)
