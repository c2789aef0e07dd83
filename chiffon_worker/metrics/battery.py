"""Whether the machine runs on battery, from ``psutil.sensors_battery()``.

None means unknown: no battery (a desktop), psutil cannot tell whether mains power is
plugged in, psutil has no battery support on this platform, or reading it failed. A failure
is that reading's only: it is logged (WARNING the first time, DEBUG while it lasts) and the
next reading tries again.
"""

from __future__ import annotations

import logging

import psutil

log = logging.getLogger(__name__)


class Battery:
    """Reads the power source; cheap (one sysfs scan by psutil), never raises."""

    def __init__(self) -> None:
        self._failing = False

    def on_battery(self) -> bool | None:
        """True on battery, False on mains power, None when unknown or unreadable."""
        sensors = getattr(psutil, "sensors_battery", None)
        if sensors is None:
            return None
        try:
            battery = sensors()
        except (OSError, ValueError, ArithmeticError, RuntimeError, psutil.Error) as exc:
            if not self._failing:
                log.warning("battery state unreadable: %r", exc)
            else:
                log.debug("battery state still unreadable: %r", exc)
            self._failing = True
            return None
        self._failing = False
        if battery is None or battery.power_plugged is None:
            return None
        return not battery.power_plugged
