"""Executable fake ``nvidia-smi`` (and ``rocm-smi``) scripts for tests.

Each helper writes a ``/bin/sh`` script into a fresh directory whose name carries a unique
marker, and returns a :class:`FakeTool`; ``install(monkeypatch)`` prepends that directory to
``PATH``. Output shapes are those of gpu-samples.md. Every script appends a line to
``calls.log`` beside it on each run, so tests can count invocations; processes of a fake
can be found with :func:`running` (by the marker in their command line).
"""

from __future__ import annotations

import os
import shlex
import signal
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

# gpu-samples.md: `nvidia-smi --query-gpu=index,name,memory.total,memory.free,
# utilization.gpu,temperature.gpu --format=csv,noheader,nounits`
TWO_GPUS = ("0, NVIDIA GeForce RTX 4090, 24564, 23791, 2, 38\n"
            "1, NVIDIA GeForce RTX 3090, 24576, 24245, 0, 31\n")
MIG_A100 = "0, NVIDIA A100-SXM4-80GB, 81920, 45383, [N/A], 33\n"
UNIFIED_MEMORY = "0, NVIDIA GB10, [N/A], [N/A], 3, 41\n"
GARBAGE = "NVIDIA-SMI couldn't find libnvidia-ml.so library in your system.\n"

# Documented exit statuses with the message each prints (18 prints on stdout).
EXIT_MESSAGES = {
    4: ("", "Insufficient Permissions"),
    9: ("", "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."),
    12: ("", "NVIDIA-SMI couldn't find libnvidia-ml.so library in your system."),
    15: ("", "Unable to determine the device handle for GPU0000:01:00.0: GPU is lost."),
    18: ("Failed to initialize NVML: Driver/library version mismatch", ""),
    255: ("", "Failed to initialize NVML: Unknown Error"),
}


@dataclass(frozen=True)
class FakeTool:
    """A fake executable on disk. ``marker`` is unique and appears in its path."""

    directory: Path
    path: Path
    marker: str

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Put this tool first on ``PATH`` for the test."""
        monkeypatch.setenv("PATH", f"{self.directory}:{_base_path()}")

    @property
    def calls(self) -> int:
        """How many times the script has started."""
        log = self.directory / "calls.log"
        return len(log.read_text().splitlines()) if log.exists() else 0


def _base_path() -> str:
    return "/usr/local/bin:/usr/bin:/bin"


def write_tool(tmp_path: Path, body: str, name: str = "nvidia-smi") -> FakeTool:
    """A ``/bin/sh`` script named ``name`` running ``body``, in a fresh marked directory."""
    marker = f"chiffon-fake-{uuid.uuid4().hex[:12]}"
    directory = tmp_path / marker
    directory.mkdir(parents=True)
    path = directory / name
    log = shlex.quote(str(directory / "calls.log"))
    path.write_text(f"#!/bin/sh\necho run >> {log}\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return FakeTool(directory, path, marker)


def printing(tmp_path: Path, stdout: str, stderr: str = "", exit_code: int = 0,
             name: str = "nvidia-smi") -> FakeTool:
    """A tool that prints ``stdout``/``stderr`` verbatim and exits with ``exit_code``."""
    body = (f"printf '%s' {shlex.quote(stdout)}\n"
            f"printf '%s' {shlex.quote(stderr)} >&2\n"
            f"exit {exit_code}")
    return write_tool(tmp_path, body, name)


def failing(tmp_path: Path, exit_code: int) -> FakeTool:
    """nvidia-smi exiting with a documented status and its message (see EXIT_MESSAGES)."""
    out, err = EXIT_MESSAGES[exit_code]
    return printing(tmp_path, out + ("\n" if out else ""), err + ("\n" if err else ""),
                    exit_code)


def sleeping(tmp_path: Path, seconds: float = 600) -> FakeTool:
    """nvidia-smi that hangs far past any timeout (a wedged driver)."""
    return write_tool(tmp_path, f"sleep {seconds}")


def hangs_after_first(tmp_path: Path, stdout: str = TWO_GPUS, seconds: float = 600) -> FakeTool:
    """nvidia-smi that answers ``stdout`` once, then hangs on every later run."""
    flag = "$(dirname \"$0\")/answered"
    body = (f"if [ -e {flag} ]; then sleep {seconds}; exit 0; fi\n"
            f"touch {flag}\n"
            f"printf '%s' {shlex.quote(stdout)}")
    return write_tool(tmp_path, body)


def escaping_pipe_holder(tmp_path: Path, seconds: float = 600) -> FakeTool:
    """A tool whose grandchild leaves the process group but keeps stdout open, so the
    pipe never closes after the group is killed (stands in for an unreapable child)."""
    tool = write_tool(tmp_path, "true")  # reserve a marked directory, then write the body
    body = (f"setsid sh -c 'sleep {seconds}; true' {tool.marker}-grandchild &\n"
            f"sleep {seconds}")
    tool.path.write_text(f"#!/bin/sh\necho run >> '{tool.directory}/calls.log'\n{body}\n")
    return tool


def running(marker: str) -> list[psutil.Process]:
    """Live processes whose command line mentions ``marker``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or ())
            if marker in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def kill_all(marker: str) -> None:
    """Kill what remains of a fake, with its process group where it leads one (cleanup
    after tests that leave a grandchild behind). Never touches the test's own group."""
    for proc in running(marker):
        try:
            pgid = os.getpgid(proc.pid)
            if pgid == proc.pid and pgid != os.getpgrp():
                os.killpg(pgid, signal.SIGKILL)
            else:
                proc.kill()
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
