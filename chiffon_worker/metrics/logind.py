"""systemd-logind over the system D-Bus: the seat's idle hint, read with a bounded wait.

logind publishes on ``org.freedesktop.login1`` at ``/org/freedesktop/login1`` (interface
``org.freedesktop.login1.Manager``) whether every session is idle (``IdleHint``, ``b``) and
since when that state last changed (``IdleSinceHint``, ``t``: CLOCK_REALTIME microseconds).

dbus-fast is asyncio-only, so :class:`LogindClient` keeps a private event loop in a daemon
thread and the synchronous :meth:`LogindClient.idle_hint` waits at most ``timeout_s``
seconds for it (connect, authenticate and both property reads together). One connection is
reused between reads; any failure of the connection itself (refused, timed out, dropped)
discards it and the next read connects again. The bus address comes from
``DBUS_SYSTEM_BUS_ADDRESS``, else :data:`DEFAULT_SYSTEM_BUS_ADDRESS`.

:func:`inhibit` takes a logind inhibitor lock (``Manager.Inhibit``), held by the file
descriptor logind hands back: the sleep watch holds a "delay" one while awake.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from dbus_fast import DBusFastError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from chiffon_worker.errors import ChiffonError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Where the system bus listens when ``DBUS_SYSTEM_BUS_ADDRESS`` is unset (D-Bus spec).
DEFAULT_SYSTEM_BUS_ADDRESS = "unix:path=/run/dbus/system_bus_socket"
#: The well-known bus name of systemd-logind.
LOGIN1_NAME = "org.freedesktop.login1"
#: The object path of logind's manager object.
LOGIN1_PATH = "/org/freedesktop/login1"
#: The interface holding ``IdleHint``, ``IdleSinceHint`` and the ``PrepareForSleep`` signal.
MANAGER_INTERFACE = "org.freedesktop.login1.Manager"
#: Default bound on one whole read: connect (when needed) plus both property reads (s).
CALL_TIMEOUT_S = 1.0
#: Extra seconds the calling thread waits on the loop thread beyond the read's own bound.
_LOOP_GRACE_S = 0.5
#: Seconds a discarded connection is given to close before it is left to the loop.
_CLOSE_WAIT_S = 0.2

_PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"


class LogindUnavailable(ChiffonError):
    """logind could not be asked: no system bus, no logind on it, no answer in time, or an
    answer of the wrong shape. ``str()`` says which."""


@dataclass(frozen=True)
class IdleHint:
    """logind's seat-wide idle state: idle or not, and when that state last changed
    (CLOCK_REALTIME microseconds; 0 where logind has no such time)."""

    idle: bool
    since_us: int


def system_bus_address(environ: Mapping[str, str] | None = None) -> str:
    """The system bus address: ``DBUS_SYSTEM_BUS_ADDRESS`` when set and non-blank, else
    :data:`DEFAULT_SYSTEM_BUS_ADDRESS`. ``environ`` defaults to ``os.environ``."""
    env = os.environ if environ is None else environ
    return env.get("DBUS_SYSTEM_BUS_ADDRESS", "").strip() or DEFAULT_SYSTEM_BUS_ADDRESS


async def connect_bus(address: str, *, negotiate_unix_fd: bool = False) -> MessageBus:
    """A connected, authenticated bus at ``address``. Unbounded: the caller bounds it.
    ``negotiate_unix_fd``: ask the bus to pass file descriptors (a bus that refuses fails
    authentication: the :class:`LogindUnavailable` raised then has an ``AuthError`` cause).

    Raises :class:`LogindUnavailable` for every way the connection can fail."""
    try:
        # dbus-fast < 5 opens the socket in the constructor, >= 5 in connect(): both here.
        return await MessageBus(bus_address=address,
                                negotiate_unix_fd=negotiate_unix_fd).connect()
    except (OSError, DBusFastError, EOFError) as exc:
        raise LogindUnavailable(f"system bus at {address}: {exc or type(exc).__name__}") from exc


def disconnected(bus: MessageBus) -> Awaitable[None]:
    """Resolves when ``bus`` has disconnected (raises what broke it, if anything did).
    Shielded: cancelling the wait does not cancel the bus's own disconnect future, which
    a later :func:`close_bus` still waits on."""
    waiter: Callable[[], Coroutine[Any, Any, None]] = bus.wait_for_disconnect  # untyped
    return asyncio.shield(waiter())


async def close_bus(bus: MessageBus) -> None:
    """Disconnect ``bus`` and give it :data:`_CLOSE_WAIT_S` seconds to finish closing."""
    bus.disconnect()
    try:
        await asyncio.wait_for(disconnected(bus), _CLOSE_WAIT_S)
    except (TimeoutError, OSError, DBusFastError, EOFError) as exc:
        log.debug("closing a bus connection: %r", exc)


def reply_error(reply: Message | None) -> str | None:
    """Why a method call failed (``"Error.Name: text"``), or None for a normal return."""
    if reply is None:
        return "no reply"
    if reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        return f"{reply.error_name}: {text}".rstrip(": ")
    if reply.message_type is not MessageType.METHOD_RETURN:
        return f"unexpected {reply.message_type.name} reply"
    return None


def close_fds(fds: Iterable[int]) -> None:
    """Close each of ``fds``, ignoring those already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def inhibit(bus: MessageBus, *, what: str, who: str, why: str, mode: str,
                  timeout_s: float) -> int:
    """Take a logind inhibitor lock (``Manager.Inhibit(ssss) -> h``) over ``bus``, which
    must have been connected with ``negotiate_unix_fd=True``: the file descriptor that
    holds the lock, not inheritable across exec. Closing it releases the lock.

    Bounded by ``timeout_s`` seconds. Raises :class:`LogindUnavailable` when logind refuses
    (no permission), is absent, does not answer in time, or answers without a descriptor;
    every other descriptor in the reply is closed, and so are those of a reply that comes
    after the wait was given up (timed out or cancelled)."""
    call = asyncio.ensure_future(bus.call(Message(
        destination=LOGIN1_NAME, path=LOGIN1_PATH, interface=MANAGER_INTERFACE,
        member="Inhibit", signature="ssss", body=[what, who, why, mode])))
    try:
        reply = await asyncio.wait_for(asyncio.shield(call), timeout_s)
    except BaseException as exc:
        call.add_done_callback(_close_reply_fds)  # a reply may yet come, with its fd
        if isinstance(exc, TimeoutError):
            raise LogindUnavailable(f"Inhibit: no answer within {timeout_s:g} s") from None
        if isinstance(exc, (OSError, DBusFastError, EOFError)):
            raise LogindUnavailable(f"Inhibit: {exc!r}") from exc
        raise
    fds = list(reply.unix_fds)
    try:
        error = reply_error(reply)
        if error is not None:
            raise LogindUnavailable(f"Inhibit: {error}")
        index = reply.body[0] if reply.signature == "h" and reply.body else None
        if not isinstance(index, int) or not 0 <= index < len(fds):
            raise LogindUnavailable(
                f"Inhibit: no file descriptor in the reply ({reply.signature or 'empty'}, "
                f"{len(fds)} fds)")
        fd = fds[index]
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise LogindUnavailable(f"Inhibit: the descriptor received: {exc!r}") from exc
        del fds[index]
        return fd
    finally:
        close_fds(fds)


def _close_reply_fds(call: asyncio.Future[Message]) -> None:
    """Done-callback of an abandoned call: closes the descriptors its reply brought."""
    if not call.cancelled() and call.exception() is None:
        close_fds(call.result().unix_fds)


class LoopThread:
    """A private asyncio event loop in a daemon thread, started on first use.

    :meth:`run` hands a coroutine to it and waits at most ``timeout_s`` seconds, from any
    thread; it cancels the coroutine and raises ``TimeoutError`` past that.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._thread is None or not self._thread.is_alive():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=self._serve, args=(loop,), daemon=True,
                                          name=self._name)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        """Run ``coro`` on the loop; its result, or its exception re-raised here.
        Raises ``TimeoutError`` (after cancelling it) past ``timeout_s`` seconds."""
        future = asyncio.run_coroutine_threadsafe(coro, self._ensure_started())
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer within {timeout_s:g} s") from None

    def stop(self, cleanup: Coroutine[Any, Any, None] | None = None,
             timeout_s: float = 1.0) -> None:
        """Run ``cleanup`` (bounded by ``timeout_s``), then stop the loop and its thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None or not thread.is_alive():
            if cleanup is not None:
                cleanup.close()
            return
        if cleanup is not None:
            future = asyncio.run_coroutine_threadsafe(cleanup, loop)
            try:
                future.result(timeout=timeout_s)
            except concurrent.futures.TimeoutError:
                future.cancel()
                log.debug("%s: cleanup did not finish within %g s", self._name, timeout_s)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)


class LogindClient:
    """Reads logind's idle hint over the system bus, each read bounded by ``timeout_s`` s.

    ``address`` defaults to :func:`system_bus_address` (read once, here). Thread-safe: reads
    from several threads are serialised. :meth:`close` ends the connection and the thread.
    """

    def __init__(self, address: str | None = None, *,
                 timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.address = address if address is not None else system_bus_address()
        self.timeout_s = timeout_s
        self._loop = LoopThread("chiffon-logind")
        self._bus: MessageBus | None = None  # touched only on the loop thread
        self._read_lock = threading.Lock()

    def idle_hint(self) -> IdleHint:
        """logind's ``IdleHint`` and ``IdleSinceHint``, within ``timeout_s`` seconds.

        Raises :class:`LogindUnavailable` when the bus or logind cannot answer in time."""
        with self._read_lock:
            try:
                return self._loop.run(self._bounded_read(), self.timeout_s + _LOOP_GRACE_S)
            except TimeoutError as exc:  # the loop thread itself did not answer
                raise LogindUnavailable(f"logind on {self.address}: {exc}") from None

    def close(self) -> None:
        """Disconnect and stop the loop thread. A later read starts them again."""
        self._loop.stop(self._drop_bus())

    async def _bounded_read(self) -> IdleHint:
        try:
            return await asyncio.wait_for(self._read(), self.timeout_s)
        except TimeoutError:
            await self._drop_bus()
            raise LogindUnavailable(
                f"logind on {self.address}: no answer within {self.timeout_s:g} s") from None
        except LogindUnavailable:
            raise
        except (OSError, DBusFastError, EOFError) as exc:  # the connection broke mid-read
            await self._drop_bus()
            raise LogindUnavailable(f"logind on {self.address}: {exc!r}") from exc

    async def _drop_bus(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            await close_bus(bus)

    async def _read(self) -> IdleHint:
        if self._bus is not None and not self._bus.connected:
            await self._drop_bus()
        if self._bus is None:
            self._bus = await connect_bus(self.address)
        idle, since = await asyncio.gather(self._get(self._bus, "IdleHint", "b"),
                                           self._get(self._bus, "IdleSinceHint", "t"))
        return IdleHint(idle=bool(idle), since_us=int(since))

    async def _get(self, bus: MessageBus, name: str, signature: str) -> Any:
        """One Manager property, checked to have D-Bus type ``signature``."""
        reply = await bus.call(Message(
            destination=LOGIN1_NAME, path=LOGIN1_PATH, interface=_PROPERTIES_INTERFACE,
            member="Get", signature="ss", body=[MANAGER_INTERFACE, name]))
        error = reply_error(reply)
        if error is not None:
            raise LogindUnavailable(f"logind on {self.address}: {name}: {error}")
        value = reply.body[0] if reply.body else None
        if not isinstance(value, Variant) or value.signature != signature:
            raise LogindUnavailable(
                f"logind on {self.address}: {name} is {value!r}, not of type {signature}")
        return value.value
