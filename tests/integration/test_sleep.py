"""Sleep end to end: a real agent whose system bus is a private ``dbus-daemon`` with a fake
logind on it. ``PrepareForSleep(true)`` makes the agent send a heartbeat at once saying
``asleep: true``, which the registry shows as ``asleep`` (not ``lost``) however long the
silence that follows; ``PrepareForSleep(false)`` makes it send one at once saying
``asleep: false`` (the heartbeat interval here is long, so only the announcement can be
that quick)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from chiffon_worker.orchestrator.registry import Registry
from tests.fake_logind import FakeLogind, private_bus
from tests.integration.helpers import HeartbeatTap, delete_agent_queues, start_agent
from tests.orchestrator.feeding import Feeder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INTERVAL_S = 60.0  # no beat-driven heartbeat after the first, within the test
SOON_S = 15.0



def test_the_agent_announces_sleep_and_waking_in_heartbeats_at_once(
        vhost: str, tmp_path: Path) -> None:
    with private_bus() as address, FakeLogind(address) as logind:
        agent = start_agent(tmp_path, vhost, interval=INTERVAL_S,
                            extra_env={"DBUS_SYSTEM_BUS_ADDRESS": address,
                                       "CHIFFON_HEARTBEAT_TIMEOUT_SECONDS": "180"})
        tap = HeartbeatTap(vhost, agent.agent_id)
        try:
            agent.wait_ready()
            first = tap.wait_until(lambda s: s.get("asleep") is False, SOON_S)
            assert first is not None, "no first heartbeat"
            # the watch subscribes to PrepareForSleep soon after the worker is ready
            asleep = None
            for _ in range(int(SOON_S / 0.5)):
                logind.emit_prepare_for_sleep(True)
                asleep = tap.wait_until(lambda s: s.get("asleep") is True, 0.5)
                if asleep is not None:
                    break
            assert asleep is not None, "no heartbeat said asleep: true"
            logind.emit_prepare_for_sleep(False)
            woke = tap.wait_until(lambda s: s.get("asleep") is False
                                  and s["seq"] > asleep.snapshot["seq"], SOON_S)
            assert woke is not None, "no heartbeat said asleep: false on waking"
            assert woke.received_at - asleep.received_at < INTERVAL_S / 2

            with Registry(f"sqlite:///{tmp_path / 'reg.sqlite3'}") as registry:
                feeder = Feeder(registry)
                feeder.snapshot(asleep.snapshot, received_at=asleep.received_at)
                feeder.commit()
                record = registry.agent(agent.agent_id, with_snapshot=False)
                assert record is not None
                hours_later = time.time() + 3 * 3600
                assert record.liveness(hours_later) == "asleep"
                assert record.state(hours_later) == "offline"
                assert not record.takes_work(hours_later)
        finally:
            tap.close()
            agent.stop()
            delete_agent_queues(vhost, agent.pool, agent.agent_queue)
