"""Sleep watch: logind's PrepareForSleep(b) from a fake logind on a private bus, and the
delay lock the watch holds while awake (the fake's ``locks_held`` says whether it is)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import AuthError

from chiffon_worker.metrics import logind as logind_module
from chiffon_worker.metrics.logind import LogindUnavailable
from chiffon_worker.worker import sleep_watch as sleep_watch_module
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


# --- the delay lock ---------------------------------------------------------------------

SLEEP_LOCK = ("sleep", "chiffon agent", "announce sleep to the orchestrator", "delay")


class LockWitness(Recorder):
    """An ``on_sleep`` that also notes how many of the fake's locks were held when called."""

    def __init__(self, logind: FakeLogind) -> None:
        super().__init__()
        self.logind = logind
        self.held_at_call: list[tuple[bool, int]] = []

    def __call__(self, going_to_sleep: bool) -> None:
        self.held_at_call.append((going_to_sleep, self.logind.manager.locks_held()))
        super().__call__(going_to_sleep)


def wait_locks_held(logind: FakeLogind, count: int) -> None:
    wait_until(lambda: logind.manager.locks_held() == count, 5.0,
               lambda: f"{count} lock(s) held, got {logind.manager.locks_held()}")


def wait_lock_taken(watch: SleepWatch, logind: FakeLogind) -> None:
    """Until ``watch`` holds a lock and the fake no longer holds a copy of it."""
    wait_until(lambda: watch.holds_lock and not logind.granting(), 5.0,
               "the watch to hold the lock alone")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_watch_takes_a_delay_lock_for_sleep_once_subscribed(
        logind: FakeLogind, watches: list[SleepWatch]) -> None:
    watch = start_watch(watches, logind.address, Recorder())
    wait_lock_taken(watch, logind)
    assert watch.subscribed
    assert logind.manager.locks_held() == 1
    assert logind.manager.inhibit_calls == [SLEEP_LOCK]


def test_going_to_sleep_calls_back_before_releasing_the_lock(
        logind: FakeLogind, watches: list[SleepWatch]) -> None:
    seen = LockWitness(logind)
    watch = start_watch(watches, logind.address, seen)
    wait_locks_held(logind, 1)
    logind.emit_prepare_for_sleep(True)
    wait_locks_held(logind, 0)
    assert seen.held_at_call == [(True, 1)]
    assert not watch.holds_lock
    assert len(logind.manager.inhibit_calls) == 1  # no new lock until it resumes


def test_resuming_takes_a_new_lock_before_calling_back(
        logind: FakeLogind, watches: list[SleepWatch]) -> None:
    seen = LockWitness(logind)
    start_watch(watches, logind.address, seen)
    wait_locks_held(logind, 1)
    logind.emit_prepare_for_sleep(True)
    wait_locks_held(logind, 0)
    logind.emit_prepare_for_sleep(False)
    wait_until(lambda: seen.seen() == [True, False], 5.0,
               lambda: f"[True, False], got {seen.seen()}")
    assert seen.held_at_call == [(True, 1), (False, 1)]
    assert logind.manager.inhibit_calls == [SLEEP_LOCK, SLEEP_LOCK]
    assert logind.manager.locks_held() == 1


def test_stop_releases_the_lock(logind: FakeLogind, watches: list[SleepWatch]) -> None:
    watch = start_watch(watches, logind.address, Recorder())
    wait_lock_taken(watch, logind)
    watch.stop()
    wait_locks_held(logind, 0)
    assert not watch.holds_lock


def test_refused_lock_is_logged_once_and_signals_still_arrive(
        logind: FakeLogind, watches: list[SleepWatch], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger=LOGGER)
    logind.manager.inhibit_error = "org.freedesktop.DBus.Error.AccessDenied"
    seen = Recorder()
    watch = start_watch(watches, logind.address, seen)
    wait_until(lambda: logind.manager.inhibit_calls, 5.0, "a lock to be asked for")
    logind.emit_prepare_for_sleep(True)
    logind.emit_prepare_for_sleep(False)
    wait_until(lambda: seen.seen() == [True, False], 5.0,
               lambda: f"[True, False], got {seen.seen()}")
    assert len(logind.manager.inhibit_calls) == 2  # asked again on resuming
    assert not watch.holds_lock
    refusals = [m for m in info_messages(caplog) if "no delay lock" in m]
    assert len(refusals) == 1
    assert "AccessDenied" in refusals[0]


def test_no_descriptor_leaks_across_sleep_wake_and_stop(
        logind: FakeLogind, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger=LOGGER)
    before = open_fds()
    seen = Recorder()
    watch = SleepWatch(seen, bus_address=logind.address)
    try:
        watch.start()
        wait_locks_held(logind, 1)
        logind.emit_prepare_for_sleep(True)
        wait_locks_held(logind, 0)
        logind.emit_prepare_for_sleep(False)
        wait_until(lambda: seen.seen() == [True, False], 5.0,
                   lambda: f"[True, False], got {seen.seen()}")
        wait_locks_held(logind, 1)
    finally:
        watch.stop()
    wait_locks_held(logind, 0)
    # the fake keeps one read end per lock granted: those are its own, not leaks
    assert open_fds() - len(logind.manager.lock_fds()) == before


def test_a_lock_granted_after_the_watch_gave_up_waiting_is_released(
        logind: FakeLogind, watches: list[SleepWatch], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger=LOGGER)
    logind.hang_inhibit = True
    seen = Recorder()
    watch = start_watch(watches, logind.address, seen, timeout_s=0.2, retry_s=0.05)
    wait_until(lambda: [m for m in info_messages(caplog) if "no delay lock" in m], 5.0,
               "the watch to give up on the lock")
    logind.answer_inhibit_calls()
    assert len(logind.manager.lock_fds()) == 1
    wait_locks_held(logind, 0)
    assert not watch.holds_lock
    logind.emit_prepare_for_sleep(True)  # and the watch goes on
    wait_until(lambda: seen.seen() == [True], 5.0, lambda: f"[True], got {seen.seen()}")


def test_a_logind_that_starts_later_is_asked_for_a_lock(
        bus_address: str, watches: list[SleepWatch]) -> None:
    watch = start_watch(watches, bus_address, Recorder())
    wait_until(lambda: watch.subscribed, 5.0, "the watch to subscribe")
    assert not watch.holds_lock
    with FakeLogind(bus_address) as late:
        wait_lock_taken(watch, late)
        assert late.manager.inhibit_calls == [SLEEP_LOCK]
        assert late.manager.locks_held() == 1


def test_a_forked_child_does_not_keep_the_lock(
        logind: FakeLogind, watches: list[SleepWatch]) -> None:
    watch = start_watch(watches, logind.address, Recorder())
    wait_lock_taken(watch, logind)
    hold_child, release_child = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: waits, with whatever it inherited, until told to exit
        os.close(release_child)
        os.read(hold_child, 1)
        os._exit(0)
    os.close(hold_child)
    try:
        watch.stop()
        wait_locks_held(logind, 0)
    finally:
        os.close(release_child)
        os.waitpid(pid, 0)


def test_a_bus_refusing_descriptor_passing_still_delivers_signals(
        logind: FakeLogind, watches: list[SleepWatch], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level("INFO", logger=LOGGER)

    async def no_fd_passing(address: str, *, negotiate_unix_fd: bool = False) -> object:
        if negotiate_unix_fd:
            raise LogindUnavailable("authentication failed") from AuthError("ERROR")
        return await logind_module.connect_bus(address)

    monkeypatch.setattr(sleep_watch_module, "connect_bus", no_fd_passing)
    seen = Recorder()
    watch = start_watch(watches, logind.address, seen)
    wait_until(lambda: watch.subscribed, 5.0, "the watch to subscribe")
    logind.emit_prepare_for_sleep(True)
    logind.emit_prepare_for_sleep(False)
    wait_until(lambda: seen.seen() == [True, False], 5.0,
               lambda: f"[True, False], got {seen.seen()}")
    assert logind.manager.inhibit_calls == []
    refusals = [m for m in info_messages(caplog) if "no delay lock" in m]
    assert len(refusals) == 1
    assert "does not pass file descriptors" in refusals[0]
