"""Waking a sleeping agent for work no awake one can take: which sleeper is chosen, and
``chiffon submit --wake`` end to end (the magic packet caught on a loopback UDP socket;
the woken agent's first heartbeat fed into the registry once the packet arrived)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.orchestrator.waking import fits_by_report, sleeper_for
from chiffon_worker.wake import magic_packet

from .feeding import Feeder
from .snapshots import make_snapshot

pytestmark = pytest.mark.integration

CHIFFON = [sys.executable, "-m", "chiffon_worker.cli"]
MAC = "1c:2b:3c:4d:5e:6f"
NOW = time.time()


def stored(registry: Registry, *snapshots: dict[str, object]) -> None:
    feeder = Feeder(registry)
    for snap in snapshots:
        feeder.snapshot(snap, received_at=NOW)
    feeder.commit()


def test_the_sleeper_that_fits_best_by_its_last_report_is_chosen(
        sqlite_registry: Registry) -> None:
    stored(sqlite_registry,
           make_snapshot("small", asleep=True, mac_address=MAC, cpu_cores_available=2.0),
           make_snapshot("big", asleep=True, mac_address=MAC, cpu_cores_available=12.0),
           make_snapshot("no-mac", asleep=True, cpu_cores_available=30.0),
           make_snapshot("awake", asleep=False, mac_address=MAC, cpu_cores_available=30.0))
    records = sqlite_registry.agents()
    chosen = sleeper_for(records, {"cores": 4}, pool=None, now=NOW + 1)
    assert chosen is not None and chosen.agent_id == "big"
    assert sleeper_for(records, {"cores": 20}, pool=None, now=NOW + 1) is None
    small = next(r for r in records if r.agent_id == "small")
    assert fits_by_report(small, {"cores": 1}) == 2.0



def test_submit_wake_wakes_the_sleeper_and_places_the_work_once_it_heartbeats(
        vhost: str, tmp_path: Path, clean_env: Path) -> None:
    registry_url = f"sqlite:///{tmp_path / 'reg.sqlite3'}"
    asleep = make_snapshot("desk-1", asleep=True, mac_address=MAC, seq=7,
                           cpu_cores_available=8.0)
    with Registry(registry_url) as registry, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        stored(registry, asleep)
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(30)
        env = {**os.environ, "CHIFFON_BROKER_URL": vhost, "CHIFFON_DATABASE_URL": registry_url,
               "CHIFFON_WAKE_BROADCAST_ADDRESS": "127.0.0.1",
               "CHIFFON_WAKE_PORT": str(listener.getsockname()[1])}
        submit = subprocess.Popen([*CHIFFON, "submit", "echo", "--needs", "cores=4",
                                   "--wake", "30"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            packet, _ = listener.recvfrom(1024)
            assert packet == magic_packet(MAC)
            feeder = Feeder(registry)  # the woken agent's first heartbeat
            feeder.snapshot({**asleep, "asleep": False, "seq": 8, "collected_at": time.time()},
                            received_at=time.time())
            feeder.commit()
            out, err = submit.communicate(timeout=30)
        finally:
            if submit.poll() is None:
                submit.kill()
        assert submit.returncode == 0, err
        assert f"woke desk-1 (host-desk-1, {MAC}); waiting up to 30 s" in err
        assert '"agent_id": "desk-1"' in out
