"""Rate-limited logging: a flood of one kind of line (a broken agent sending garbage every
second) shows as a few lines and a count, not as the whole flood."""

from __future__ import annotations

import logging
from typing import Any

#: Lines per key (reason, restart, gap, ...) per window before suppressing.
LOG_BURST = 5
#: The window, seconds.
LOG_WINDOW_SECONDS = 60.0


class LimitedLog:
    """Logs through ``logger``, at most ``LOG_BURST`` lines per key per window; the first
    line of the next window says how many were suppressed. Times are unix seconds,
    passed in (the caller's receipt time), so the limiter reads no clock."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._windows: dict[str, tuple[float, int]] = {}

    def allow(self, key: str, now: float) -> tuple[bool, int]:
        """(may log now, lines suppressed since the last allowed one)."""
        start, count = self._windows.get(key, (now, 0))
        if now - start >= LOG_WINDOW_SECONDS:
            self._windows[key] = (now, 1)
            return True, max(0, count - LOG_BURST)
        self._windows[key] = (start, count + 1)
        return count < LOG_BURST, 0

    def log(self, level: int, key: str, now: float, msg: str, *args: Any) -> None:
        """``logger.log(level, msg, *args)`` unless ``key`` used up its lines."""
        if not self.logger.isEnabledFor(level):
            return
        allowed, suppressed = self.allow(key, now)
        if not allowed:
            return
        if suppressed:
            msg += " (%d similar lines suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args)
