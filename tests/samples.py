"""Sample messages shared by the test suites (valid ones; each suite breaks them its own way)."""

from __future__ import annotations

from typing import Any

#: A valid heartbeat snapshot (schema 1) of a desktop with one 24 GiB NVIDIA GPU.
GOOD_SNAPSHOT: dict[str, Any] = {
    "schema": 1, "agent_id": "rig-1", "hostname": "rig", "pool": "desktop_pool_1",
    "boot_id": "2f0c3a8e-6a55-4d0e-9c1e-0d6b9b4f1a77", "seq": 12,
    "started_at": 1_700_000_000.0, "collected_at": 1_700_000_360.5,
    "heartbeat_interval_seconds": 30.0, "heartbeat_timeout_seconds": 90.0,
    "capabilities": {"gpu": True}, "version": "0.1.0",
    "cpu_percent": 12.5, "cpu_load_1min": 0.5, "cpu_load_5min": 0.4, "cpu_load_15min": 0.3,
    "cpu_cores_physical": 8, "cpu_cores_available": 7.5,
    "memory_percent": 40.0, "memory_available_gb": 18.2, "memory_total_gb": 31.3,
    "gpu_vram_total_gb": 23.988, "gpu_vram_available_gb": 23.234, "gpu_type": "nvidia",
    "gpu_count": 1,
    "gpus": [{"index": 0, "vendor": "nvidia", "name": "RTX 4090", "vram_total_gb": 23.988,
              "vram_available_gb": 23.234, "utilization_percent": 2, "temperature_c": 38,
              "source": "nvml", "error": None}],
    "gpu_probe": {"state": "ok", "source": "nvml", "age_seconds": 0.1, "error": None},
}

#: The same machine as today's agent reports it: every optional key present as well.
CURRENT_SNAPSHOT: dict[str, Any] = {
    **GOOD_SNAPSHOT,
    "cpu_cores_effective": 8.0, "cpu_cores_busy": 0.5, "cpu_busy_source": "load",
    "gpu_vram_known": True, "gpu_health": "ok", "gpu_power_draw_w": 31.5,
    "gpu_power_limit_w": 450.0, "gpu_processes": 1, "gpu_foreign_processes": 0,
    "gpu_foreign_memory_gb": 0.0, "accepting": True, "accepting_reason": None,
    "work_running": 0, "owner_idle_seconds": 312.5, "owner_idle_source": "logind",
    "on_battery": False, "gpu_temperature_max_c": 38.0, "asleep": False,
    "mac_address": "3c:7c:3f:1e:22:9a",
}
