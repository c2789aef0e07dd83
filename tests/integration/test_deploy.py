"""The systemd units in deploy/ run chiffon as documented: the agent's plain command and
``chiffon orchestrator`` (a command the CLI has), all from one venv, as an unprivileged
user with the system config and state dir, restarted on failure but not in a loop on a
config or login error (exit 2), hardened; and the docs quote the units' venv path."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chiffon_worker.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "chiffon-agent.service"
ORCHESTRATOR_UNIT = ROOT / "deploy" / "chiffon-orchestrator.service"
UNITS = sorted((ROOT / "deploy").glob("*.service"))
#: The venv every unit runs from (the install steps atop each unit create it).
VENV_BIN = "/opt/chiffon/bin/"


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


def test_the_orchestrator_unit_runs_chiffon_orchestrator_as_user_chiffon() -> None:
    unit = _directives(ORCHESTRATOR_UNIT)
    assert unit["ExecStart"] == [f"{VENV_BIN}chiffon orchestrator"]
    assert unit["User"] == ["chiffon"] and unit["Group"] == ["chiffon"]


def test_the_orchestrator_unit_uses_the_system_config_and_state_dir() -> None:
    unit = _directives(ORCHESTRATOR_UNIT)
    assert unit["AssertPathExists"] == ["/etc/chiffon/agent.yml"]
    assert unit["StateDirectory"] == ["chiffon"]
    assert "CHIFFON_STATE_DIR=/var/lib/chiffon" in unit["Environment"]


def test_the_orchestrator_command_of_the_unit_exists_in_the_cli() -> None:
    (command,) = _directives(ORCHESTRATOR_UNIT)["ExecStart"]
    program, *argv = shlex.split(command)
    assert Path(program).name == "chiffon"
    assert build_parser().parse_args(argv).handler.__name__ == "cmd_orchestrator"


@pytest.mark.parametrize("unit_path", UNITS, ids=lambda path: path.name)
def test_every_unit_runs_from_the_one_venv(unit_path: Path) -> None:
    (command,) = _directives(unit_path)["ExecStart"]
    assert command.startswith(VENV_BIN), command


@pytest.mark.parametrize("unit_path", UNITS, ids=lambda path: path.name)
def test_every_unit_restarts_on_failure_but_not_on_exit_2(unit_path: Path) -> None:
    unit = _directives(unit_path)
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == ["2"]
    assert unit["User"] == ["chiffon"]


def test_the_docs_quote_the_venv_path_of_the_units() -> None:
    quoted = {
        (doc.name, match.group(1))
        for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for match in re.finditer(r"(/opt/chiffon\S*/bin/)", doc.read_text(encoding="utf-8"))}
    assert quoted, "no doc quotes the venv path"
    assert {path for _, path in quoted} == {VENV_BIN}, sorted(quoted)


@pytest.mark.parametrize("unit_path", UNITS, ids=lambda path: path.name)
def test_unit_passes_systemd_analyze_verify(unit_path: Path, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    # the units name /opt/chiffon/bin/...; point them at this venv's so verify can run
    text = unit_path.read_text().replace(VENV_BIN, f"{Path(sys.executable).parent}/")
    unit = tmp_path / unit_path.name
    unit.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
