"""Run a command with a hard bound on how long the caller waits.

``subprocess.run(timeout=...)`` kills the child on timeout but then waits for it without
bound; a child stuck in uninterruptible sleep (a wedged GPU driver) blocks the caller
anyway. :func:`run_bounded` never does: the child gets its own process group, the whole
group is killed with SIGKILL on timeout, and if the child still cannot be reaped within
:data:`REAP_GRACE_S` seconds it is handed to a daemon reaper thread. The caller is never
blocked longer than ``timeout_s + REAP_GRACE_S`` seconds (plus scheduling noise).

Executables are looked up with :func:`shutil.which`; the answer (found or not) is cached
for :data:`WHICH_CACHE_S` seconds per ``(name, PATH)`` so a missing tool costs one dict
lookup per call.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from chiffon_worker.errors import GpuSourceUnavailable, ProbeTimeout

log = logging.getLogger(__name__)

#: Seconds granted to a killed child to be reaped before it is left to a reaper thread.
REAP_GRACE_S = 0.5
#: Seconds a :func:`which` answer (path or "not found") is trusted.
WHICH_CACHE_S = 60.0

_which_cache: dict[tuple[str, str], tuple[float, str | None]] = {}
_which_lock = threading.Lock()


@dataclass(frozen=True)
class CompletedCommand:
    """A command that finished within its bound: exit status and decoded output (UTF-8)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration_s: float


def which(name: str) -> str | None:
    """``shutil.which(name)`` cached for :data:`WHICH_CACHE_S` seconds per (name, $PATH)."""
    key = (name, os.environ.get("PATH", ""))
    now = time.monotonic()
    with _which_lock:
        hit = _which_cache.get(key)
        if hit is not None and now - hit[0] < WHICH_CACHE_S:
            return hit[1]
    found = shutil.which(name)
    with _which_lock:
        _which_cache[key] = (now, found)
    return found


def clear_which_cache() -> None:
    """Forget every cached :func:`which` answer (tests; a tool installed at run time)."""
    with _which_lock:
        _which_cache.clear()


def _reap_forever(proc: subprocess.Popen[bytes]) -> None:
    """Body of a reaper thread: wait for a killed child however long it takes."""
    try:
        proc.communicate()
    except (OSError, ValueError) as exc:
        log.debug("reaper for pid %s: %s", proc.pid, exc)
    log.info("pid %s (%s) finally exited with %s", proc.pid, proc.args, proc.returncode)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone
    except PermissionError:
        proc.kill()


def run_bounded(argv: Sequence[str], timeout_s: float) -> CompletedCommand:
    """Run ``argv`` and return its exit status and output, waiting at most ``timeout_s`` s.

    ``argv[0]`` is resolved through the cached :func:`which`. Raises
    :class:`~chiffon_worker.errors.GpuSourceUnavailable` when the executable does not
    exist (or cannot be started) and :class:`~chiffon_worker.errors.ProbeTimeout` when it
    runs past ``timeout_s`` seconds; in that case its whole process group has been sent
    SIGKILL and the call has returned within ``timeout_s + REAP_GRACE_S`` seconds.
    A non-zero exit status is not an error here: the caller interprets it.
    """
    if not argv:
        raise ValueError("empty command")
    name = argv[0]
    exe = which(name)
    if exe is None:
        raise GpuSourceUnavailable(f"{name}: not found on PATH")
    cmd = (exe, *argv[1:])
    started = time.monotonic()
    try:
        proc = subprocess.Popen(  # fixed argv, no shell
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
    except (FileNotFoundError, PermissionError) as exc:
        raise GpuSourceUnavailable(f"{name}: cannot start: {exc.strerror or exc}") from exc
    try:
        out, err = proc.communicate(timeout=max(0.0, timeout_s))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            proc.communicate(timeout=REAP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %s) survived SIGKILL for %.1f s (uninterruptible sleep?); "
                        "leaving it to a reaper thread", name, proc.pid, REAP_GRACE_S)
            threading.Thread(target=_reap_forever, args=(proc,), daemon=True,
                             name=f"reap-{name}-{proc.pid}").start()
        raise ProbeTimeout(f"{name} timed out after {timeout_s:g} s") from None
    return CompletedCommand(
        argv=cmd,
        returncode=proc.returncode,
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        duration_s=time.monotonic() - started,
    )
