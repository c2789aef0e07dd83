"""A bad config stops ``celery -A chiffon_worker worker -B`` at start: one line naming the
file (or variable), the key and the problem; exit status 2; no traceback; no worker."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.helpers import CELERY, agent_environment, unique


def _start_worker(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "home"
    home.mkdir()
    return subprocess.run([str(CELERY), "-A", "chiffon_worker", "worker", "-B"],
                          env=agent_environment(home, env), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)


def _only_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout + done.stderr
    return lines[0]


def test_bad_value_in_a_config_file_stops_the_worker_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.yml"
    config.write_text("agent_pool_name: gpu_pool\nheartbeat_interval_seconds: -1\n")
    done = _start_worker(tmp_path, CHIFFON_CONFIG=str(config))
    assert done.returncode == 2
    assert _only_line(done) == (f"chiffon: error: {config}: heartbeat_interval_seconds: "
                                f"must be between 0.1 and 86400 (got -1.0)")


def test_malformed_yaml_stops_the_worker_with_one_line_naming_file_and_line(
        tmp_path: Path) -> None:
    config = tmp_path / "agent.yml"
    config.write_text("agent_pool_name: [gpu_pool\n")
    done = _start_worker(tmp_path, CHIFFON_CONFIG=str(config))
    assert done.returncode == 2
    line = _only_line(done)
    assert line.startswith(f"chiffon: error: {config}: invalid YAML at line 2")


def test_bad_environment_value_stops_the_worker_with_one_line_naming_the_variable(
        tmp_path: Path) -> None:
    done = _start_worker(tmp_path, CHIFFON_HEARTBEAT_INTERVAL="soon")
    assert done.returncode == 2
    assert _only_line(done) == ("chiffon: error: environment CHIFFON_HEARTBEAT_INTERVAL: "
                                "heartbeat_interval_seconds: expected a number, got 'soon'")


def test_bad_config_leaves_no_traceback_and_no_files(tmp_path: Path) -> None:
    done = _start_worker(tmp_path, CHIFFON_BROKER_URL="ftp://example")
    assert done.returncode == 2
    assert "Traceback" not in done.stdout + done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["home"]


def test_refused_broker_login_stops_the_worker_with_one_error_line_and_exit_2(
        tmp_path: Path, rabbitmq_url: str) -> None:
    done = _start_worker(tmp_path, CHIFFON_AGENT_ID=unique("t-agent"),
                         CHIFFON_RABBITMQ_PASSWORD="not-the-password")
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output
    assert "CRITICAL" not in output
    errors = [line for line in output.splitlines() if "ERROR/" in line]
    assert len(errors) == 1, output
    assert "refused the login (check rabbitmq_user, rabbitmq_password" in errors[0]
    assert "amqp://guest:**@127.0.0.1:5672//" in errors[0]
    assert "not-the-password" not in output
