"""Wake-on-LAN: the magic packet and sending it.

A magic packet is 6 bytes ``0xFF`` followed by the target's 6-byte MAC address repeated
16 times (102 bytes), sent as one UDP datagram, usually to the LAN's broadcast address on
port 9 (``wake_broadcast_address``, ``wake_port``). The network card of a sleeping machine
with Wake-on-LAN enabled wakes it when it sees its MAC there; nothing answers.
"""

from __future__ import annotations

import re
import socket

from chiffon_worker.errors import ChiffonError

__all__ = ["MAGIC_PACKET_LENGTH", "BadMacAddress", "WakeError", "format_mac", "magic_packet",
           "parse_mac", "send_wake"]

#: Length of a magic packet: 6 x 0xFF, then the MAC 16 times.
MAGIC_PACKET_LENGTH = 6 + 16 * 6

#: Six hex bytes, all separated by ``:`` or all by ``-``.
_MAC = re.compile(r"^[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}$")


class BadMacAddress(ChiffonError, ValueError):
    """A text that is not a MAC address (six hex bytes separated by ``:`` or ``-``)."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(f"{text!r} is not a MAC address (six hex bytes separated by ':' "
                         f"or '-', like aa:bb:cc:dd:ee:ff)")


class WakeError(ChiffonError):
    """A Wake-on-LAN packet could not be sent (bad address or port, no route, ...)."""


def parse_mac(mac: str) -> bytes:
    """The 6 bytes of ``mac`` (``aa:bb:cc:dd:ee:ff`` or ``AA-BB-CC-DD-EE-FF``, any case);
    raises :class:`BadMacAddress`."""
    text = mac.strip()
    if not _MAC.match(text):
        raise BadMacAddress(mac)
    return bytes.fromhex(text.replace(":", "").replace("-", ""))


def format_mac(raw: bytes) -> str:
    """``raw`` (6 bytes) as ``aa:bb:cc:dd:ee:ff``."""
    return raw.hex(":")


def magic_packet(mac: str) -> bytes:
    """The 102-byte magic packet that wakes the card with MAC ``mac``; raises
    :class:`BadMacAddress`."""
    return b"\xff" * 6 + parse_mac(mac) * 16


def send_wake(mac: str, broadcast_address: str, port: int) -> None:
    """Send the magic packet for ``mac`` as one UDP datagram to ``broadcast_address:port``
    (``SO_BROADCAST`` set, so a broadcast address is allowed).

    Raises :class:`BadMacAddress` for a bad MAC and :class:`WakeError` for a port outside
    1-65535, an address that does not resolve, or a send the system refuses.
    """
    packet = magic_packet(mac)
    if not 1 <= port <= 65535:
        raise WakeError(f"Wake-on-LAN port {port} is not a UDP port (1-65535)")
    try:
        infos = socket.getaddrinfo(broadcast_address, port, 0, socket.SOCK_DGRAM)
    except (OSError, ValueError) as exc:  # ValueError: UnicodeError of a bad name
        raise WakeError(f"bad Wake-on-LAN address {broadcast_address!r}: {exc}") from None
    family, _type, _proto, _name, sockaddr = infos[0]
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            if family == socket.AF_INET:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.sendto(packet, sockaddr)
    except OSError as exc:
        raise WakeError(f"cannot send the Wake-on-LAN packet to {broadcast_address}:{port}: "
                        f"{exc}") from None
