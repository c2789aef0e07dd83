"""``ProcessLocal``: one value per process, made on first use, made again after ``fork``.

The one fork-safety scheme of the project for process-wide state (the agent's config and
``DesktopAgent``, the shared NVML source): threads, library handles and sockets do not
survive ``fork``, so a forked child (a prefork pool process) builds its own value on first
use instead of inheriting its parent's. ``set`` pins a value (tests, embedding code) and
``reset`` forgets it; both act on the calling process only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ProcessLocal(Generic[T]):
    """A lazily built value owned by the process that built it (thread-safe)."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._value: T | None = None
        self._pid: int | None = None

    def get(self) -> T:
        """This process's value, built by the factory on the first call in each process."""
        pid = os.getpid()
        value, owner = self._value, self._pid
        if value is not None and owner == pid:
            return value
        if owner != pid:  # a forked child: its parent's lock may have been held at fork
            self._lock = threading.Lock()
        with self._lock:
            if self._value is None or self._pid != pid:
                self._value = self._factory()
                self._pid = pid
            return self._value

    def set(self, value: T) -> None:
        """Use ``value`` in this process from now on."""
        with self._lock:
            self._value, self._pid = value, os.getpid()

    def reset(self) -> None:
        """Forget the value; the next :meth:`get` builds a new one."""
        with self._lock:
            self._value, self._pid = None, None

    def peek(self) -> T | None:
        """This process's value if one was built, else None (never builds one)."""
        return self._value if self._pid == os.getpid() else None
