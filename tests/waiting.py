"""Waiting in tests: poll what can be observed until a deadline, never sleep blindly.

A fixed ``time.sleep(n)`` bets that something has happened after ``n`` seconds, a bet a
loaded 2-core machine wins or loses at random. :func:`wait_until` asks instead, every
``interval`` seconds, and fails with a message naming what never happened.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T | None], timeout: float, what: str | Callable[[], str],
               *, interval: float = 0.05) -> T:
    """Call ``condition()`` until it returns something truthy, and return that.

    Raises ``AssertionError`` after ``timeout`` seconds (``what``, or ``what()`` for a
    message built at that moment, says what was awaited). Exceptions of ``condition``
    propagate: assert there what must hold while waiting (a process still alive).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            message = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(min(interval, left))
