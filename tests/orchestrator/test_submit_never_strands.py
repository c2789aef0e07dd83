"""``chiffon submit`` never leaves work in a queue nobody consumes, and takes its payload
from an argument, a file or stdin, up to the protocol's 1 MiB.

Each test talks to the machine's RabbitMQ on a private vhost (deleted afterwards), so
"nothing was declared" can be checked by listing every queue of that vhost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from kombu.connection import Connection

from chiffon_worker.cli import main
from chiffon_worker.config import Config
from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.orchestrator.routing import work_queue
from chiffon_worker.protocol import MAX_MESSAGE_BYTES
from tests.conftest import missing_service
from tests.orchestrator_process import VhostUnavailable, private_vhost, rabbitmqctl
from tests.waiting import wait_until

from .conftest import queue_depth
from .feeding import Feeder
from .snapshots import make_snapshot

pytestmark = pytest.mark.integration

CHIFFON = [sys.executable, "-m", "chiffon_worker.cli"]
NO_POOL_MESSAGE = ("no online agent in pool nosuchpool; pools: desktop_pool_1 (2 online), "
                   "gpu_rigs (0 online of 1)")


@pytest.fixture
def vhost_url(rabbitmq_url: str) -> Iterator[str]:
    """The broker URL of a private vhost on the machine's RabbitMQ."""
    try:
        with private_vhost(rabbitmq_url) as url:
            yield url
    except VhostUnavailable as exc:
        missing_service(str(exc))


@pytest.fixture
def env(clean_env: Path, tmp_path: Path, vhost_url: str, monkeypatch: pytest.MonkeyPatch
        ) -> dict[str, str]:
    """The configuration of ``chiffon`` (in this process and for subprocesses): the
    private vhost as broker, a registry in a private state dir."""
    monkeypatch.setenv("CHIFFON_STATE_DIR", str(tmp_path / "chiffon-state"))
    monkeypatch.setenv("CHIFFON_BROKER_URL", vhost_url)
    return dict(os.environ)


@pytest.fixture
def fleet(env: dict[str, str]) -> None:
    """Two online agents in desktop_pool_1, one lost agent in gpu_rigs."""
    now = time.time()
    url = f"sqlite:///{Path(env['CHIFFON_STATE_DIR']) / 'registry.sqlite3'}"
    with Registry(url) as registry:
        feeder = Feeder(registry)
        for agent in ("desk-1", "desk-2"):
            feeder.snapshot(make_snapshot(agent, collected_at=now), received_at=now)
        feeder.snapshot(make_snapshot("rig-1", pool="gpu_rigs", collected_at=now - 500),
                        received_at=now - 500)
        feeder.commit()


def vhost_queues(vhost_url: str) -> list[str]:
    """Every queue of the vhost of ``vhost_url``, by name."""
    vhost = urlsplit(vhost_url).path[1:]
    listed = rabbitmqctl("list_queues", "-p", vhost, "name", "--no-table-headers", "-q")
    assert listed.returncode == 0, listed.stderr
    return sorted(filter(None, listed.stdout.split()))


def take_request(vhost_url: str, queue: str) -> dict[str, Any]:
    """The work request of the one message waiting in ``queue`` (consumed)."""
    wait_until(lambda: queue_depth(vhost_url, queue) == 1, 10, f"one message in {queue}")
    with Connection(vhost_url) as conn:
        simple = conn.SimpleQueue(work_queue(queue))
        message = simple.get(timeout=10)
        message.ack()
        simple.close()
    request: dict[str, Any] = json.loads(message.body)[0][0]
    return request


def one_error_line(err: str) -> str:
    """The message of the single ``chiffon: error:`` line that ``err`` must be."""
    assert err.count("\n") == 1 and err.startswith("chiffon: error: "), err
    assert "Traceback" not in err
    return err[len("chiffon: error: "):].rstrip("\n")


def test_a_pool_with_no_online_agent_is_refused_naming_the_pools_and_nothing_is_declared(
        fleet: None, vhost_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "echo", "{}", "--pool", "nosuchpool"]) == 1
    message = one_error_line(capsys.readouterr().err)
    assert message.startswith(NO_POOL_MESSAGE + "; --queue-anyway queues the work")
    assert vhost_queues(vhost_url) == []


def test_a_pool_whose_agents_are_all_offline_is_refused_too(
        fleet: None, vhost_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "echo", "{}", "--pool", "gpu_rigs"]) == 1
    message = one_error_line(capsys.readouterr().err)
    assert message.startswith("no online agent in pool gpu_rigs; pools: desktop_pool_1 "
                              "(2 online), gpu_rigs (0 online of 1)")
    assert vhost_queues(vhost_url) == []


def test_no_registry_yet_says_the_orchestrator_must_be_running_and_makes_none(
        env: dict[str, str], vhost_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "echo", "{}", "--pool", "desktop_pool_1"]) == 1
    message = one_error_line(capsys.readouterr().err)
    path = Path(env["CHIFFON_STATE_DIR"]) / "registry.sqlite3"
    assert message.startswith(f"no registry at {path}: none was written there yet")
    assert "`chiffon orchestrator` running" in message
    assert not path.exists()
    assert vhost_queues(vhost_url) == []


def test_an_empty_registry_says_the_orchestrator_must_be_running_to_fill_it(
        env: dict[str, str], vhost_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    Registry.from_config(Config()).close()  # made by an orchestrator that heard nobody yet
    assert main(["submit", "echo", "{}", "--pool", "desktop_pool_1"]) == 1
    message = one_error_line(capsys.readouterr().err)
    assert message.startswith("no online agent in pool desktop_pool_1: the registry has no "
                              "agents yet (chiffon orchestrator must be running to fill it)")
    assert vhost_queues(vhost_url) == []


def test_queue_anyway_publishes_to_the_pool_queue_where_the_work_waits(
        fleet: None, vhost_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "echo", '{"n": 1}', "--pool", "nosuchpool", "--queue-anyway",
                 "--work-id", "w-later"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "work_id": "w-later", "queue": "nosuchpool", "agent_id": None}
    assert take_request(vhost_url, "nosuchpool") == {
        "work_id": "w-later", "work_type": "echo", "payload": {"n": 1}}


def test_a_pool_with_an_online_agent_takes_the_work_without_the_flag(
        fleet: None, vhost_url: str) -> None:
    assert main(["submit", "echo", "{}", "--pool", "desktop_pool_1", "--work-id", "w-1"]) == 0
    assert take_request(vhost_url, "desktop_pool_1")["work_id"] == "w-1"


def test_a_payload_from_a_file_arrives_intact(
        fleet: None, vhost_url: str, tmp_path: Path) -> None:
    payload = {"text": "grüße ✓", "nested": {"list": [1, 2.5, None, True]}, "big": "x" * 5000}
    source = tmp_path / "payload.json"
    source.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    assert main(["submit", "echo", f"@{source}", "--pool", "desktop_pool_1"]) == 0
    assert take_request(vhost_url, "desktop_pool_1")["payload"] == payload


def test_a_payload_from_stdin_arrives_intact(
        fleet: None, vhost_url: str, env: dict[str, str]) -> None:
    payload = {"lines": ["one", "two"], "text": "ünïcode"}
    done = subprocess.run([*CHIFFON, "submit", "echo", "-", "--pool", "desktop_pool_1"],
                          env=env, input=json.dumps(payload).encode(), capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert take_request(vhost_url, "desktop_pool_1")["payload"] == payload


def test_a_payload_of_exactly_the_limit_is_sent(
        fleet: None, vhost_url: str, tmp_path: Path) -> None:
    source = tmp_path / "limit.json"
    source.write_text(json.dumps("x" * (MAX_MESSAGE_BYTES - 2)))
    assert source.stat().st_size == MAX_MESSAGE_BYTES
    assert main(["submit", "echo", f"@{source}", "--pool", "desktop_pool_1"]) == 0
    assert len(take_request(vhost_url, "desktop_pool_1")["payload"]) == MAX_MESSAGE_BYTES - 2


def test_a_payload_file_over_1_mib_is_refused_with_the_limit_and_nothing_is_sent(
        fleet: None, vhost_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
        ) -> None:
    source = tmp_path / "big.json"
    source.write_text(json.dumps("x" * (10 * MAX_MESSAGE_BYTES - 2)))
    assert main(["submit", "echo", f"@{source}", "--pool", "desktop_pool_1",
                 "--queue-anyway"]) == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"payload @{source}: 10485760 bytes is more than the 1 MiB (1048576 bytes) a work "
        "request may carry")
    assert vhost_queues(vhost_url) == []


def test_a_payload_on_stdin_over_1_mib_is_refused_with_its_size(
        fleet: None, vhost_url: str, env: dict[str, str]) -> None:
    done = subprocess.run([*CHIFFON, "submit", "echo", "-", "--queue-anyway"], env=env,
                          input=b" " * (MAX_MESSAGE_BYTES + 1), capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert one_error_line(done.stderr.decode()) == (
        "payload from stdin: 1048577 bytes is more than the 1 MiB (1048576 bytes) a work "
        "request may carry")
    assert vhost_queues(vhost_url) == []


def test_a_missing_payload_file_is_one_line_naming_the_path(
        env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.json"
    assert main(["submit", "echo", f"@{missing}", "--queue-anyway"]) == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"payload: cannot read {missing}: No such file or directory")


def test_invalid_json_in_a_payload_file_names_the_file(
        env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "broken.json"
    source.write_text("{oops")
    assert main(["submit", "echo", f"@{source}", "--queue-anyway"]) == 1
    assert one_error_line(capsys.readouterr().err).startswith(
        f"payload @{source}: is not valid JSON")
