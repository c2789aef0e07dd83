"""Wake-on-LAN: the magic packet's bytes, sending it, and ``chiffon wake AGENT`` end to end
(a SQLite registry filled with heartbeats, the packet caught on a loopback UDP socket)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chiffon_worker.cli import main
from chiffon_worker.errors import ChiffonError
from chiffon_worker.wake import (
    MAGIC_PACKET_LENGTH,
    BadMacAddress,
    WakeError,
    format_mac,
    magic_packet,
    parse_mac,
    send_wake,
)

MAC = "1c:2b:3c:4d:5e:6f"
MAC_BYTES = bytes([0x1C, 0x2B, 0x3C, 0x4D, 0x5E, 0x6F])
EXPECTED_PACKET = b"\xff\xff\xff\xff\xff\xff" + MAC_BYTES * 16


@pytest.fixture
def catcher() -> Iterator[socket.socket]:
    """A UDP socket on 127.0.0.1, an ephemeral port, that waits at most 2 s for a packet."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2.0)
        yield sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


# -- the packet -------------------------------------------------------------------------------

def test_the_magic_packet_is_six_ff_then_the_mac_sixteen_times() -> None:
    packet = magic_packet(MAC)
    assert packet == EXPECTED_PACKET
    assert len(packet) == MAGIC_PACKET_LENGTH == 102
    assert packet[:6] == b"\xff" * 6
    assert all(packet[6 + 6 * n:12 + 6 * n] == MAC_BYTES for n in range(16))


@pytest.mark.parametrize("spelling", ["1C:2B:3C:4D:5E:6F", "1c-2b-3c-4d-5e-6f",
                                      "1C-2b-3C-4d-5E-6f", " 1c:2b:3c:4d:5e:6f\n"])
def test_a_mac_is_read_with_colons_or_dashes_in_any_case(spelling: str) -> None:
    assert magic_packet(spelling) == EXPECTED_PACKET
    assert parse_mac(spelling) == MAC_BYTES
    assert format_mac(parse_mac(spelling)) == MAC


@pytest.mark.parametrize("bad", ["", "1c:2b:3c:4d:5e", "1c:2b:3c:4d:5e:6f:70", "1c2b3c4d5e6f",
                                 "1c:2b-3c:4d:5e:6f", "1c:2b:3c:4d:5e:6g", "1c:2b:3c:4d:5e:f",
                                 "1c.2b.3c.4d.5e.6f", "not a mac"])
def test_a_bad_mac_is_refused_with_a_clear_message(bad: str) -> None:
    with pytest.raises(BadMacAddress) as raised:
        magic_packet(bad)
    assert isinstance(raised.value, ChiffonError) and isinstance(raised.value, ValueError)
    message = str(raised.value)
    assert repr(bad) in message and "is not a MAC address" in message
    assert "aa:bb:cc:dd:ee:ff" in message and "\n" not in message


# -- sending ----------------------------------------------------------------------------------

def test_send_wake_sends_the_102_bytes_in_one_datagram(catcher: socket.socket) -> None:
    send_wake(MAC, "127.0.0.1", port_of(catcher))
    data, _sender = catcher.recvfrom(2048)
    assert data == EXPECTED_PACKET


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_send_wake_refuses_a_port_that_is_not_a_udp_port(port: int) -> None:
    with pytest.raises(WakeError, match=f"port {port} is not a UDP port"):
        send_wake(MAC, "127.0.0.1", port)


def test_send_wake_refuses_an_address_that_does_not_resolve() -> None:
    with pytest.raises(WakeError, match=r"bad Wake-on-LAN address '256\.1\.1\.1\.invalid'"):
        send_wake(MAC, "256.1.1.1.invalid", 9)


def test_send_wake_checks_the_mac_before_anything_is_sent() -> None:
    with pytest.raises(BadMacAddress):
        send_wake("zz:zz:zz:zz:zz:zz", "127.0.0.1", 9)


# -- chiffon wake -----------------------------------------------------------------------------

@pytest.fixture
def state_dir(clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI's state dir (its SQLite registry is ``registry.sqlite3`` there)."""
    state = tmp_path / "chiffon-state"
    monkeypatch.setenv("CHIFFON_STATE_DIR", str(state))
    return state


@pytest.fixture
def fleet(state_dir: Path) -> Path:
    """A registry with ``desk-1`` (a MAC reported, dash-separated, upper case),
    ``desk-2`` (a MAC reported) and ``laptop`` (none: an older agent, or loopback)."""
    from chiffon_worker.orchestrator.registry import Registry
    from tests.orchestrator.feeding import Feeder
    from tests.orchestrator.snapshots import make_snapshot

    now = time.time()
    with Registry(f"sqlite:///{state_dir / 'registry.sqlite3'}") as registry:
        feeder = Feeder(registry)
        feeder.snapshot(make_snapshot("desk-1", hostname="gamer-pc",
                                      mac_address=MAC.upper().replace(":", "-")),
                        received_at=now)
        feeder.snapshot(make_snapshot("desk-2", mac_address="aa:bb:cc:dd:ee:01"),
                        received_at=now)
        feeder.snapshot(make_snapshot("laptop"), received_at=now)
        feeder.commit()
    return state_dir


def test_chiffon_wake_sends_the_agents_mac_and_says_where(
        fleet: Path, catcher: socket.socket, capsys: pytest.CaptureFixture[str]) -> None:
    port = port_of(catcher)
    assert main(["wake", "gamer-pc", "--broadcast", "127.0.0.1", "--port", str(port)]) == 0
    assert catcher.recvfrom(2048)[0] == EXPECTED_PACKET
    out, err = capsys.readouterr()
    assert out == (f"sent a Wake-on-LAN packet for desk-1 (gamer-pc, {MAC}) to "
                   f"127.0.0.1:{port}\n")
    assert err == ""


def test_chiffon_wake_takes_address_and_port_from_the_config(
        fleet: Path, catcher: socket.socket, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CHIFFON_WAKE_BROADCAST_ADDRESS", "127.0.0.1")
    monkeypatch.setenv("CHIFFON_WAKE_PORT", str(port_of(catcher)))
    assert main(["wake", "desk-2"]) == 0  # by agent id
    assert catcher.recvfrom(2048)[0] == magic_packet("aa:bb:cc:dd:ee:01")
    assert f"to 127.0.0.1:{port_of(catcher)}" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["wake", "nobody"], "no agent 'nobody' in the registry"),
    (["wake", "desk"], "'desk' matches 2 agents"),
    (["wake", "laptop"], "no MAC address known for laptop (host-laptop): the agent must "
                         "have sent a heartbeat once with a network interface"),
    (["wake", "desk-1", "--broadcast", "no-such-host.invalid", "--port", "9"],
     "bad Wake-on-LAN address 'no-such-host.invalid'"),
    (["wake", "desk-1", "--broadcast", "127.0.0.1", "--port", "70000"],
     "port 70000 is not a UDP port"),
])
def test_chiffon_wake_errors_exit_1_with_one_line(
        fleet: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
        ) -> None:
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("chiffon: error: ")
    assert message in err


def test_chiffon_wake_says_so_when_the_stored_mac_is_not_a_mac(
        state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from chiffon_worker.orchestrator.registry import Registry
    from tests.orchestrator.feeding import feed
    from tests.orchestrator.snapshots import make_snapshot

    with Registry(f"sqlite:///{state_dir / 'registry.sqlite3'}") as registry:
        feed(registry, make_snapshot("odd", mac_address="not-a-mac"), start=time.time())
    assert main(["wake", "odd", "--broadcast", "127.0.0.1", "--port", "9"]) == 1
    err = capsys.readouterr().err
    assert "odd (host-odd) reported a bad MAC address: 'not-a-mac' is not a MAC address" in err


def test_chiffon_wake_as_a_subprocess(fleet: Path, catcher: socket.socket) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "chiffon_worker.cli", "wake", "desk-1", "--broadcast",
         "127.0.0.1", "--port", str(port_of(catcher))],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert catcher.recvfrom(2048)[0] == EXPECTED_PACKET
    assert done.stdout.startswith("sent a Wake-on-LAN packet for desk-1 (gamer-pc, ")
