"""Sleep watch: logind's PrepareForSleep(b) from a fake logind on a private bus."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chiffon_worker.worker.sleep_watch import SleepWatch
from tests.fake_logind import FakeLogind, private_bus, send_impostor_signal
from tests.waiting import wait_until

LOGGER = "chiffon_worker.worker.sleep_watch"


class Recorder:
    """An ``on_sleep`` callback that remembers its calls (from the watch thread)."""

    def __init__(self) -> None:
        self.calls: list[bool] = []
        self._lock = threading.Lock()

    def __call__(self, going_to_sleep: bool) -> None:
        with self._lock:
            self.calls.append(going_to_sleep)

    def seen(self) -> list[bool]:
        with self._lock:
            return list(self.calls)


@pytest.fixture(scope="module")
def bus_address() -> Iterator[str]:
    with private_bus() as address:
        yield address


@pytest.fixture
def logind(bus_address: str) -> Iterator[FakeLogind]:
    with FakeLogind(bus_address) as fake:
        yield fake


@pytest.fixture
def watches() -> Iterator[list[SleepWatch]]:
    made: list[SleepWatch] = []
    yield made
    for watch in made:
        watch.stop()


def start_watch(made: list[SleepWatch], address: str | None, on_sleep: Recorder,
                **kwargs: float) -> SleepWatch:
    watch = SleepWatch(on_sleep, bus_address=address, **kwargs)
    made.append(watch)
    watch.start()
    return watch


def info_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelname == "INFO"]


def test_prepare_for_sleep_true_then_false_reaches_the_callback(
        logind: FakeLogind, watches: list[SleepWatch]) -> None:
    seen = Recorder()
    watch = start_watch(watches, logind.address, seen)
    wait_until(lambda: watch.subscribed, 5.0, "the watch to subscribe")
    logind.emit_prepare_for_sleep(True)
    wait_until(lambda: seen.seen() == [True], 5.0, lambda: f"[True], got {seen.seen()}")
    logind.emit_prepare_for_sleep(False)
    wait_until(lambda: seen.seen() == [True, False], 5.0,
               lambda: f"[True, False], got {seen.seen()}")


def test_bus_address_comes_from_the_environment(
        logind: FakeLogind, watches: list[SleepWatch], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", logind.address)
    seen = Recorder()
    watch = start_watch(watches, None, seen)
    wait_until(lambda: watch.subscribed, 5.0, "the watch to subscribe")
    logind.emit_prepare_for_sleep(True)
    wait_until(lambda: seen.seen() == [True], 5.0, lambda: f"[True], got {seen.seen()}")


def test_signal_from_a_connection_not_owning_login1_is_ignored(
        logind: FakeLogind, watches: list[SleepWatch]) -> None:
    seen = Recorder()
    watch = start_watch(watches, logind.address, seen)
    wait_until(lambda: watch.subscribed, 5.0, "the watch to subscribe")
    asyncio.run(send_impostor_signal(logind.address, True))
    logind.emit_prepare_for_sleep(False)
    wait_until(seen.seen, 5.0, "the real signal")
    assert seen.seen() == [False]


def test_callback_that_raises_does_not_stop_the_watch(
        logind: FakeLogind, watches: list[SleepWatch], caplog: pytest.LogCaptureFixture) -> None:
    seen = Recorder()

    def fragile(going_to_sleep: bool) -> None:
        seen(going_to_sleep)
        if going_to_sleep:
            raise RuntimeError("drain failed")

    watch = SleepWatch(fragile, bus_address=logind.address)
    watches.append(watch)
    watch.start()
    wait_until(lambda: watch.subscribed, 5.0, "the watch to subscribe")
    logind.emit_prepare_for_sleep(True)
    logind.emit_prepare_for_sleep(False)
    wait_until(lambda: seen.seen() == [True, False], 5.0,
               lambda: f"[True, False], got {seen.seen()}")
    assert any("drain failed" in (r.exc_text or str(r.exc_info)) for r in caplog.records
               if r.levelname == "ERROR")


def test_no_system_bus_is_logged_once_at_info_and_retried_quietly(
        tmp_path: Path, watches: list[SleepWatch], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger=LOGGER)
    watch = start_watch(watches, f"unix:path={tmp_path / 'no-bus'}", Recorder(), retry_s=0.02)
    wait_until(lambda: sum("still no system bus" in r.getMessage() for r in caplog.records) >= 3,
               5.0, "three quiet retries")
    assert not watch.subscribed
    infos = info_messages(caplog)
    assert len(infos) == 1
    assert "sleep watch off" in infos[0]


def test_logind_absent_is_logged_once_and_its_later_signals_still_arrive(
        bus_address: str, watches: list[SleepWatch], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger=LOGGER)
    seen = Recorder()
    watch = start_watch(watches, bus_address, seen)
    wait_until(lambda: watch.subscribed, 5.0, "the watch to subscribe")
    assert len([m for m in info_messages(caplog) if "is not on the system bus" in m]) == 1
    with FakeLogind(bus_address) as late:
        late.emit_prepare_for_sleep(True)
        wait_until(lambda: seen.seen() == [True], 5.0, lambda: f"[True], got {seen.seen()}")


def test_stop_is_prompt_while_waiting_to_retry(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger=LOGGER)
    watch = SleepWatch(Recorder(), bus_address=f"unix:path={tmp_path / 'no-bus'}",
                       retry_s=600.0)
    watch.start()
    wait_until(lambda: info_messages(caplog), 5.0, "the first failed attempt")
    started = time.monotonic()
    watch.stop()
    assert time.monotonic() - started < 1.0
    assert not any(t.name == "chiffon-sleep-watch" and t.is_alive()
                   for t in threading.enumerate())


def test_stop_before_start_and_twice_is_harmless() -> None:
    watch = SleepWatch(Recorder(), bus_address="unix:path=/nonexistent")
    watch.stop()
    watch.start()
    watch.stop()
    watch.stop()


def test_watch_resubscribes_after_the_system_bus_restarts(
        tmp_path: Path, watches: list[SleepWatch]) -> None:
    address = f"unix:path={tmp_path / 'system_bus_socket'}"
    seen = Recorder()
    with private_bus(address), FakeLogind(address):
        watch = start_watch(watches, address, seen, retry_s=0.05)
        wait_until(lambda: watch.subscribed, 5.0, "the watch to subscribe")
    wait_until(lambda: not watch.subscribed, 5.0, "the watch to notice the bus is gone")
    with private_bus(address), FakeLogind(address) as again:
        wait_until(lambda: watch.subscribed, 5.0, "the watch to subscribe again")
        again.emit_prepare_for_sleep(False)
        wait_until(lambda: seen.seen() == [False], 5.0, lambda: f"[False], got {seen.seen()}")
