"""``pip install chiffon-worker`` (this checkout's wheel, no extras) in a clean venv is the
agent: it runs on RabbitMQ and on Redis, and the commands of the extras it lacks say which
extra to install, in one line, with exit status 2.

One venv for the module: ``python -m venv --without-pip`` (no system site packages, and
not even pip or setuptools in it, so nothing the wheel does not pull in is there), then the
test runner's own pip installs the wheel into it (``pip --python VENV install
--no-compile``). Measured on the 2-core dev machine: venv 0.06 s, install about 3 s
(against 2.5 s + 4 s for a venv with its own pip and compiled bytecode: modules compile on
first import instead, and only those the agent imports). The ``chiffon history --png``
test also needs the orchestrator extra: its requirements, read from the wheel's metadata,
go into a directory of their own on PYTHONPATH (about 2.5 s), so the venv stays a base
install for the other tests. The whole module takes about 15 s, the wheel build (shared
with tests/layout/test_package_shape.py) included. pip resolves the dependencies through
the machine's pip configuration (its local index and find-links, then PyPI): where pip
cannot reach an index the tests skip locally and fail under CI, like any missing service.

Every process runs with a minimal environment (PATH = the venv's bin, then /usr/bin:/bin;
no PYTHONPATH) in a temp working directory, so nothing of the checkout is importable.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import pytest
import redis

from chiffon_worker.wire import HEARTBEAT_QUEUE
from tests.conftest import missing_service
from tests.integration.helpers import (
    TEST_HEARTBEAT_TIMEOUT_S,
    Agent,
    HeartbeatTap,
    delete_agent_queues,
    unique,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

log = logging.getLogger(__name__)

#: A Redis database of this module's own: what the agent leaves there is deleted after.
REDIS_DB = 14
#: Longest wait for an agent of the fresh venv to start and send its first heartbeat (s).
FIRST_HEARTBEAT_TIMEOUT_S = 60.0
#: Top-level modules of the extras, none of which a base install may bring.
EXTRA_MODULES = ("sqlalchemy", "psycopg", "prometheus_client", "orjson", "matplotlib")
#: What pip prints when it cannot reach an index (offline), as opposed to a real failure.
_UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection",
                "Temporary failure in name resolution", "Network is unreachable",
                "connection broken by")
ORCHESTRATOR_HINT = "pip install 'chiffon-worker[orchestrator]'"
PNG_HINT = "pip install 'chiffon-worker[png]'"


@dataclass(frozen=True)
class BaseInstall:
    """A venv holding the wheel and its required dependencies, nothing else."""

    venv: Path
    wheel: Path
    workdir: Path  # temp dir for homes, working dirs and logs

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name

    def environment(self, home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A minimal environment: the venv first on PATH, a private HOME and state dir."""
        home.mkdir(parents=True, exist_ok=True)
        env = {"PATH": f"{self.venv / 'bin'}:/usr/bin:/bin", "HOME": str(home),
               "XDG_STATE_HOME": str(home / "state"), "CHIFFON_STATE_DIR": str(home / "chiffon"),
               "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
        env.update(extra or {})
        return env

    def run(self, *argv: str, home: Path, extra_env: Mapping[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run a program of the venv (``argv[0]`` names it) and wait for it."""
        return subprocess.run([str(self.bin(argv[0])), *argv[1:]], cwd=home,
                              env=self.environment(home, extra_env), capture_output=True,
                              text=True, timeout=120, check=False)


def _pip(*args: str) -> None:
    """The test runner's pip, quiet, failing fast where no index answers."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check",
         "--no-compile", "--retries", "1", "--timeout", "15"],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PIP_NO_INPUT": "1"})
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if any(sign in output for sign in _UNREACHABLE):
            missing_service(f"pip cannot reach a package index:\n{output[-2000:]}")
        pytest.fail(f"pip {' '.join(args)} failed:\n{output[-4000:]}")


def _extra_requirements(wheel: Path, extra: str) -> list[str]:
    """The requirements the wheel's metadata lists for ``extra``."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(name).decode())
    marker = f'extra == "{extra}"'
    return [requirement.split(";")[0].strip()
            for requirement in metadata.get_all("Requires-Dist") or []
            if requirement.split(";", 1)[-1].strip() == marker]


@pytest.fixture(scope="module")
def base_install(project_wheel: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[BaseInstall]:
    """The venv, removed afterwards (about 100 MiB with the orchestrator extra)."""
    workdir = tmp_path_factory.mktemp("pip-install")
    try:
        yield _install(project_wheel, workdir)
    finally:
        shutil.rmtree(workdir / "venv", ignore_errors=True)
        shutil.rmtree(workdir / "orchestrator-extra", ignore_errors=True)


def _install(project_wheel: Path, workdir: Path) -> BaseInstall:
    venv = workdir / "venv"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=120)
    made = time.monotonic()
    _pip("--python", str(venv / "bin" / "python"), "install", str(project_wheel))
    log.info("clean venv in %.2f s, pip install of %s in %.2f s", made - started,
             project_wheel.name, time.monotonic() - made)
    return BaseInstall(venv, project_wheel, workdir)


@pytest.fixture(scope="module")
def orchestrator_extra(base_install: BaseInstall) -> Path:
    """The orchestrator extra's requirements (from the wheel's metadata) installed into a
    directory of their own, for PYTHONPATH: the base venv itself stays without them."""
    target = base_install.workdir / "orchestrator-extra"
    requirements = _extra_requirements(base_install.wheel, "orchestrator")
    assert requirements, "the wheel declares no orchestrator extra"
    _pip("--python", str(base_install.bin("python")), "install", "--target", str(target),
         *requirements)
    return target


def _start_agent(install: BaseInstall, tmp: Path, broker_url: str, agent_id: str,
                 pool: str) -> Agent:
    """``celery -A chiffon_worker worker -B`` from the venv, heartbeat every 0.5 s."""
    cwd = tmp / "cwd"
    cwd.mkdir()
    env = install.environment(tmp / "home", {
        "CHIFFON_BROKER_URL": broker_url,
        "CHIFFON_AGENT_ID": agent_id,
        "CHIFFON_AGENT_POOL_NAME": pool,
        "CHIFFON_HEARTBEAT_INTERVAL": "0.5",
        "CHIFFON_HEARTBEAT_TIMEOUT_SECONDS": str(TEST_HEARTBEAT_TIMEOUT_S),
    })
    log_path = tmp / "agent.log"
    spawned_at = time.time()
    with log_path.open("wb") as out:
        popen = subprocess.Popen([str(install.bin("celery")), "-A", "chiffon_worker",
                                  "worker", "-B"], env=env, cwd=cwd, stdout=out,
                                 stderr=subprocess.STDOUT)
    return Agent(popen, agent_id, pool, broker_url, cwd, log_path, spawned_at)


def _first_heartbeat_then_stop(agent: Agent, tap: HeartbeatTap) -> None:
    """The agent's first heartbeat arrives on the broker; SIGTERM then stops it with 0."""
    try:
        beats = tap.wait_for(1, timeout=FIRST_HEARTBEAT_TIMEOUT_S)
        assert beats, f"no heartbeat from the venv's agent:\n{agent.log()}"
        assert beats[0].snapshot["pool"] == agent.pool
        log.info("first heartbeat %.2f s after the venv's agent was started",
                  beats[0].received_at - agent.spawned_at)
    finally:
        status = agent.stop()
    assert status == 0, f"the agent exited with {status}:\n{agent.log()}"


def test_a_base_install_holds_chiffon_worker_and_no_module_of_any_extra(
        base_install: BaseInstall, tmp_path: Path) -> None:
    code = ("import importlib.util, chiffon_worker\n"
            "print(chiffon_worker.__file__)\n"
            f"print(*[m for m in {EXTRA_MODULES!r} if importlib.util.find_spec(m)])\n")
    done = base_install.run("python", "-c", code, home=tmp_path)
    assert done.returncode == 0, done.stderr
    location, extras = done.stdout.splitlines()
    assert Path(location).resolve().is_relative_to(base_install.venv.resolve() / "lib")
    assert extras == ""


def test_a_base_install_runs_the_agent_on_rabbitmq_and_its_first_heartbeat_arrives(
        base_install: BaseInstall, vhost: str, tmp_path: Path) -> None:
    agent_id = unique("t-pip-agent")
    tap = HeartbeatTap(vhost, agent_id)  # the vhost goes, with everything in it, after
    try:
        agent = _start_agent(base_install, tmp_path, vhost, agent_id, unique("t-pool"))
        _first_heartbeat_then_stop(agent, tap)
    finally:
        tap.close()


def test_a_base_install_runs_the_agent_on_redis_and_its_first_heartbeat_arrives(
        base_install: BaseInstall, redis_url: str, tmp_path: Path) -> None:
    url = redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    agent_id, pool = unique("t-pip-agent"), unique("t-pool")
    tap = HeartbeatTap(url, agent_id)
    try:
        agent = _start_agent(base_install, tmp_path, url, agent_id, pool)
        _first_heartbeat_then_stop(agent, tap)
    finally:
        tap.delete()
        delete_agent_queues(url, pool, f"chiffon.agent.{agent_id}", HEARTBEAT_QUEUE)
        redis.Redis.from_url(url).delete("unacked", "unacked_index", "unacked_mutex")


@pytest.mark.parametrize("command", ["status", "orchestrator"])
def test_an_orchestrator_command_on_a_base_install_names_the_orchestrator_extra_and_exits_2(
        base_install: BaseInstall, tmp_path: Path, command: str) -> None:
    done = base_install.run("chiffon", command, home=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"chiffon: error: chiffon {command} needs the "
                                  "orchestrator extra (")
    assert done.stderr.endswith(f"): {ORCHESTRATOR_HINT}\n")
    assert done.stderr.count("\n") == 1 and done.stdout == ""


def test_history_png_without_the_png_extra_names_it_and_exits_2(
        base_install: BaseInstall, orchestrator_extra: Path, tmp_path: Path) -> None:
    from chiffon_worker.orchestrator.registry import Registry
    from tests.orchestrator.feeding import feed
    from tests.orchestrator.snapshots import make_snapshot

    home = tmp_path / "home"
    state = home / "chiffon"  # the CHIFFON_STATE_DIR of base_install.environment
    state.mkdir(parents=True)
    with Registry(f"sqlite:///{state / 'registry.sqlite3'}") as registry:
        now = time.time()
        feed(registry, make_snapshot("desk-1", seq=1, collected_at=now - 30),
             make_snapshot("desk-1", seq=2, collected_at=now), start=now - 30)
    png = tmp_path / "desk-1.png"
    done = base_install.run("chiffon", "history", "desk-1", "--png", str(png), home=home,
                            extra_env={"PYTHONPATH": str(orchestrator_extra)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("chiffon: error: --png needs matplotlib, in the png extra: ")
    assert PNG_HINT in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not png.exists()
