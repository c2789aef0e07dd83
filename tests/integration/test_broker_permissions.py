"""Least privilege on RabbitMQ, tried for real: each role's user is made by
``deploy/rabbitmq-users.sh`` (as docs/security.md says to) on a private vhost of the
machine's broker; an agent (its own per-agent user), an orchestrator, a submitter and
Flower's user do their work with nothing more, results going through Redis (``rpc://``
results would need write on ``amq.default``). Then what an agent's credentials must not
do is tried through kombu/py-amqp, each refusal read back as the permission the one-line
error names; and ``chiffon submit`` and an agent without a permission they need stop with
exit status 2 and one line naming the role and the permission.

One agent and one orchestrator are shared by the module (the agent starts first: its
heartbeats are not sent until the orchestrator declares the heartbeat route).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from amqp.exceptions import AccessRefused, NotFound
from kombu.connection import Connection
from kombu.messaging import Producer

from chiffon_worker.broker_permissions import Denial, denial_in, parse_denial
from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.orchestrator.routing import Router
from chiffon_worker.wire import (
    AGENT_QUEUE_PREFIX,
    EXECUTE_WORK_TASK,
    HEARTBEAT_COPY_PREFIX,
    HEARTBEAT_QUEUE,
    ORCHESTRATOR_EVENTS_QUEUE_PREFIX,
    WORKER_EVENTS_EXCHANGE,
    agent_queue_name,
    declared_queue,
)
from tests.conftest import missing_service
from tests.integration.helpers import CELERY, Agent, queue_depth, start_agent, unique
from tests.orchestrator_process import (
    OrchestratorOnVhost,
    VhostUnavailable,
    orchestrator_on,
    private_vhost,
    rabbitmqctl,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq-users.sh"
CHIFFON = Path(sys.executable).parent / "chiffon"
PASSWORD = f"t-{uuid.uuid4().hex}"
#: The exchange of Celery's pidbox replies (agents publish control replies through it).
REPLY_EXCHANGE = "reply.celery.pidbox"
#: How long an agent refused a permission may take to stop (seconds; it takes ~1 s).
REFUSED_AGENT_EXIT_S = 30.0


# -- the script -------------------------------------------------------------------------------

def printed_permissions(*argv: str) -> tuple[str, str, str]:
    """The configure, write and read regexes ``rabbitmq-users.sh argv`` prints."""
    done = subprocess.run(["sh", str(SCRIPT), *argv], capture_output=True, text=True,
                          check=True, timeout=30)
    words = shlex.split(done.stdout.replace("\\\n", " "))
    assert words[:2] == ["rabbitmqctl", "add_user"] and "set_permissions" in words, done.stdout
    configure, write, read = words[-3:]
    return configure, write, read


def run_script(vhost: str, user: str, *argv: str) -> None:
    """``rabbitmq-users.sh --run`` for ``user`` on ``vhost`` (password PASSWORD)."""
    done = subprocess.run(["sh", str(SCRIPT), "--run", "-p", vhost, "--user", user, *argv],
                          env={**os.environ, "CHIFFON_BROKER_PASSWORD": PASSWORD},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def add_user(vhost: str, user: str, configure: str, write: str, read: str) -> None:
    """A user with hand-given permissions (a deliberately wrong one)."""
    added = subprocess.run(["rabbitmqctl", "-q", "add_user", user], input=f"{PASSWORD}\n",
                           capture_output=True, text=True, timeout=60, check=False)
    assert added.returncode == 0, added.stderr
    granted = rabbitmqctl("-q", "set_permissions", "-p", vhost, user, configure, write, read)
    assert granted.returncode == 0, granted.stderr


def fullmatch(regex: str, name: str) -> bool:
    return re.fullmatch(regex, name) is not None


# -- the lab ----------------------------------------------------------------------------------

@dataclass
class Lab:
    """The vhost, each role's broker URL and the processes running as them."""

    guest_url: str
    vhost: str
    pool: str
    agent: Agent
    other_queue: str  # another agent's own queue, declared as that agent would
    orchestrator: OrchestratorOnVhost
    urls: dict[str, str]  # role -> broker URL with that role's user
    users: dict[str, str]  # role -> user name
    result_backend: str
    agent_log_before_orchestrator: str

    def chiffon(self, role: str, *argv: str) -> subprocess.CompletedProcess[str]:
        """``chiffon argv`` with ``role``'s user (the orchestrator's registry)."""
        env = {**self.orchestrator.env, "CHIFFON_BROKER_URL": self.urls[role],
               "CHIFFON_RESULT_BACKEND": self.result_backend, "CHIFFON_LOG_LEVEL": "WARNING"}
        return subprocess.run([str(CHIFFON), *argv], env=env, capture_output=True,
                              text=True, timeout=60, check=False)


def url_as(url: str, user: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}:{PASSWORD}@{parts.hostname}:{parts.port}"))


@pytest.fixture(scope="module")
def lab(rabbitmq_url: str, redis_url: str,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if shutil.which("rabbitmqctl") is None:
        missing_service("rabbitmqctl not on PATH (needed to add RabbitMQ users)")
    tmp = tmp_path_factory.mktemp("permissions")
    prefix = unique("chiffon-t")
    agent_id, other_id, pool = unique("t-agent"), unique("t-other"), unique("t-pool")
    users = {role: f"{prefix}-{role}" for role in
             ("agent", "orchestrator", "submitter", "flower", "submitter-without-write",
              "agent-with-rpc-results")}
    with ExitStack() as stack:
        try:
            guest_url = stack.enter_context(private_vhost(rabbitmq_url))
        except VhostUnavailable as exc:
            missing_service(str(exc))
        vhost = urlsplit(guest_url).path[1:]
        stack.callback(delete_users, list(users.values()))
        configure, _write, read = printed_permissions("submitter", pool)
        with ThreadPoolExecutor(len(users)) as pool_of_threads:
            made = [
                pool_of_threads.submit(run_script, vhost, users["agent"], "agent", agent_id,
                                       pool),
                pool_of_threads.submit(run_script, vhost, users["orchestrator"],
                                       "orchestrator"),
                pool_of_threads.submit(run_script, vhost, users["submitter"], "submitter",
                                       pool),
                pool_of_threads.submit(run_script, vhost, users["flower"], "flower"),
                pool_of_threads.submit(run_script, vhost, users["agent-with-rpc-results"],
                                       "--rpc-results", "agent", agent_id, pool),
                pool_of_threads.submit(add_user, vhost, users["submitter-without-write"],
                                       configure, "^$", read),
            ]
            for future in made:
                future.result()
        urls = {role: url_as(guest_url, user) for role, user in users.items()}
        other_queue = agent_queue_name(other_id)
        with Connection(guest_url) as conn:
            declared_queue(other_queue)(conn.default_channel).declare()
        agent = start_agent(tmp, urls["agent"], agent_id=agent_id, pool=pool,
                            extra_env={"CHIFFON_RESULT_BACKEND": redis_url})
        stack.callback(agent.stop)
        agent.wait_for_log(r"heartbeat seq \d+ not sent: the broker has no chiffon\.heartbeats")
        before = agent.log()
        orchestrator = stack.enter_context(orchestrator_on(urls["orchestrator"], tmp))
        registry = Registry(orchestrator.registry_url, read_only=True)
        stack.callback(registry.close)
        wait_until(lambda: [r for r in registry.agents() if r.agent_id == agent_id],
                   30, lambda: f"agent {agent_id} in the registry:\n{agent.log()}")
        yield Lab(guest_url, vhost, pool, agent, other_queue, orchestrator, urls, users,
                  redis_url, before)


def delete_users(users: list[str]) -> None:
    with ThreadPoolExecutor(len(users)) as threads:
        list(threads.map(lambda user: rabbitmqctl("-q", "delete_user", user), users))


# -- trying things with the agent's credentials ------------------------------------------------

def refusal(url: str, operation: Callable[[Any], object]) -> Denial:
    """Run ``operation(channel)`` on a fresh channel as the user of ``url``; it must be
    refused: the permission denial it got."""
    with Connection(url, transport_options={"confirm_publish": True}) as conn:
        channel = conn.channel()
        with pytest.raises(AccessRefused) as refused:
            operation(channel)
    denial = denial_in(refused.value)
    assert denial is not None, refused.value
    return denial


def publish(channel: Any, exchange: str, routing_key: str) -> None:
    """A confirmed publish (returns once the broker has routed it, raises if refused)."""
    Producer(channel).publish({"forged": True}, exchange=exchange, routing_key=routing_key,
                              serializer="json", declare=[])


def agent_denial(lab: Lab, permission: str, kind: str, name: str) -> Denial:
    return Denial(permission, kind, name, lab.vhost, lab.users["agent"])


def test_before_any_orchestrator_an_agents_heartbeats_are_not_sent_and_it_says_why(
        lab: Lab) -> None:
    assert re.search(
        r"WARNING/MainProcess/Beat\] heartbeat seq 1 not sent: the broker has no "
        r"chiffon\.heartbeats queue and exchange yet, and this agent's user may not declare "
        r"them \(ACCESS_REFUSED - .*\); an orchestrator declares them when it starts",
        lab.agent_log_before_orchestrator)
    assert "Traceback" not in lab.agent_log_before_orchestrator


def test_the_orchestrator_stores_the_heartbeats_of_an_agent_with_its_own_user(
        lab: Lab) -> None:
    with Registry(lab.orchestrator.registry_url, read_only=True) as registry:
        seq = wait_until(lambda: next((r.seq for r in registry.agents()
                                       if r.agent_id == lab.agent.agent_id and r.seq > 1),
                                      None), 15, "a second stored heartbeat")
    assert seq > 1
    assert "ERROR" not in lab.agent.log() and "ERROR" not in lab.orchestrator.orchestrator.log()


def test_the_submitter_user_runs_work_on_the_agent_and_gets_its_result(lab: Lab) -> None:
    work_id = str(uuid.uuid4())
    try:
        done = lab.chiffon("submitter", "submit", "echo", '{"x": 1}', "--pool", lab.pool,
                           "--work-id", work_id, "--wait", "--timeout", "30")
    finally:
        redis.Redis.from_url(lab.result_backend).delete(f"celery-task-meta-{work_id}")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["work_id"], result["status"], result["agent_id"]) == (
        work_id, "success", lab.agent.agent_id)


def test_the_submitter_user_places_work_on_the_agents_own_queue_and_gets_its_result(
        lab: Lab) -> None:
    work_id = str(uuid.uuid4())
    try:
        done = lab.chiffon("submitter", "submit", "echo", "{}", "--needs", "cores=0.01",
                           "--work-id", work_id, "--wait", "--timeout", "30")
    finally:
        redis.Redis.from_url(lab.result_backend).delete(f"celery-task-meta-{work_id}")
    assert done.returncode == 0, done.stderr
    assert f"to {lab.agent.agent_queue} (agent {lab.agent.agent_id})" in done.stderr
    assert json.loads(done.stdout)["status"] == "success"


def test_the_flower_user_lists_the_agent_with_celery_inspect_ping(lab: Lab) -> None:
    env = {**lab.orchestrator.env, "CHIFFON_BROKER_URL": lab.urls["flower"]}
    # (a named destination: the reply ends the wait, instead of the whole --timeout)
    done = subprocess.run([str(CELERY), "-A", "chiffon_worker", "inspect", "ping",
                           "--destination", lab.agent.nodename, "--timeout", "10"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{lab.agent.nodename}: OK" in done.stdout


def test_an_agent_may_not_consume_heartbeats(lab: Lab) -> None:
    denial = refusal(lab.urls["agent"], lambda channel: channel.basic_consume(HEARTBEAT_QUEUE))
    assert denial == agent_denial(lab, "read", "queue", HEARTBEAT_QUEUE)


def test_an_agent_may_not_read_another_agents_queue(lab: Lab) -> None:
    denial = refusal(lab.urls["agent"], lambda channel: channel.basic_get(lab.other_queue))
    assert denial == agent_denial(lab, "read", "queue", lab.other_queue)


@pytest.mark.parametrize("through", ["the default exchange", "that agent's exchange"])
def test_an_agent_may_not_publish_into_another_agents_queue(lab: Lab, through: str) -> None:
    exchange = "" if through == "the default exchange" else lab.other_queue
    denial = refusal(lab.urls["agent"],
                     lambda channel: publish(channel, exchange, lab.other_queue))
    assert denial == agent_denial(lab, "write", "exchange", exchange or "amq.default")
    assert queue_depth(lab.guest_url, lab.other_queue) == 0


def test_no_exchange_an_agent_may_write_routes_into_another_agents_queue(lab: Lab) -> None:
    writable = [lab.pool, lab.agent.agent_queue, HEARTBEAT_QUEUE, WORKER_EVENTS_EXCHANGE,
                REPLY_EXCHANGE]
    outcomes = {}
    with Connection(lab.urls["agent"], transport_options={"confirm_publish": True}) as conn:
        for exchange in writable:
            try:
                publish(conn.channel(), exchange, lab.other_queue)
                outcomes[exchange] = "confirmed"
            except (AccessRefused, NotFound) as exc:
                outcomes[exchange] = type(exc).__name__
    assert outcomes[HEARTBEAT_QUEUE] == "confirmed"  # the agent may write there
    assert queue_depth(lab.guest_url, lab.other_queue) == 0, outcomes


def test_an_agent_may_not_declare_an_unrelated_queue(lab: Lab) -> None:
    name = unique("unrelated")
    denial = refusal(lab.urls["agent"],
                     lambda channel: channel.queue_declare(name, auto_delete=True))
    assert denial == agent_denial(lab, "configure", "queue", name)


def test_an_agent_may_not_bind_a_queue_to_the_heartbeat_exchange(lab: Lab) -> None:
    denial = refusal(lab.urls["agent"], lambda channel: channel.queue_bind(
        lab.agent.agent_queue, HEARTBEAT_QUEUE, HEARTBEAT_QUEUE))
    assert denial == agent_denial(lab, "read", "exchange", HEARTBEAT_QUEUE)


def test_with_rpc_results_an_agent_may_publish_into_any_queue(lab: Lab) -> None:
    """What docs/security.md warns of: write on amq.default (``--rpc-results``) lets an
    agent put messages into any queue by name, another agent's included."""
    try:
        with Connection(lab.urls["agent-with-rpc-results"],
                        transport_options={"confirm_publish": True}) as conn:
            publish(conn.channel(), "", lab.other_queue)
        assert queue_depth(lab.guest_url, lab.other_queue) == 1
    finally:
        with Connection(lab.guest_url) as conn:
            conn.default_channel.queue_purge(lab.other_queue)


# -- refusals as one line -----------------------------------------------------------------------

def test_chiffon_submit_without_write_permission_exits_2_with_one_line(lab: Lab) -> None:
    done = lab.chiffon("submitter-without-write", "submit", "echo", "{}", "--pool", lab.pool,
                       "--wait", "--timeout", "10")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"chiffon: error: the broker refused chiffon submit (submitter): user "
        f"'{lab.users['submitter-without-write']}' has no write permission on queue "
        f"'{lab.pool}' in vhost '{lab.vhost}'; see docs/security.md\n")


def test_a_publish_the_broker_refuses_fails_instead_of_vanishing(lab: Lab) -> None:
    """Work is published with broker confirms: through the default exchange (which the
    submitter may not write to), the publish raises instead of being dropped unseen."""
    router = Router(broker_url=lab.urls["submitter"], result_backend=lab.result_backend)
    with router, pytest.raises(AccessRefused) as refused:
        router.app.send_task(EXECUTE_WORK_TASK, args=[{}], queue=lab.pool)
    assert denial_in(refused.value) == Denial(
        "write", "exchange", "amq.default", lab.vhost, lab.users["submitter"])


def test_an_agent_that_may_not_write_heartbeats_stops_with_exit_2_and_one_line(
        lab: Lab, tmp_path: Path) -> None:
    agent_id = unique("t-agent")
    user = f"{lab.users['agent']}-no-heartbeats"
    configure, write, read = printed_permissions("agent", agent_id, lab.pool)
    add_user(lab.vhost, user, configure, write.replace(r"|chiffon\.heartbeats", ""), read)
    try:
        agent = start_agent(tmp_path, url_as(lab.guest_url, user), agent_id=agent_id,
                            pool=lab.pool, extra_env={"CHIFFON_RESULT_BACKEND": lab.result_backend})
        try:
            status = agent.popen.wait(REFUSED_AGENT_EXIT_S)
        finally:
            agent.stop()
    finally:
        rabbitmqctl("-q", "delete_user", user)
    log = agent.log()
    errors = re.findall(r"^\[.*?: ERROR/[^\]]*\] (.*)$", log, re.MULTILINE)
    assert status == 2, log
    assert errors == [
        f"the broker refused the agent's heartbeat (agent): user '{user}' has no write "
        f"permission on exchange 'chiffon.heartbeats' in vhost '{lab.vhost}'; "
        "see docs/security.md"], log
    assert "Traceback" not in log


# -- the script's names are wire.py's -----------------------------------------------------------

AGENT_ID, OTHER_ID, POOLS = "desk.7", "desk7", "desktop_pool_1,gpu-rigs"


@pytest.mark.parametrize(("role", "permission", "name", "admitted"), [
    ("agent", "read", agent_queue_name(AGENT_ID), True),
    ("agent", "read", "gpu-rigs", True),
    ("agent", "read", f"{AGENT_ID}@host.lab.celery.pidbox", True),
    ("agent", "read", agent_queue_name(OTHER_ID), False),
    ("agent", "read", f"{OTHER_ID}@host.celery.pidbox", False),
    ("agent", "read", HEARTBEAT_QUEUE, False),
    ("agent", "configure", HEARTBEAT_QUEUE, False),
    ("agent", "write", HEARTBEAT_QUEUE, True),
    ("agent", "write", "amq.default", False),
    ("agent", "write", agent_queue_name(OTHER_ID), False),
    ("orchestrator", "read", HEARTBEAT_QUEUE, True),
    ("orchestrator", "read", HEARTBEAT_COPY_PREFIX + "registry-1", True),
    ("orchestrator", "read", ORCHESTRATOR_EVENTS_QUEUE_PREFIX + "7f.1700000000", True),
    ("orchestrator", "read", WORKER_EVENTS_EXCHANGE, True),
    ("orchestrator", "read", agent_queue_name(AGENT_ID), False),
    ("orchestrator", "write", "amq.default", False),
    ("submitter", "write", "desktop_pool_1", True),
    ("submitter", "write", AGENT_QUEUE_PREFIX + OTHER_ID, True),
    ("submitter", "write", HEARTBEAT_QUEUE, False),
    ("submitter", "write", "amq.default", False),
    ("flower", "read", WORKER_EVENTS_EXCHANGE, True),
    ("flower", "read", "celeryev.0b6f1b4e-8a0c-4f6e-9d7b-3f5a2c1e9d80", True),
    ("flower", "read", HEARTBEAT_QUEUE, False),
])
def test_the_scripts_permissions_admit_the_names_of_wire_py(
        role: str, permission: str, name: str, admitted: bool) -> None:
    argv = {"agent": ("agent", AGENT_ID, POOLS), "submitter": ("submitter", POOLS)}.get(
        role, (role,))
    configure, write, read = printed_permissions(*argv)
    regex = {"configure": configure, "write": write, "read": read}[permission]
    assert fullmatch(regex, name) is admitted, regex


# -- reading RabbitMQ's words -------------------------------------------------------------------

def test_a_refusal_that_names_its_permission_is_read_as_it_says() -> None:
    """RabbitMQ 3.11+ names the permission in the text; the method then does not matter."""
    assert parse_denial("ACCESS_REFUSED - write access to exchange 'amq.default' in vhost "
                        "'/' refused for user 'desk7'", (50, 10)) == Denial(
        "write", "exchange", "amq.default", "/", "desk7")


def test_a_refused_login_or_vhost_is_not_a_permission_denial() -> None:
    assert parse_denial("ACCESS_REFUSED - Login was refused using authentication mechanism "
                        "PLAIN. For details see the broker logfile.") is None
    assert parse_denial("ACCESS_REFUSED - access to vhost 'lab' refused for user 'desk7'",
                        (10, 40)) is None


def test_chiffon_drain_without_write_permission_exits_2_with_one_line(lab: Lab) -> None:
    agent_id = lab.agent.agent_id
    try:
        done = lab.chiffon("submitter-without-write", "drain", agent_id)
    finally:
        lab.chiffon("submitter", "undrain", agent_id)  # the drain was recorded first
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(
        f"chiffon: error: the broker refused chiffon drain (submitter): user "
        f"'{lab.users['submitter-without-write']}' has no "), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
