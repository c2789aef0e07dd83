"""GPU detection across sources, and the probe runner that bounds it in time.

:class:`GpuProber` runs the detection order of DESIGN.md once:

1. NVIDIA: if sysfs shows every NVIDIA GPU runtime-suspended, report them from sysfs
   without waking them; otherwise NVML, and only if NVML is *unavailable* (no binding,
   no ``libnvidia-ml.so.1``) ``nvidia-smi``. An NVML that is present but failing is not
   retried through nvidia-smi: the tool sits on the same library and would fail (or
   hang) the same way.
2. AMD (amdgpu sysfs, ``rocm-smi`` for missing memory figures) and Intel (sysfs), always.

:class:`GpuMetrics` owns one daemon probe thread and turns probes into
:class:`~chiffon_worker.metrics.gpu_types.GpuSample`\\ s: ``sample()`` never raises and never
waits longer than ``timeout_s`` (plus scheduling noise). Recent readings are served from
a cache in a few microseconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from chiffon_worker.errors import GpuProbeError, GpuSourceUnavailable, ProbeTimeout
from chiffon_worker.metrics.amd import AmdSysfsSource
from chiffon_worker.metrics.drm_clients import DrmClientScanner
from chiffon_worker.metrics.gpu_health import assess
from chiffon_worker.metrics.gpu_processes import OwnerClassifier
from chiffon_worker.metrics.gpu_types import (
    EMPTY_READING,
    GpuDevice,
    GpuReading,
    GpuSample,
    ProbeState,
)
from chiffon_worker.metrics.intel import IntelSysfsSource
from chiffon_worker.metrics.nvidia_smi import NvidiaSmiSource
from chiffon_worker.metrics.nvml import nvidia_pci_devices, shared_source, suspended_nvidia_cards

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class GpuSource(Protocol):
    """One way of finding GPUs. ``read`` raises ``GpuSourceUnavailable`` when the source
    does not exist here, ``ProbeTimeout`` when it ran out of ``timeout_s`` seconds, and
    ``GpuProbeError`` when it exists but failed."""

    name: str

    def read(self, timeout_s: float) -> tuple[GpuDevice, ...]: ...


class Prober(Protocol):
    """What :class:`GpuMetrics` runs in its probe thread.

    ``probe`` returns a complete reading, or raises ``ProbeTimeout`` when some source ran
    out of time (the reading would be incomplete) or ``GpuProbeError``.
    """

    def probe(self) -> GpuReading: ...


def _unique_sources(devices: tuple[GpuDevice, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(d.source for d in devices))


class GpuProber:
    """One pass over every GPU source, in DESIGN.md's order, bounded by ``timeout_s``.

    Subprocess sources (nvidia-smi, rocm-smi) get whatever is left of ``timeout_s``
    seconds; in-process sources (NVML, sysfs) are bounded by the caller's thread (see
    :class:`GpuMetrics`). Sources are injectable for tests; defaults read the real
    machine under ``sysfs_root`` (GPU processes of AMD and Intel under ``proc_root``).
    """

    def __init__(self, sysfs_root: str = "/sys", timeout_s: float = 5.0, *,
                 nvml: GpuSource | None = None, nvidia_smi: GpuSource | None = None,
                 amd: GpuSource | None = None, intel: GpuSource | None = None,
                 respect_runtime_suspend: bool = True, clock: Clock = time.monotonic,
                 proc_root: str = "/proc") -> None:
        self.sysfs_root = sysfs_root
        self.timeout_s = timeout_s
        self.nvml: GpuSource = nvml if nvml is not None else shared_source()
        self.nvidia_smi: GpuSource = nvidia_smi if nvidia_smi is not None else NvidiaSmiSource()
        clients = DrmClientScanner(proc_root)  # one /proc scan serves AMD and Intel
        self.amd: GpuSource = amd if amd is not None else AmdSysfsSource(
            sysfs_root, proc_root=proc_root, clients=clients)
        self.intel: GpuSource = intel if intel is not None else IntelSysfsSource(
            sysfs_root, proc_root=proc_root, clients=clients)
        self.respect_runtime_suspend = respect_runtime_suspend
        self._clock = clock

    def _nvidia(self, deadline: float) -> tuple[GpuDevice, ...]:
        if self.respect_runtime_suspend:
            asleep = suspended_nvidia_cards(self.sysfs_root)
            if asleep is not None:
                log.debug("every NVIDIA GPU is runtime-suspended; not waking it")
                return asleep
        try:
            return self._read(self.nvml, deadline)
        except GpuSourceUnavailable as exc:
            log.debug("%s", exc)
        return self._read(self.nvidia_smi, deadline)

    def _read(self, source: GpuSource, deadline: float) -> tuple[GpuDevice, ...]:
        # Past the deadline a source still runs, with 0 s left: sysfs answers anyway, and a
        # subprocess source times out at once instead of extending the probe.
        return source.read(max(0.0, deadline - self._clock()))

    def probe(self) -> GpuReading:
        """Every GPU every source sees, with its processes' owners and its health set.
        Per-source failures go to ``errors``; raises
        :class:`~chiffon_worker.errors.ProbeTimeout` if any source ran out of time."""
        deadline = self._clock() + self.timeout_s
        devices: list[GpuDevice] = []
        errors: list[str] = []
        timeouts: list[str] = []
        steps: tuple[tuple[str, Callable[[], tuple[GpuDevice, ...]]], ...] = (
            ("nvidia", lambda: self._nvidia(deadline)),
            ("amd", lambda: self._read(self.amd, deadline)),
            ("intel", lambda: self._read(self.intel, deadline)),
        )
        for vendor, step in steps:
            try:
                devices.extend(step())
            except GpuSourceUnavailable as exc:
                log.debug("%s: %s", vendor, exc)
            except ProbeTimeout as exc:
                timeouts.append(str(exc))
            except GpuProbeError as exc:
                if vendor == "nvidia" and nvidia_pci_devices(self.sysfs_root) == []:
                    # Driver files installed but no NVIDIA GPU in the machine: absent.
                    log.debug("nvidia: %s (and no NVIDIA PCI device: ignored)", exc)
                else:
                    errors.append(str(exc))
        if timeouts:
            raise ProbeTimeout("; ".join(timeouts))
        classifier = OwnerClassifier()
        found = tuple(assess(classifier.classify(d)) for d in devices)
        return GpuReading(devices=found, sources=_unique_sources(found), errors=tuple(errors))

    def close(self) -> None:
        """Release library state (NVML shutdown) where an NVML source was given to this
        prober; the process-wide NVML session (the default) stays up for the process."""
        if self.nvml is shared_source():
            return
        closer = getattr(self.nvml, "close", None)
        if callable(closer):
            closer()


OutcomeKind = Literal["ok", "error", "absent", "timeout"]


@dataclass(frozen=True)
class _Outcome:
    """One finished probe. ``fresh_until`` (monotonic s) is when it stops being reused."""

    reading: GpuReading
    kind: OutcomeKind
    error: str | None
    started_at: float
    finished_at: float
    fresh_until: float


class GpuMetrics:
    """GPU samples for snapshots: bounded in time, cached, never raising.

    ``timeout_s``: the longest ``sample()`` waits for a probe (seconds). ``max_age_s``: how
    long a reading with GPUs (or an error) is reused without probing again.
    ``absent_recheck_s``: how long "no GPU at all", and a probe that timed out, are
    trusted before the sources are looked at again (a timed-out source is re-probed in
    the background; callers never wait for it). ``prober``: anything with
    ``probe() -> GpuReading`` (default: a :class:`GpuProber` over ``sysfs_root``).

    At most one probe is in flight, ever, in one lazily started daemon thread. A hung
    probe (driver in D-state) leaves the thread stuck; meanwhile every ``sample()``
    returns at once the last good reading marked ``stale`` (``timeout`` with no devices if
    none ever succeeded) until the probe finishes.
    """

    def __init__(self, sysfs_root: str = "/sys", timeout_s: float = 5.0, max_age_s: float = 1.0,
                 absent_recheck_s: float = 60.0, *, prober: Prober | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.sysfs_root = sysfs_root
        self.timeout_s = timeout_s
        self.max_age_s = max_age_s
        self.absent_recheck_s = absent_recheck_s
        self._prober: Prober = prober if prober is not None else GpuProber(sysfs_root, timeout_s)
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._stop = False
        self._busy = False  # a probe is requested or running
        self._requested = False
        self._probe_started = 0.0
        self._wait_until = 0.0  # callers wait for the in-flight probe until this moment
        self._outcome: _Outcome | None = None  # the last finished probe
        self._good: _Outcome | None = None  # the last probe that found GPUs, if still valid
        self._trouble_since: float | None = None  # start of the first unanswered probe
        self._reported: ProbeState | None = None
        self.probes_started = 0  # diagnostics (and tests)
        _live.add(self)

    def _reset_after_fork(self) -> None:
        """In a forked child: the probe thread and its lock did not come along."""
        self._cond = threading.Condition(threading.Lock())
        self._thread = None
        self._busy = False
        self._requested = False

    # -- the caller's side -----------------------------------------------------------------

    def sample(self) -> GpuSample:
        """The current GPU sample; returns within ``timeout_s`` seconds, never raises."""
        now = self._clock()
        out = self._outcome
        if out is not None and not self._busy and now < out.fresh_until:
            return self._deliver(out, now)
        return self._sample_slow(now)

    def _sample_slow(self, now: float) -> GpuSample:
        with self._cond:
            if not self._busy:
                out = self._outcome
                if out is not None and now < out.fresh_until:
                    return self._deliver(out, now)  # another caller refreshed it meanwhile
                # After a timeout, re-probe in the background: callers never wait on a
                # source that has already hung once.
                wait = out is None or out.kind != "timeout"
                self._start_probe_locked(now, wait)
            while self._busy:
                remaining = self._wait_until - self._clock()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            now = self._clock()
            if self._busy:
                if self._trouble_since is None:
                    self._trouble_since = self._probe_started
                running = now - self._probe_started
                return self._degraded(now, f"GPU probe timed out: still running after "
                                           f"{running:.1f} s (timeout {self.timeout_s:g} s)")
            assert self._outcome is not None
            return self._deliver(self._outcome, now)

    def _deliver(self, out: _Outcome, now: float) -> GpuSample:
        if out.kind == "timeout":
            return self._degraded(now, out.error)
        state: ProbeState = out.kind
        sample = GpuSample(out.reading, state, now - out.finished_at, out.error)
        if state is not self._reported:
            self._report(state, out.error)
        return sample

    def _degraded(self, now: float, error: str | None) -> GpuSample:
        good = self._good
        if good is not None:
            sample = GpuSample(good.reading, "stale", now - good.finished_at, error)
        else:
            since = self._trouble_since if self._trouble_since is not None else now
            sample = GpuSample(EMPTY_READING, "timeout", now - since, error)
        if sample.state is not self._reported:
            self._report(sample.state, error)
        return sample

    def _report(self, state: ProbeState, error: str | None) -> None:
        previous, self._reported = self._reported, state
        detail = f": {error}" if error else ""
        if previous is None and state in ("ok", "absent"):
            log.info("GPU probe state %s%s", state, detail)
        else:
            log.warning("GPU probe state %s -> %s%s", previous or "(start)", state, detail)

    # -- the probe thread ------------------------------------------------------------------

    def _start_probe_locked(self, now: float, wait: bool) -> None:
        self._busy = True
        self._requested = True
        self._stop = False
        self._probe_started = now
        self._wait_until = now + self.timeout_s if wait else now
        self.probes_started += 1
        if self._thread is None:
            self._spawn_locked()
        self._cond.notify_all()

    def _spawn_locked(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chiffon-gpu-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                with self._cond:
                    while not self._requested and not self._stop:
                        self._cond.wait()
                    if not self._requested:
                        self._thread = None  # stopped while idle
                        return
                    self._requested = False
                    started = self._probe_started
                self._probe_and_store(started)
        finally:
            # Reached on stop, or when an unexpected exception ends the thread; in the
            # latter case a request made meanwhile gets a new thread.
            with self._cond:
                if self._thread is me:
                    self._thread = None
                    if self._requested:
                        self._spawn_locked()

    def _probe_and_store(self, started: float) -> None:
        outcome: _Outcome | None = None
        try:
            outcome = self._probe_once(started)
        finally:
            # Also on an unexpected exception (a bug in a source): callers must not wait
            # forever. The exception then ends this thread (threading.excepthook logs it)
            # and the next probe starts a new one.
            with self._cond:
                if outcome is None:
                    outcome = self._outcome_of(started, EMPTY_READING, "error",
                                               "GPU probe crashed (see log)")
                self._store_locked(outcome)
                self._busy = False
                self._cond.notify_all()

    def _probe_once(self, started: float) -> _Outcome:
        try:
            reading = self._prober.probe()
        except ProbeTimeout as exc:
            return self._outcome_of(started, EMPTY_READING, "timeout", str(exc))
        except GpuProbeError as exc:
            return self._outcome_of(started, EMPTY_READING, "error", str(exc))
        except GpuSourceUnavailable:
            return self._outcome_of(started, EMPTY_READING, "absent", None)
        error = "; ".join(reading.errors) or None
        if reading.devices:
            return self._outcome_of(started, reading, "ok", error)
        if error:
            return self._outcome_of(started, reading, "error", error)
        return self._outcome_of(started, reading, "absent", None)

    def _outcome_of(self, started: float, reading: GpuReading, kind: OutcomeKind,
                    error: str | None) -> _Outcome:
        finished = self._clock()
        ttl = self.absent_recheck_s if kind in ("absent", "timeout") else self.max_age_s
        return _Outcome(reading, kind, error, started, finished, finished + ttl)

    def _store_locked(self, outcome: _Outcome) -> None:
        self._outcome = outcome
        if outcome.kind == "timeout":
            if self._trouble_since is None:
                self._trouble_since = outcome.started_at
            return
        self._trouble_since = None
        # A reading is "last good" only until a later probe says otherwise.
        self._good = outcome if outcome.kind == "ok" else None

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the probe thread when idle and release NVML. A hung probe thread is a
        daemon and is left behind. ``sample()`` still works afterwards (it restarts)."""
        with self._cond:
            self._stop = True
            busy = self._busy
            self._cond.notify_all()
        if not busy:
            closer = getattr(self._prober, "close", None)
            if callable(closer):
                closer()


_live: weakref.WeakSet[GpuMetrics] = weakref.WeakSet()


def _reset_all_after_fork() -> None:
    for gpu in list(_live):
        gpu._reset_after_fork()


os.register_at_fork(after_in_child=_reset_all_after_fork)
