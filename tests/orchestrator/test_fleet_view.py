"""The fleet page's data (``/fleet.json``) and how the metrics port serves the page.

The page itself runs in a real browser in ``tests/integration/test_fleet_page.py``; here
its file is checked for what must hold of it without a browser (text only, nothing
fetched from elsewhere, a policy allowing its own inline code).
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest

from chiffon_worker.errors import RegistryError
from chiffon_worker.orchestrator.exporter import MetricsServer, OrchestratorCollector
from chiffon_worker.orchestrator.fleet_page import PAGE_RESOURCE, fleet_page
from chiffon_worker.orchestrator.fleet_view import BUCKETS, FleetView, bucket_means
from chiffon_worker.orchestrator.registry import HistoryPoint, Registry

from .feeding import Feeder
from .snapshots import make_gpu, make_snapshot

#: Reset to the start of each test by the autouse ``fresh_now`` fixture (conftest.py).
NOW = time.time()
ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)

#: A GPU that does not tell its free VRAM (Intel i915/xe).
INTEL_GPU = {"index": 0, "vendor": "intel", "name": "Intel Arc A770", "vram_total_gb": 16.0,
             "vram_available_gb": None, "utilization_percent": None, "temperature_c": None,
             "source": "sysfs"}


def view(registry: Registry, **options: Any) -> FleetView:
    """A view judging liveness at ``NOW``, building afresh on every call."""
    options.setdefault("build_every", 0.0)
    options.setdefault("spark_every", 0.0)
    return FleetView(registry, clock=lambda: NOW, **options)


def agents_of(fleet: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {agent["agent_id"]: agent for pool in fleet["pools"] for agent in pool["agents"]}


def feed(registry: Registry, *snapshots: tuple[dict[str, Any], float]) -> None:
    """Judge and write ``snapshots`` (each with its receipt time) in one batch."""
    feeder = Feeder(registry)
    for snap, received_at in snapshots:
        feeder.snapshot(snap, received_at=received_at)
    feeder.commit()


# -- one agent --------------------------------------------------------------------------------

def test_an_agent_carries_its_liveness_heartbeat_age_and_capacity_in_cores_and_gib(
        sqlite_registry: Registry) -> None:
    feed(sqlite_registry, (make_snapshot("desk-1", cores_physical=8, load_1min=1.5,
                                         memory_available_gb=21.3, memory_total_gb=31.2,
                                         cpu_cores_effective=6, gpu_health="ok"), NOW - 12))
    agent = agents_of(view(sqlite_registry).fleet())["desk-1"]
    assert (agent["hostname"], agent["pool"], agent["liveness"], agent["state"]) == (
        "host-desk-1", "desktop_pool_1", "online", "online")
    assert agent["age_seconds"] == pytest.approx(12.0)
    assert agent["cores"] == {"available": 6.5, "effective": 6.0}
    assert agent["memory"] == {"available_gb": 21.3, "total_gb": 31.2}
    assert agent["gpus"] == [{"index": 0, "name": "NVIDIA GeForce RTX 4090", "vendor": "nvidia",
                              "vram_total_gb": 23.99, "vram_available_gb": 20.5,
                              "unified": False, "health": None, "health_reason": None,
                              "error": None}]
    assert (agent["gpu_health"], agent["hold"], agent["conflict_hostname"]) == ("ok", None, None)


def test_an_agent_that_cannot_tell_its_free_vram_shows_it_unknown_not_zero(
        sqlite_registry: Registry) -> None:
    feed(sqlite_registry, (make_snapshot(
        "nuc", gpu_type="intel", gpu_vram_known=False, gpu_vram_available_gb=0.0,
        gpu_vram_total_gb=16.0, gpus=[INTEL_GPU]), NOW))
    agent = agents_of(view(sqlite_registry).fleet())["nuc"]
    assert [(g["name"], g["vram_available_gb"], g["vram_total_gb"]) for g in agent["gpus"]] == [
        ("Intel Arc A770", None, 16.0)]
    assert agent["spark"]["vram"] is None  # its history holds 0 there: not a fact
    assert agent["spark"]["cores"] is not None


def test_an_agent_without_a_gpu_has_no_gpus_no_gpu_health_and_no_vram_sparkline(
        sqlite_registry: Registry) -> None:
    feed(sqlite_registry, (make_snapshot("laptop", gpu=False, gpu_health="none"), NOW))
    agent = agents_of(view(sqlite_registry).fleet())["laptop"]
    assert (agent["gpus"], agent["gpu_health"], agent["spark"]["vram"]) == ([], None, None)


def test_an_older_agent_without_an_effective_core_count_is_measured_against_its_cores(
        sqlite_registry: Registry) -> None:
    snap = make_snapshot("old-agent", cores_physical=4, load_1min=1.0)
    del snap["cpu_cores_effective"]
    feed(sqlite_registry, (snap, NOW))
    assert agents_of(view(sqlite_registry).fleet())["old-agent"]["cores"] == {
        "available": 3.0, "effective": 4.0}


def test_a_failed_gpu_shows_its_error_and_health_beside_the_good_one(
        sqlite_registry: Registry) -> None:
    lost = {"index": 1, "vendor": "nvidia", "name": "NVIDIA RTX A6000", "vram_total_gb": None,
            "vram_available_gb": None, "utilization_percent": None, "temperature_c": None,
            "source": "nvml", "error": "GPU is lost", "health": "unhealthy",
            "health_reason": "GPU is lost"}
    feed(sqlite_registry, (make_snapshot("rig", gpus=[make_gpu(0), lost], gpu_count=2,
                                         gpu_health="unhealthy",
                                         gpu_health_reason="GPU 1: GPU is lost"), NOW))
    agent = agents_of(view(sqlite_registry).fleet())["rig"]
    assert [(g["index"], g["vram_available_gb"], g["health"], g["error"])
            for g in agent["gpus"]] == [(0, 20.5, None, None),
                                        (1, None, "unhealthy", "GPU is lost")]
    assert (agent["gpu_health"], agent["gpu_health_reason"]) == ("unhealthy",
                                                                 "GPU 1: GPU is lost")


# -- states and holds -------------------------------------------------------------------------

def test_each_liveness_state_is_reported_as_the_registry_judges_it(
        sqlite_registry: Registry) -> None:
    feed(sqlite_registry, (make_snapshot("up"), NOW), (make_snapshot("gone"), NOW - 1000),
         (make_snapshot("sleepy", asleep=True), NOW), (make_snapshot("twin"), NOW),
         (make_snapshot("halted"), NOW - 30))
    sqlite_registry.write_signs([{"agent_id": "halted", "worker_name": "celery@halted",
                                  "last_event_at": NOW - 30, "event_interval_seconds": 2.0,
                                  "offline_at": NOW - 20}])
    sqlite_registry.write_batch([], [], [{"agent_id": "twin", "hostname": "clone",
                                          "boot_id": "b2", "seen_at": NOW}])
    agents = agents_of(view(sqlite_registry).fleet())
    assert {agent_id: a["liveness"] for agent_id, a in agents.items()} == {
        "up": "online", "gone": "lost", "sleepy": "asleep", "twin": "conflict",
        "halted": "stopped"}
    assert agents["twin"]["conflict_hostname"] == "clone"


def test_a_drained_agent_is_held_by_the_drain_whatever_its_liveness(
        sqlite_registry: Registry) -> None:
    feed(sqlite_registry, (make_snapshot("busy", work_running=1), NOW),
         (make_snapshot("away"), NOW - 1000))
    sqlite_registry.drain("busy", "ops", now=NOW - 5)
    sqlite_registry.drain("away", "ops", now=NOW - 5)
    agents = agents_of(view(sqlite_registry).fleet())
    assert (agents["busy"]["hold_kind"], agents["busy"]["hold"]) == ("drain", "draining")
    assert (agents["away"]["hold_kind"], agents["away"]["hold"]) == ("drain", "drained")


def test_an_owner_rule_holding_a_live_agent_is_its_hold_with_the_reason(
        sqlite_registry: Registry) -> None:
    feed(sqlite_registry,
         (make_snapshot("desk", accepting=False,
                        accepting_reason="owner-busy (input 12 s ago)"), NOW),
         (make_snapshot("stale", accepting=False, accepting_reason="on-battery"), NOW - 1000))
    agents = agents_of(view(sqlite_registry).fleet())
    assert (agents["desk"]["hold_kind"], agents["desk"]["hold"]) == (
        "owner", "owner-busy (input 12 s ago)")
    assert agents["stale"]["hold"] is None  # a lost agent's last word is not news


# -- grouping ---------------------------------------------------------------------------------

def test_agents_are_grouped_by_pool_in_name_order_and_by_hostname_within_a_pool(
        sqlite_registry: Registry) -> None:
    feed(sqlite_registry,
         (make_snapshot("a-1", pool="rigs", hostname="zeta"), NOW),
         (make_snapshot("a-2", pool="desks", hostname="Beta"), NOW),
         (make_snapshot("a-3", pool="rigs", hostname="alpha"), NOW),
         (make_snapshot("a-4", pool="desks", hostname="alpha"), NOW - 1000))
    fleet = view(sqlite_registry).fleet()
    assert [(p["pool"], [a["hostname"] for a in p["agents"]]) for p in fleet["pools"]] == [
        ("desks", ["alpha", "Beta"]), ("rigs", ["alpha", "zeta"])]
    assert fleet["pools"][0]["liveness"] == {"online": 1, "stopped": 0, "lost": 1,
                                             "conflict": 0, "asleep": 0}
    assert fleet["totals"] == {"agents": 4, "liveness": {"online": 3, "stopped": 0, "lost": 1,
                                                         "conflict": 0, "asleep": 0}}


def test_an_empty_registry_is_an_empty_fleet(sqlite_registry: Registry) -> None:
    fleet = view(sqlite_registry).fleet()
    assert (fleet["pools"], fleet["totals"]["agents"]) == ([], 0)


def test_hostile_text_from_agents_is_carried_verbatim_for_the_page_to_write_as_text(
        sqlite_registry: Registry) -> None:
    hostile = "<script>alert(1)</script>"
    feed(sqlite_registry, (make_snapshot("evil", hostname=hostile, pool="<b>pool</b>",
                                         accepting=False, accepting_reason="<img src=x>"), NOW))
    body = view(sqlite_registry).json_bytes()
    agent = agents_of(json.loads(body))["evil"]
    assert (agent["hostname"], agent["pool"], agent["hold"]) == (hostile, "<b>pool</b>",
                                                                 "<img src=x>")


# -- sparklines -------------------------------------------------------------------------------

def point(at: float, **values: float) -> HistoryPoint:
    return HistoryPoint(at, values)


def test_a_sparkline_point_is_the_mean_of_its_slice_and_null_where_nothing_came() -> None:
    start = 1000.0
    points = [point(1000.0, x=2.0), point(1050.0, x=4.0), point(1200.0, x=7.0),
              point(999.0, x=100.0), point(1300.0, x=8.0)]  # one before, one on the end
    assert bucket_means(points, "x", start, 60.0, 5) == [3.0, None, None, 7.0, 8.0]


def test_sparklines_cover_the_last_hour_of_cores_and_vram_with_the_silence_left_blank(
        sqlite_registry: Registry) -> None:
    beats = [(make_snapshot("rig", seq=n + 1, load_1min=float(n % 4),
                            vram_available_gb=10.0 + n % 3), NOW - 3600 + 60 * n + 30)
             for n in range(60) if not 20 <= n < 30]  # 10 minutes of silence
    beats.append((make_snapshot("rig", seq=200), NOW - 7200 + 30))  # before the window
    feed(sqlite_registry, *beats)
    fleet = view(sqlite_registry).fleet()
    spark = agents_of(fleet)["rig"]["spark"]
    assert len(spark["cores"]) == len(spark["vram"]) == BUCKETS
    assert spark["cores"][:4] == [8.0, 7.0, 6.0, 5.0]  # cores_available = 8 - load
    assert spark["vram"][:3] == [10.0, 11.0, 12.0]
    assert spark["cores"][20:30] == [None] * 10
    assert (spark["cores_max"], spark["vram_max"]) == (8.0, 23.99)
    assert fleet["spark"]["step_seconds"] == 60.0


def test_history_since_gives_each_agents_points_from_then_oldest_first(
        registry: Registry) -> None:
    feeder = Feeder(registry)
    for n in range(5):
        for agent_id in ("a", "b"):
            feeder.snapshot(make_snapshot(agent_id, seq=n + 1, load_1min=float(n)),
                            received_at=NOW - 100 + 10 * n)
    feeder.commit()
    history = registry.history_since(NOW - 80)
    assert sorted(history) == ["a", "b"]
    assert [(p.received_at - NOW, p.cpu_load_1min) for p in history["a"]] == [
        (pytest.approx(-80.0), 2.0), (pytest.approx(-70.0), 3.0), (pytest.approx(-60.0), 4.0)]


# -- sharing builds ---------------------------------------------------------------------------

def test_one_build_serves_every_request_until_it_is_build_every_old(
        sqlite_registry: Registry) -> None:
    feed(sqlite_registry, (make_snapshot("first"), NOW))
    shared = view(sqlite_registry, build_every=3600.0)
    fresh = view(sqlite_registry)
    before = shared.json_bytes()
    feed(sqlite_registry, (make_snapshot("second"), NOW))
    assert shared.json_bytes() is before
    assert set(agents_of(json.loads(fresh.json_bytes()))) == {"first", "second"}


def test_the_history_is_read_again_only_after_spark_every(sqlite_registry: Registry) -> None:
    feed(sqlite_registry, (make_snapshot("desk", seq=1), NOW - 120))
    once = view(sqlite_registry, spark_every=3600.0)
    assert agents_of(once.fleet())["desk"]["spark"]["cores"] is not None
    feed(sqlite_registry, (make_snapshot("newcomer"), NOW))
    agents = agents_of(once.fleet())  # listed at once; its sparkline with the next read
    assert (agents["newcomer"]["spark"]["cores"], agents["newcomer"]["liveness"]) == (
        None, "online")


def test_a_thousand_agents_with_an_hour_of_history_build_in_one_pass(
        sqlite_registry: Registry) -> None:
    """Measures the build time at 1,000 agents (logged: ``--log-cli-level=INFO``); asserts
    no time (a shared machine)."""
    feeder = Feeder(sqlite_registry)
    for n in range(1000):
        feeder.snapshot(make_snapshot(f"agent-{n:04d}", pool=f"pool-{n % 7}",
                                      gpu=n % 3 != 0), received_at=NOW - 1)
    feeder.commit()
    history = [{"agent_id": f"agent-{n:04d}", "slot": slot, "received_at": NOW - 30 * slot - 2,
                "cpu_load_1min": 1.0, "cpu_cores_available": 7.0, "memory_available_gb": 20.0,
                "gpu_vram_available_gb": 12.0} for n in range(1000) for slot in range(1, 121)]
    sqlite_registry.write_batch([], history)
    began = time.perf_counter()
    fleet = view(sqlite_registry).fleet()
    took = time.perf_counter() - began
    log.info("fleet view of 1,000 agents with 121,000 history points: %.3f s", took)
    assert fleet["totals"]["agents"] == 1000 and len(fleet["pools"]) == 7
    assert all(a["spark"]["cores"] is not None for p in fleet["pools"] for a in p["agents"])


# -- served beside /metrics -------------------------------------------------------------------

@pytest.fixture
def served(sqlite_registry: Registry) -> Iterator[MetricsServer]:
    feed(sqlite_registry, (make_snapshot("desk-1", pool="desks"), NOW))
    server = MetricsServer(OrchestratorCollector(sqlite_registry, clock=lambda: NOW), 0,
                           "127.0.0.1")
    yield server
    server.close()


def get(port: int, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_root_of_the_metrics_port_is_the_fleet_page_under_a_strict_policy(
        served: MetricsServer) -> None:
    status, headers, body = get(served.port, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert body == fleet_page().body
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy


def test_fleet_json_is_served_beside_metrics_gzipped_when_asked(served: MetricsServer) -> None:
    status, headers, body = get(served.port, "/fleet.json", **{"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert headers["Content-Encoding"] == "gzip" and headers["Cache-Control"] == "no-store"
    assert [p["pool"] for p in json.loads(gzip.decompress(body))["pools"]] == ["desks"]
    status, _, metrics = get(served.port, "/metrics")
    assert status == 200 and b'chiffon_agent_up{agent_id="desk-1"' in metrics


def test_fleet_json_says_503_with_the_reason_when_the_registry_cannot_be_read(
        sqlite_registry: Registry) -> None:
    class Down(FleetView):
        def json_bytes(self) -> bytes:
            raise RegistryError("cannot read registry sqlite:///x: disk I/O error")

    server = MetricsServer(OrchestratorCollector(sqlite_registry), 0, "127.0.0.1",
                           fleet=Down(sqlite_registry))
    try:
        status, _, body = get(server.port, "/fleet.json")
    finally:
        server.close()
    assert status == 503
    assert json.loads(body) == {"error": "cannot read registry sqlite:///x: disk I/O error"}


# -- the page file ----------------------------------------------------------------------------

def page_script() -> str:
    html = fleet_page().body.decode()
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    return script


def test_the_page_writes_what_agents_send_only_as_text_never_as_html() -> None:
    script = page_script()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "createContextualFragment", "DOMParser"):
        assert sink not in script, sink
    assert "textContent" in script


def test_the_page_fetches_nothing_but_its_own_json() -> None:
    html = fleet_page().body.decode()
    urls = set(re.findall(r"""https?://[^\s"'<>)]+""", html))
    assert urls == {"http://www.w3.org/2000/svg"}  # a namespace name, never fetched
    assert re.findall(r"""fetch\(\s*["']([^"']+)""", page_script()) == ["fleet.json"]
    assert not re.search(r"<(?:link[^>]+stylesheet|img|iframe)|\ssrc=|@import|url\(", html)


def test_the_page_is_package_data_that_the_wheel_carries() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["chiffon_worker"]
    assert any(fnmatch(PAGE_RESOURCE, pattern) for pattern in patterns)
    assert (ROOT / "chiffon_worker" / PAGE_RESOURCE).is_file()
