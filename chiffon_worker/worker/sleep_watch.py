"""Sleep watch: tells the agent when the machine is about to suspend and when it resumed.

systemd-logind broadcasts ``PrepareForSleep(b)`` on the system bus (interface
``org.freedesktop.login1.Manager``): ``true`` just before suspend or hibernation, ``false``
after resume. :class:`SleepWatch` subscribes to it from a daemon thread with its own asyncio
loop and calls ``on_sleep(going_to_sleep)`` on that thread for each one, in order.

While subscribed it holds a logind "delay" inhibitor lock for sleep (``Manager.Inhibit``,
a file descriptor: the connection negotiates descriptor passing), so logind waits for it
before suspending: on ``true`` it calls ``on_sleep(True)`` and only then closes the lock,
and logind goes on (logind's ``InhibitDelayMaxSec``, 5 s by default, bounds that wait
whatever ``on_sleep`` does, so ``on_sleep(True)`` must be quick or bound itself). On
``false`` it takes a new lock, then calls ``on_sleep(False)``. The lock is released on
:meth:`stop`, when the connection is lost (re-taken on reconnecting), and in any process
forked from this one. A lock logind refuses (no permission, no logind, no descriptor
passing) is logged once at INFO and the watch goes on without one: detection still works,
only the suspend may then come before ``on_sleep(True)`` has finished. A lock is tried
again on each resume and when ``org.freedesktop.login1`` gets an owner.

Nothing here raises into the caller. No system bus (or one that does not answer within
``timeout_s`` seconds): logged once at INFO, tried again every ``retry_s`` seconds quietly.
No logind on the bus: logged once at INFO; the subscription stays, so signals arrive if
logind starts later. A dropped connection is re-made. An exception from ``on_sleep`` is
logged with its traceback and the watch goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from functools import partial

from dbus_fast import AuthError, DBusFastError, Message, MessageType
from dbus_fast.aio import MessageBus

from chiffon_worker.metrics.logind import (
    CALL_TIMEOUT_S,
    LOGIN1_NAME,
    LOGIN1_PATH,
    MANAGER_INTERFACE,
    LogindUnavailable,
    close_bus,
    close_fds,
    connect_bus,
    disconnected,
    inhibit,
    reply_error,
    system_bus_address,
)

log = logging.getLogger(__name__)

#: Seconds between attempts to reach a system bus that was not there.
RETRY_S = 30.0
#: The logind signal watched, and the match rule that asks the bus daemon for it.
SIGNAL_NAME = "PrepareForSleep"
MATCH_RULE = (f"type='signal',sender='{LOGIN1_NAME}',path='{LOGIN1_PATH}',"
              f"interface='{MANAGER_INTERFACE}',member='{SIGNAL_NAME}'")
#: The inhibitor lock held while awake (``systemd-inhibit --list`` shows who and why).
INHIBIT_WHAT = "sleep"
INHIBIT_WHO = "chiffon agent"
INHIBIT_WHY = "announce sleep to the orchestrator"
INHIBIT_MODE = "delay"

_DBUS_NAME = "org.freedesktop.DBus"
_DBUS_PATH = "/org/freedesktop/DBus"
#: Tells the watch when logind (re)appears on the bus, to take a lock it could not before.
OWNER_MATCH_RULE = (f"type='signal',sender='{_DBUS_NAME}',path='{_DBUS_PATH}',"
                    f"interface='{_DBUS_NAME}',member='NameOwnerChanged',arg0='{LOGIN1_NAME}'")

# What the watch thread is told to do, in order, by the messages received.
_SLEEP = "sleep"  # PrepareForSleep(true)
_WAKE = "wake"  # PrepareForSleep(false)
_LOGIND_STARTED = "logind started"  # login1 got an owner
_END = "end"  # the connection is gone: deliver what came before, then end

#: Watches that may hold a lock; a forked child closes their descriptors (see below).
_WATCHES: weakref.WeakSet[SleepWatch] = weakref.WeakSet()


class SleepWatch:
    """Calls ``on_sleep(True)`` before the machine suspends and ``on_sleep(False)`` after it
    resumes, from a daemon thread started by :meth:`start` and ended by :meth:`stop`, and
    holds a logind delay lock for sleep meanwhile (see the module's documentation).

    ``bus_address`` defaults to ``DBUS_SYSTEM_BUS_ADDRESS`` or the standard system bus
    socket (read at :meth:`start`). Each bus call is bounded by ``timeout_s`` seconds.
    """

    def __init__(self, on_sleep: Callable[[bool], None], *, bus_address: str | None = None,
                 timeout_s: float = CALL_TIMEOUT_S, retry_s: float = RETRY_S) -> None:
        self._on_sleep = on_sleep
        self._address = bus_address
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._subscribed = False
        self._lock_fd: int | None = None  # the delay lock; set and closed on the watch thread
        self._lock_refusal_logged = False
        _WATCHES.add(self)

    @property
    def subscribed(self) -> bool:
        """True while the signal subscription is in place on a live bus connection."""
        return self._subscribed

    @property
    def holds_lock(self) -> bool:
        """True while the watch holds its logind delay lock."""
        return self._lock_fd is not None

    def start(self) -> None:
        """Start watching in a daemon thread (no-op while already running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        address = self._address if self._address is not None else system_bus_address()
        self._thread = threading.Thread(target=self._run, args=(address,), daemon=True,
                                        name="chiffon-sleep-watch")
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop watching and release the lock; waits up to ``timeout_s`` seconds for the
        thread to end (it releases the lock on its way out)."""
        self._stopping.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # RuntimeError: the loop has closed
                loop.call_soon_threadsafe(wake.set)
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("sleep watch thread still running %g s after stop", timeout_s)

    def _run(self, address: str) -> None:
        """Body of the watch thread: never lets an exception escape unlogged."""
        try:
            asyncio.run(self._watch(address))
        except Exception:
            log.exception("sleep watch stopped by an unexpected error")
        finally:
            self._subscribed = False
            self._release_lock()
            self._loop = self._wake = None

    async def _watch(self, address: str) -> None:
        wake = asyncio.Event()
        self._loop, self._wake = asyncio.get_running_loop(), wake
        if self._stopping.is_set():
            return
        unavailable_logged = False
        while not self._stopping.is_set():
            events: asyncio.Queue[str] = asyncio.Queue()
            try:
                bus, can_lock, lock_now = await self._subscribe(address, events)
            except LogindUnavailable as exc:
                if not unavailable_logged:
                    log.info("sleep watch off: %s; trying again every %g s", exc, self._retry_s)
                    unavailable_logged = True
                else:
                    log.debug("sleep watch: still no system bus: %s", exc)
                await self._sleep(wake, self._retry_s)
                continue
            if unavailable_logged:
                log.info("sleep watch: system bus at %s reachable again", address)
                unavailable_logged = False
            try:
                await self._until_stopped_or_lost(bus, wake, events, can_lock, lock_now)
            finally:
                self._subscribed = False
                self._release_lock()  # no use without the signal that would release it
                await close_bus(bus)

    async def _connect(self, address: str) -> tuple[MessageBus, bool]:
        """A connection to the bus, negotiating descriptor passing where the bus allows it;
        and whether it did. Raises :class:`LogindUnavailable`."""
        try:
            try:
                return await asyncio.wait_for(
                    connect_bus(address, negotiate_unix_fd=True), self._timeout_s), True
            except LogindUnavailable as exc:
                if not isinstance(exc.__cause__, AuthError):
                    raise
                log.debug("sleep watch: connecting with descriptor passing: %s", exc)
                return await asyncio.wait_for(connect_bus(address), self._timeout_s), False
        except TimeoutError:
            raise LogindUnavailable(
                f"system bus at {address}: no answer within {self._timeout_s:g} s") from None

    async def _subscribe(self, address: str,
                         events: asyncio.Queue[str]) -> tuple[MessageBus, bool, bool]:
        """A connection subscribed to ``PrepareForSleep`` (whose messages go to ``events``),
        whether it can hold a lock (it passes descriptors) and whether to take one now
        (logind is there too). Raises :class:`LogindUnavailable`."""
        bus, fd_passing = await self._connect(address)
        try:
            bus.add_message_handler(partial(self._on_message, events))
            await self._bus_call(bus, "AddMatch", "s", [MATCH_RULE])
            if fd_passing:
                await self._bus_call(bus, "AddMatch", "s", [OWNER_MATCH_RULE])
            owned = await self._bus_call(bus, "NameHasOwner", "s", [LOGIN1_NAME])
        except (LogindUnavailable, TimeoutError, OSError, DBusFastError, EOFError) as exc:
            await close_bus(bus)
            if isinstance(exc, LogindUnavailable):
                raise
            raise LogindUnavailable(f"system bus at {address}: {exc!r}") from exc
        self._subscribed = True
        if owned != [True]:
            log.info("sleep watch: %s is not on the system bus at %s; no sleep signals "
                     "unless it starts", LOGIN1_NAME, address)
        if not fd_passing:
            self._log_no_lock(f"the system bus at {address} does not pass file descriptors")
        return bus, fd_passing, fd_passing and owned == [True]

    async def _bus_call(self, bus: MessageBus, member: str, signature: str,
                        body: list[object]) -> list[object]:
        """Call the bus daemon itself (bounded); the reply's body."""
        reply = await asyncio.wait_for(bus.call(Message(
            destination=_DBUS_NAME, path=_DBUS_PATH, interface=_DBUS_NAME, member=member,
            signature=signature, body=body)), self._timeout_s)
        error = reply_error(reply)
        if error is not None:
            raise LogindUnavailable(f"bus daemon {member}: {error}")
        return list(reply.body)

    async def _until_stopped_or_lost(self, bus: MessageBus, wake: asyncio.Event,
                                     events: asyncio.Queue[str], can_lock: bool,
                                     lock_now: bool) -> None:
        """Deliver ``events`` until :meth:`stop` (the rest are dropped) or until the
        connection drops (logged at INFO; those already received are delivered)."""
        deliver = asyncio.ensure_future(self._deliver(bus, events, can_lock, lock_now))
        stopped = asyncio.ensure_future(wake.wait())
        lost = asyncio.ensure_future(disconnected(bus))
        try:
            done, _ = await asyncio.wait({stopped, lost, deliver},
                                         return_when=asyncio.FIRST_COMPLETED)
            if lost in done and not self._stopping.is_set():
                why = lost.exception() if not lost.cancelled() else None
                log.info("sleep watch: lost the system bus (%s); reconnecting", why or "closed")
                events.put_nowait(_END)
                await asyncio.wait({stopped, deliver}, return_when=asyncio.FIRST_COMPLETED)
            if deliver.done():
                deliver.result()  # an unexpected error: raised to _run, which logs it
        finally:
            for task in (stopped, lost, deliver):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await deliver

    async def _deliver(self, bus: MessageBus, events: asyncio.Queue[str], can_lock: bool,
                       lock_now: bool) -> None:
        """Take the lock (when ``lock_now``), then act on ``events`` in order until
        :data:`_END`, taking locks only where ``can_lock``. Never returns otherwise;
        callback errors are logged here."""
        if lock_now:
            await self._take_lock(bus)
        while (event := await events.get()) != _END:
            if event == _SLEEP:
                self._call_back(True)
                self._release_lock()  # logind may suspend now
                continue
            if can_lock:  # _WAKE or _LOGIND_STARTED
                await self._take_lock(bus)
            if event == _WAKE:
                self._call_back(False)

    async def _take_lock(self, bus: MessageBus) -> None:
        """Take the delay lock unless held; a refusal is logged (at INFO the first time)."""
        if self._lock_fd is not None:
            return
        try:
            fd = await inhibit(bus, what=INHIBIT_WHAT, who=INHIBIT_WHO, why=INHIBIT_WHY,
                               mode=INHIBIT_MODE, timeout_s=self._timeout_s)
        except LogindUnavailable as exc:
            self._log_no_lock(str(exc))
            return
        self._lock_fd = fd
        log.debug("sleep watch: holding a logind delay lock for sleep (fd %d)", fd)

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            close_fds([fd])
            log.debug("sleep watch: released the delay lock (fd %d)", fd)

    def _log_no_lock(self, why: str) -> None:
        if self._lock_refusal_logged:
            log.debug("sleep watch: no delay lock: %s", why)
            return
        self._lock_refusal_logged = True
        log.info("sleep watch: no delay lock (%s); suspend may not wait for on_sleep to "
                 "announce it", why)

    def _call_back(self, going_to_sleep: bool) -> None:
        log.info("logind: %s", "preparing for sleep" if going_to_sleep else "resumed")
        try:
            self._on_sleep(going_to_sleep)
        except Exception:
            log.exception("sleep watch: on_sleep(%s) raised", going_to_sleep)

    async def _sleep(self, wake: asyncio.Event, seconds: float) -> None:
        """Wait ``seconds`` or until :meth:`stop`, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)

    def _on_message(self, events: asyncio.Queue[str], msg: Message) -> bool:
        """dbus-fast message handler: queues broadcast ``PrepareForSleep(b)`` signals and
        login1 getting an owner. Closes descriptors sent with anything but a reply (none
        is expected: a reply's belong to whoever made the call)."""
        if msg.unix_fds and msg.message_type in (MessageType.SIGNAL, MessageType.METHOD_CALL):
            close_fds(msg.unix_fds)
        if msg.message_type is not MessageType.SIGNAL:
            return False
        if (not msg.destination and msg.path == LOGIN1_PATH
                and msg.interface == MANAGER_INTERFACE and msg.member == SIGNAL_NAME
                and msg.signature == "b"):
            events.put_nowait(_SLEEP if msg.body[0] else _WAKE)
            return True
        if (msg.sender == _DBUS_NAME and msg.member == "NameOwnerChanged"
                and msg.signature == "sss" and msg.body[0] == LOGIN1_NAME and msg.body[2]):
            events.put_nowait(_LOGIND_STARTED)
        return False


def _forget_locks_in_child() -> None:
    """After ``fork``: the child closes its copies of the lock descriptors, or the lock
    would outlive the parent's release (logind waits for every copy to close)."""
    for watch in list(_WATCHES):
        fd, watch._lock_fd = watch._lock_fd, None
        if fd is not None:
            close_fds([fd])


os.register_at_fork(after_in_child=_forget_locks_in_child)
