"""On battery: psutil.sensors_battery() replayed through monkeypatch."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from chiffon_worker.metrics.battery import Battery

Sensors = Callable[[], Any]


def battery(plugged: bool | None) -> Any:
    """What psutil returns: an ``sbattery`` with these fields."""
    return SimpleNamespace(percent=55.0, secsleft=3600, power_plugged=plugged)


def replay(monkeypatch: pytest.MonkeyPatch, sensors: Sensors) -> None:
    monkeypatch.setattr(psutil, "sensors_battery", sensors, raising=False)


def test_unplugged_battery_is_on_battery(monkeypatch: pytest.MonkeyPatch) -> None:
    replay(monkeypatch, lambda: battery(False))
    assert Battery().on_battery() is True


def test_plugged_battery_is_not_on_battery(monkeypatch: pytest.MonkeyPatch) -> None:
    replay(monkeypatch, lambda: battery(True))
    assert Battery().on_battery() is False


def test_no_battery_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    replay(monkeypatch, lambda: None)
    assert Battery().on_battery() is None


def test_undetermined_power_source_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    replay(monkeypatch, lambda: battery(None))
    assert Battery().on_battery() is None


def test_platform_without_battery_support_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(psutil, "sensors_battery", raising=False)
    assert Battery().on_battery() is None


@pytest.mark.parametrize("error", [OSError(5, "EIO"), ZeroDivisionError("energy_full 0"),
                                   psutil.AccessDenied(), NotImplementedError()])
def test_psutil_raising_fails_that_reading_only(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture,
                                                error: Exception) -> None:
    def broken() -> Any:
        raise error

    # a test before this one may have raised the package logger's level
    caplog.set_level("DEBUG", logger="chiffon_worker.metrics.battery")
    reader = Battery()
    replay(monkeypatch, broken)
    assert reader.on_battery() is None
    assert reader.on_battery() is None
    assert [r.levelname for r in caplog.records if r.levelname == "WARNING"] == ["WARNING"]
    replay(monkeypatch, lambda: battery(False))
    assert reader.on_battery() is True
