"""A private D-Bus daemon and a fake systemd-logind on it, for tests of the logind readers.

:func:`private_bus` starts ``dbus-daemon --session`` (optionally on a fixed ``unix:path=``
address, so a test can restart "the system bus" in place) and kills it afterwards; a machine
without ``dbus-daemon`` skips the test (fails it under ``CI=true``). :class:`FakeLogind`
owns ``org.freedesktop.login1`` on such a bus and exports a ``Manager`` with ``IdleHint`` and
``IdleSinceHint`` that the test sets, ``PrepareForSleep(b)`` that the test emits, and a
``hang`` switch that leaves property reads unanswered. Code under test gets the bus through
``DBUS_SYSTEM_BUS_ADDRESS`` or an explicit address.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from dbus_fast import Message, MessageType, PropertyAccess, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, dbus_property
from dbus_fast.service import signal as dbus_signal

from chiffon_worker.metrics.logind import (
    LOGIN1_NAME,
    LOGIN1_PATH,
    MANAGER_INTERFACE,
    LoopThread,
    close_bus,
)
from tests.conftest import missing_service
from tests.waiting import wait_until

#: Bound on every start-up step of the daemon and the fake service (s).
START_TIMEOUT_S = 5.0


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie nobody reaps counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def kill_daemon(pid: int) -> None:
    """SIGTERM ``pid`` (SIGKILL if it lingers) and wait until it is gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        try:
            wait_until(lambda: _gone(pid), 2.0, f"dbus-daemon {pid} to exit")
            return
        except AssertionError:
            continue


@contextmanager
def private_bus(address: str | None = None) -> Iterator[str]:
    """A private ``dbus-daemon``; yields its address (``address`` when given, e.g.
    ``unix:path=/tmp/x/bus``). The daemon is killed on exit."""
    exe = shutil.which("dbus-daemon")
    if exe is None:
        missing_service("dbus-daemon is not installed (Debian package dbus-daemon)")
    argv = [exe, "--session", "--print-address=1", "--print-pid=1", "--fork", "--nopidfile"]
    if address is not None:
        argv.append(f"--address={address}")
    started = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT_S,
                             check=False)
    lines = started.stdout.split()
    if started.returncode != 0 or len(lines) < 2:
        missing_service(f"dbus-daemon did not start: {started.stderr.strip()}")
    printed, pid = lines[0], int(lines[1])
    try:
        yield printed
    finally:
        kill_daemon(pid)


class FakeManager(ServiceInterface):
    """``org.freedesktop.login1.Manager`` with only what the agent reads. The return
    annotations are D-Bus signatures (strings under PEP 563), as every dbus-fast reads them."""

    def __init__(self) -> None:
        super().__init__(MANAGER_INTERFACE)
        self.idle = False
        self.since_us = 0

    @dbus_property(access=PropertyAccess.READ)
    def IdleHint(self) -> b:  # noqa: F821
        return self.idle

    @dbus_property(access=PropertyAccess.READ)
    def IdleSinceHint(self) -> t:  # noqa: F821
        return self.since_us

    @dbus_signal()
    def PrepareForSleep(self, start: bool) -> b:  # noqa: F821
        return start


class FakeLogind:
    """A fake logind on the bus at ``address``; a context manager (start, then stop).

    ``get_calls`` counts property reads received; ``readers`` holds the unique bus names
    of the connections that made them; ``hang = True`` leaves reads unanswered.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.manager = FakeManager()
        self.hang = False
        self.get_calls = 0
        self.readers: list[str] = []
        self._loop = LoopThread("fake-logind")
        self._bus: MessageBus | None = None

    def set_idle(self, idle: bool, since_us: int) -> None:
        """What the next ``IdleHint`` / ``IdleSinceHint`` reads answer."""
        self.manager.idle = idle
        self.manager.since_us = since_us

    def emit_prepare_for_sleep(self, start: bool) -> None:
        """Broadcast ``PrepareForSleep(start)``; returns once it is on the bus."""
        self._loop.run(self._emit(start), START_TIMEOUT_S)

    def start(self) -> FakeLogind:
        self._loop.run(self._start(), START_TIMEOUT_S)
        return self

    def stop(self) -> None:
        self._loop.stop(self._stop())

    def __enter__(self) -> FakeLogind:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def _start(self) -> None:
        bus = await MessageBus(bus_address=self.address).connect()
        bus.add_message_handler(self._count_reads)
        bus.export(LOGIN1_PATH, self.manager)
        reply = await bus.request_name(LOGIN1_NAME)
        if reply is not RequestNameReply.PRIMARY_OWNER:
            raise RuntimeError(f"could not own {LOGIN1_NAME}: {reply}")
        self._bus = bus

    async def _emit(self, start: bool) -> None:
        self.manager.PrepareForSleep(start)
        if self._bus is not None:  # a round trip: the signal has left before the reply
            await self._bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus.Peer", member="Ping"))

    async def _stop(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            await close_bus(bus)

    def _count_reads(self, msg: Message) -> bool:
        """Counts property reads; swallows them (no reply) while ``hang`` is set."""
        if msg.message_type is MessageType.METHOD_CALL and msg.member == "Get":
            self.get_calls += 1
            self.readers.append(msg.sender or "")
            return self.hang
        return False


async def send_impostor_signal(address: str, start: bool) -> None:
    """Broadcast a ``PrepareForSleep`` from a connection that does not own login1."""
    bus = await MessageBus(bus_address=address).connect()
    try:
        await bus.send(Message.new_signal(LOGIN1_PATH, MANAGER_INTERFACE, "PrepareForSleep",
                                          "b", [start]))
        await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus.Peer", member="Ping"))
    finally:
        await close_bus(bus)
