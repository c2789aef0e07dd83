"""The MAC address of the network interface that reaches the broker (for Wake-on-LAN).

:func:`mac_for_broker` takes the first host of ``broker_url`` (a ``;``-separated failover
list counts by its first URL), resolves it, asks the kernel which local address a UDP
socket ``connect()`` to it would use (no packet is sent: UDP ``connect`` only picks the
route), and returns the link-layer address of the interface holding that local address
(``psutil.net_if_addrs()``, ``psutil.AF_LINK``), as ``aa:bb:cc:dd:ee:ff``.

It returns None where there is nothing to wake through: a broker on this machine (a
loopback route), an interface without a MAC (a VPN tunnel), an all-zero MAC, or any
failure (unresolvable host, no route, a malformed URL); failures are logged at DEBUG.

Bounded: an IP literal is used as is; a host name is resolved by the system resolver in a
daemon thread that is waited for at most ``resolve_timeout`` seconds (1 s by default). A
resolver that hangs longer leaves that thread to finish on its own (``getaddrinfo`` cannot
be cancelled) and the answer is None.

The socket, resolver and interface table are parameters, so tests replace them.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import psutil

log = logging.getLogger(__name__)

#: Separates the URLs of a failover list (the same as ``config.FAILOVER_SEPARATOR``;
#: metrics/ does not import the configuration).
_FAILOVER_SEPARATOR = ";"
#: The port a scheme's URL means when it names none (only used to pick a route).
_DEFAULT_PORTS = {"amqp": 5672, "pyamqp": 5672, "amqps": 5671, "redis": 6379,
                  "rediss": 6380}
_FALLBACK_PORT = 5672
#: How long a host name may take to resolve (seconds).
RESOLVE_TIMEOUT_SECONDS = 1.0

_MAC = re.compile(r"^[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")

#: ``socket.getaddrinfo``'s signature, as far as it is used here.
Resolver = Callable[..., Sequence[tuple[Any, ...]]]
#: ``psutil.net_if_addrs``: interface name -> its addresses (``family``, ``address``).
InterfaceTable = Callable[[], Mapping[str, Sequence[Any]]]
#: ``socket.socket``: makes a socket of (family, type).
SocketFactory = Callable[[int, int], socket.socket]


def broker_host(broker_url: str) -> tuple[str, int] | None:
    """(host, port) of the first URL of ``broker_url``; ``localhost`` when the URL names no
    host (``redis://``), the scheme's default port when it names none; None for a URL that
    does not parse."""
    first = broker_url.split(_FAILOVER_SEPARATOR, maxsplit=1)[0].strip()
    try:
        parts = urlsplit(first)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not parts.scheme:
        return None
    return (host or "localhost",
            port or _DEFAULT_PORTS.get(parts.scheme.lower(), _FALLBACK_PORT))


def normalized_mac(text: str) -> str | None:
    """``text`` as ``aa:bb:cc:dd:ee:ff`` if it is a 6-byte MAC (``:`` or ``-`` separated, any
    case) other than all zeros, else None."""
    lowered = text.strip().lower()
    if not _MAC.match(lowered):
        return None
    mac = lowered.replace("-", ":")
    return None if mac == "00:00:00:00:00:00" else mac


def _bare(address: str) -> str:
    """An IP address without an IPv6 zone (``fe80::1%eth0`` -> ``fe80::1``)."""
    return address.split("%", 1)[0]


def resolve(host: str, port: int, *, timeout: float = RESOLVE_TIMEOUT_SECONDS,
            getaddrinfo: Resolver | None = None) -> tuple[int, tuple[Any, ...]]:
    """(family, socket address) of ``host``: an IP literal at once, a name through
    ``getaddrinfo`` waited for at most ``timeout`` seconds. Raises OSError (``TimeoutError``
    when the resolver is too slow) or ValueError (a name IDNA cannot encode)."""
    lookup: Resolver = getaddrinfo or socket.getaddrinfo
    try:
        literal = ipaddress.ip_address(_bare(host))
    except ValueError:
        literal = None
    if literal is not None:
        family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        infos = lookup(host, port, family, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)
    else:
        infos = _resolve_bounded(lookup, host, port, timeout)
    if not infos:
        raise OSError(f"{host} resolves to no address")
    family, _type, _proto, _name, sockaddr = infos[0]
    return int(family), tuple(sockaddr)


def _resolve_bounded(lookup: Resolver, host: str, port: int, timeout: float
                     ) -> Sequence[tuple[Any, ...]]:
    found: list[Sequence[tuple[Any, ...]]] = []
    failed: list[OSError | ValueError] = []

    def run() -> None:
        try:
            found.append(lookup(host, port, 0, socket.SOCK_DGRAM))
        except (OSError, ValueError) as exc:  # ValueError: UnicodeError of a bad IDNA name
            failed.append(exc)

    thread = threading.Thread(target=run, name=f"resolve {host}", daemon=True)
    thread.start()
    thread.join(timeout)
    if failed:
        raise failed[0]
    if not found:
        raise TimeoutError(f"resolving {host} took more than {timeout:g} s")
    return found[0]


def source_address(family: int, sockaddr: tuple[Any, ...], *,
                   make_socket: SocketFactory | None = None) -> str:
    """The local address the kernel would send from to reach ``sockaddr`` (a UDP
    ``connect``: no packet leaves). Raises OSError (no route, ...)."""
    factory: SocketFactory = make_socket or socket.socket
    with factory(family, socket.SOCK_DGRAM) as sock:
        sock.connect(sockaddr)
        return _bare(str(sock.getsockname()[0]))


def interface_mac(address: str, interfaces: Mapping[str, Sequence[Any]]) -> str | None:
    """The MAC of the interface in ``interfaces`` (``psutil.net_if_addrs()``'s shape) that
    holds ``address``; None when none holds it or it has no (non-zero) MAC."""
    wanted = _bare(address)
    for name, addresses in interfaces.items():
        if not any(_bare(str(entry.address)) == wanted for entry in addresses
                   if entry.family in (socket.AF_INET, socket.AF_INET6)):
            continue
        for entry in addresses:
            if entry.family == psutil.AF_LINK and entry.address:
                mac = normalized_mac(str(entry.address))
                if mac is not None:
                    return mac
        log.debug("interface %s holds %s but has no MAC address", name, wanted)
        return None
    log.debug("no interface holds %s", wanted)
    return None


def mac_for_broker(broker_url: str, *, resolve_timeout: float = RESOLVE_TIMEOUT_SECONDS,
                   getaddrinfo: Resolver | None = None,
                   make_socket: SocketFactory | None = None,
                   net_if_addrs: InterfaceTable | None = None) -> str | None:
    """The MAC (``aa:bb:cc:dd:ee:ff``) of the interface this machine reaches the broker
    through, or None (loopback, no MAC, any failure: see the module docstring).

    ``getaddrinfo``, ``make_socket`` and ``net_if_addrs`` default to ``socket.getaddrinfo``,
    ``socket.socket`` and ``psutil.net_if_addrs``.
    """
    target = broker_host(broker_url)
    if target is None:
        log.debug("no broker host in the broker URL: no MAC address for Wake-on-LAN")
        return None
    host, port = target
    try:
        family, sockaddr = resolve(host, port, timeout=resolve_timeout,
                                   getaddrinfo=getaddrinfo)
        local = source_address(family, sockaddr, make_socket=make_socket)
        if ipaddress.ip_address(local).is_loopback:
            log.debug("the broker %s is reached through loopback: no MAC address", host)
            return None
        table = (net_if_addrs or psutil.net_if_addrs)()
    except (OSError, ValueError) as exc:
        log.debug("no MAC address for the route to the broker %s: %s", host, exc)
        return None
    return interface_mac(local, table)
