"""Owner activity: idle seconds from a fake logind on a private bus, else /dev/input atimes."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chiffon_worker.metrics.logind import (
    DEFAULT_SYSTEM_BUS_ADDRESS,
    LogindClient,
    LogindUnavailable,
    system_bus_address,
)
from chiffon_worker.metrics.owner_activity import (
    OwnerActivity,
    OwnerReading,
    input_idle_seconds,
    logind_idle_seconds,
)
from tests.fake_logind import FakeLogind, private_bus
from tests.waiting import wait_until

NOW = 1_750_000_000.0  # wall-clock seconds of every read
FAST_TIMEOUT_S = 0.3  # the logind bound in tests that hit it


class SteppedClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dev_root(tmp_path: Path) -> Path:
    """A replayed /dev: input/event0 read 300 s before NOW, event1 90 s, mice 5 s (ignored)."""
    root = tmp_path / "dev"
    (root / "input").mkdir(parents=True)
    for name, age in (("event0", 300), ("event1", 90), ("mice", 5)):
        device = root / "input" / name
        device.touch()
        os.utime(device, (NOW - age, NOW - 1000))
    return root


@pytest.fixture
def owner_factory() -> Iterator[list[OwnerActivity]]:
    made: list[OwnerActivity] = []
    yield made
    for owner in made:
        owner.close()


def make_owner(made: list[OwnerActivity], dev_root: Path | str, address: str | None,
               **kwargs: object) -> OwnerActivity:
    owner = OwnerActivity(str(dev_root), bus_address=address, **kwargs)  # type: ignore[arg-type]
    made.append(owner)
    return owner


def test_active_owner_per_logind_is_idle_zero_seconds(
        logind: FakeLogind, dev_root: Path, owner_factory: list[OwnerActivity]) -> None:
    logind.set_idle(False, int((NOW - 600) * 1e6))
    owner = make_owner(owner_factory, dev_root, logind.address)
    assert owner.read(NOW) == OwnerReading(0.0, "logind")


def test_idle_owner_per_logind_is_idle_since_the_hint(
        logind: FakeLogind, dev_root: Path, owner_factory: list[OwnerActivity]) -> None:
    logind.set_idle(True, int((NOW - 754.5) * 1e6))
    owner = make_owner(owner_factory, dev_root, logind.address)
    reading = owner.read(NOW)
    assert reading.source == "logind"
    assert reading.idle_seconds == pytest.approx(754.5)


def test_idle_hint_without_a_time_falls_back_to_input_devices(
        logind: FakeLogind, dev_root: Path, owner_factory: list[OwnerActivity]) -> None:
    logind.set_idle(True, 0)
    owner = make_owner(owner_factory, dev_root, logind.address)
    assert owner.read(NOW) == OwnerReading(90.0, "input")


def test_connection_is_reused_between_reads(
        logind: FakeLogind, dev_root: Path, owner_factory: list[OwnerActivity]) -> None:
    owner = make_owner(owner_factory, dev_root, logind.address)
    for _ in range(3):
        assert owner.read(NOW).source == "logind"
    assert logind.get_calls == 6
    assert len(set(logind.readers)) == 1


def test_bus_address_comes_from_the_environment(
        logind: FakeLogind, dev_root: Path, owner_factory: list[OwnerActivity],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", logind.address)
    logind.set_idle(True, int((NOW - 42) * 1e6))
    owner = make_owner(owner_factory, dev_root, None)
    assert owner.read(NOW) == OwnerReading(42.0, "logind")


def test_system_bus_address_defaults_to_the_standard_socket() -> None:
    assert system_bus_address({}) == DEFAULT_SYSTEM_BUS_ADDRESS
    assert system_bus_address({"DBUS_SYSTEM_BUS_ADDRESS": "  "}) == DEFAULT_SYSTEM_BUS_ADDRESS
    assert system_bus_address({"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/x"}) == "unix:path=/x"


def test_logind_absent_from_the_bus_uses_input_device_atimes(
        bus_address: str, dev_root: Path, owner_factory: list[OwnerActivity]) -> None:
    owner = make_owner(owner_factory, dev_root, bus_address)
    assert owner.read(NOW) == OwnerReading(90.0, "input")


def test_no_bus_at_all_uses_input_device_atimes(
        tmp_path: Path, dev_root: Path, owner_factory: list[OwnerActivity]) -> None:
    owner = make_owner(owner_factory, dev_root, f"unix:path={tmp_path / 'no-such-socket'}")
    assert owner.read(NOW) == OwnerReading(90.0, "input")


def test_neither_source_gives_none(
        tmp_path: Path, owner_factory: list[OwnerActivity]) -> None:
    owner = make_owner(owner_factory, tmp_path / "empty-dev",
                       f"unix:path={tmp_path / 'no-such-socket'}")
    assert owner.read(NOW) == OwnerReading(None, None)


def test_unreachable_logind_is_logged_once_at_info(
        tmp_path: Path, dev_root: Path, owner_factory: list[OwnerActivity],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="chiffon_worker.metrics.owner_activity")
    clock = SteppedClock()
    owner = make_owner(owner_factory, dev_root, f"unix:path={tmp_path / 'nothing'}",
                       retry_s=10.0, clock=clock)
    for _ in range(3):
        owner.read(NOW)
        clock.now += 11.0
    infos = [r for r in caplog.records if r.levelname == "INFO"]
    assert len(infos) == 1
    assert "logind unavailable" in infos[0].getMessage()


def test_silent_bus_is_bounded_by_the_timeout(
        tmp_path: Path, dev_root: Path, owner_factory: list[OwnerActivity]) -> None:
    path = tmp_path / "silent-bus"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(8)  # accepts connections, never says a word
        owner = make_owner(owner_factory, dev_root, f"unix:path={path}",
                           timeout_s=FAST_TIMEOUT_S)
        started = time.monotonic()
        reading = owner.read(NOW)
        elapsed = time.monotonic() - started
    assert reading == OwnerReading(90.0, "input")
    assert FAST_TIMEOUT_S * 0.9 <= elapsed < FAST_TIMEOUT_S + 0.7


def test_hung_logind_is_bounded_and_left_alone_until_the_retry(
        logind: FakeLogind, dev_root: Path, owner_factory: list[OwnerActivity]) -> None:
    logind.hang = True
    clock = SteppedClock()
    owner = make_owner(owner_factory, dev_root, logind.address, timeout_s=FAST_TIMEOUT_S,
                       retry_s=30.0, clock=clock)
    started = time.monotonic()
    assert owner.read(NOW) == OwnerReading(90.0, "input")
    assert time.monotonic() - started < FAST_TIMEOUT_S + 0.7
    asked = logind.get_calls
    assert asked > 0

    started = time.monotonic()
    assert owner.read(NOW) == OwnerReading(90.0, "input")  # backing off: not asked at all
    assert time.monotonic() - started < 0.1
    assert logind.get_calls == asked

    logind.hang = False
    logind.set_idle(True, int((NOW - 5) * 1e6))
    clock.now += 31.0
    assert owner.read(NOW) == OwnerReading(5.0, "logind")  # a fresh connection answers


def test_reconnects_after_the_system_bus_restarts(
        tmp_path: Path, dev_root: Path, owner_factory: list[OwnerActivity]) -> None:
    address = f"unix:path={tmp_path / 'system_bus_socket'}"
    clock = SteppedClock()
    owner = make_owner(owner_factory, dev_root, address, retry_s=10.0, clock=clock)
    with private_bus(address), FakeLogind(address) as first:
        first.set_idle(True, int((NOW - 7) * 1e6))
        assert owner.read(NOW) == OwnerReading(7.0, "logind")
    assert owner.read(NOW) == OwnerReading(90.0, "input")  # bus gone
    with private_bus(address), FakeLogind(address) as second:
        second.set_idle(False, 0)
        clock.now += 11.0
        assert owner.read(NOW) == OwnerReading(0.0, "logind")


def test_logind_client_raises_unavailable_for_a_missing_service(bus_address: str) -> None:
    client = LogindClient(bus_address)
    try:
        with pytest.raises(LogindUnavailable, match="ServiceUnknown"):
            client.idle_hint()
    finally:
        client.close()


def test_closed_client_reads_again_on_a_fresh_thread(logind: FakeLogind) -> None:
    client = LogindClient(logind.address)
    try:
        logind.set_idle(True, 123)
        assert client.idle_hint().since_us == 123
        client.close()
        assert client.idle_hint().since_us == 123
        wait_until(lambda: len(set(logind.readers)) == 2, 2.0, "a second connection")
    finally:
        client.close()


@pytest.mark.parametrize(("idle", "since_us", "expected"), [
    (False, 0, 0.0),
    (False, int((NOW - 50) * 1e6), 0.0),
    (True, int((NOW - 50) * 1e6), 50.0),
    (True, int((NOW + 50) * 1e6), 0.0),  # the wall clock stepped back: never negative
    (True, 0, None),
])
def test_logind_idle_seconds(idle: bool, since_us: int, expected: float | None) -> None:
    assert logind_idle_seconds(idle, since_us, NOW) == expected


def test_input_idle_seconds_takes_the_newest_event_device(dev_root: Path) -> None:
    assert input_idle_seconds(str(dev_root), NOW) == 90.0


def test_input_idle_seconds_is_never_negative(dev_root: Path) -> None:
    assert input_idle_seconds(str(dev_root), NOW - 1000) == 0.0


def test_input_idle_seconds_without_event_devices_is_none(tmp_path: Path) -> None:
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "mice").touch()
    assert input_idle_seconds(str(tmp_path), NOW) is None
    assert input_idle_seconds(str(tmp_path / "absent"), NOW) is None


def test_input_idle_seconds_skips_a_device_that_cannot_be_stated(dev_root: Path) -> None:
    (dev_root / "input" / "event9").symlink_to(dev_root / "input" / "gone")
    assert input_idle_seconds(str(dev_root), NOW) == 90.0


def test_input_idle_seconds_reads_character_devices(tmp_path: Path) -> None:
    (tmp_path / "input").mkdir()
    device = tmp_path / "input" / "event3"
    try:
        os.mknod(device, 0o600 | 0o020000, os.makedev(13, 67))  # S_IFCHR, like evdev
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    os.utime(device, (NOW - 12, NOW - 12))
    assert input_idle_seconds(str(tmp_path), NOW) == 12.0
