"""mac_for_broker: the MAC of the interface that reaches the broker, or None (loopback, no
MAC, any failure), with the resolver, socket and interface table replaced."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import psutil
import pytest

from chiffon_worker.metrics import network
from chiffon_worker.metrics.network import broker_host, mac_for_broker, normalized_mac


class Addr(NamedTuple):
    """One entry of ``psutil.net_if_addrs()`` (the fields used)."""

    family: int
    address: str


def link(mac: str) -> Addr:
    return Addr(psutil.AF_LINK, mac)


def inet(address: str) -> Addr:
    return Addr(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


#: A desktop: loopback, a wired card on the LAN, a VPN tunnel without a MAC.
INTERFACES: dict[str, list[Addr]] = {
    "lo": [inet("127.0.0.1"), inet("::1"), link("00:00:00:00:00:00")],
    "enp5s0": [inet("192.168.1.20"), inet("fe80::1c2b:3cff:fe4d:5e6f%enp5s0"),
               link("1C:2B:3C:4D:5E:6F")],
    "wg0": [inet("10.8.0.2")],
}


class FakeSocket:
    """A UDP socket whose ``connect`` picks ``local`` as the source (or raises)."""

    def __init__(self, local: str | None, connected: list[tuple[Any, ...]]) -> None:
        self.local = local
        self.connected = connected

    def __enter__(self) -> FakeSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def connect(self, sockaddr: tuple[Any, ...]) -> None:
        if self.local is None:
            raise OSError(101, "Network is unreachable")
        self.connected.append(sockaddr)

    def getsockname(self) -> tuple[str, int]:
        assert self.local is not None
        return (self.local, 40000)


class Machine:
    """The replaced resolver, socket and interface table of one test."""

    def __init__(self, *, names: Mapping[str, str] | None = None, local: str | None,
                 interfaces: Mapping[str, Sequence[Addr]] = INTERFACES) -> None:
        self.names = dict(names or {})
        self.local = local
        self.interfaces = interfaces
        self.connected: list[tuple[Any, ...]] = []
        self.looked_up: list[str] = []

    def getaddrinfo(self, host: str, port: int, family: int = 0, type_: int = 0,
                    proto: int = 0, flags: int = 0) -> list[tuple[Any, ...]]:
        self.looked_up.append(host)
        address = self.names.get(host, host)
        try:
            socket.inet_pton(socket.AF_INET, address)
        except OSError:
            raise socket.gaierror(-2, "Name or service not known") from None
        return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", (address, port))]

    def make_socket(self, family: int, type_: int) -> Any:
        assert type_ == socket.SOCK_DGRAM
        return FakeSocket(self.local, self.connected)

    def mac(self, url: str) -> str | None:
        return mac_for_broker(url, getaddrinfo=self.getaddrinfo, make_socket=self.make_socket,
                              net_if_addrs=lambda: self.interfaces)


def test_the_mac_of_the_interface_holding_the_route_to_the_broker() -> None:
    machine = Machine(names={"rabbit.lan": "192.168.1.5"}, local="192.168.1.20")
    assert machine.mac("amqp://chiffon:secret@rabbit.lan:5672/chiffon") == "1c:2b:3c:4d:5e:6f"
    assert machine.connected == [("192.168.1.5", 5672)]


def test_the_first_host_of_a_failover_list_is_the_one_asked() -> None:
    machine = Machine(local="192.168.1.20")
    url = "amqp://u:p@192.168.1.5//;amqp://u:p@192.168.1.6//;amqp://u:p@192.168.1.7//"
    assert machine.mac(url) == "1c:2b:3c:4d:5e:6f"
    assert machine.connected == [("192.168.1.5", 5672)]


def test_a_redis_url_without_a_port_uses_redis_port_to_pick_the_route() -> None:
    machine = Machine(local="192.168.1.20")
    assert machine.mac("redis://:pw@192.168.1.5/0") == "1c:2b:3c:4d:5e:6f"
    assert machine.connected == [("192.168.1.5", 6379)]


def test_an_ipv6_source_with_a_zone_finds_its_interface() -> None:
    assert network.interface_mac("fe80::1c2b:3cff:fe4d:5e6f%enp5s0", INTERFACES) \
        == "1c:2b:3c:4d:5e:6f"


@pytest.mark.parametrize("url", ["amqp://guest:guest@127.0.0.1:5672//", "redis://",
                                 "amqp://guest:guest@localhost//"])
def test_a_broker_on_this_machine_gives_no_mac(url: str) -> None:
    machine = Machine(names={"localhost": "127.0.0.1"}, local="127.0.0.1")
    assert machine.mac(url) is None


def test_an_interface_without_a_mac_gives_none() -> None:
    assert Machine(local="10.8.0.2").mac("amqp://u:p@10.8.0.1//") is None


def test_an_address_no_interface_holds_gives_none() -> None:
    assert Machine(local="172.16.0.9").mac("amqp://u:p@172.16.0.1//") is None


def test_failures_give_none_and_a_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger=network.__name__)
    assert Machine(local="192.168.1.20").mac("amqp://u:p@no-such-host.invalid//") is None
    assert "no-such-host.invalid" in caplog.text
    assert Machine(local=None).mac("amqp://u:p@192.168.1.5//") is None  # no route
    assert "Network is unreachable" in caplog.text
    assert Machine(local="192.168.1.20").mac("not a url") is None
    assert Machine(local="192.168.1.20").mac("amqp://u:p@host:99999//") is None


def test_a_failing_interface_table_gives_none() -> None:
    def broken() -> Mapping[str, Sequence[Addr]]:
        raise PermissionError("denied")

    assert mac_for_broker("amqp://u:p@192.168.1.5//",
                          make_socket=Machine(local="192.168.1.20").make_socket,
                          net_if_addrs=broken) is None


def test_a_hanging_resolver_is_given_up_after_the_timeout() -> None:
    release = threading.Event()

    def hangs(*args: Any) -> list[tuple[Any, ...]]:
        release.wait(5)
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    start = time.monotonic()
    try:
        assert mac_for_broker("amqp://u:p@slow.lan//", resolve_timeout=0.2, getaddrinfo=hangs,
                              make_socket=Machine(local="192.168.1.20").make_socket) is None
    finally:
        release.set()
    assert time.monotonic() - start < 1.0


def test_an_ip_literal_is_not_sent_to_the_resolver_thread() -> None:
    machine = Machine(local="192.168.1.20")
    machine.mac("amqp://u:p@192.168.1.5//")
    assert machine.looked_up == ["192.168.1.5"]


@pytest.mark.parametrize(("url", "expected"), [
    ("amqp://u:p@rabbit.lan:5673/vhost", ("rabbit.lan", 5673)),
    ("amqps://u:p@rabbit.lan/vhost", ("rabbit.lan", 5671)),
    ("rediss://rabbit.lan", ("rabbit.lan", 6380)),
    ("amqp://", ("localhost", 5672)),
    ("amqp://u:p@[fd00::5]:5672//", ("fd00::5", 5672)),
    (" amqp://a//; amqp://b//", ("a", 5672)),
    ("no scheme", None),
    ("amqp://h:port//", None),
])
def test_broker_host(url: str, expected: tuple[str, int] | None) -> None:
    assert broker_host(url) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("1C:2B:3C:4D:5E:6F", "1c:2b:3c:4d:5e:6f"),
    ("1c-2b-3c-4d-5e-6f", "1c:2b:3c:4d:5e:6f"),
    ("00:00:00:00:00:00", None),
    ("1c:2b:3c:4d:5e", None),
    ("1c:2b-3c:4d:5e:6f", None),
    ("", None),
])
def test_normalized_mac(text: str, expected: str | None) -> None:
    assert normalized_mac(text) == expected


def test_the_real_machine_answers_none_or_a_mac_quickly() -> None:
    start = time.monotonic()
    found = mac_for_broker("amqp://guest:guest@127.0.0.1:5672//")
    assert found is None
    found = mac_for_broker("amqp://u:p@192.0.2.1//")  # TEST-NET-1: routed, never reached
    assert found is None or normalized_mac(found) == found
    assert time.monotonic() - start < 2.0
