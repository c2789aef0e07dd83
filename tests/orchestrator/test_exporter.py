"""Prometheus /metrics: per-agent gauges from the registry, counters from the consumer."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chiffon_worker.orchestrator.exporter import MetricsServer, OrchestratorCollector
from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.snapshot import GIB

from .feeding import Feeder
from .snapshots import make_snapshot

#: Reset to the start of each test by the autouse ``fresh_now`` fixture (conftest.py).
NOW = time.time()


@pytest.fixture
def served(sqlite_registry: Registry) -> Iterator[tuple[MetricsServer, Feeder]]:
    feeder = Feeder(sqlite_registry)
    feeder.snapshot(make_snapshot("gpu-box", vram_available_gb=20.5, vram_total_gb=23.99,
                                  memory_available_gb=21.3, memory_total_gb=31.2,
                                  cores_physical=8, load_1min=1.25), received_at=NOW)
    feeder.snapshot(make_snapshot("old-box", gpu=False, pool="p2"), received_at=NOW - 1000)
    feeder.snapshot(make_snapshot("gpu-box", seq=4), received_at=NOW)
    feeder.message(b"garbage", {}, "application/json", received_at=NOW)
    feeder.commit()
    server = MetricsServer(OrchestratorCollector(sqlite_registry, feeder.stats), 0,
                           "127.0.0.1")
    yield server, feeder
    server.close()


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return samples


def agent(agent_id: str, pool: str = "desktop_pool_1") -> tuple[tuple[str, str], ...]:
    return (("agent_id", agent_id), ("hostname", f"host-{agent_id}"), ("pool", pool))


def test_metrics_over_http_parse_and_carry_per_agent_gauges_in_base_units(
        served: tuple[MetricsServer, Feeder]) -> None:
    server, _ = served
    samples = scrape(server.port)
    box = agent("gpu-box")
    assert samples["chiffon_agent_up"] == {box: 1.0, agent("old-box", "p2"): 0.0}
    assert samples["chiffon_agent_cpu_load_1min"][box] == 1.25
    assert samples["chiffon_agent_cpu_cores_available"][box] == 6.75
    assert samples["chiffon_agent_cpu_cores_physical"][box] == 8
    assert samples["chiffon_agent_memory_available_bytes"][box] == pytest.approx(21.3 * GIB)
    assert samples["chiffon_agent_memory_total_bytes"][box] == pytest.approx(31.2 * GIB)
    assert samples["chiffon_agent_gpu_vram_available_bytes"][box] == pytest.approx(20.5 * GIB)
    assert samples["chiffon_agent_gpu_vram_total_bytes"][box] == pytest.approx(23.99 * GIB)
    assert samples["chiffon_agent_missed_heartbeats_total"][box] == 2
    assert samples["chiffon_agent_heartbeat_age_seconds"][agent("old-box", "p2")] >= 1000
    assert samples["chiffon_registry_up"] == {(): 1.0}


def test_each_agent_has_exactly_one_liveness_state_set(
        served: tuple[MetricsServer, Feeder]) -> None:
    server, _ = served
    states = scrape(server.port)["chiffon_agent_liveness"]
    shown = {(dict(labels)["agent_id"], dict(labels)["state"]): value
             for labels, value in states.items()}
    assert shown == {("gpu-box", "online"): 1.0, ("gpu-box", "stopped"): 0.0,
                     ("gpu-box", "lost"): 0.0, ("gpu-box", "conflict"): 0.0,
                     ("gpu-box", "asleep"): 0.0,
                     ("old-box", "online"): 0.0, ("old-box", "stopped"): 0.0,
                     ("old-box", "lost"): 1.0, ("old-box", "conflict"): 0.0,
                     ("old-box", "asleep"): 0.0}


def test_metrics_carry_the_consumer_counters(served: tuple[MetricsServer, Feeder]) -> None:
    server, feeder = served
    samples = scrape(server.port)
    assert samples["chiffon_heartbeats_accepted_total"] == {(): 3.0}
    rejected = samples["chiffon_heartbeats_rejected_total"]
    assert rejected[(("reason", "not_json"),)] == 1.0
    assert rejected[(("reason", "forged"),)] == 0.0, "every reason is exported from the start"
    assert samples["chiffon_heartbeat_gaps_total"] == {(): 1.0}
    assert samples["chiffon_heartbeats_missed_total"] == {(): 2.0}
    assert samples["chiffon_registry_batches_total"] == {(): 1.0}
    feeder.message(b"[]", {}, "application/json", received_at=NOW)
    assert scrape(server.port)["chiffon_heartbeats_rejected_total"][
        (("reason", "bad_envelope"),)] == 1.0, "counters are read at scrape time"


def test_gpu_health_power_and_processes_are_exported_where_the_agent_reports_them(
        sqlite_registry: Registry) -> None:
    feeder = Feeder(sqlite_registry)
    feeder.snapshot(make_snapshot("rig", gpu_health="degraded", gpu_power_draw_w=312.5,
                                  gpu_power_limit_w=450.0, gpu_processes=3,
                                  gpu_foreign_processes=1, gpu_foreign_memory_gb=6.25),
                    received_at=NOW)
    feeder.snapshot(make_snapshot("older-agent"), received_at=NOW)  # sends none of them
    feeder.commit()
    server = MetricsServer(OrchestratorCollector(sqlite_registry, feeder.stats), 0, "127.0.0.1")
    try:
        samples = scrape(server.port)
    finally:
        server.close()
    rig = agent("rig")
    assert samples["chiffon_agent_gpu_power_draw_watts"] == {rig: 312.5}
    assert samples["chiffon_agent_gpu_power_limit_watts"] == {rig: 450.0}
    assert samples["chiffon_agent_gpu_processes"] == {rig: 3}
    assert samples["chiffon_agent_gpu_foreign_processes"] == {rig: 1}
    assert samples["chiffon_agent_gpu_foreign_memory_bytes"] == {rig: 6.25 * GIB}
    health = {dict(labels)["state"]: value
              for labels, value in samples["chiffon_agent_gpu_health"].items()}
    assert health == {"ok": 0.0, "degraded": 1.0, "unhealthy": 0.0, "none": 0.0}
