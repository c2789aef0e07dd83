"""GPU faults while the agent runs: heartbeats stay on time and say which fault it is.

A fake ``nvidia-smi`` first on the worker's PATH reads its behaviour from a mode file on
every call, so the test switches faults under a running ``celery -A chiffon_worker worker
-B`` (interval 1 s, GPU probe timeout 0.5 s): GPU lost, driver/library mismatch,
permission denied, garbage output, NVML library vanished, and a hang. Skipped where a real
NVML is present (it would win over the fake tool).
"""

from __future__ import annotations

import ctypes.util
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.fakes.nvidia_smi import LINE_4090
from tests.integration.helpers import Agent, HeartbeatTap, delete_agent_queues, start_agent

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INTERVAL = 1.0
#: A heartbeat may arrive this much later than one interval after the previous one
#: (2-core CI machine, every process of the suite competing).
LATE_TOLERANCE = 1.5
GOOD_LINE = LINE_4090  # "0, NVIDIA GeForce RTX 4090, 24564, 23791, 2, 38, <uuid>, ..."
GOOD_TOTAL_GB = round(24564 / 1024, 3)
GOOD_FREE_GB = round(23791 / 1024, 3)

FAKE_TOOL = """#!/bin/bash
# fake nvidia-smi driven by a mode file: {marker}
mode=$(cat '{mode_file}' 2>/dev/null)
case "$mode" in
  ok) case "$*" in *query-compute-apps*) exit 0 ;; esac  # no GPU processes
      echo '{good}'; exit 0 ;;
  lost) echo 'Unable to determine the device handle for GPU0000:01:00.0: GPU is lost.' >&2
        exit 15 ;;
  mismatch) echo 'Failed to initialize NVML: Driver/library version mismatch'; exit 18 ;;
  permission) echo 'Insufficient Permissions' >&2; exit 4 ;;
  garbage) echo 'NVIDIA-SMI has produced something unexpected <<<>>>'; exit 0 ;;
  nolib) echo "NVIDIA-SMI couldn't find libnvidia-ml.so library in your system." >&2
         exit 12 ;;
  hang) exec sleep 600 ;;
esac
exit 255
"""

#: mode -> (expected gpu_probe.state, a word its error text must contain)
FAULTS = [
    ("lost", "error", "GPU is lost"),
    ("mismatch", "error", "version mismatch"),
    ("permission", "error", "permission denied"),
    ("garbage", "error", "nvidia-smi"),
    ("nolib", "error", "library not found"),
]


@pytest.fixture(scope="module")
def gpu_rig(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
            ) -> Iterator[tuple[Agent, HeartbeatTap, Path]]:
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("a real NVML is installed here; it would take precedence over the fake")
    broker = request.getfixturevalue("rabbitmq_url")
    tmp = tmp_path_factory.mktemp("gpu-faults")
    tools = tmp / "bin"
    tools.mkdir()
    mode_file = tmp / "mode"
    mode_file.write_text("ok")
    tool = tools / "nvidia-smi"
    tool.write_text(FAKE_TOOL.format(marker=tmp.name, mode_file=mode_file, good=GOOD_LINE))
    tool.chmod(0o755)
    # sysfs shows one awake NVIDIA GPU on the PCI bus: tool failures are GPU faults, not
    # "driver files without a card"
    gpu = tmp / "sys" / "bus" / "pci" / "devices" / "0000:01:00.0"
    (gpu / "power").mkdir(parents=True)
    (gpu / "vendor").write_text("0x10de\n")
    (gpu / "class").write_text("0x030000\n")
    (gpu / "device").write_text("0x2684\n")
    (gpu / "power" / "runtime_status").write_text("active\n")
    agent = start_agent(tmp, broker, interval=INTERVAL, extra_env={
        "PATH": f"{tools}:{os.environ['PATH']}",
        "CHIFFON_SYSFS_ROOT": str(tmp / "sys"),
        "CHIFFON_GPU_DETECTION_TIMEOUT_SECONDS": "0.5",
        "CHIFFON_HEARTBEAT_TIMEOUT_SECONDS": "10",
    })
    listener = HeartbeatTap(broker, agent.agent_id)
    try:
        first = listener.wait_until(lambda s: s["gpu_probe"]["state"] == "ok", timeout=30)
        assert first is not None, agent.log()
        yield agent, listener, mode_file
    finally:
        listener.delete()
        agent.stop()
        delete_agent_queues(broker, agent.pool, agent.agent_queue)


def switch(mode_file: Path, mode: str) -> None:
    mode_file.write_text(mode)


def assert_on_time(beats: list[Any]) -> None:
    gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(beats)]
    assert gaps, "no heartbeats"
    assert max(gaps) <= INTERVAL + LATE_TOLERANCE, gaps
    seqs = [b.snapshot["seq"] for b in beats]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


def test_healthy_fake_gpu_is_reported_with_exact_numbers(gpu_rig: Any) -> None:
    _, listener, mode_file = gpu_rig
    switch(mode_file, "ok")
    beat = listener.wait_until(lambda s: s["gpu_probe"]["state"] == "ok", timeout=10)
    assert beat is not None
    snap = beat.snapshot
    assert (snap["gpu_type"], snap["gpu_count"]) == ("nvidia", 1)
    assert snap["gpu_vram_total_gb"] == GOOD_TOTAL_GB
    assert snap["gpu_vram_available_gb"] == GOOD_FREE_GB
    assert snap["gpu_probe"]["source"] == "nvidia-smi"


@pytest.mark.parametrize(("mode", "state", "words"), FAULTS)
def test_gpu_fault_is_named_in_the_heartbeat_and_heartbeats_stay_on_time(
        gpu_rig: Any, mode: str, state: str, words: str) -> None:
    agent, listener, mode_file = gpu_rig
    switch(mode_file, mode)
    beat = listener.wait_until(
        lambda s: s["gpu_probe"]["state"] == state and words.lower() in
        (s["gpu_probe"]["error"] or "").lower(), timeout=10)
    assert beat is not None, [b.snapshot["gpu_probe"] for b in listener.received[-5:]]
    assert beat.snapshot["gpu_count"] == 0  # no stale numbers passed off as current
    start = len(listener.received)
    assert_on_time(listener.wait_for(start + 4, timeout=4 * INTERVAL + 5)[start:])
    assert agent.alive
    switch(mode_file, "ok")
    assert listener.wait_until(lambda s: s["gpu_probe"]["state"] == "ok", timeout=10)


def fake_tools_alive(marker_dir: Path) -> int:
    count = 0
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "sleep 600" in cmdline or str(marker_dir) in cmdline:
            count += 1
    return count


def thread_and_process_count(agent: Agent) -> tuple[int, int]:
    tree = agent.tree()
    return len(tree), sum(p.num_threads() for p in tree)


def test_hung_gpu_tool_gives_stale_heartbeats_on_time_without_growth(gpu_rig: Any) -> None:
    agent, listener, mode_file = gpu_rig
    switch(mode_file, "ok")
    assert listener.wait_until(lambda s: s["gpu_probe"]["state"] == "ok", timeout=10)
    switch(mode_file, "hang")
    stale = listener.wait_until(lambda s: s["gpu_probe"]["state"] == "stale", timeout=10)
    assert stale is not None
    assert stale.snapshot["gpu_vram_total_gb"] == GOOD_TOTAL_GB  # last good numbers ...
    assert stale.snapshot["gpu_probe"]["error"]  # ... marked, with the reason
    before = thread_and_process_count(agent)
    start = len(listener.received)
    beats = listener.wait_for(start + 20, timeout=20 * INTERVAL + 10)[start:]
    after = thread_and_process_count(agent)
    assert len(beats) >= 20
    assert_on_time(beats)
    assert {b.snapshot["gpu_probe"]["state"] for b in beats} == {"stale"}
    assert after[0] <= before[0] + 1, (before, after)  # at most the one hung tool
    assert after[1] <= before[1], (before, after)
    assert fake_tools_alive(mode_file.parent) <= 1
    switch(mode_file, "ok")
