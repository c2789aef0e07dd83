"""Fixtures of the metrics tests: a private system bus with a fake logind on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_logind import FakeLogind, private_bus


@pytest.fixture(scope="module")
def bus_address() -> Iterator[str]:
    """A private ``dbus-daemon`` standing in for the system bus (one per test module)."""
    with private_bus() as address:
        yield address


@pytest.fixture
def logind(bus_address: str) -> Iterator[FakeLogind]:
    """A fake ``org.freedesktop.login1`` on that bus."""
    with FakeLogind(bus_address) as fake:
        yield fake
