"""Snapshot cost: ``DesktopAgent._get_resource_metrics()`` per call, in microseconds.

Scenarios, all measured in one run on this machine:

* ``psutil_baseline``: psutil's own calls a snapshot cannot avoid
  (``getloadavg()`` + ``virtual_memory()`` + ``cpu_percent(None)``).
* ``agent_no_gpu``: the agent's CPU + memory + GPU keys on a machine without GPUs
  (after the first call, which looks for GPUs once).
* ``agent_gpu_tool_hung``: the same with a fake ``nvidia-smi`` that hangs forever first on
  PATH, measured after the first call has timed out (``gpu_detection_timeout_seconds``).
* ``gpu_probe_in_flight``: ``GpuMetrics.sample()`` + ``flat_gpu_keys`` alone while a probe
  is stuck in-process (an NVML call in D-state): the slow path, taken on every call.

Targets: p50 <= 150 us without GPU, <= 1 ms while the GPU tool is hung. Writes
``bench/results/snapshot.json``.

    python bench/snapshot.py [--iterations 20000] [--timeout 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chiffon_worker.agents.desktop import DesktopAgent  # noqa: E402
from chiffon_worker.config import Config  # noqa: E402
from chiffon_worker.metrics.bounded_subprocess import clear_which_cache  # noqa: E402
from chiffon_worker.metrics.gpu import GpuMetrics  # noqa: E402
from chiffon_worker.metrics.gpu_types import GpuReading, flat_gpu_keys  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TARGET_NO_GPU_P50_US = 150.0
TARGET_HUNG_P50_US = 1000.0


def measure(fn: Callable[[], Any], iterations: int, warmup: int = 200) -> dict[str, float]:
    """p50/p99/mean/max of one call, in microseconds."""
    for _ in range(warmup):
        fn()
    costs = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        started = clock()
        fn()
        costs.append(clock() - started)
    costs.sort()

    def pct(p: float) -> float:
        return round(costs[min(len(costs) - 1, int(p * len(costs)))] / 1000, 2)

    return {"p50_us": pct(0.50), "p99_us": pct(0.99),
            "mean_us": round(sum(costs) / len(costs) / 1000, 2),
            "max_us": round(costs[-1] / 1000, 2), "iterations": iterations}


def psutil_baseline() -> None:
    os.getloadavg()
    psutil.virtual_memory()
    psutil.cpu_percent(None)


def hung_nvidia_smi(directory: Path) -> Path:
    tool = directory / "nvidia-smi"
    tool.write_text("#!/bin/sh\nsleep 600\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return tool


class StuckProber:
    """A probe that never returns until released (stands in for NVML in D-state)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def probe(self) -> GpuReading:
        self.release.wait()
        return GpuReading(devices=(), sources=())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--timeout", type=float, default=1.0,
                        help="gpu_detection_timeout_seconds for the hung scenario")
    args = parser.parse_args()
    results: dict[str, Any] = {}

    results["psutil_baseline"] = measure(psutil_baseline, args.iterations)

    agent = DesktopAgent("bench", "desktop", Config(agent_id="bench"))
    first = agent._get_resource_metrics()
    results["agent_no_gpu"] = measure(agent._get_resource_metrics, args.iterations)
    results["agent_no_gpu"]["gpu_probe"] = first["gpu_probe"]
    agent.close()

    old_path = os.environ.get("PATH", "")
    with tempfile.TemporaryDirectory(prefix="chiffon-bench-") as tmp:
        hung_nvidia_smi(Path(tmp))
        os.environ["PATH"] = f"{tmp}:{old_path}"
        clear_which_cache()
        try:
            agent = DesktopAgent("bench", "desktop",
                                 Config(agent_id="bench",
                                        gpu_detection_timeout_seconds=args.timeout))
            started = time.perf_counter()
            first = agent._get_resource_metrics()
            first_call_s = time.perf_counter() - started
            results["agent_gpu_tool_hung"] = measure(agent._get_resource_metrics,
                                                     args.iterations)
            results["agent_gpu_tool_hung"].update(
                first_call_s=round(first_call_s, 3), gpu_probe=first["gpu_probe"],
                state_after=agent._get_resource_metrics()["gpu_probe"]["state"])
            agent.close()
        finally:
            os.environ["PATH"] = old_path
            clear_which_cache()

    stuck = StuckProber()
    gpu = GpuMetrics(timeout_s=0.05, prober=stuck)
    gpu.sample()  # times out after 0.05 s; the probe stays in flight
    results["gpu_probe_in_flight"] = measure(lambda: flat_gpu_keys(gpu.sample()),
                                             args.iterations)
    results["gpu_probe_in_flight"]["probes_started"] = gpu.probes_started
    stuck.release.set()
    gpu.close()

    base = results["psutil_baseline"]["p50_us"]
    for name in ("agent_no_gpu", "agent_gpu_tool_hung", "gpu_probe_in_flight"):
        results[name]["ratio_to_psutil_p50"] = round(results[name]["p50_us"] / base, 2)
    report = {
        "benchmark": "snapshot",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu_detection_timeout_seconds": args.timeout,
        "targets": {"agent_no_gpu_p50_us": TARGET_NO_GPU_P50_US,
                    "agent_gpu_tool_hung_p50_us": TARGET_HUNG_P50_US},
        "results": results,
        "pass": {
            "agent_no_gpu": results["agent_no_gpu"]["p50_us"] <= TARGET_NO_GPU_P50_US,
            "agent_gpu_tool_hung":
                results["agent_gpu_tool_hung"]["p50_us"] <= TARGET_HUNG_P50_US,
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "snapshot.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    leftover = shutil.which("nvidia-smi")
    if leftover and leftover.startswith(tempfile.gettempdir()):
        print("warning: fake nvidia-smi still on PATH", file=sys.stderr)
    return 0 if all(report["pass"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
