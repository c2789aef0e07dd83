"""Secrets never reach what a user sees: logs, `chiffon` output, `celery inspect`, errors.

An agent and the orchestrator run with real passwords: a RabbitMQ user of their own
(``chiffon_t_<hex>``, in a vhost of its own on the machine's broker, both deleted
afterwards), a PostgreSQL URL with a password (the machine's server trusts local
connections, so any password works) pointing at a database of their own, and signed
heartbeats: the orchestrator holds a lab secret, the one before it and the older shared
``heartbeat_secret``; the agent signs every heartbeat with its own key derived from the
lab secret (``heartbeat_key``). Each secret carries a distinctive token;
none may appear, raw or URL-encoded, in any log line or command output. The run must
also work (the agent shows up online in ``chiffon status``), so the secrets were really
in use and not silently ignored.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, text

from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.signing import derive_agent_key
from chiffon_worker.wire import HEARTBEAT_QUEUE
from tests.conftest import missing_service as unavailable
from tests.integration.helpers import (
    Agent,
    agent_environment,
    start_agent,
)
from tests.integration.private_rabbit import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
CHIFFON = str(BIN / "chiffon")
CELERY = str(BIN / "celery")
TAG = uuid.uuid4().hex[:12]
AGENT_ID = f"t-agent-{TAG}"
LAB_SECRET = f"lab{TAG}!secret"
#: name -> secret. Each holds a distinctive token (the secret up to its "!"), and the "!"
#: makes it different from its URL-encoded form.
SECRETS = {
    "rabbitmq password": f"rmq{TAG}!pw",
    "database password": f"pg{TAG}!pw",
    "heartbeat secret": f"hb{TAG}!key",
    "heartbeat lab secret": LAB_SECRET,
    "previous heartbeat lab secret": f"oldlab{TAG}!secret",
    "agent's heartbeat key": derive_agent_key(LAB_SECRET, AGENT_ID),
    "redis password": f"redis{TAG}!pw",
    "wrong rabbitmq password": f"bad{TAG}!pw",
}
USER = f"chiffon_t_{TAG}"
VHOST = f"chiffon_t_{TAG}"
DATABASE = f"chiffon_t_{TAG}"
BROKER_URL = (f"amqp://{USER}:{quote(SECRETS['rabbitmq password'], safe='')}"
              f"@127.0.0.1:5672/{VHOST}")
DATABASE_URL = (f"postgresql+psycopg://postgres:{quote(SECRETS['database password'], safe='')}"
                f"@127.0.0.1:5432/{DATABASE}")
#: The same user with a password RabbitMQ refuses.
REFUSED_BROKER_URL = BROKER_URL.replace(quote(SECRETS["rabbitmq password"], safe=""),
                                        quote(SECRETS["wrong rabbitmq password"], safe=""))
#: A result backend with a password, for `chiffon config show` only (never connected).
RESULT_BACKEND = f"redis://:{quote(SECRETS['redis password'], safe='')}@127.0.0.1:6379/0"

OUTPUTS = [
    "agent log",
    "orchestrator log",
    "chiffon config show",
    "chiffon config show --json",
    "chiffon status",
    "chiffon status --json",
    "chiffon submit --wait",
    "celery inspect chiffon_metrics",
    "chiffon status (database unreachable)",
    "chiffon orchestrator (database unreachable)",
    "agent log (login refused)",
    "orchestrator log (login refused)",
]


def tokens(secret: str) -> set[str]:
    """What would betray ``secret``: itself, URL-encoded, and its distinctive token."""
    return {secret, quote(secret, safe=""), secret.split("!", maxsplit=1)[0]}


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=90, check=False)


def shown(done: subprocess.CompletedProcess[str]) -> str:
    """Everything a command showed: exit status, stdout and stderr."""
    return f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


@dataclass
class Lab:
    agent: Agent
    outputs: dict[str, str]  # name -> everything it showed
    results: dict[str, subprocess.CompletedProcess[str]]
    unreachable_port: int


@pytest.fixture(scope="module")
def rabbit_user(rabbitmq_url: str) -> Iterator[str]:
    """A RabbitMQ user with a distinctive password, allowed a vhost of its own only."""
    del rabbitmq_url  # (the machine's broker must be up)
    if shutil.which("rabbitmqctl") is None:
        unavailable("rabbitmqctl not on PATH (needed to add a RabbitMQ user)")
    added = rabbitmqctl("add_vhost", VHOST)
    if added.returncode != 0:
        unavailable(f"cannot add a RabbitMQ vhost: {added.stderr.strip()}")
    try:
        for step in (("add_user", USER, SECRETS["rabbitmq password"]),
                     ("set_permissions", "-p", VHOST, USER, ".*", ".*", ".*")):
            done = rabbitmqctl(*step)
            assert done.returncode == 0, done.stderr
        yield USER
    finally:
        rabbitmqctl("delete_user", USER)
        rabbitmqctl("delete_vhost", VHOST)


@pytest.fixture(scope="module")
def database(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL database of this module's own; dropped afterwards."""
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{DATABASE}"'))
    try:
        yield DATABASE_URL
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
        admin.dispose()


def login_refused(tmp: Path, env: dict[str, str]) -> dict[str, str]:
    """An agent and an orchestrator whose password RabbitMQ refuses: both stop with
    exit status 2 and one line; their logs."""
    log_path = tmp / "orchestrator-refused.log"
    with log_path.open("wb") as log:
        orchestrator = subprocess.Popen(
            [CHIFFON, "orchestrator", "--metrics-port", "0"],
            env={**env, "CHIFFON_BROKER_URL": REFUSED_BROKER_URL}, stdout=log,
            stderr=subprocess.STDOUT)
    agent = start_agent(tmp, REFUSED_BROKER_URL, extra_env={"CHIFFON_LOG_LEVEL": "DEBUG"})
    try:
        # a refused login is a configuration problem: the agent says so in one line, exits 2
        agent.wait_for_log(r"ACCESS_REFUSED")
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.popen.wait(10)
        # the orchestrator too: a login that cannot succeed is not retried
        assert orchestrator.wait(30) == 2, log_path.read_text()
        assert "login refused (ACCESS_REFUSED)" in log_path.read_text()
    finally:
        agent.stop()
        orchestrator.send_signal(signal.SIGTERM)
        orchestrator.wait(15)
    return {"agent log (login refused)": agent.log(),
            "orchestrator log (login refused)": log_path.read_text()}


@pytest.fixture(scope="module")
def lab(rabbit_user: str, database: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Lab]:
    del rabbit_user
    tmp = tmp_path_factory.mktemp("secrets")
    env = agent_environment(tmp / "orchestrator-home", {
        "CHIFFON_BROKER_URL": BROKER_URL,
        "CHIFFON_DATABASE_URL": database,
        "CHIFFON_HEARTBEAT_SECRET": SECRETS["heartbeat secret"],
        "CHIFFON_HEARTBEAT_LAB_SECRET": SECRETS["heartbeat lab secret"],
        "CHIFFON_HEARTBEAT_LAB_SECRET_PREVIOUS": SECRETS["previous heartbeat lab secret"],
        "CHIFFON_STATE_DIR": str(tmp / "orchestrator-state"),
        "CHIFFON_LOG_LEVEL": "DEBUG",  # every log line there is
    })
    orchestrator_log = tmp / "orchestrator.log"
    with orchestrator_log.open("wb") as log:
        orchestrator = subprocess.Popen([CHIFFON, "orchestrator", "--metrics-port", "0"],
                                        env=env, stdout=log, stderr=subprocess.STDOUT)
    agent: Agent | None = None
    try:
        deadline = time.monotonic() + 30
        while f"consuming {HEARTBEAT_QUEUE} on" not in orchestrator_log.read_text():
            assert orchestrator.poll() is None, orchestrator_log.read_text()
            assert time.monotonic() < deadline, orchestrator_log.read_text()
            time.sleep(0.05)
        agent = start_agent(tmp, BROKER_URL, agent_id=AGENT_ID, extra_env={
            "CHIFFON_HEARTBEAT_SECRET": SECRETS["heartbeat secret"],
            "CHIFFON_HEARTBEAT_KEY": SECRETS["agent's heartbeat key"],
            "CHIFFON_DATABASE_URL": database,
            "CHIFFON_LOG_LEVEL": "DEBUG",
        })
        agent.wait_ready()
        with Registry(database) as registry:
            deadline = time.monotonic() + 20
            while (record := registry.agent(agent.agent_id, with_snapshot=False)) is None \
                    or record.seq < 2:
                assert time.monotonic() < deadline, (orchestrator_log.read_text(),
                                                     agent.log())
                time.sleep(0.1)

        cli_env = {**env, "CHIFFON_RABBITMQ_PASSWORD": SECRETS["rabbitmq password"],
                   "CHIFFON_RESULT_BACKEND": RESULT_BACKEND,
                   "CHIFFON_HEARTBEAT_KEY": SECRETS["agent's heartbeat key"]}
        agent_env = agent_environment(tmp / "inspect-home", {
            "CHIFFON_BROKER_URL": BROKER_URL,
            "CHIFFON_HEARTBEAT_SECRET": SECRETS["heartbeat secret"],
            "CHIFFON_HEARTBEAT_KEY": SECRETS["agent's heartbeat key"]})
        unreachable_port = free_port()
        unreachable = {**env, "CHIFFON_DATABASE_URL": DATABASE_URL.replace(
            "127.0.0.1:5432", f"127.0.0.1:{unreachable_port}")}
        results = {
            "chiffon config show": run([CHIFFON, "config", "show"], cli_env, tmp),
            "chiffon config show --json": run([CHIFFON, "config", "show", "--json"], cli_env,
                                              tmp),
            "chiffon status": run([CHIFFON, "status"], env, tmp),
            "chiffon status --json": run([CHIFFON, "status", "--json"], env, tmp),
            "chiffon submit --wait": run([CHIFFON, "submit", "sleep", '{"seconds": 0.1}',
                                          "--pool", agent.pool, "--wait", "--timeout", "30"],
                                         env, tmp),
            "celery inspect chiffon_metrics": run(
                [CELERY, "-A", "chiffon_worker", "inspect", "chiffon_metrics", "-d",
                 agent.nodename, "--timeout", "10"], agent_env, tmp),
            "chiffon status (database unreachable)": run([CHIFFON, "status"], unreachable,
                                                         tmp),
            "chiffon orchestrator (database unreachable)": run(
                [CHIFFON, "orchestrator", "--metrics-port", "0"], unreachable, tmp),
        }
        agent.stop()  # shutdown lines belong to the log too
        orchestrator.send_signal(signal.SIGTERM)
        orchestrator.wait(15)
        outputs = {name: shown(done) for name, done in results.items()}
        outputs["agent log"] = agent.log()
        outputs["orchestrator log"] = orchestrator_log.read_text()
        outputs.update(login_refused(tmp, env))
        assert set(outputs) == set(OUTPUTS)
        yield Lab(agent, outputs, results, unreachable_port)
    finally:
        if agent is not None:
            agent.stop()
        if orchestrator.poll() is None:
            orchestrator.kill()
            orchestrator.wait(15)


def test_the_secrets_were_really_in_use(lab: Lab) -> None:
    """A password broker, a password database and signed heartbeats, all working."""
    status = lab.results["chiffon status --json"]
    assert status.returncode == 0, status.stderr
    agents = {entry["agent_id"]: entry for entry in json.loads(status.stdout)}
    assert agents[lab.agent.agent_id]["state"] == "online"
    assert "signature" not in agents[lab.agent.agent_id]
    assert "WARNING" not in lab.outputs["orchestrator log"]  # no heartbeat rejected
    assert "signed heartbeats required (agent keys, previous agent keys, shared secret)" \
        in lab.outputs["orchestrator log"]
    assert "signs with the shared heartbeat_secret" not in lab.outputs["orchestrator log"], \
        "the agent signs with its own key"
    inspect = lab.results["celery inspect chiffon_metrics"]
    assert inspect.returncode == 0 and lab.agent.agent_id in inspect.stdout, shown(inspect)
    submit = lab.results["chiffon submit --wait"]
    assert submit.returncode == 0 and json.loads(submit.stdout)["status"] == "success", (
        shown(submit))


def test_config_show_says_each_secret_is_set_but_masks_it(lab: Lab) -> None:
    done = lab.results["chiffon config show --json"]
    assert done.returncode == 0, done.stderr
    values = {key: entry["value"] for key, entry in json.loads(done.stdout).items()}
    assert values["broker_url"] == f"amqp://{USER}:**@127.0.0.1:5672/{VHOST}"
    assert values["database_url"] == f"postgresql+psycopg://postgres:**@127.0.0.1:5432/{DATABASE}"
    assert values["result_backend"] == "redis://:**@127.0.0.1:6379/0"
    assert values["rabbitmq_password"] == "**"
    for key in ("heartbeat_secret", "heartbeat_key", "heartbeat_lab_secret",
                "heartbeat_lab_secret_previous"):
        assert values[key] == "**", key


@pytest.mark.parametrize("output", OUTPUTS)
def test_no_secret_appears_in(lab: Lab, output: str) -> None:
    seen = lab.outputs[output]
    assert seen.strip(), f"{output} showed nothing"
    leaked = [f"{name} ({token!r})" for name, secret in SECRETS.items()
              for token in sorted(tokens(secret)) if token in seen]
    assert not leaked, f"{output} shows {', '.join(leaked)}:\n{seen}"


@pytest.mark.parametrize("command", ["chiffon status (database unreachable)",
                                     "chiffon orchestrator (database unreachable)"])
def test_an_unreachable_database_is_one_line_naming_it_with_the_password_masked(
        lab: Lab, command: str) -> None:
    done = lab.results[command]
    assert done.returncode != 0
    assert done.stderr.startswith("chiffon: error: ") and done.stderr.count("\n") == 1, (
        shown(done))
    assert f"postgres:**@127.0.0.1:{lab.unreachable_port}" in done.stderr

