"""The snapshot's GPU keys: unified memory, the primary GPU, unknown VRAM, health and
processes, each computed here from the fixture values."""

from __future__ import annotations

from dataclasses import replace

from chiffon_worker.metrics.gpu_snapshot import HostMemory, gpu_keys, with_host_memory
from chiffon_worker.metrics.gpu_types import GpuDevice, GpuProcess, GpuReading, GpuSample
from chiffon_worker.protocol import validate_snapshot
from tests.samples import GOOD_SNAPSHOT

HOST = HostMemory(total_gb=119.7, available_gb=101.25)
DGPU = GpuDevice(index=0, vendor="nvidia", name="NVIDIA GeForce RTX 4090", vram_total_gb=23.988,
                 vram_available_gb=23.233, utilization_percent=2.0, temperature_c=38.0,
                 source="nvml", processes=(), power_draw_w=123.5, power_limit_w=450.0)
GB10 = GpuDevice(index=0, vendor="nvidia", name="NVIDIA GB10", vram_total_gb=None,
                 vram_available_gb=None, utilization_percent=3.0, temperature_c=41.0,
                 source="nvml", unified=True)
# gpu-samples.md "APU card0": carve-out 2147483648 B, 79949824 B used; GTT 17179869184 B.
GIB = 2**30
APU = GpuDevice(index=0, vendor="amd", name="AMD GPU 0x15bf",
                vram_total_gb=round(2147483648 / GIB, 3),
                vram_available_gb=round((2147483648 - 79949824) / GIB, 3),
                utilization_percent=10.0, temperature_c=24.0, source="amd-sysfs", unified=True,
                extra={"gtt_total_gb": round(17179869184 / GIB, 3), "gtt_used_gb": 1.5})
INTEL = GpuDevice(index=1, vendor="intel", name="Intel GPU 0x46a6", vram_total_gb=None,
                  vram_available_gb=None, utilization_percent=None, temperature_c=None,
                  source="intel-sysfs")


def keys_of(*devices: GpuDevice, host: HostMemory | None = HOST, state: str = "ok"
            ) -> dict[str, object]:
    sample = GpuSample(GpuReading(tuple(devices), ("nvml",)), state, 0.2)  # type: ignore[arg-type]
    return gpu_keys(sample, host)


def test_a_gb10_reports_the_hosts_available_memory_as_what_a_job_can_get() -> None:
    keys = keys_of(GB10)
    assert (keys["gpu_vram_total_gb"], keys["gpu_vram_available_gb"], keys["gpu_vram_known"]) \
        == (HOST.total_gb, HOST.available_gb, True)


def test_an_apu_adds_its_free_gtt_to_its_free_carve_out() -> None:
    gtt_total = round(17179869184 / GIB, 3)
    carve_total, carve_free = APU.vram_total_gb or 0.0, APU.vram_available_gb or 0.0
    device = with_host_memory(APU, HOST)
    assert device.vram_total_gb == round(carve_total + gtt_total, 3)
    assert device.vram_available_gb == round(carve_free + (gtt_total - 1.5), 3)
    assert (device.extra["carveout_total_gb"], device.extra["carveout_available_gb"]) == (
        carve_total, carve_free)


def test_an_apus_gtt_share_is_capped_by_the_hosts_available_memory() -> None:
    tight = HostMemory(total_gb=15.0, available_gb=4.0)
    device = with_host_memory(APU, tight)
    assert device.vram_available_gb == round((APU.vram_available_gb or 0.0) + 4.0, 3)


def test_a_discrete_gpu_is_not_touched_by_host_memory() -> None:
    assert with_host_memory(DGPU, HOST) is DGPU


def test_unknown_free_vram_is_flagged_not_passed_off_as_zero() -> None:
    keys = keys_of(INTEL)
    assert (keys["gpu_vram_available_gb"], keys["gpu_vram_known"]) == (0.0, False)


def test_no_gpu_at_all_is_a_known_zero() -> None:
    keys = keys_of(host=HOST, state="absent")
    assert (keys["gpu_vram_available_gb"], keys["gpu_vram_known"], keys["gpu_type"]) == (
        0.0, True, "none")


def test_a_probe_that_never_answered_is_an_unknown_zero() -> None:
    assert keys_of(state="timeout")["gpu_vram_known"] is False


def test_an_unhealthy_gpu_is_never_the_primary() -> None:
    broken = replace(DGPU, index=1, vram_total_gb=79.6, vram_available_gb=79.0,
                     health="unhealthy", health_reason="NVML: GPU requires reset")
    keys = keys_of(DGPU, broken)
    assert keys["gpu_vram_available_gb"] == DGPU.vram_available_gb
    assert (keys["gpu_health"], keys["gpu_health_reason"]) == (
        "unhealthy", "gpu 1: NVML: GPU requires reset")


def test_only_unhealthy_gpus_offer_no_vram() -> None:
    broken = replace(DGPU, health="unhealthy", health_reason="lost")
    keys = keys_of(broken)
    assert (keys["gpu_vram_available_gb"], keys["gpu_vram_known"], keys["gpu_type"]) == (
        0.0, True, "nvidia")


def test_power_sums_what_the_gpus_tell() -> None:
    second = replace(DGPU, index=1, power_draw_w=80.25, power_limit_w=None)
    keys = keys_of(DGPU, second, INTEL)
    assert keys["gpu_power_draw_w"] == round(123.5 + 80.25, 1)
    assert keys["gpu_power_limit_w"] == 450.0


def test_foreign_processes_and_their_memory_are_counted() -> None:
    busy = replace(DGPU, processes=(GpuProcess(10, "python", 4.0, "agent"),
                                    GpuProcess(11, "game.exe", 6.25, "foreign"),
                                    GpuProcess(12, "ollama", None, "foreign")))
    keys = keys_of(busy, INTEL)
    assert (keys["gpu_processes"], keys["gpu_foreign_processes"],
            keys["gpu_foreign_memory_gb"]) == (3, 2, 6.25)


def test_process_counts_are_null_when_no_gpu_lists_processes() -> None:
    keys = keys_of(INTEL)
    assert (keys["gpu_processes"], keys["gpu_foreign_processes"]) == (None, None)


def test_the_gpu_keys_make_a_valid_snapshot() -> None:
    busy = replace(DGPU, processes=(GpuProcess(11, "game", 6.25, "foreign"),),
                   throttle_reasons=("sw_power_cap",))
    snap = dict(GOOD_SNAPSHOT, **keys_of(busy, GB10, APU, INTEL))
    assert validate_snapshot(snap)


class _Prober:
    def __init__(self, *devices: GpuDevice) -> None:
        self.reading = GpuReading(devices, ("nvml",))

    def probe(self) -> GpuReading:
        return self.reading


def test_an_agent_reports_a_gb10_with_the_memory_figures_of_the_same_snapshot() -> None:
    from chiffon_worker.agents.desktop import DesktopAgent
    from chiffon_worker.config import Config
    from chiffon_worker.metrics.cpu import CpuMetrics
    from chiffon_worker.metrics.gpu import GpuMetrics
    from chiffon_worker.metrics.memory import MemoryMetrics

    agent = DesktopAgent("spark-1", "desktop", Config())
    agent._cpu, agent._memory = CpuMetrics(), MemoryMetrics()
    agent._gpu = GpuMetrics(prober=_Prober(GB10))
    try:
        snap = agent.snapshot(heartbeat=False)
    finally:
        agent.close()
    assert validate_snapshot(snap)
    assert snap["gpus"][0]["unified"] is True
    assert (snap["gpu_vram_total_gb"], snap["gpu_vram_available_gb"]) == (
        snap["memory_total_gb"], snap["memory_available_gb"])


def test_an_agents_owner_facts_carry_what_games_hold_of_its_gpus_and_the_hottest_one() -> None:
    from chiffon_worker.agents.desktop import DesktopAgent
    from chiffon_worker.config import Config
    from chiffon_worker.metrics.cpu import CpuMetrics
    from chiffon_worker.metrics.gpu import GpuMetrics
    from chiffon_worker.metrics.memory import MemoryMetrics

    game = GpuProcess(pid=4242, name="Cyberpunk2077.exe", memory_gb=7.5, owner="foreign")
    ours = GpuProcess(pid=4243, name="python3", memory_gb=3.0, owner="agent")
    busy = replace(DGPU, temperature_c=83.0, processes=(game, ours))
    agent = DesktopAgent("rig-1", "desktop", Config(environ={}, dev_root="/nonexistent"))
    agent._cpu, agent._memory = CpuMetrics(), MemoryMetrics()
    agent._gpu = GpuMetrics(prober=_Prober(busy, replace(DGPU, index=1)))
    try:
        facts = agent.owner_facts()
    finally:
        agent.close()
    assert (facts.foreign_gpu_memory_gb, facts.gpu_temperature_max_c) == (7.5, 83.0)
    assert facts.idle_seconds is None or facts.idle_seconds >= 0
