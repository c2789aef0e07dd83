"""Flower, the operator's live view: a real ``celery -A chiffon_worker flower`` on a free
port, watching a real agent (with two stand-in NVIDIA GPUs, tests/fakes/libnvidia-ml) on
a private vhost, sees the agent and its queues, its execute_work tasks but never a
heartbeat as a task, the agent's capacity on its worker page (the ``chiffon_*`` entries of
its ``stats`` reply, as its heartbeats say), and a Config tab without reprs that masks
only secrets."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from chiffon_worker.wire import (
    DRAIN_CONTROL_COMMAND,
    DRAINED_REASON,
    EXECUTE_WORK_TASK,
    HEARTBEAT_TASK,
    UNDRAIN_CONTROL_COMMAND,
)
from chiffon_worker.worker.flower_stats import STATS_PREFIX
from tests.conftest import missing_service
from tests.integration.conftest import WatchedAgent
from tests.integration.helpers import (
    CELERY,
    HeartbeatTap,
    agent_environment,
    close_client,
    start_agent,
    submit,
    unique,
    work_client,
)
from tests.integration.private_rabbit import free_port, port_open
from tests.orchestrator_process import VhostUnavailable, private_vhost
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 30.0
#: The stand-in libnvidia-ml.so.1: two GPUs (an RTX 4090 and an A100 with MIG).
FAKE_NVML_SOURCE = Path(__file__).resolve().parents[1] / "fakes" / "libnvidia-ml" / "fake_nvml.c"
FAKE_GPUS = 2

USER, PASSWORD = "operator", "s3cret-test-only"


def _request(url: str, *, auth: bool = True) -> urllib.request.Request:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def _get(url: str, *, auth: bool = True) -> Any:
    with urllib.request.urlopen(_request(url, auth=auth), timeout=20) as response:
        return json.load(response)


def _get_text(url: str) -> str:
    with urllib.request.urlopen(_request(url), timeout=20) as response:
        return str(response.read().decode("utf-8"))


def _poll(url: str, accept: Callable[[Any], bool], timeout: float) -> Any:
    """GET ``url`` until ``accept(json)`` holds, and return that answer; fails after
    ``timeout`` seconds, showing the last answer."""
    last: list[Any] = [None]

    def accepted() -> tuple[Any] | None:  # a tuple: an accepted answer may be empty
        try:
            last[0] = _get(url)
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError) as exc:
            last[0] = exc
            return None
        return (last[0],) if accept(last[0]) else None

    (answer,) = wait_until(accepted, timeout, lambda: f"{url} to answer as expected; "
                           f"last answer: {last[0]!r}", interval=0.1)
    return answer


def _fake_nvml(out_dir: Path) -> Path:
    """A folder holding the stand-in libnvidia-ml.so.1, built with the machine's gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        missing_service("no gcc to build the stand-in libnvidia-ml.so.1")
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-o", str(out_dir / "libnvidia-ml.so.1"),
                    str(FAKE_NVML_SOURCE)], check=True, timeout=120)
    return out_dir


@pytest.fixture(scope="module")
def vhost_url(rabbitmq_url: str) -> Iterator[str]:
    """A private vhost for this module's agent and Flower (deleted afterwards)."""
    try:
        with private_vhost(rabbitmq_url) as url:
            yield url
    except VhostUnavailable as exc:
        missing_service(str(exc))


@pytest.fixture(scope="module")
def gpu_agent(vhost_url: str, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[WatchedAgent]:
    """``celery -A chiffon_worker worker -B`` seeing two stand-in NVIDIA GPUs, heartbeat
    every second, with a tap on its heartbeats and a submitter."""
    tmp: Path = tmp_path_factory.mktemp("flower-agent")
    lib = _fake_nvml(tmp / "nvml")
    agent_id = unique("t-flower-agent")
    tap = HeartbeatTap(vhost_url, agent_id)
    agent = start_agent(tmp, vhost_url, agent_id=agent_id,
                        extra_env={"LD_LIBRARY_PATH": str(lib)})
    client = work_client(vhost_url, "rpc://")
    try:
        agent.wait_ready()
        yield WatchedAgent(agent, tap, client)
    finally:
        agent.stop()
        close_client(client)
        tap.close()


@pytest.fixture(scope="module")
def flower(gpu_agent: WatchedAgent, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[str]:
    """Flower's base URL, with basic auth as docs/operations.md deploys it."""
    tmp: Path = tmp_path_factory.mktemp("flower")
    port = free_port()
    env = agent_environment(tmp, {"CHIFFON_BROKER_URL": gpu_agent.agent.broker_url,
                                  "CHIFFON_AGENT_ID": unique("t-flower")})
    with (tmp / "flower.log").open("wb") as log:
        process = subprocess.Popen(
            [str(CELERY), "-A", "chiffon_worker", "flower", "--address=127.0.0.1",
             f"--port={port}", f"--basic-auth={USER}:{PASSWORD}"],
            env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def flower_log() -> str:
        return (tmp / "flower.log").read_text(errors="replace")

    def listening() -> bool:
        assert process.poll() is None, flower_log()
        return port_open(port)

    try:
        wait_until(listening, START_TIMEOUT_S,
                   lambda: f"Flower on port {port}:\n{flower_log()}")
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _worker_url(flower: str, nodename: str) -> str:
    """``/api/workers`` for one worker, inspected afresh (replies as soon as it answers)."""
    return f"{flower}/api/workers?refresh=1&workername={urllib.parse.quote(nodename)}"


def _capacity(flower: str, nodename: str,
              accept: Callable[[dict[str, Any]], bool] = lambda _: True) -> dict[str, Any]:
    """The ``chiffon_*`` entries of the worker's stats as Flower returns them (prefix
    removed), once ``accept(them)`` holds and they come from a heartbeat
    (``snapshot_seq`` > 0)."""
    def shown_in(answer: Any) -> dict[str, Any]:
        stats = answer.get(nodename, {}).get("stats", {})
        return {key.removeprefix(STATS_PREFIX): value for key, value in stats.items()
                if key.startswith(STATS_PREFIX)}

    def wanted(answer: Any) -> bool:
        shown = shown_in(answer)
        return bool(shown) and shown["snapshot_seq"] > 0 and accept(shown)

    return shown_in(_poll(_worker_url(flower, nodename), wanted, START_TIMEOUT_S))


def _heartbeat(tap: HeartbeatTap, seq: int) -> dict[str, Any]:
    """The snapshot of the agent's heartbeat ``seq``, as the tap received it."""
    def received() -> dict[str, Any] | None:
        tap.drain(0.1)
        return next((beat.snapshot for beat in tap.received
                     if beat.snapshot["seq"] == seq), None)

    return wait_until(received, START_TIMEOUT_S, f"heartbeat seq {seq}")


def _heartbeats_taken_after(tap: HeartbeatTap, wall_time: float, count: int) -> None:
    """Wait until the tap received ``count`` heartbeats taken after ``wall_time``."""
    def received() -> bool:
        tap.drain(0.1)
        return len([beat for beat in tap.received
                    if beat.snapshot["collected_at"] > wall_time]) >= count

    wait_until(received, START_TIMEOUT_S, f"{count} heartbeats after {wall_time:.3f}")


def _as_heartbeat_says(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The capacity keys Flower should show for ``snapshot`` (GiB and cores to 0.01)."""
    expected = {
        "snapshot_seq": snapshot["seq"],
        "cpu_cores_effective": round(snapshot["cpu_cores_effective"], 2),
        "cpu_cores_available": round(snapshot["cpu_cores_available"], 2),
        "memory_total_gb": round(snapshot["memory_total_gb"], 2),
        "memory_available_gb": round(snapshot["memory_available_gb"], 2),
        "gpu_count": snapshot["gpu_count"],
        "gpu_health": snapshot["gpu_health"],
        "gpu_probe_state": snapshot["gpu_probe"]["state"],
    }
    for position, gpu in enumerate(snapshot["gpus"]):
        available = gpu["vram_available_gb"]
        expected.update({
            f"gpu{position}_name": gpu["name"],
            f"gpu{position}_vram_total_gb": round(gpu["vram_total_gb"], 2),
            f"gpu{position}_vram_available_gb": None if available is None
            else round(available, 2),
            f"gpu{position}_vram_known": available is not None,
            f"gpu{position}_health": gpu["health"],
        })
    return expected


def _shown_part(shown: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    return {key: shown.get(key) for key in expected}


def test_flower_lists_the_agents_worker_with_its_queues(
        flower: str, gpu_agent: WatchedAgent) -> None:
    agent = gpu_agent.agent
    workers = _poll(_worker_url(flower, agent.nodename),
                    lambda answer: agent.nodename in answer, START_TIMEOUT_S)
    queues = {queue["name"] for queue in workers[agent.nodename]["active_queues"]}
    assert queues == {agent.pool, agent.agent_queue}


def test_flower_shows_execute_work_tasks_and_never_a_heartbeat_as_a_task(
        flower: str, gpu_agent: WatchedAgent) -> None:
    agent, tap = gpu_agent.agent, gpu_agent.tap
    _poll(f"{flower}/api/workers?status=1",  # Flower follows the agent's events
          lambda answer: answer.get(agent.nodename) is True, START_TIMEOUT_S)
    _heartbeats_taken_after(tap, time.time(), 2)  # sent while Flower listens
    work_id = unique("w")
    submit(gpu_agent.client, agent.pool, {"work_id": work_id, "work_type": "render",
                                          "payload": {}})
    tasks = _poll(f"{flower}/api/tasks",
                  lambda answer: any(task.get("name") == EXECUTE_WORK_TASK
                                     and task.get("state") == "SUCCESS"
                                     for task in answer.values()), START_TIMEOUT_S)
    assert [task for task in tasks.values() if task.get("name") == HEARTBEAT_TASK] == []


def test_flower_shows_the_agents_capacity_as_its_latest_heartbeat_says(
        flower: str, gpu_agent: WatchedAgent) -> None:
    shown = _capacity(flower, gpu_agent.agent.nodename)
    expected = _as_heartbeat_says(_heartbeat(gpu_agent.tap, shown["snapshot_seq"]))
    assert expected["gpu_count"] == FAKE_GPUS  # the stand-in GPUs are seen
    assert _shown_part(shown, expected) == expected
    assert (shown["agent_id"], shown["pool"], shown["accepting"]) == (
        gpu_agent.agent.agent_id, gpu_agent.agent.pool, True)


def test_flower_capacity_follows_each_new_heartbeat(
        flower: str, gpu_agent: WatchedAgent) -> None:
    nodename = gpu_agent.agent.nodename
    first = _capacity(flower, nodename)["snapshot_seq"]
    later = _capacity(flower, nodename, lambda shown: shown["snapshot_seq"] > first)
    expected = _as_heartbeat_says(_heartbeat(gpu_agent.tap, later["snapshot_seq"]))
    assert _shown_part(later, expected) == expected


def test_flower_shows_a_drain_at_once_and_its_end(
        flower: str, gpu_agent: WatchedAgent) -> None:
    agent, client = gpu_agent.agent, gpu_agent.client

    def command(name: str, **arguments: Any) -> None:
        replies = client.control.broadcast(name, destination=[agent.nodename], reply=True,
                                           timeout=10, arguments=arguments)
        assert replies, f"{name}: no reply from {agent.nodename}"

    command(DRAIN_CONTROL_COMMAND, requested_by="test_flower")
    try:
        drained = _capacity(flower, agent.nodename, lambda shown: not shown["accepting"])
        assert (drained["hold_reason"], drained["drained"]) == (DRAINED_REASON, True)
    finally:
        command(UNDRAIN_CONTROL_COMMAND)
    back = _capacity(flower, agent.nodename, lambda shown: shown["accepting"])
    assert (back["hold_reason"], back["drained"]) == (None, False)


def test_flower_config_shows_routing_keys_and_masks_only_the_broker_password(
        flower: str, gpu_agent: WatchedAgent) -> None:
    agent = gpu_agent.agent
    answer = _poll(_worker_url(flower, agent.nodename),
                   lambda answer: "conf" in answer.get(agent.nodename, {}), START_TIMEOUT_S)
    conf = answer[agent.nodename]["conf"]
    assert (conf["task_default_routing_key"], conf["task_default_exchange"]) == (
        agent.pool, agent.pool)
    assert "guest:guest@" in agent.broker_url
    assert conf["broker_url"] == agent.broker_url.replace("guest:guest@", "guest:**@")
    text = json.dumps(conf)
    assert "<function" not in text and "<class" not in text and "********" not in text


def test_flower_worker_page_has_the_capacity_row_and_a_config_tab_without_reprs(
        flower: str, gpu_agent: WatchedAgent) -> None:
    agent = gpu_agent.agent
    _capacity(flower, agent.nodename)  # Flower knows the worker
    page = _get_text(f"{flower}/worker/{urllib.parse.quote(agent.nodename)}")
    assert "Other statistics" in page and "chiffon_memory_available_gb" in page
    assert "chiffon_gpu1_vram_available_gb" in page
    assert "&lt;function" not in page and "&lt;class" not in page
    assert "********" not in page


def test_flower_api_refuses_requests_without_credentials(flower: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        _get(f"{flower}/api/workers", auth=False)
    assert refused.value.code == 401
