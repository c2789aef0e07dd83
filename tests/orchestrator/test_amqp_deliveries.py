"""The bulk AMQP delivery reader, on frame streams that py-amqp itself encodes.

py-amqp is the reference: every delivery the reader cuts from a stream must read as
py-amqp reads it (tag, redelivered flag, body, content type and encoding, the header
entries the judge needs), however the stream is split across socket reads, and every
frame the reader does not own must reach py-amqp's handler unchanged.
"""

from __future__ import annotations

import errno
import struct
from datetime import UTC, datetime
from typing import Any

import pytest
from amqp.basic_message import Message
from amqp.exceptions import UnexpectedFrame
from amqp.serialization import dumps, loads
from celery import Celery

from chiffon_worker.orchestrator import decoding
from chiffon_worker.orchestrator.amqp_deliveries import (
    UNDECODED,
    DeliveryReader,
    HeaderReader,
)
from chiffon_worker.orchestrator.decoding import HEADERS_READ, UnreadableHeaders

CHANNEL = 1
WANTED = HEADERS_READ


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def deliver_frames(tag: int, body: bytes, *, channel: int = CHANNEL, redelivered: bool = False,
                   frame_max: int = 131072, **properties: Any) -> bytes:
    """basic.deliver, its content header and body frames, as py-amqp writes them."""
    method = struct.pack(">HH", 60, 60) + dumps("sLbss", ["ctag-1", tag, redelivered,
                                                          "", "chiffon.heartbeats"])
    message = Message(body, **properties)
    header = struct.pack(">HHQ", 60, 0, len(body)) + message._serialize_properties()
    chunk = frame_max - 8
    bodies = [frame(3, channel, body[i:i + chunk]) for i in range(0, len(body), chunk)]
    return frame(1, channel, method) + frame(2, channel, header) + b"".join(bodies)


def celery_headers(**extra: Any) -> dict[str, Any]:
    """The header table Celery sends with a heartbeat task."""
    app = Celery(set_as_current=False)
    message = app.amqp.as_task_v2("0" * 36, "chiffon.heartbeat", args=[{}], expires=900.0,
                                  argsrepr="(snapshot,)", kwargsrepr="{}")
    return {**message.headers, **extra}


class FakeTransport:
    """py-amqp's transport as the reader uses it: ``_quick_recv`` returns the next chunk."""

    def __init__(self, chunks: list[bytes | BaseException]) -> None:
        self.chunks = list(chunks)
        self._read_buffer = b""

    def _quick_recv(self, size: int) -> bytes:
        chunk = self.chunks.pop(0)
        if isinstance(chunk, BaseException):
            raise chunk
        return chunk


class FakeConnection:
    """py-amqp's connection as the reader uses it; passed-on frames are kept."""

    def __init__(self, chunks: list[bytes | BaseException]) -> None:
        self.transport = FakeTransport(chunks)
        self.passed: list[tuple[int, int, bytes]] = []
        self.bytes_recv = 0

    def on_inbound_frame(self, frame: tuple[int, int, bytes]) -> None:
        self.passed.append(frame)


def read_all(chunks: list[bytes | BaseException]) -> tuple[list[tuple[Any, ...]],
                                                          FakeConnection]:
    """Every delivery the reader hands on while reading ``chunks`` one read each."""
    deliveries: list[tuple[Any, ...]] = []
    connection = FakeConnection(chunks)
    reader = DeliveryReader(connection, CHANNEL, deliveries.append, WANTED)
    reader.attach()
    while connection.transport.chunks:
        reader.read()
    return deliveries, connection


def as_py_amqp_reads(stream: bytes) -> list[tuple[Any, ...]]:
    """The deliveries of ``stream`` as py-amqp decodes them (the reference)."""
    deliveries = []
    at = 0
    message: Message | None = None
    while at < len(stream):
        kind, _, size = struct.unpack_from(">BHI", stream, at)
        payload = stream[at + 7:at + 7 + size]
        at += size + 8
        if kind == 1:
            message = Message(frame_method=(60, 60), frame_args=payload)
        elif kind == 2 and message is not None:
            message.inbound_header(payload)
        elif kind == 3 and message is not None:
            message.inbound_body(payload)
        if message is not None and message.ready:
            _, tag, redelivered, _, _ = loads("sLbss", message.frame_args, 4)[0]
            headers = message.properties.get("application_headers")
            wanted = None if headers is None else {k: v for k, v in headers.items()
                                                   if k in WANTED}
            deliveries.append((tag, redelivered, message.body,
                               message.properties.get("content_type"),
                               message.properties.get("content_encoding"), wanted))
            message = None
    return deliveries


HEARTBEAT_BODY = b'[[{"schema": 1}], {}, {"callbacks": null}]'


def test_a_delivery_reads_as_py_amqp_reads_it() -> None:
    stream = deliver_frames(7, HEARTBEAT_BODY, content_type="application/json",
                            content_encoding="utf-8", application_headers=celery_headers())
    deliveries, connection = read_all([stream])
    assert deliveries == as_py_amqp_reads(stream)
    assert deliveries[0][5]["task"] == "chiffon.heartbeat"
    assert connection.passed == []


def test_a_stream_split_at_every_byte_gives_the_same_deliveries() -> None:
    stream = b"".join(deliver_frames(tag, HEARTBEAT_BODY + bytes([tag]),
                                     redelivered=tag % 2 == 0, content_type="application/json",
                                     application_headers=celery_headers())
                      for tag in (1, 2, 3))
    expected = as_py_amqp_reads(stream)
    for cut in range(1, len(stream)):
        assert read_all([stream[:cut], stream[cut:]])[0] == expected, cut
    assert read_all([stream[i:i + 1] for i in range(len(stream))])[0] == expected


def test_a_body_larger_than_a_frame_is_joined_from_its_frames() -> None:
    body = bytes(range(256)) * 2000  # 512 000 bytes: four frames of 131 064
    stream = deliver_frames(9, body, content_type="application/json")
    deliveries, _ = read_all([stream[i:i + 65536] for i in range(0, len(stream), 65536)])
    assert [d[2] for d in deliveries] == [body]


def test_a_delivery_without_a_body_is_handed_on_at_its_header() -> None:
    deliveries, _ = read_all([deliver_frames(4, b"", content_type="application/json")])
    assert deliveries == [(4, False, b"", "application/json", None, None)]


def test_frames_it_does_not_own_reach_py_amqp_unchanged_and_in_order() -> None:
    heartbeat = frame(8, 0, b"")
    other_channel = deliver_frames(5, b"{}", channel=2)
    cancel = frame(1, CHANNEL, struct.pack(">HH", 60, 30) + dumps("sb", ["ctag-1", False]))
    mine = deliver_frames(6, b"{}", content_type="application/json")
    deliveries, connection = read_all([heartbeat + other_channel + cancel + mine])
    assert [d[0] for d in deliveries] == [6]
    assert [(kind, channel) for kind, channel, _ in connection.passed] == \
        [(8, 0), (1, 2), (2, 2), (3, 2), (1, CHANNEL)]
    assert connection.passed[-1][2] == cancel[7:-1]


def test_a_heartbeat_frame_inside_a_delivery_is_passed_on_and_the_delivery_completes() -> None:
    stream = deliver_frames(3, b"{}", content_type="application/json")
    method_end = 7 + struct.unpack_from(">I", stream, 3)[0] + 1
    deliveries, connection = read_all([stream[:method_end] + frame(8, 0, b"") +
                                       stream[method_end:]])
    assert [d[0] for d in deliveries] == [3]
    assert [(kind, channel) for kind, channel, _ in connection.passed] == [(8, 0)]


def test_a_broken_frame_end_stops_the_connection_like_py_amqp() -> None:
    stream = bytearray(deliver_frames(1, b"{}"))
    stream[-1] = 0x00
    with pytest.raises(UnexpectedFrame, match="frame_end"):
        read_all([bytes(stream)])


def test_a_second_method_inside_a_delivery_is_an_unexpected_frame() -> None:
    stream = deliver_frames(1, b"{}")
    method = stream[:7 + struct.unpack_from(">I", stream, 3)[0] + 1]
    with pytest.raises(UnexpectedFrame, match="middle of a delivery"):
        read_all([method + method])


def test_detach_gives_py_amqp_the_delivery_in_progress_and_the_rest_byte_for_byte() -> None:
    stream = deliver_frames(1, b"{}") + deliver_frames(2, b'{"a": 1}')
    first = len(deliver_frames(1, b"{}"))
    for cut in range(first + 1, len(stream)):
        connection = FakeConnection([stream[:cut]])
        connection.transport._read_buffer = b""
        reader = DeliveryReader(connection, CHANNEL, lambda _: None, WANTED)
        reader.attach()
        reader.read()
        connection.transport._read_buffer = stream[cut:]  # what py-amqp reads next
        reader.detach()
        assert connection.transport._read_buffer == stream[first:], cut


def test_attach_takes_what_py_amqp_read_ahead() -> None:
    stream = deliver_frames(1, b"{}") + deliver_frames(2, b"{}")
    connection = FakeConnection([stream[40:]])
    connection.transport._read_buffer = stream[:40]
    deliveries: list[Any] = []
    reader = DeliveryReader(connection, CHANNEL, deliveries.append, WANTED)
    reader.attach()
    reader.read()
    assert [d[0] for d in deliveries] == [1, 2]


def test_a_closed_socket_is_an_os_error_and_an_interrupted_read_reads_nothing() -> None:
    connection = FakeConnection([OSError(errno.EINTR, "interrupted"), b""])
    reader = DeliveryReader(connection, CHANNEL, lambda _: None, WANTED)
    assert reader.read() == 0
    with pytest.raises(OSError, match="closed"):
        reader.read()


def test_a_read_that_times_out_raises_timeout_error() -> None:
    reader = DeliveryReader(FakeConnection([TimeoutError("timed out")]), CHANNEL,
                            lambda _: None, WANTED)
    with pytest.raises(TimeoutError):
        reader.read()


def test_each_read_with_data_counts_as_a_sign_of_life_of_the_broker() -> None:
    _, connection = read_all([frame(8, 0, b""), frame(8, 0, b"")])
    assert connection.bytes_recv == 2


def table(entries: dict[str, Any]) -> bytes:
    raw: bytes = dumps("F", [entries])
    return raw


@pytest.mark.parametrize(("value", "expected"), [
    ("chiffon.heartbeat", "chiffon.heartbeat"),
    (None, None),
    (True, True),
    (-7, -7),
    (1 << 40, 1 << 40),
    (2.5, 2.5),
    (datetime(2026, 12, 1, tzinfo=UTC), 1796083200),
    ({"nested": 1}, UNDECODED),
    ([1, 2], UNDECODED),
])
def test_a_wanted_entry_is_decoded_by_its_type(value: Any, expected: Any) -> None:
    raw = table({"lang": "py", "expires": value, "argsrepr": "(snapshot,)"})
    assert HeaderReader(WANTED).read(raw, 4, len(raw)) == {"expires": expected}


def test_only_entries_at_entry_boundaries_count_not_key_bytes_inside_a_value() -> None:
    lookalike = "\x04taskS\x00\x00\x00\x04evil"
    raw = table({"argsrepr": lookalike, "task": "chiffon.heartbeat"})
    assert HeaderReader(WANTED).read(raw, 4, len(raw)) == {"task": "chiffon.heartbeat"}


def test_a_key_absent_from_the_table_is_absent_from_the_result() -> None:
    raw = table(celery_headers())
    assert set(HeaderReader(WANTED).read(raw, 4, len(raw))) == {"task", "expires"}


def test_compression_anywhere_in_a_celery_table_is_found() -> None:
    raw = table(celery_headers(compression="application/x-gzip"))
    assert HeaderReader(WANTED).read(raw, 4, len(raw))["compression"] == "application/x-gzip"


@pytest.mark.parametrize(("raw", "problem"), [
    (b"\x04taskZ\x00", "unknown value type 'Z'"),
    (b"\x04taskS\x00\x00\x10\x00abc", "runs past the table's end"),
    (b"\x04taskS\x00", "truncated table"),
])
def test_a_table_that_cannot_be_walked_is_a_value_error(raw: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        HeaderReader(WANTED).read(raw, 0, len(raw))


def test_an_unreadable_header_table_is_a_rejected_message_not_a_broken_connection() -> None:
    method = struct.pack(">HH", 60, 60) + dumps("sLbss", ["ctag-1", 1, False, "", "q"])
    bad_table = b"\x04taskZ\x00"
    header = struct.pack(">HHQH", 60, 0, 2, 0xA000) + b"\x10application/json" + \
        struct.pack(">I", len(bad_table)) + bad_table
    deliveries, _ = read_all([frame(1, CHANNEL, method) + frame(2, CHANNEL, header) +
                              frame(3, CHANNEL, b"{}")])
    headers = deliveries[0][5]
    assert isinstance(headers, UnreadableHeaders)
    with pytest.raises(decoding.HeartbeatRejected, match="unreadable AMQP headers") as caught:
        decoding.decode_heartbeat(b"{}", headers, "application/json")
    assert caught.value.reason == decoding.BAD_ENVELOPE
