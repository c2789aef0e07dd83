"""The probe runner: detection order, one reading for all vendors, and the time bound.

``GpuProber`` and ``GpuMetrics`` are the real code; hardware is faked (fake pynvml, fake
``nvidia-smi`` scripts on PATH, fake sysfs trees). Hang tests use a timeout of 1 s or less.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from chiffon_worker.errors import GpuSourceUnavailable, ProbeTimeout
from chiffon_worker.metrics import bounded_subprocess as bs
from chiffon_worker.metrics.gpu import GpuMetrics, GpuProber
from chiffon_worker.metrics.gpu_snapshot import gpu_keys
from chiffon_worker.metrics.gpu_types import GpuDevice, GpuSample
from chiffon_worker.metrics.nvml import NvmlSource, shared_source
from tests.fakes import fake_pynvml as fnv
from tests.fakes import nvidia_smi as fake
from tests.fakes import sysfs
from tests.waiting import wait_until


def gib(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 3)


def mib_gib(mib: int) -> float:
    return round(mib / 1024, 3)


NO_NVML = NvmlSource(load=fnv.unavailable_loader)


def nvml_with(*gpus: fnv.FakeGpu, **scenario: Any) -> tuple[NvmlSource, Any]:
    mod, load = fnv.loader(fnv.Scenario(gpus=list(gpus), **scenario))
    return NvmlSource(load=load), mod


@pytest.fixture(autouse=True)
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No real GPU tools: tests put their fakes first on PATH explicitly."""
    empty = tmp_path / "no-tools"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.fixture
def root(tmp_path: Path) -> str:
    """A sysfs root with one awake NVIDIA GPU on the PCI bus (no DRM entry, as without
    nvidia-drm) and no other GPU: NVML or nvidia-smi decide what is reported."""
    return str(sysfs.write_tree(tmp_path / "sys", sysfs.nvidia_card("0000:01:00.0")))


@pytest.fixture
def make_metrics() -> Iterator[Callable[..., GpuMetrics]]:
    """Build ``GpuMetrics`` over a real ``GpuProber``; closed after the test."""
    made: list[GpuMetrics] = []

    def build(sysfs_root: str, nvml: NvmlSource = NO_NVML, timeout_s: float = 1.0,
              **kwargs: Any) -> GpuMetrics:
        prober = GpuProber(sysfs_root, timeout_s, nvml=nvml)
        gpu = GpuMetrics(sysfs_root, timeout_s, prober=prober, **kwargs)
        made.append(gpu)
        return gpu

    yield build
    for gpu in made:
        gpu.close()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


# -- detection order -----------------------------------------------------------------------


def test_nvml_answers_and_nvidia_smi_is_not_run(
        root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = fake.printing(tmp_path, fake.TWO_GPUS)
    tool.install(monkeypatch)
    nvml, _ = nvml_with(fnv.RTX4090_V2)
    reading = GpuProber(root, nvml=nvml).probe()
    assert reading.sources == ("nvml",)
    assert [d.name for d in reading.devices] == ["NVIDIA GeForce RTX 4090"]
    assert tool.calls == 0


def test_without_nvml_nvidia_smi_is_used(
        root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.printing(tmp_path, fake.TWO_GPUS).install(monkeypatch)
    reading = GpuProber(root, nvml=NO_NVML).probe()
    assert reading.sources == ("nvidia-smi",)
    assert [d.vram_total_gb for d in reading.devices] == [mib_gib(24564), mib_gib(24576)]


def test_failing_nvml_is_an_error_and_nvidia_smi_is_not_tried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = sysfs.write_tree(tmp_path / "sys", sysfs.nvidia_card("0000:01:00.0"))
    tool = fake.printing(tmp_path, fake.TWO_GPUS)
    tool.install(monkeypatch)
    nvml, _ = nvml_with(fnv.RTX4090_V2, init_error="NVML_ERROR_LIB_RM_VERSION_MISMATCH")
    reading = GpuProber(str(root), nvml=nvml).probe()
    assert reading.devices == ()
    assert len(reading.errors) == 1
    assert reading.errors[0].startswith("NVML: driver/library version mismatch")
    assert tool.calls == 0


def test_driver_files_without_an_nvidia_gpu_in_the_machine_are_absent_not_error(
        tmp_path: Path) -> None:
    root = sysfs.write_tree(tmp_path / "sys", sysfs.AMD_DGPU_CARD1)
    nvml, _ = nvml_with(init_error="NVML_ERROR_DRIVER_NOT_LOADED")
    reading = GpuProber(str(root), nvml=nvml).probe()
    assert reading.errors == ()
    assert reading.sources == ("amd-sysfs",)


def test_every_vendor_goes_into_one_reading_and_primary_is_most_vram(
        tmp_path: Path, make_metrics: Callable[..., GpuMetrics]) -> None:
    xe = replace(sysfs.INTEL_XE_CARD0, number=2)
    root = sysfs.write_tree(tmp_path / "sys", sysfs.AMD_APU_CARD0, sysfs.AMD_DGPU_CARD1, xe,
                            sysfs.nvidia_card("0000:01:00.0"))
    nvml, _ = nvml_with(fnv.RTX4090_V2, fnv.RTX3090)
    sample = make_metrics(str(root), nvml=nvml).sample()
    keys = gpu_keys(sample)
    assert sample.reading.sources == ("nvml", "amd-sysfs", "intel-sysfs")
    assert [(g["vendor"], g["index"]) for g in keys["gpus"]] == [
        ("nvidia", 0), ("nvidia", 1), ("amd", 0), ("amd", 1), ("intel", 2)]
    # The 3090 (24576 MiB = 24.0 GiB) beats the 4090 (25757220864 B) and the AMD dGPU.
    assert max(gib(25757220864), gib(25753026560), mib_gib(24576)) == mib_gib(24576)
    assert keys["gpu_vram_total_gb"] == mib_gib(24576)
    assert keys["gpu_vram_available_gb"] == gib(24245 * 2**20)
    assert (keys["gpu_type"], keys["gpu_count"]) == ("nvidia", 5)
    assert keys["gpu_probe"]["source"] == "nvml+amd-sysfs+intel-sysfs"


def test_a_subprocess_source_out_of_time_makes_the_probe_time_out(
        root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.sleeping(tmp_path).install(monkeypatch)
    prober = GpuProber(root, 0.3, nvml=NO_NVML)
    started = time.monotonic()
    with pytest.raises(ProbeTimeout):
        prober.probe()
    assert time.monotonic() - started < 0.3 + 0.5


# -- GpuMetrics: states, numbers, caching ----------------------------------------------------


def test_two_nvidia_smi_gpus_give_exact_snapshot_keys(
        root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_metrics: Callable[..., GpuMetrics]) -> None:
    fake.printing(tmp_path, fake.TWO_GPUS).install(monkeypatch)
    keys = gpu_keys(make_metrics(root).sample())
    probe = keys.pop("gpu_probe")
    gpus = keys.pop("gpus")
    assert {k: keys[k] for k in ("gpu_vram_total_gb", "gpu_vram_available_gb", "gpu_type",
                                 "gpu_count", "gpu_vram_known", "gpu_health")} == {
        "gpu_vram_total_gb": mib_gib(24576),  # the 3090: 24576 MiB > the 4090's 24564 MiB
        "gpu_vram_available_gb": mib_gib(24245),
        "gpu_type": "nvidia",
        "gpu_count": 2,
        "gpu_vram_known": True,
        "gpu_health": "ok",
    }
    first_six = ("index", "vendor", "name", "vram_total_gb", "vram_available_gb",
                 "utilization_percent", "temperature_c", "source", "error", "uuid")
    assert [{k: g[k] for k in first_six} for g in gpus] == [
        {"index": 0, "vendor": "nvidia", "name": "NVIDIA GeForce RTX 4090",
         "vram_total_gb": mib_gib(24564), "vram_available_gb": mib_gib(23791),
         "utilization_percent": 2.0, "temperature_c": 38.0, "source": "nvidia-smi",
         "error": None, "uuid": fake.UUID_4090},
        {"index": 1, "vendor": "nvidia", "name": "NVIDIA GeForce RTX 3090",
         "vram_total_gb": mib_gib(24576), "vram_available_gb": mib_gib(24245),
         "utilization_percent": 0.0, "temperature_c": 31.0, "source": "nvidia-smi",
         "error": None, "uuid": fake.UUID_3090},
    ]
    assert [(g["processes"], g["health"]) for g in gpus] == [([], "ok"), ([], "ok")]
    assert (probe["state"], probe["source"], probe["error"]) == ("ok", "nvidia-smi", None)
    assert 0 <= probe["age_seconds"] < 0.5


def test_the_hottest_gpus_temperature_is_a_flat_key(
        root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_metrics: Callable[..., GpuMetrics]) -> None:
    fake.printing(tmp_path, fake.TWO_GPUS).install(monkeypatch)
    keys = gpu_keys(make_metrics(root).sample())
    hottest = max(g["temperature_c"] for g in keys["gpus"])
    assert hottest > 31.0, "the 4090 runs hotter than the idle 3090 in the sample"
    assert keys["gpu_temperature_max_c"] == hottest


def test_machine_without_gpus_reports_absent_and_zeros(
        root: str, make_metrics: Callable[..., GpuMetrics]) -> None:
    keys = gpu_keys(make_metrics(root).sample())
    assert keys == {
        "gpu_vram_total_gb": 0.0, "gpu_vram_available_gb": 0.0, "gpu_vram_known": True,
        "gpu_type": "none", "gpu_count": 0, "gpus": [], "gpu_health": "none",
        "gpu_health_reason": None, "gpu_power_draw_w": None, "gpu_power_limit_w": None,
        "gpu_processes": None, "gpu_foreign_processes": None, "gpu_foreign_memory_gb": None,
        "gpu_temperature_max_c": None,
        "gpu_probe": {"state": "absent", "source": "none", "age_seconds": keys["gpu_probe"][
            "age_seconds"], "error": None},
    }


def test_every_present_source_failing_is_state_error_with_its_text(
        tmp_path: Path, make_metrics: Callable[..., GpuMetrics]) -> None:
    root = sysfs.write_tree(tmp_path / "sys", sysfs.nvidia_card("0000:01:00.0"))
    nvml, _ = nvml_with(fnv.RTX4090_V2, init_error="NVML_ERROR_LIB_RM_VERSION_MISMATCH")
    sample = make_metrics(str(root), nvml=nvml).sample()
    assert sample.state == "error"
    assert sample.error is not None
    assert sample.error.startswith("NVML: driver/library version mismatch")
    assert gpu_keys(sample)["gpu_type"] == "none"


def test_nvidia_smi_reporting_a_lost_gpu_is_state_error(
        root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_metrics: Callable[..., GpuMetrics]) -> None:
    fake.failing(tmp_path, 15).install(monkeypatch)
    sample = make_metrics(root).sample()
    assert sample.state == "error"
    assert sample.error is not None and "GPU is lost" in sample.error


def test_one_lost_gpu_among_two_is_still_ok_with_that_device_marked(
        root: str, make_metrics: Callable[..., GpuMetrics]) -> None:
    nvml, _ = nvml_with(fnv.RTX4090_V2, replace(fnv.RTX3090, lost=True))
    sample = make_metrics(root, nvml=nvml).sample()
    assert sample.state == "ok"
    keys = gpu_keys(sample)
    assert keys["gpu_vram_total_gb"] == gib(25757220864)
    assert keys["gpus"][1]["error"] is not None


def test_a_reading_younger_than_max_age_is_reused_without_probing(
        root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_metrics: Callable[..., GpuMetrics]) -> None:
    tool = fake.printing(tmp_path, fake.TWO_GPUS)
    tool.install(monkeypatch)
    gpu = make_metrics(root, max_age_s=60)
    first, second = gpu.sample(), gpu.sample()
    assert first.reading is second.reading
    assert second.age_seconds >= first.age_seconds
    assert (gpu.probes_started, tool.calls) == (1, 1)


class FakeClock:
    """Time that stands still until the test moves ``now``."""

    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


class SkippingClock:
    """Real monotonic time that the test can also move forward at once: readings age
    without sleeping, while ``sample()``'s wait for the probe thread still ends on real
    time (a frozen clock would never reach a hung probe's deadline)."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skipped

    def skip(self, seconds: float) -> None:
        self.skipped += seconds


def test_a_reading_older_than_max_age_is_probed_again(
        root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_metrics: Callable[..., GpuMetrics]) -> None:
    tool = fake.printing(tmp_path, fake.TWO_GPUS)
    tool.install(monkeypatch)
    clock = SkippingClock()
    gpu = make_metrics(root, max_age_s=60, clock=clock)
    gpu.sample()
    clock.skip(61)
    assert gpu.sample().state == "ok"
    assert tool.calls == 2


def test_absence_is_rechecked_only_after_absent_recheck_s(
        root: str, make_metrics: Callable[..., GpuMetrics]) -> None:
    clock = FakeClock()
    gpu = make_metrics(root, max_age_s=1, absent_recheck_s=60, clock=clock)
    assert gpu.sample().state == "absent"
    clock.now += 59
    sample = gpu.sample()
    assert (sample.state, sample.age_seconds, gpu.probes_started) == ("absent", 59, 1)
    clock.now += 2
    assert gpu.sample().state == "absent"
    assert gpu.probes_started == 2


def test_the_cached_fast_path_costs_microseconds(
        root: str, make_metrics: Callable[..., GpuMetrics]) -> None:
    gpu = make_metrics(root)
    gpu.sample()
    costs = []
    for _ in range(2000):
        started = time.perf_counter()
        gpu.sample()
        costs.append(time.perf_counter() - started)
    assert statistics.median(costs) < 20e-6


# -- hangs: bounded, one probe in flight, stale / timeout ------------------------------------


def test_hung_nvidia_smi_times_out_on_time_and_later_calls_return_at_once(
        root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_metrics: Callable[..., GpuMetrics]) -> None:
    tool = fake.sleeping(tmp_path)
    tool.install(monkeypatch)
    gpu = make_metrics(root, timeout_s=1.0, absent_recheck_s=0.3)
    try:
        first, elapsed = timed(gpu.sample)
        assert elapsed < 1.0 + 0.5
        assert first.state == "timeout"
        assert first.error is not None and "timed out" in first.error
        assert gpu_keys(first)["gpu_count"] == 0
        second, elapsed = timed(gpu.sample)
        assert elapsed < 0.05
        assert second.state in ("timeout", "stale")
        # Keep asking until two re-probes have started in the background (each after
        # absent_recheck_s=0.3, the first hung one killed at 1 s): through the hand-over
        # from one hung nvidia-smi to the next, never more than one is alive and no call
        # waits.
        worst, alive = 0.0, 0

        def reprobed_twice() -> bool:
            nonlocal worst, alive
            sample, elapsed = timed(gpu.sample)
            assert sample.state == "timeout"
            worst = max(worst, elapsed)
            alive = max(alive, len(fake.running(tool.marker)))
            return tool.calls >= 3

        wait_until(reprobed_twice, 10, lambda: f"2 background re-probes ({tool.calls} runs)",
                   interval=0.01)
        assert worst < 0.05
        assert alive <= 1
    finally:
        fake.kill_all(tool.marker)


def test_nvidia_smi_hanging_after_a_success_serves_the_last_good_reading_as_stale(
        root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_metrics: Callable[..., GpuMetrics]) -> None:
    tool = fake.hangs_after_first(tmp_path, fake.TWO_GPUS)
    tool.install(monkeypatch)
    clock = SkippingClock()
    gpu = make_metrics(root, timeout_s=0.5, max_age_s=60, clock=clock)
    try:
        good = gpu.sample()
        assert good.state == "ok"
        clock.skip(61)
        stale, elapsed = timed(gpu.sample)
        assert elapsed < 0.5 + 0.5
        assert stale.state == "stale"
        assert stale.reading == good.reading
        assert stale.age_seconds >= 61
        keys = gpu_keys(stale)
        assert (keys["gpu_vram_total_gb"], keys["gpu_vram_available_gb"]) == (
            mib_gib(24576), mib_gib(24245))
        assert keys["gpu_probe"]["state"] == "stale"
        again, elapsed = timed(gpu.sample)
        assert (again.state, elapsed < 0.05) == ("stale", True)
    finally:
        fake.kill_all(tool.marker)


def test_in_process_hang_keeps_one_probe_in_flight_and_recovers_when_it_ends(
        root: str, make_metrics: Callable[..., GpuMetrics]) -> None:
    release = threading.Event()
    nvml, _ = nvml_with(fnv.RTX4090_V2, hang=release)
    gpu = make_metrics(root, nvml=nvml, timeout_s=0.3, max_age_s=0.05)
    try:
        first, elapsed = timed(gpu.sample)
        assert (first.state, elapsed < 0.3 + 0.5) == ("timeout", True)
        for _ in range(20):
            sample, elapsed = timed(gpu.sample)
            assert (sample.state, elapsed < 0.05) == ("timeout", True)
        assert gpu.probes_started == 1
    finally:
        release.set()

    def good_sample() -> GpuSample | None:
        sample = gpu.sample()
        return sample if sample.state == "ok" else None

    recovered = wait_until(good_sample, 5, "a reading once the hung probe returned",
                           interval=0.01)
    assert gpu_keys(recovered)["gpu_vram_total_gb"] == gib(25757220864)


def test_state_changes_are_logged_once_at_warning(
        root: str, make_metrics: Callable[..., GpuMetrics],
        caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    nvml, _ = nvml_with(fnv.RTX4090_V2, hang=release)
    gpu = make_metrics(root, nvml=nvml, timeout_s=0.2)
    caplog.set_level(logging.WARNING, logger="chiffon_worker.metrics.gpu")
    try:
        for _ in range(10):
            gpu.sample()
    finally:
        release.set()
    warnings = [r for r in caplog.records if r.name == "chiffon_worker.metrics.gpu"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "timeout" in warnings[0].getMessage()


def test_an_error_after_a_success_is_reported_as_error_not_stale(
        root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_metrics: Callable[..., GpuMetrics]) -> None:
    tool = fake.printing(tmp_path, fake.TWO_GPUS)
    tool.install(monkeypatch)
    clock = SkippingClock()
    gpu = make_metrics(root, max_age_s=60, clock=clock)
    assert gpu.sample().state == "ok"
    lost = fake.failing(tmp_path, 15)
    tool.path.write_text(lost.path.read_text())  # same tool, now the GPU fell off the bus
    clock.skip(61)
    sample = gpu.sample()
    assert (sample.state, gpu_keys(sample)["gpu_count"]) == ("error", 0)


class ExplodingSource:
    """A source with a bug: raises something no source is allowed to raise."""

    name = "exploding"

    def __init__(self) -> None:
        self.calls = 0

    def read(self, timeout_s: float) -> tuple[GpuDevice, ...]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("bug")
        raise GpuSourceUnavailable("nothing here")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_crashing_probe_is_state_error_and_the_next_probe_still_runs(root: str) -> None:
    before = _probe_threads()
    source = ExplodingSource()
    clock = SkippingClock()
    gpu = GpuMetrics(root, 1.0, max_age_s=60, prober=GpuProber(root, nvml=NO_NVML, amd=source),
                     clock=clock)
    try:
        first, elapsed = timed(gpu.sample)
        assert (first.state, elapsed < 1.0) == ("error", True)
        assert first.error is not None and "crashed" in first.error
        clock.skip(61)  # the error is no longer fresh: the next sample probes again
        assert gpu.sample().state == "absent"
        assert source.calls == 2
    finally:
        gpu.close()
        for thread in _probe_threads() - before:  # the crashed one reports within this test
            thread.join(timeout=5)


def _probe_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "chiffon-gpu-probe"}


def test_close_ends_the_idle_probe_thread_and_sample_still_works_afterwards(root: str) -> None:
    before = _probe_threads()
    gpu = GpuMetrics(root, 1.0, max_age_s=0, absent_recheck_s=0,
                     prober=GpuProber(root, nvml=NO_NVML))
    gpu.sample()
    (mine,) = _probe_threads() - before
    gpu.close()
    mine.join(timeout=2)
    assert not mine.is_alive()
    assert gpu.sample().state == "absent"
    gpu.close()


# -- bounded_subprocess ----------------------------------------------------------------------


def test_run_bounded_returns_status_and_both_outputs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.printing(tmp_path, "out\n", "err\n", 3, name="tool").install(monkeypatch)
    done = bs.run_bounded(["tool", "--flag"], 5)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_run_bounded_kills_the_whole_process_group_on_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = fake.write_tool(tmp_path, "")
    body = f"sh -c 'sleep 600; true' {tool.marker}-child &\nwait"
    tool.path.write_text(f"#!/bin/sh\n{body}\n")
    tool.install(monkeypatch)
    try:
        started = time.monotonic()
        with pytest.raises(ProbeTimeout):
            bs.run_bounded(["nvidia-smi"], 0.3)
        assert time.monotonic() - started < 0.3 + 0.5
        assert fake.running(tool.marker) == []  # the child in the group died too
    finally:
        fake.kill_all(tool.marker)


def test_run_bounded_does_not_wait_for_a_child_it_cannot_reap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = fake.escaping_pipe_holder(tmp_path)
    tool.install(monkeypatch)
    try:
        started = time.monotonic()
        with pytest.raises(ProbeTimeout):
            bs.run_bounded(["nvidia-smi"], 0.3)
        assert time.monotonic() - started < 0.3 + bs.REAP_GRACE_S + 0.2
    finally:
        fake.kill_all(tool.marker)


def test_run_bounded_missing_executable_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(GpuSourceUnavailable, match="not found"):
        bs.run_bounded(["chiffon-no-such-tool"], 1)


def test_which_remembers_a_missing_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    assert bs.which("nvidia-smi") is None
    installed = fake.printing(tmp_path, "")
    (bindir / "nvidia-smi").symlink_to(installed.path)
    assert bs.which("nvidia-smi") is None  # cached for WHICH_CACHE_S
    bs.clear_which_cache()
    assert bs.which("nvidia-smi") == str(bindir / "nvidia-smi")


# -- processes: one NVML session per process, probing keeps working after fork ---------------


def test_default_probers_share_one_nvml_session_per_process() -> None:
    assert GpuProber().nvml is GpuProber().nvml is shared_source()


def test_a_forked_child_probes_again_instead_of_waiting_for_the_parents_thread(
        root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.printing(tmp_path, fake.TWO_GPUS).install(monkeypatch)
    gpu = GpuMetrics(root, 1.0, max_age_s=0, prober=GpuProber(root, nvml=NO_NVML))
    try:
        assert gpu.sample().state == "ok"  # the parent's probe thread now exists
        pid = os.fork()
        if pid == 0:  # child: the parent's thread did not come along
            code = 1
            try:
                sample = gpu.sample()
                code = 0 if sample.state == "ok" and len(sample.reading.devices) == 2 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        gpu.close()


def test_a_gpu_needing_a_reset_is_unhealthy_while_the_other_carries_the_snapshot(
        root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_metrics: Callable[..., GpuMetrics]) -> None:
    # The bigger 3090 needs a reset: nvidia-smi prints the NVML error text in its fields.
    reset = ", ".join(["1", "NVIDIA GeForce RTX 3090"] + ["[GPU requires reset]"] * 4
                      + [fake.UUID_3090] + ["[GPU requires reset]"] * 4)
    fake.nvidia_smi(tmp_path, gpus=f"{fake.LINE_4090}\n{reset}\n").install(monkeypatch)
    sample = make_metrics(root).sample()
    keys = gpu_keys(sample)
    assert sample.state == "ok" and keys["gpu_count"] == 2
    assert (keys["gpu_vram_total_gb"], keys["gpu_vram_available_gb"]) == (
        mib_gib(24564), mib_gib(23791))  # the healthy 4090, though the 3090 is bigger
    assert keys["gpu_health"] == "unhealthy"
    assert keys["gpu_health_reason"] == "gpu 1: nvidia-smi: GPU requires reset"
    assert [g["health"] for g in keys["gpus"]] == ["ok", "unhealthy"]
