"""Sleep watch: tells the agent when the machine is about to suspend and when it resumed.

systemd-logind broadcasts ``PrepareForSleep(b)`` on the system bus (interface
``org.freedesktop.login1.Manager``): ``true`` just before suspend or hibernation, ``false``
after resume. :class:`SleepWatch` subscribes to it from a daemon thread with its own asyncio
loop and calls ``on_sleep(going_to_sleep)`` on that thread for each one. This is detection
only: without a logind "delay" inhibitor lock the ``true`` signal may arrive moments before
the machine sleeps, so ``on_sleep`` must be quick (set a flag, wake a thread).

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
import threading
from collections.abc import Callable

from dbus_fast import DBusFastError, Message, MessageType
from dbus_fast.aio import MessageBus

from chiffon_worker.metrics.logind import (
    CALL_TIMEOUT_S,
    LOGIN1_NAME,
    LOGIN1_PATH,
    MANAGER_INTERFACE,
    LogindUnavailable,
    close_bus,
    connect_bus,
    disconnected,
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

_DBUS_NAME = "org.freedesktop.DBus"
_DBUS_PATH = "/org/freedesktop/DBus"


class SleepWatch:
    """Calls ``on_sleep(True)`` before the machine suspends and ``on_sleep(False)`` after it
    resumes, from a daemon thread started by :meth:`start` and ended by :meth:`stop`.

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

    @property
    def subscribed(self) -> bool:
        """True while the signal subscription is in place on a live bus connection."""
        return self._subscribed

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
        """Stop watching; waits up to ``timeout_s`` seconds for the thread to end."""
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
            self._loop = self._wake = None

    async def _watch(self, address: str) -> None:
        wake = asyncio.Event()
        self._loop, self._wake = asyncio.get_running_loop(), wake
        if self._stopping.is_set():
            return
        unavailable_logged = False
        while not self._stopping.is_set():
            try:
                bus = await self._subscribe(address)
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
                await self._until_stopped_or_lost(bus, wake)
            finally:
                self._subscribed = False
                await close_bus(bus)

    async def _subscribe(self, address: str) -> MessageBus:
        """A connection subscribed to ``PrepareForSleep``; raises :class:`LogindUnavailable`."""
        try:
            bus = await asyncio.wait_for(connect_bus(address), self._timeout_s)
        except TimeoutError:
            raise LogindUnavailable(
                f"system bus at {address}: no answer within {self._timeout_s:g} s") from None
        try:
            bus.add_message_handler(self._on_message)
            await self._bus_call(bus, "AddMatch", "s", [MATCH_RULE])
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
        return bus

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

    async def _until_stopped_or_lost(self, bus: MessageBus, wake: asyncio.Event) -> None:
        """Wait until :meth:`stop` or until the connection drops (logged at INFO)."""
        stopped = asyncio.ensure_future(wake.wait())
        lost = asyncio.ensure_future(disconnected(bus))
        try:
            done, _ = await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stopped, lost):
                task.cancel()
        if lost in done and not self._stopping.is_set():
            why = lost.exception() if not lost.cancelled() else None
            log.info("sleep watch: lost the system bus (%s); reconnecting", why or "closed")

    async def _sleep(self, wake: asyncio.Event, seconds: float) -> None:
        """Wait ``seconds`` or until :meth:`stop`, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)

    def _on_message(self, msg: Message) -> bool:
        """dbus-fast message handler: delivers broadcast ``PrepareForSleep(b)`` signals."""
        if (msg.message_type is MessageType.SIGNAL and not msg.destination
                and msg.path == LOGIN1_PATH and msg.interface == MANAGER_INTERFACE
                and msg.member == SIGNAL_NAME and msg.signature == "b"):
            going_to_sleep = bool(msg.body[0])
            log.info("logind: %s", "preparing for sleep" if going_to_sleep else "resumed")
            try:
                self._on_sleep(going_to_sleep)
            except Exception:
                log.exception("sleep watch: on_sleep(%s) raised", going_to_sleep)
            return True
        return False
