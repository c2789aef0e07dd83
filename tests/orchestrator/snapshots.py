"""Realistic, schema-valid heartbeat snapshots (schema 1) for orchestrator tests and bench.

``make_snapshot()`` returns what a desktop agent would send; keyword arguments override
any key, and ``gpu=False`` gives a machine without a GPU. Numbers stay consistent
(available <= total, cores_available = max(1, cores - load)), so the result always
passes ``validate_snapshot`` unless a test breaks it on purpose.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

from chiffon_worker.metrics.gpu_snapshot import gpu_keys
from chiffon_worker.metrics.gpu_types import (
    EMPTY_READING,
    GpuDevice,
    GpuProcess,
    GpuReading,
    GpuSample,
)
from chiffon_worker.protocol import SNAPSHOT_SCHEMA

GPU_MODELS = (("NVIDIA GeForce RTX 4090", 23.99), ("NVIDIA GeForce RTX 3060", 11.99),
              ("NVIDIA RTX A6000", 47.99))


def make_gpu(index: int = 0, name: str = "NVIDIA GeForce RTX 4090", total_gb: float = 23.99,
             available_gb: float = 20.5) -> dict[str, Any]:
    """One entry of ``gpus`` as the NVML probe reports it."""
    return {"index": index, "vendor": "nvidia", "name": name, "vram_total_gb": total_gb,
            "vram_available_gb": available_gb, "utilization_percent": 12.0,
            "temperature_c": 47.0, "source": "nvml"}


def make_snapshot(agent_id: str = "agent-1", *, seq: int = 1, boot_id: str | None = None,
                  pool: str = "desktop_pool_1", hostname: str | None = None,
                  gpu: bool = True, vram_available_gb: float = 20.5,
                  vram_total_gb: float = 23.99, cores_physical: int = 8,
                  load_1min: float = 1.25, memory_available_gb: float = 21.3,
                  memory_total_gb: float = 31.2, collected_at: float | None = None,
                  started_at: float = 1_764_000_000.0, interval: float = 30.0,
                  timeout: float = 90.0, **overrides: Any) -> dict[str, Any]:
    """A complete snapshot of a desktop with (by default) one 24 GiB NVIDIA GPU."""
    gpus = [make_gpu(0, total_gb=vram_total_gb, available_gb=vram_available_gb)] if gpu else []
    snap: dict[str, Any] = {
        "schema": SNAPSHOT_SCHEMA,
        "agent_id": agent_id,
        "agent_type": "desktop",
        "hostname": hostname or f"host-{agent_id}",
        "pool": pool,
        "boot_id": boot_id or f"boot-{agent_id}",
        "seq": seq,
        "started_at": started_at,
        "collected_at": time.time() if collected_at is None else collected_at,
        "heartbeat_interval_seconds": interval,
        "heartbeat_timeout_seconds": timeout,
        "capabilities": {"work_types": ["echo", "shell"], "gpu": gpu},
        "version": "0.1.0",
        "cpu_percent": 17.5,
        "cpu_load_1min": load_1min,
        "cpu_load_5min": 1.1,
        "cpu_load_15min": 0.9,
        "cpu_cores_physical": cores_physical,
        "cpu_cores_effective": cores_physical,
        "cpu_cores_available": max(1.0, cores_physical - load_1min),
        "memory_percent": round(100 * (1 - memory_available_gb / memory_total_gb), 1),
        "memory_available_gb": memory_available_gb,
        "memory_total_gb": memory_total_gb,
        "gpu_vram_total_gb": vram_total_gb if gpu else 0.0,
        "gpu_vram_available_gb": vram_available_gb if gpu else 0.0,
        "gpu_type": "nvidia" if gpu else "none",
        "gpu_count": len(gpus),
        "gpus": gpus,
        "gpu_probe": {"state": "ok" if gpu else "absent", "source": "nvml" if gpu else "none",
                      "age_seconds": 0.4, "error": None},
    }
    snap.update(overrides)
    return snap


def random_snapshot(rng: random.Random, agent_id: str, seq: int) -> dict[str, Any]:
    """A varied but valid snapshot (for load tests and benchmarks) in the shape today's
    agent sends: mixed GPUs, cores and memory, every key the agent adds (owner, drain,
    GPU health, power and processes), and GPU entries made by the agent's own
    ``gpu_keys`` from NVML-like readings."""
    snap = _schema_one_snapshot(rng, agent_id, seq)
    gpus = snap.pop("gpus")
    snap.pop("gpu_probe")
    devices = tuple(GpuDevice(
        index=gpu["index"], vendor="nvidia", name=gpu["name"],
        vram_total_gb=gpu["vram_total_gb"], vram_available_gb=gpu["vram_available_gb"],
        utilization_percent=round(rng.uniform(0, 100), 1),
        temperature_c=float(rng.randint(30, 80)), source="nvml",
        uuid=f"GPU-{uuid.UUID(int=rng.getrandbits(128))}",
        power_draw_w=round(rng.uniform(20, 300), 1), power_limit_w=350.0,
        throttle_reasons=(), ecc_uncorrected_volatile=0,
        processes=tuple(GpuProcess(rng.randint(1000, 99999), "python3",
                                   round(rng.uniform(0.2, 4.0), 3), "agent")
                        for _ in range(rng.randint(0, 2))))
        for gpu in gpus)
    reading = GpuReading(devices, ("nvml",)) if devices else EMPTY_READING
    snap.update(gpu_keys(GpuSample(reading, "ok" if devices else "absent", 0.4)))
    load = snap["cpu_load_1min"]
    snap.update(cpu_cores_busy=load, cpu_busy_source="load",
                owner_idle_seconds=round(rng.uniform(0, 7200), 1),
                owner_idle_source="logind", on_battery=False, asleep=False,
                mac_address=":".join(f"{rng.randrange(256):02x}" for _ in range(6)),
                accepting=True, accepting_reason=None, work_running=rng.randint(0, 2))
    return snap


def _schema_one_snapshot(rng: random.Random, agent_id: str, seq: int) -> dict[str, Any]:
    """A varied snapshot with only the keys of the first agents (schema 1 as released)."""
    has_gpu = rng.random() < 0.6
    name, total = rng.choice(GPU_MODELS)
    cores = rng.choice((4, 6, 8, 12, 16, 24, 32))
    mem_total = rng.choice((15.5, 31.2, 62.7, 125.6))
    load = round(rng.uniform(0, cores * 1.2), 2)
    snap = make_snapshot(
        agent_id, seq=seq, boot_id=str(uuid.UUID(int=rng.getrandbits(128))),
        pool=f"desktop_pool_{rng.randint(1, 3)}", gpu=has_gpu,
        vram_total_gb=total, vram_available_gb=round(rng.uniform(0, total), 2),
        cores_physical=cores, load_1min=load,
        memory_total_gb=mem_total, memory_available_gb=round(rng.uniform(0.5, mem_total), 2))
    if has_gpu:
        snap["gpus"][0]["name"] = name
    return snap
