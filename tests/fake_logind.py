"""A private D-Bus daemon and a fake systemd-logind on it, for tests of the logind readers.

:func:`private_bus` starts ``dbus-daemon --session`` (optionally on a fixed ``unix:path=``
address, so a test can restart "the system bus" in place) and kills it afterwards; a machine
without ``dbus-daemon`` skips the test (fails it under ``CI=true``). :class:`FakeLogind`
owns ``org.freedesktop.login1`` on such a bus and exports a ``Manager`` with ``IdleHint`` and
``IdleSinceHint`` that the test sets, ``PrepareForSleep(b)`` that the test emits, and a
``hang`` switch that leaves property reads unanswered. Code under test gets the bus through
``DBUS_SYSTEM_BUS_ADDRESS`` or an explicit address.

``Inhibit(ssss) -> h`` grants a lock as logind does, as the write end of a pipe whose read
end the fake keeps: the lock is held while that read end does not read EOF, i.e. while the
client (the only one left with the write end) keeps it open. The fake records each call,
can refuse them (a D-Bus error) or leave them unanswered until the test says.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from dbus_fast import DBusError, Message, MessageType, PropertyAccess, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, dbus_property
from dbus_fast.service import signal as dbus_signal

from chiffon_worker.metrics.logind import (
    LOGIN1_NAME,
    LOGIN1_PATH,
    MANAGER_INTERFACE,
    LoopThread,
    close_bus,
    close_fds,
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
        #: ``(what, who, why, mode)`` of each ``Inhibit`` call, in order
        self.inhibit_calls: list[tuple[str, str, str, str]] = []
        #: a D-Bus error name: ``Inhibit`` then fails with it (no lock)
        self.inhibit_error: str | None = None
        self._lock_ends: list[int] = []  # the read end of each lock granted
        self._guard = threading.Lock()

    def Inhibit(self, what: str, who: str, why: str, mode: str) -> int:
        """``Inhibit(ssss) -> h``, called by :class:`FakeLogind` for each call on the bus:
        records it; raises :class:`DBusError` when ``inhibit_error`` is set, else returns
        the write end of a new lock's pipe, for the caller to send and then close."""
        with self._guard:
            self.inhibit_calls.append((what, who, why, mode))
        if self.inhibit_error is not None:
            raise DBusError(self.inhibit_error, "the fake logind refuses the lock")
        read_end, write_end = os.pipe()
        with self._guard:
            self._lock_ends.append(read_end)
        return write_end

    def locks_held(self) -> int:
        """How many of the locks granted are held still: a read end at EOF has no write
        end left open anywhere (this process, the bus daemon) and counts as released."""
        with self._guard:
            ends = list(self._lock_ends)
        return sum(not select.select([end], [], [], 0)[0] for end in ends)

    def lock_fds(self) -> list[int]:
        """The descriptors the fake itself keeps for the locks granted."""
        with self._guard:
            return list(self._lock_ends)

    def close_locks(self) -> None:
        """Close the fake's ends of every lock (what logind forgets when it stops)."""
        with self._guard:
            ends, self._lock_ends = self._lock_ends, []
        close_fds(ends)

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
    ``hang_inhibit = True`` leaves ``Inhibit`` calls unanswered until
    :meth:`answer_inhibit_calls`. The connection negotiates descriptor passing.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.manager = FakeManager()
        self.hang = False
        self.get_calls = 0
        self.readers: list[str] = []
        self.hang_inhibit = False
        self._unanswered: list[Message] = []  # Inhibit calls left while hang_inhibit
        self._unsent: set[int] = set()  # write ends of locks not yet on the socket
        self._loop = LoopThread("fake-logind")
        self._bus: MessageBus | None = None

    def set_idle(self, idle: bool, since_us: int) -> None:
        """What the next ``IdleHint`` / ``IdleSinceHint`` reads answer."""
        self.manager.idle = idle
        self.manager.since_us = since_us

    def emit_prepare_for_sleep(self, start: bool) -> None:
        """Broadcast ``PrepareForSleep(start)``; returns once it is on the bus."""
        self._loop.run(self._emit(start), START_TIMEOUT_S)

    def granting(self) -> int:
        """How many locks granted are not yet sent (the fake still has their write end)."""
        return len(self._unsent)

    def answer_inhibit_calls(self) -> None:
        """Answer the ``Inhibit`` calls left unanswered (``hang_inhibit``), granting locks;
        returns once the answers are on the bus."""
        self._loop.run(self._answer_unanswered(), START_TIMEOUT_S)

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
        bus = await MessageBus(bus_address=self.address, negotiate_unix_fd=True).connect()
        bus.add_message_handler(self._count_reads)
        bus.add_message_handler(self._on_inhibit)
        bus.export(LOGIN1_PATH, self.manager)
        self._bus = bus  # before owning the name: calls may come as soon as it is owned
        reply = await bus.request_name(LOGIN1_NAME)
        if reply is not RequestNameReply.PRIMARY_OWNER:
            await self._stop()
            raise RuntimeError(f"could not own {LOGIN1_NAME}: {reply}")

    async def _emit(self, start: bool) -> None:
        self.manager.PrepareForSleep(start)
        await self._ping()

    async def _stop(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            await close_bus(bus)
        close_fds(self._unsent)
        self._unsent.clear()
        self.manager.close_locks()

    def _on_inhibit(self, msg: Message) -> bool:
        """Answers ``Inhibit`` (or keeps it, while ``hang_inhibit``). A :class:`DBusError`
        raised here goes back to the caller as an error reply."""
        if (msg.message_type is not MessageType.METHOD_CALL or msg.member != "Inhibit"
                or msg.interface != MANAGER_INTERFACE or msg.path != LOGIN1_PATH):
            return False
        if msg.signature != "ssss":
            raise DBusError("org.freedesktop.DBus.Error.InvalidArgs", msg.signature)
        if self.hang_inhibit:
            self._unanswered.append(msg)
        else:
            self._grant(msg)
        return True

    def _grant(self, msg: Message) -> None:
        """Reply with a new lock, and close the fake's copy of its write end once sent."""
        what, who, why, mode = msg.body
        write_end = self.manager.Inhibit(what, who, why, mode)
        self._unsent.add(write_end)
        if self._bus is None:
            return
        sent = self._bus.send(Message.new_method_return(msg, "h", [0], [write_end]))
        sent.add_done_callback(lambda _: self._sent(write_end))

    def _sent(self, write_end: int) -> None:
        if write_end in self._unsent:
            self._unsent.discard(write_end)
            close_fds([write_end])

    async def _answer_unanswered(self) -> None:
        calls, self._unanswered = self._unanswered, []
        for msg in calls:
            self._grant(msg)
        await self._ping()

    async def _ping(self) -> None:
        """A round trip to the bus daemon: what was sent before has left."""
        if self._bus is not None:
            await self._bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus.Peer", member="Ping"))

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
