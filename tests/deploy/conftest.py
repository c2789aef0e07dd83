"""What the real exporter serves for a fleet in every liveness state, scraped once per
session over HTTP; and promtool, which a test needs (skip locally, fail under CI)."""

from __future__ import annotations

import shutil
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chiffon_worker.orchestrator.exporter import MetricsServer, OrchestratorCollector
from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.orchestrator.worker_events import WorkerEventListener
from tests.conftest import missing_service
from tests.orchestrator.feeding import Feeder
from tests.orchestrator.snapshots import make_snapshot

ROOT = Path(__file__).resolve().parents[2]
#: Labels Prometheus itself puts on every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})


@dataclass
class Served:
    """One scrape of the exporter: sample names, their label names and label values."""

    #: sample name -> label names
    labels: dict[str, set[str]] = field(default_factory=dict)
    #: (sample name, label) -> values seen
    values: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    #: (sample name, sorted label items) -> value
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Served:
        """Read an exposition-format page with prometheus_client's parser."""
        served = cls()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                served.labels.setdefault(sample.name, set()).update(sample.labels)
                for label, value in sample.labels.items():
                    served.values.setdefault((sample.name, label), set()).add(value)
                served.samples[sample.name, tuple(sorted(sample.labels.items()))] = \
                    sample.value
        return served

    def one_hot(self, name: str, agent_id: str) -> str | None:
        """The ``state`` set to 1 in family ``name`` for ``agent_id`` (None: none is)."""
        for (sample, labels), value in self.samples.items():
            found = dict(labels)
            if sample == name and found.get("agent_id") == agent_id and value == 1:
                return found["state"]
        return None


def _fill(registry: Registry, now: float) -> Feeder:
    """Agents online (with a GPU reporting everything), lost, asleep, in conflict and
    stopped, plus one rejected message, all received around ``now`` (unix seconds)."""
    feeder = Feeder(registry)
    feeder.snapshot(make_snapshot(
        "rig", pool="gpu_rigs", gpu_health="unhealthy", gpu_temperature_max_c=83.0,
        gpu_power_draw_w=312.5, gpu_power_limit_w=450.0, gpu_processes=3,
        gpu_foreign_processes=1, gpu_foreign_memory_gb=6.25, owner_idle_seconds=42.0,
        accepting=True), received_at=now)
    feeder.snapshot(make_snapshot("gone", gpu=False, collected_at=now - 1000),
                    received_at=now - 1000)
    feeder.snapshot(make_snapshot("sleeper", asleep=True), received_at=now)
    feeder.snapshot(make_snapshot("clone", seq=9, boot_id="old", hostname="clone-a"),
                    received_at=now - 2)
    feeder.snapshot(make_snapshot("clone", seq=1, boot_id="new", started_at=2e9,
                                  hostname="clone-b"), received_at=now - 1)
    feeder.snapshot(make_snapshot("clone", seq=10, boot_id="old", hostname="clone-a"),
                    received_at=now)
    feeder.snapshot(make_snapshot("quitter"), received_at=now - 10)
    feeder.message(b"garbage", {}, "application/json", received_at=now)
    feeder.commit()
    clock = [now - 9]
    listener = WorkerEventListener("memory://", registry, clock=lambda: clock[0])
    listener.record_event({"type": "worker-heartbeat", "hostname": "quitter@host-quitter",
                           "freq": 2.0})
    clock[0] = now - 8
    listener.record_event({"type": "worker-offline", "hostname": "quitter@host-quitter"})
    listener.flush()
    return feeder


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """The page the exporter serves over HTTP for the fleet of :func:`_fill`."""
    path = tmp_path_factory.mktemp("exporter") / "reg.sqlite3"
    with Registry(f"sqlite:///{path}") as registry:
        feeder = _fill(registry, time.time())
        server = MetricsServer(OrchestratorCollector(registry, feeder.stats), 0, "127.0.0.1")
        try:
            url = f"http://127.0.0.1:{server.port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
        finally:
            server.close()
    return Served.parse(text)


@pytest.fixture(scope="session")
def promtool() -> str:
    """The path of promtool (Debian package ``prometheus``)."""
    found = shutil.which("promtool")
    if found is None:
        missing_service("promtool not found (Debian: apt-get install --no-install-recommends "
                        "prometheus)")
    return found
