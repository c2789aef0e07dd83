"""Bulk reading of AMQP deliveries for the heartbeat consumer, on py-amqp's connection.

py-amqp reads one frame at a time (three reads of its buffer per frame, three frames per
message), builds a ``Message`` per delivery, decodes every AMQP property and the whole
Celery header table (about twenty entries, each through a generic decoder) and dispatches
it through the channel: about 100 µs of the client's time per heartbeat on a 2-core
machine, as much as a bare kombu consumer's whole cost per message.
:class:`DeliveryReader` takes over the inbound side of one connection while the consumer
drains its queue: it reads what the socket holds (up to :data:`READ_BYTES`), cuts every
whole frame out of it, and hands each ``basic.deliver`` on the consuming channel to the
consumer as (delivery tag, redelivered, body, content type, content encoding, the header
entries the judge reads). Every other frame (heartbeats, channel and connection methods,
other channels) goes to py-amqp's own frame handler, so py-amqp still owns negotiation,
heartbeats, flow control, acks and errors.

The header table is walked, not decoded: each entry's length comes from its type tag, only
the ``wanted`` keys are decoded, and the walk ends at the last of them
(:class:`HeaderReader`). A table that cannot be walked
gives :class:`~chiffon_worker.orchestrator.decoding.UnreadableHeaders` (the judge rejects
that message) instead of breaking the connection.

:meth:`DeliveryReader.detach` gives what was read but not handled (whole frames, and the
frames of a delivery still missing its body) back to py-amqp's read buffer, so py-amqp can
go on reading the connection (e.g. to cancel the consumer) where the reader stopped.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

from amqp.exceptions import UnexpectedFrame

from chiffon_worker.orchestrator.decoding import UnreadableHeaders

#: Bytes asked of the socket per read (a read returns what is there, up to this).
READ_BYTES = 1 << 17

_FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size
_CONTENT_HEADER = struct.Struct(">HHQH")  # class, weight, body size, property flags
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_FRAME_END = 0xCE
_METHOD, _HEADER, _BODY = 1, 2, 3
_DELIVER = b"\x00\x3c\x00\x3c"  # basic.deliver: class 60, method 60
# basic property flags, in the order the properties follow the flags
_CONTENT_TYPE, _CONTENT_ENCODING, _APPLICATION_HEADERS = 0x8000, 0x4000, 0x2000
_RETRY_ERRNOS = frozenset({errno.EAGAIN, errno.EINTR, errno.ENOENT})

#: A header value of a type the judge never needs decoded (decimal, table, array, bytes):
#: it is not a task name, not an expiry, and is truthy (so a ``compression`` of that type
#: is still refused).
UNDECODED = object()

# field table value types: fixed sizes in bytes, and the types with a 4-byte length first
_FIXED_SIZES = {ord(k): v for k, v in {
    "t": 1, "b": 1, "B": 1, "U": 2, "u": 2, "s": 2, "I": 4, "i": 4, "L": 8, "l": 8,
    "f": 4, "d": 8, "D": 5, "T": 8, "V": 0}.items()}
_LENGTH_FIRST = frozenset(map(ord, "SFAx"))
_NUMBERS = {ord(k): struct.Struct(f">{v}") for k, v in {
    "b": "b", "B": "B", "U": "h", "u": "H", "s": "h", "I": "i", "i": "I", "L": "q",
    "l": "q", "f": "f", "d": "d", "T": "Q"}.items()}


class Delivery(NamedTuple):
    """One message delivered to the consumer: what acknowledges it (``tag``), whether the
    broker delivered it before, its body, and the properties the judge reads (``headers``:
    only the wanted entries, or :class:`UnreadableHeaders`; None when it has none)."""

    tag: int
    redelivered: bool
    body: bytes
    content_type: str | None
    content_encoding: str | None
    headers: dict[str, Any] | None


class HeaderReader:
    """Reads the ``wanted`` entries of AMQP field tables, decoded; other entries are only
    stepped over, and the walk stops once every wanted entry that can be there is found.

    A key is looked for only where its entry's bytes (the key's length byte, then the key)
    occur somewhere in the table: where they occur nowhere, no entry has that key, so a
    Celery header table (about twenty entries, ``task`` second and ``expires`` sixth) is
    walked through six entries instead of twenty. The entries after the last wanted one
    are not checked. Strings are ``str`` (``bytes`` where not UTF-8), numbers
    ``int``/``float``, timestamps unix seconds, void ``None``, booleans ``bool``; other
    types are :data:`UNDECODED`. Where a key occurs twice, the first entry counts.
    """

    def __init__(self, wanted: Collection[str]) -> None:
        encoded = [key.encode() for key in wanted]
        self._patterns = tuple((key, bytes((len(key),)) + key) for key in encoded)

    def read(self, buf: bytes, start: int, end: int) -> dict[str, Any]:
        """The wanted entries of the table whose entries lie in ``buf[start:end]``.

        Raises ValueError where the table cannot be walked up to the last wanted entry.
        """
        looking = {key for key, pattern in self._patterns if buf.find(pattern, start, end) >= 0}
        found: dict[str, Any] = {}
        unpack_length = _U32.unpack_from
        off = start
        try:
            while looking and off < end:
                key_end = off + 1 + buf[off]
                kind = buf[key_end]
                if kind == 0x53 or kind in _LENGTH_FIRST:  # 'S' (most entries), 'F', 'A', 'x'
                    value_at = key_end + 5
                    next_at = value_at + unpack_length(buf, key_end + 1)[0]
                else:
                    size = _FIXED_SIZES.get(kind)
                    if size is None:
                        raise ValueError(f"unknown value type {chr(kind)!r} for "
                                         f"{buf[off + 1:key_end]!r}")
                    value_at = key_end + 1
                    next_at = value_at + size
                if next_at > end:
                    raise ValueError(f"entry {buf[off + 1:key_end]!r} runs past the "
                                     "table's end")
                key = buf[off + 1:key_end]
                if key in looking:
                    looking.discard(key)
                    found[key.decode("utf-8", "replace")] = _value(kind, buf, value_at,
                                                                   next_at)
                off = next_at
        except (IndexError, struct.error) as exc:
            raise ValueError(f"truncated table: {exc}") from None
        return found


def _value(kind: int, buf: bytes, at: int, end: int) -> Any:
    """One decoded table value of type ``kind`` lying in ``buf[at:end]``."""
    if kind == 0x53:  # 'S'
        raw = buf[at:end]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    if kind == 0x56:  # 'V'
        return None
    if kind == 0x74:  # 't'
        return bool(buf[at])
    number = _NUMBERS.get(kind)
    return UNDECODED if number is None else number.unpack_from(buf, at)[0]


def _shortstr(buf: bytes, at: int) -> tuple[str, int]:
    end = at + 1 + buf[at]
    return buf[at + 1:end].decode("utf-8", "replace"), end


def read_properties(payload: bytes, headers_read: HeaderReader
                    ) -> tuple[int, str | None, str | None, dict[str, Any] | None]:
    """A content header frame's body size (bytes), content type, content encoding and the
    ``wanted`` header entries (:class:`UnreadableHeaders` where the table is unreadable)."""
    _, _, body_size, flags = _CONTENT_HEADER.unpack_from(payload, 0)
    at = _CONTENT_HEADER.size
    content_type = content_encoding = None
    headers: dict[str, Any] | None = None
    if flags & _CONTENT_TYPE:
        content_type, at = _shortstr(payload, at)
    if flags & _CONTENT_ENCODING:
        content_encoding, at = _shortstr(payload, at)
    if flags & _APPLICATION_HEADERS:
        size = _U32.unpack_from(payload, at)[0]
        at += 4
        if at + size > len(payload):
            headers = UnreadableHeaders("the header table runs past its frame")
        else:
            try:
                headers = headers_read.read(payload, at, at + size)
            except ValueError as exc:
                headers = UnreadableHeaders(str(exc))
    return body_size, content_type, content_encoding, headers


class DeliveryReader:
    """Reads ``connection`` (py-amqp's) in bulk; deliveries on ``channel_id`` go to
    ``on_delivery``, every other frame to py-amqp's frame handler.

    Call :meth:`attach` before the first :meth:`read` and :meth:`detach` before py-amqp
    reads the connection again. ``wanted``: the header keys to decode.
    """

    def __init__(self, connection: Any, channel_id: int, on_delivery: Callable[[Delivery], None],
                 wanted: Collection[str]) -> None:
        self._connection = connection
        self._transport = connection.transport
        self._pass_on: Callable[[tuple[int, int, bytes]], Any] = connection.on_inbound_frame
        self._channel = channel_id
        self._on_delivery = on_delivery
        self._headers = HeaderReader(wanted)
        self._buffer = b""
        # the delivery in progress: its method and header frames, and the body so far
        self._method: bytes | None = None
        self._header: bytes | None = None
        self._parts: list[bytes] = []
        self._missing = 0
        self._properties: tuple[str | None, str | None, dict[str, Any] | None] = \
            (None, None, None)

    def attach(self) -> None:
        """Take over what py-amqp has read ahead but not yet handled."""
        self._buffer, self._transport._read_buffer = self._transport._read_buffer, b""

    def detach(self) -> None:
        """Give py-amqp the bytes not yet handled, the delivery in progress first."""
        frames = []
        if self._method is not None:
            frames.append(_frame(_METHOD, self._channel, self._method))
            if self._header is not None:
                frames.append(_frame(_HEADER, self._channel, self._header))
                frames.extend(_frame(_BODY, self._channel, part) for part in self._parts)
        self._method, self._header, self._parts = None, None, []
        self._transport._read_buffer = b"".join(frames) + self._buffer + \
            self._transport._read_buffer
        self._buffer = b""

    def read(self) -> int:
        """One read of the socket, then every whole frame in hand; returns the bytes read.

        Blocks up to the socket's timeout: raises TimeoutError when nothing arrived, OSError
        when the broker closed the connection, UnexpectedFrame on a broken frame, and
        whatever py-amqp raises for a frame passed on to it (a closed channel...).
        """
        try:
            data = self._transport._quick_recv(READ_BYTES)
        except OSError as exc:
            if exc.errno in _RETRY_ERRNOS:
                return 0
            raise
        if not data:
            raise OSError("Server unexpectedly closed connection")
        self._connection.bytes_recv += 1
        buf = self._buffer + data if self._buffer else data
        self._buffer = b""
        at, size = 0, len(buf)
        unpack = _FRAME_HEADER.unpack_from
        try:
            while size - at > 7:
                kind, channel, length = unpack(buf, at)
                end = at + 7 + length
                if end >= size:
                    break
                if buf[end] != _FRAME_END:
                    raise UnexpectedFrame(f"Received frame_end {buf[end]:#04x} while "
                                          "expecting 0xce")
                payload = buf[at + 7:end]
                at = end + 1
                if channel == self._channel and (self._method is not None or (
                        kind == _METHOD and payload[:4] == _DELIVER)):
                    self._take(kind, payload)
                else:
                    self._pass_on((kind, channel, payload))
        finally:
            self._buffer = buf[at:]
        return len(data)

    def _take(self, kind: int, payload: bytes) -> None:
        """One frame of a delivery on the consuming channel."""
        if kind == _METHOD and self._method is None:
            self._method = payload
        elif kind == _HEADER and self._method is not None and self._header is None:
            body_size, content_type, content_encoding, headers = \
                read_properties(payload, self._headers)
            self._properties = (content_type, content_encoding, headers)
            self._header, self._missing = payload, body_size
            if body_size == 0:
                self._deliver(b"")
        elif kind == _BODY and self._header is not None:
            self._parts.append(payload)
            self._missing -= len(payload)
            if self._missing <= 0:
                parts = self._parts
                self._deliver(parts[0] if len(parts) == 1 else b"".join(parts))
        elif kind != 8:  # a heartbeat frame may come anywhere; anything else is broken
            raise UnexpectedFrame(f"Received frame type {kind} on channel {self._channel} "
                                  "in the middle of a delivery")

    def _deliver(self, body: bytes) -> None:
        method = self._method
        assert method is not None  # a delivery is complete only after its method frame
        at = 5 + method[4]  # basic.deliver's arguments after the consumer tag
        tag, redelivered = _U64.unpack_from(method, at)[0], bool(method[at + 8] & 1)
        self._method, self._header, self._parts = None, None, []
        self._on_delivery(Delivery(tag, redelivered, body, *self._properties))


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    """One AMQP frame as it is on the wire."""
    return _FRAME_HEADER.pack(kind, channel, len(payload)) + payload + bytes((_FRAME_END,))
