"""A broker that refuses the login is a configuration error: one line, exit status 2, for
``chiffon submit`` and ``chiffon orchestrator`` alike (the orchestrator stops instead of
retrying for ever). ``chiffon status`` and ``history`` read only the registry: the broker
cannot refuse them, and their registry faults are one line too.

All against the machine's real RabbitMQ (and Redis) with a wrong password.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from chiffon_worker.cli import main
from chiffon_worker.errors import BrokerLoginRefused
from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.orchestrator.worker_events import WorkerEventListener
from tests.conftest import RABBITMQ_URL, missing_service
from tests.orchestrator_process import VhostUnavailable, rabbitmqctl
from tests.waiting import wait_until

CHIFFON = [sys.executable, "-m", "chiffon_worker.cli"]
WRONG_PASSWORD_URL = "amqp://guest:wrong@127.0.0.1:5672//"
AMQP_REFUSED = ("login refused (ACCESS_REFUSED): check broker_url's user and password "
                "(or rabbitmq_user and rabbitmq_password)")
#: How long a refused orchestrator may take to exit (seconds); it takes about 0.5 s.
ORCHESTRATOR_EXIT_S = 20.0


@pytest.fixture
def env(clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for ``chiffon`` with a private state dir, logging at WARNING (so
    stderr holds only what goes wrong); the broker URL is each test's."""
    monkeypatch.setenv("CHIFFON_STATE_DIR", str(tmp_path / "chiffon-state"))
    monkeypatch.setenv("CHIFFON_LOG_LEVEL", "WARNING")
    return dict(os.environ)


def chiffon(env: dict[str, str], broker_url: str, *argv: str
            ) -> subprocess.CompletedProcess[str]:
    """Run ``chiffon argv`` to its end with ``broker_url`` as broker."""
    return subprocess.run([*CHIFFON, *argv], env={**env, "CHIFFON_BROKER_URL": broker_url},
                          capture_output=True, text=True, timeout=120, check=False)


def the_one_line(stderr: str) -> str:
    """The message of ``stderr``, which must be exactly one ``chiffon: error:`` line."""
    assert stderr.count("\n") == 1 and stderr.startswith("chiffon: error: "), stderr
    return stderr[len("chiffon: error: "):].rstrip("\n")


@pytest.mark.integration
@pytest.mark.parametrize(("broker_url", "shown"), [
    (WRONG_PASSWORD_URL, "amqp://guest:**@127.0.0.1:5672//"),
    ("amqp://nosuchuser:secret@127.0.0.1:5672//", "amqp://nosuchuser:**@127.0.0.1:5672//"),
])
def test_a_pool_submit_refused_by_the_broker_exits_2_with_one_line(
        rabbitmq_url: str, env: dict[str, str], broker_url: str, shown: str) -> None:
    done = chiffon(env, broker_url, "submit", "echo", "{}", "--queue-anyway")
    assert done.returncode == 2
    assert the_one_line(done.stderr) == f"broker {shown}: {AMQP_REFUSED}"
    assert done.stdout == ""


@pytest.mark.integration
def test_a_needs_submit_refused_by_the_broker_exits_2_with_one_line(
        rabbitmq_url: str, env: dict[str, str]) -> None:
    done = chiffon(env, WRONG_PASSWORD_URL, "submit", "train", "{}", "--needs", "cores=1")
    assert done.returncode == 2
    assert the_one_line(done.stderr) == f"broker amqp://guest:**@127.0.0.1:5672//: {AMQP_REFUSED}"


@pytest.mark.integration
def test_a_submit_refused_by_redis_exits_2_with_one_line(
        redis_url: str, env: dict[str, str]) -> None:
    done = chiffon(env, "redis://nobody:wrong@127.0.0.1:6379/0", "submit", "echo", "{}",
                   "--queue-anyway")
    assert done.returncode == 2
    assert the_one_line(done.stderr) == (
        "broker redis://nobody:**@127.0.0.1:6379/0: login refused (invalid username-password "
        "pair or user is disabled.): check broker_url's user and password")


@pytest.mark.integration
def test_a_submit_to_an_unreachable_broker_is_one_line_and_exit_1(env: dict[str, str]) -> None:
    done = chiffon(env, "amqp://guest:guest@127.0.0.1:1//", "submit", "echo", "{}",
                   "--queue-anyway")
    assert done.returncode == 1
    assert the_one_line(done.stderr) == (
        "broker amqp://guest:**@127.0.0.1:1//: [Errno 111] Connection refused")


def run_orchestrator(env: dict[str, str], broker_url: str) -> subprocess.CompletedProcess[str]:
    """``chiffon orchestrator`` until it exits by itself (killed after ORCHESTRATOR_EXIT_S)."""
    process = subprocess.Popen([*CHIFFON, "orchestrator", "--metrics-port", "0"],
                               env={**env, "CHIFFON_BROKER_URL": broker_url},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=ORCHESTRATOR_EXIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the orchestrator still ran after {ORCHESTRATOR_EXIT_S:g} s:\n{err}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.integration
def test_the_orchestrator_stops_with_exit_2_and_one_line_when_its_login_is_refused(
        rabbitmq_url: str, env: dict[str, str]) -> None:
    done = run_orchestrator(env, WRONG_PASSWORD_URL)
    assert done.returncode == 2
    assert the_one_line(done.stderr) == f"broker amqp://guest:**@127.0.0.1:5672//: {AMQP_REFUSED}"


@pytest.fixture
def vhost_without_configure(rabbitmq_url: str) -> Iterator[str]:
    """The URL of a private vhost where guest may read and write but declare nothing."""
    vhost = f"chiffon_t_noconf_{os.getpid()}_{threading.get_ident()}"
    try:
        added = rabbitmqctl("add_vhost", vhost)
    except FileNotFoundError:
        missing_service("rabbitmqctl not on PATH (needed for a private vhost)")
    if added.returncode != 0:
        missing_service(str(VhostUnavailable(added.stderr.strip())))
    try:
        granted = rabbitmqctl("set_permissions", "-p", vhost, "guest", "^$", ".*", ".*")
        assert granted.returncode == 0, granted.stderr
        yield urlunsplit(urlsplit(rabbitmq_url)._replace(path=f"/{vhost}"))
    finally:
        rabbitmqctl("delete_vhost", vhost)


@pytest.mark.integration
def test_the_orchestrator_stops_with_exit_2_when_it_may_not_declare_its_queue(
        vhost_without_configure: str, env: dict[str, str]) -> None:
    done = run_orchestrator(env, vhost_without_configure)
    assert done.returncode == 2
    vhost = urlsplit(vhost_without_configure).path[1:]
    assert the_one_line(done.stderr) == (
        "the broker refused chiffon orchestrator (orchestrator): user 'guest' has no "
        f"configure permission on exchange 'chiffon.heartbeats' in vhost '{vhost}'; "
        "see docs/security.md")


@pytest.mark.integration
def test_the_orchestrator_keeps_retrying_an_unreachable_broker(env: dict[str, str]) -> None:
    process = subprocess.Popen([*CHIFFON, "orchestrator", "--metrics-port", "0"],
                               env={**env, "CHIFFON_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr or ()), daemon=True)
    reader.start()
    try:
        wait_until(lambda: sum("reconnecting in" in line for line in lines) >= 2
                   or process.poll() is not None, 30, "two reconnect warnings")
        assert process.poll() is None, "".join(lines)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=15)
    assert not any("chiffon: error" in line or "Traceback" in line for line in lines)


@pytest.mark.integration
def test_the_worker_event_listener_ends_and_reports_a_refused_login(
        rabbitmq_url: str, sqlite_registry: Registry) -> None:
    seen: list[BrokerLoginRefused] = []
    listener = WorkerEventListener(WRONG_PASSWORD_URL, sqlite_registry, on_refused=seen.append)
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    thread.join(timeout=ORCHESTRATOR_EXIT_S)
    assert not thread.is_alive(), "the listener kept retrying a refused login"
    assert seen == [listener.refused]
    assert str(seen[0]) == f"broker amqp://guest:**@127.0.0.1:5672//: {AMQP_REFUSED}"


@pytest.mark.integration
def test_status_reads_only_the_registry_so_a_wrong_broker_password_does_not_matter(
        rabbitmq_url: str, env: dict[str, str]) -> None:
    Registry(f"sqlite:///{Path(env['CHIFFON_STATE_DIR']) / 'registry.sqlite3'}").close()
    done = chiffon(env, WRONG_PASSWORD_URL, "status", "--json")
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("[]\n", "")


@pytest.mark.parametrize("argv", [["status"], ["status", "--watch", "0.2"],
                                  ["history", "desk-1"]])
def test_status_watch_and_history_on_an_unreachable_registry_are_one_line(
        env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    monkeypatch.setenv("CHIFFON_BROKER_URL", RABBITMQ_URL)
    monkeypatch.setenv("CHIFFON_DATABASE_URL", "postgresql+psycopg://u:pw@127.0.0.1:1/x")
    assert main(argv) == 1
    message = the_one_line(capsys.readouterr().err)
    assert message.startswith("cannot open registry postgresql+psycopg://u:**@127.0.0.1:1/x")
