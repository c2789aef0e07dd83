"""Executable fake ``nvidia-smi`` (and ``rocm-smi``) scripts for tests.

Each helper writes a ``/bin/sh`` script into a fresh directory whose name carries a unique
marker, and returns a :class:`FakeTool`; ``install(monkeypatch)`` prepends that directory to
``PATH``. Output shapes are those of gpu-samples.md. Every script appends a line to
``calls.log`` beside it on each run, so tests can count invocations; processes of a fake
can be found with :func:`running` (by the marker in their command line).

A fake ``nvidia-smi`` answers its two query kinds apart (it switches on its arguments):
the GPU query (``--query-gpu=...``) and the process query (``--query-compute-apps=...``).
``calls.log`` holds each run's arguments, one run a line.
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

#: The argument that tells nvidia-smi's process query apart from its GPU query.
APPS_QUERY = "--query-compute-apps="

# The GPU query nvidia_smi.QUERY_ARGS asks (gpu-samples.md's six fields first, then the
# depth fields): index, name, memory.total, memory.free, utilization.gpu, temperature.gpu,
# uuid, power.draw, enforced.power.limit, clocks_throttle_reasons.active,
# ecc.errors.uncorrected.volatile.total. Fields are separated by ", "; memory is MiB.
UUID_4090 = "GPU-5c2b7f4e-1f0a-4d2b-9a41-7e3c1b2d9f10"
UUID_3090 = "GPU-a8d1c3e2-77b4-4e0f-8c5d-2f6b9e1a4c33"
UUID_A100 = "GPU-0e9b7c61-3a52-4f18-b6d7-91c4e2a8f005"
UUID_GB10 = "GPU-7f3a1d92-c4e6-4b08-a1f5-5d2e8c9b6a47"
LINE_4090 = (f"0, NVIDIA GeForce RTX 4090, 24564, 23791, 2, 38, {UUID_4090}, 31.42, 450.00, "
             "0x0000000000000000, [N/A]")
LINE_3090 = (f"1, NVIDIA GeForce RTX 3090, 24576, 24245, 0, 31, {UUID_3090}, 22.17, 350.00, "
             "0x0000000000000001, [N/A]")
TWO_GPUS = f"{LINE_4090}\n{LINE_3090}\n"
MIG_A100 = (f"0, NVIDIA A100-SXM4-80GB, 81920, 45383, [N/A], 33, {UUID_A100}, 61.05, 400.00, "
            "0x0000000000000001, 0\n")
UNIFIED_MEMORY = (f"0, NVIDIA GB10, [N/A], [N/A], 3, 41, {UUID_GB10}, [N/A], [N/A], "
                  "0x0000000000000000, [N/A]\n")
# gpu-samples.md: the original six-field query
# (`--query-gpu=index,name,memory.total,memory.free,utilization.gpu,temperature.gpu`).
TWO_GPUS_SHORT = ("0, NVIDIA GeForce RTX 4090, 24564, 23791, 2, 38\n"
                  "1, NVIDIA GeForce RTX 3090, 24576, 24245, 0, 31\n")
GARBAGE = "NVIDIA-SMI couldn't find libnvidia-ml.so library in your system.\n"
# `--query-compute-apps=gpu_uuid,pid,process_name,used_memory`: used_memory is MiB.
APPS_ON_4090 = (f"{UUID_4090}, 4242, /usr/bin/python3, 1536\n"
                f"{UUID_4090}, 5151, /usr/local/bin/ollama, 20480\n")
APPS_UNDER_MIG = f"{UUID_A100}, 6161, /usr/bin/python3, [N/A]\n"
# An old driver asked for a field it does not know (exit status 2, message on stdout).
UNKNOWN_FIELD_MESSAGE = ('Field "clocks_throttle_reasons.active" is not a valid field to query.'
                         "\n\n")
# One GPU fell off the bus: the healthy GPU's line on stdout, the lost one on stderr, exit 15.
LOST_BUS_ID = "0000:3B:00.0"
LOST_GPU_STDERR = (f"Unable to determine the device handle for GPU{LOST_BUS_ID}: GPU is lost. "
                   "Reboot the system to recover this GPU\n")

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
    def runs(self) -> list[str]:
        """The arguments of every run so far, one string a run, in order."""
        log = self.directory / "calls.log"
        return log.read_text().splitlines() if log.exists() else []

    @property
    def calls(self) -> int:
        """How many times the script has started, not counting process queries
        (``--query-compute-apps``): for nvidia-smi, the GPU queries it answered."""
        return sum(1 for run in self.runs if APPS_QUERY not in run)

    def runs_with(self, fragment: str) -> int:
        """How many runs had ``fragment`` in their arguments."""
        return sum(1 for run in self.runs if fragment in run)


def _base_path() -> str:
    return "/usr/local/bin:/usr/bin:/bin"


def write_tool(tmp_path: Path, body: str, name: str = "nvidia-smi") -> FakeTool:
    """A ``/bin/sh`` script named ``name`` running ``body``, in a fresh marked directory."""
    marker = f"chiffon-fake-{uuid.uuid4().hex[:12]}"
    directory = tmp_path / marker
    directory.mkdir(parents=True)
    path = directory / name
    log = shlex.quote(str(directory / "calls.log"))
    path.write_text(f"#!/bin/sh\necho \"run $*\" >> {log}\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return FakeTool(directory, path, marker)


def _answer(stdout: str, stderr: str = "", exit_code: int = 0) -> str:
    """Shell lines printing ``stdout``/``stderr`` verbatim, then exiting ``exit_code``."""
    return (f"printf '%s' {shlex.quote(stdout)}\n"
            f"printf '%s' {shlex.quote(stderr)} >&2\n"
            f"exit {exit_code}")


def _by_query(gpu_query: str, apps_query: str) -> str:
    """Shell ``case`` running ``apps_query`` for the process query, else ``gpu_query``."""
    return (f'case "$*" in\n'
            f"  *{APPS_QUERY}*)\n{apps_query}\n  ;;\n"
            f"  *)\n{gpu_query}\n  ;;\n"
            "esac")


def nvidia_smi(tmp_path: Path, gpus: str = TWO_GPUS, apps: str = "", *, stderr: str = "",
               exit_code: int = 0, apps_stderr: str = "", apps_exit_code: int = 0,
               apps_seconds: float = 0) -> FakeTool:
    """nvidia-smi answering the GPU query with ``gpus``/``stderr``/``exit_code`` and the
    process query with ``apps``/``apps_stderr``/``apps_exit_code``, after sleeping
    ``apps_seconds`` (a process query that hangs)."""
    apps_query = _answer(apps, apps_stderr, apps_exit_code)
    if apps_seconds:
        apps_query = f"sleep {apps_seconds}\n{apps_query}"
    return write_tool(tmp_path, _by_query(_answer(gpus, stderr, exit_code), apps_query))


def old_driver(tmp_path: Path, gpus: str = TWO_GPUS_SHORT) -> FakeTool:
    """nvidia-smi of a driver that knows only the six original fields: a query naming
    ``clocks_throttle_reasons.active`` exits 2 (:data:`UNKNOWN_FIELD_MESSAGE`), any other
    GPU query prints ``gpus``."""
    body = (f'case "$*" in\n'
            f"  *clocks_throttle_reasons*)\n{_answer(UNKNOWN_FIELD_MESSAGE, '', 2)}\n  ;;\n"
            f"  *)\n{_answer(gpus)}\n  ;;\n"
            "esac")
    return write_tool(tmp_path, body)


def printing(tmp_path: Path, stdout: str, stderr: str = "", exit_code: int = 0,
             name: str = "nvidia-smi") -> FakeTool:
    """A tool that prints ``stdout``/``stderr`` verbatim and exits with ``exit_code``.

    Named ``nvidia-smi``, it does so for the GPU query and finds no process for the
    process query (empty output, exit 0), as :func:`nvidia_smi` does.
    """
    if name == "nvidia-smi":
        return nvidia_smi(tmp_path, stdout, stderr=stderr, exit_code=exit_code)
    return write_tool(tmp_path, _answer(stdout, stderr, exit_code), name)


def failing(tmp_path: Path, exit_code: int) -> FakeTool:
    """nvidia-smi exiting with a documented status and its message (see EXIT_MESSAGES)."""
    out, err = EXIT_MESSAGES[exit_code]
    return printing(tmp_path, out + ("\n" if out else ""), err + ("\n" if err else ""),
                    exit_code)


def sleeping(tmp_path: Path, seconds: float = 600) -> FakeTool:
    """nvidia-smi that hangs far past any timeout (a wedged driver)."""
    return write_tool(tmp_path, f"sleep {seconds}")


def hangs_after_first(tmp_path: Path, stdout: str = TWO_GPUS, seconds: float = 600) -> FakeTool:
    """nvidia-smi that answers the GPU query with ``stdout`` once, then hangs on every
    later GPU query; its process query always finds no process at once."""
    flag = "$(dirname \"$0\")/answered"
    gpu_query = (f"if [ -e {flag} ]; then sleep {seconds}; exit 0; fi\n"
                 f"touch {flag}\n"
                 f"printf '%s' {shlex.quote(stdout)}")
    return write_tool(tmp_path, _by_query(gpu_query, "exit 0"))


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
