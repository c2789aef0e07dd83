"""Shared fixtures: an isolated config environment and access to the machine's services.

A missing service skips an integration test locally and fails it under ``CI=true``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_service(message: str) -> NoReturn:
    """A service a test needs is missing: skip locally, fail under CI."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def require_port(host: str, port: int, what: str) -> None:
    """Skip (locally) or fail (CI) unless ``host:port`` accepts a TCP connection."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        missing_service(f"{what} not reachable at {host}:{port}: {exc}")


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    require_port("127.0.0.1", 5672, "RabbitMQ")
    return RABBITMQ_URL


@pytest.fixture
def vhost(rabbitmq_url: str) -> Iterator[str]:
    """The broker URL of a private vhost on the machine's RabbitMQ, deleted afterwards (other
    programs use the broker at the same time)."""
    from tests.orchestrator_process import VhostUnavailable, private_vhost

    try:
        with private_vhost(rabbitmq_url) as url:
            yield url
    except VhostUnavailable as exc:
        missing_service(str(exc))


@pytest.fixture(scope="session")
def redis_url() -> str:
    require_port("127.0.0.1", 6379, "Redis")
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_url() -> str:
    require_port("127.0.0.1", 5432, "PostgreSQL")
    return POSTGRES_URL


@pytest.fixture(scope="session")
def project_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's wheel, built once per test run (tests/project_wheel.py)."""
    from tests.project_wheel import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No CHIFFON_* variables, HOME and XDG_STATE_HOME inside tmp_path; yields the home."""
    for name in list(os.environ):
        if name.startswith("CHIFFON_") or name == "YAML_LOADER_FOR_DYNACONF":
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    yield home
