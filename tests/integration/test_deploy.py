"""The systemd unit in deploy/ runs the agent as documented: the plain command, an
unprivileged user, the system config and state dir, restart on failure, hardening."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "chiffon-agent.service"


def _directives(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_agent_unit_runs_the_plain_worker_command_as_user_chiffon() -> None:
    unit = _directives(UNIT)
    assert unit["ExecStart"][0].endswith("/celery -A chiffon_worker worker -B")
    assert unit["User"] == ["chiffon"] and unit["Group"] == ["chiffon"]


def test_agent_unit_uses_the_system_config_and_state_dir() -> None:
    unit = _directives(UNIT)
    assert unit["AssertPathExists"] == ["/etc/chiffon/agent.yml"]
    assert unit["StateDirectory"] == ["chiffon"]
    assert "CHIFFON_STATE_DIR=/var/lib/chiffon" in unit["Environment"]


def test_agent_unit_restarts_on_failure_but_not_on_a_bad_config() -> None:
    unit = _directives(UNIT)
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == ["2"]


def test_agent_unit_is_hardened() -> None:
    unit = _directives(UNIT)
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes",
                       "CapabilityBoundingSet": ""}.items():
        assert unit[key] == [value], key


@pytest.mark.parametrize("name", ["chiffon-agent.service", "chiffon-flower.service"])
def test_unit_passes_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    # the unit names /opt/chiffon/bin/celery; point it at this venv's so verify can run
    text = (ROOT / "deploy" / name).read_text().replace(
        "/opt/chiffon/bin/celery", str(Path(sys.executable).parent / "celery"))
    unit = tmp_path / name
    unit.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
