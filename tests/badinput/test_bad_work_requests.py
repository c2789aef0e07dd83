"""Bad work messages against ONE real agent (``celery -A chiffon_worker worker -B``).

The table sends malformed ``chiffon.execute_work`` requests the way a submitter does
(a Celery client, JSON, ``rpc://`` results) and expects an error ``WorkResult`` naming the
field and problem for each, with the agent still serving good work afterwards. Then
messages that are bad at the transport level (unregistered task, pickle, garbage bodies
and content types, broken task envelopes) go straight through kombu; after each the
agent must still be alive and serving.

Needs the machine's RabbitMQ: skipped locally without it, failed under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import NotRegistered
from celery.exceptions import TimeoutError as CeleryTimeoutError
from kombu import Connection

from chiffon_worker.protocol import MAX_MESSAGE_BYTES, WorkResult
from tests.badinput._support import CELERY, isolated_env
from tests.conftest import RABBITMQ_URL, require_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STUB_OUTPUT = "Desktop agent phase 4 (metrics only)"
EXECUTE_WORK = "chiffon.execute_work"
RESULT_TIMEOUT = 20.0
READY_TIMEOUT = 60.0


class Agent:
    """The agent under test: one worker subprocess at a time, plus a submitting client."""

    def __init__(self, workdir: Path) -> None:
        suffix = uuid.uuid4().hex[:10]
        self.agent_id = f"badinput-{suffix}"
        self.pool = f"badinput_pool_{suffix}"
        self.agent_queue = f"chiffon.agent.{self.agent_id}"
        self.workdir = workdir
        self.cwd = workdir / "cwd"
        self.cwd.mkdir()
        self.log_path = workdir / "worker.log"
        self.env = isolated_env(workdir / "home", workdir / "state", {
            "CHIFFON_AGENT_ID": self.agent_id,
            "CHIFFON_AGENT_POOL_NAME": self.pool,
            "CHIFFON_HEARTBEAT_INTERVAL": "5",
            # our heartbeats expire quickly from chiffon.heartbeats (nobody consumes them here)
            "CHIFFON_HEARTBEAT_TIMEOUT_SECONDS": "15",
            "CHIFFON_BROKER_URL": RABBITMQ_URL,
        })
        # An explicit unique node name: two workers with the same name on one host fight
        # over the exclusive pidbox queue <name>.celery.pidbox and the second one dies.
        self.command = [CELERY, "-A", "chiffon_worker", "worker", "-B",
                        "-n", f"{self.agent_id}@%h"]
        self.client = Celery("chiffon-badinput-client", broker=RABBITMQ_URL,
                             backend="rpc://", set_as_current=False)
        self.client.conf.update(task_serializer="json", accept_content=["json"],
                                result_accept_content=["json"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # -- process ------------------------------------------------------------------------------

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        value = self.submit(good_request("ready"), timeout=READY_TIMEOUT)
        assert value["status"] == "success", value

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> None:
        """Restart a dead agent (after purging what killed it); one process at a time."""
        if not self.alive():
            self.purge()
            self.start()

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # the beat child, should it linger
            os.killpg(proc.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- broker -------------------------------------------------------------------------------

    def submit(self, raw: Any, *, args: list[Any] | None = None,
               kwargs: dict[str, Any] | None = None, timeout: float = RESULT_TIMEOUT) -> Any:
        """Send ``chiffon.execute_work`` to the pool queue and wait for its result (failing
        at once if the agent process dies meanwhile)."""
        result = self.client.send_task(EXECUTE_WORK, args=[raw] if args is None else args,
                                       kwargs=kwargs, queue=self.pool)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return result.get(timeout=1.0)
            except CeleryTimeoutError:
                if not self.alive():
                    status = self.proc.returncode if self.proc else None
                    pytest.fail(f"the agent is not running (exit status {status})\n"
                                f"{self.log_tail()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no result within {timeout:g} s\n{self.log_tail()}")

    def publish_raw(self, body: bytes, content_type: str, content_encoding: str,
                    headers: dict[str, Any]) -> None:
        with Connection(RABBITMQ_URL) as conn:
            conn.Producer().publish(body, exchange="", routing_key=self.pool,
                                    content_type=content_type,
                                    content_encoding=content_encoding, headers=headers)

    def ready_messages(self) -> int:
        with Connection(RABBITMQ_URL) as conn:
            return int(conn.default_channel.queue_declare(
                self.pool, passive=True).message_count)

    def purge(self) -> None:
        with Connection(RABBITMQ_URL) as conn, contextlib.suppress(conn.channel_errors):
            conn.default_channel.queue_purge(self.pool)

    def delete_broker_objects(self) -> None:
        """Delete the pool and agent queues (and their exchanges) this agent declared."""
        with Connection(RABBITMQ_URL) as conn:
            for name in (self.pool, self.agent_queue):
                for delete in ("queue_delete", "exchange_delete"):
                    channel = conn.channel()
                    try:
                        getattr(channel, delete)(name)
                    except conn.channel_errors:
                        pass
                    finally:
                        with contextlib.suppress(*conn.connection_errors,
                                                 *conn.channel_errors):
                            channel.close()


def good_request(work_id: str) -> dict[str, Any]:
    return {"work_id": work_id, "work_type": "echo", "payload": {"n": 1}}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    require_port("127.0.0.1", 5672, "RabbitMQ")
    workdir = tmp_path_factory.mktemp("badinput-agent")
    (workdir / "home").mkdir()
    the_agent = Agent(workdir)
    try:
        the_agent.start()
        yield the_agent
    finally:
        the_agent.stop()
        the_agent.delete_broker_objects()
        the_agent.client.close()


# -- bad requests through a real submitter ----------------------------------------------------

OVERSIZED_TEXT = ('{"work_id": "big", "work_type": "echo", "payload": "'
                  + "x" * (MAX_MESSAGE_BYTES + 1) + '"}')


@dataclass(frozen=True)
class BadRequest:
    """A malformed request and the error result it must produce."""

    id: str
    raw: Any
    field: str | None  # None: the message as a whole
    problem: str
    work_id: str = ""  # echoed in the result when the request carried a valid one
    xfail: str | None = None


REQUESTS: list[BadRequest] = [
    BadRequest("not_json_text", "not json", None, "work request is not valid JSON"),
    BadRequest("empty_text", "", None, "work request is not valid JSON"),
    BadRequest("json_text_with_trailing_garbage", '{"work_id": "w", "work_type": "t"} !!',
               None, "work request is not valid JSON: Extra data"),
    BadRequest("json_array_text", "[1, 2, 3]", None,
               "work request must be a JSON object, got list"),
    BadRequest("json_number_text", "42", None, "work request must be a JSON object, got int"),
    BadRequest("json_null_text", "null", None, "work request must be a JSON object"),
    BadRequest("json_string_text", '"render"', None,
               "work request must be a JSON object, got str"),
    BadRequest("null_argument", None, None, "work request must be a JSON object"),
    BadRequest("number_argument", 3.5, None, "work request must be a JSON object, got float"),
    BadRequest("boolean_argument", True, None, "work request must be a JSON object, got bool"),
    BadRequest("array_argument", [good_request("w")], None,
               "work request must be a JSON object, got list"),
    BadRequest("empty_object", {}, "work_id", "is missing"),
    BadRequest("missing_work_id", {"work_type": "echo", "payload": {}}, "work_id", "is missing"),
    BadRequest("missing_work_type", {"work_id": "w-1"}, "work_type", "is missing",
               work_id="w-1"),
    BadRequest("empty_work_type", {"work_id": "w-2", "work_type": ""}, "work_type",
               "must not be empty", work_id="w-2"),
    BadRequest("blank_work_id", {"work_id": "   ", "work_type": "echo"}, "work_id",
               "must not be empty"),
    BadRequest("work_id_integer", {"work_id": 7, "work_type": "echo"}, "work_id",
               "must be a string, got int"),
    BadRequest("work_id_boolean", {"work_id": False, "work_type": "echo"}, "work_id",
               "must be a string, got bool"),
    BadRequest("work_type_null", {"work_id": "w-3", "work_type": None}, "work_type",
               "must be a string, got null", work_id="w-3"),
    BadRequest("work_type_list", {"work_id": "w-4", "work_type": ["echo"]}, "work_type",
               "must be a string, got list", work_id="w-4"),
    BadRequest("work_id_too_long", {"work_id": "w" * 257, "work_type": "echo"}, "work_id",
               "is longer than 256 characters"),
    BadRequest("unknown_extra_field",
               {"work_id": "w-5", "work_type": "echo", "payload": {}, "priority": 9},
               "priority", "is not a work request field", work_id="w-5"),
    BadRequest("integer_key_becomes_unknown_field", {1: 2}, "1",
               "is not a work request field"),
    BadRequest("nan_work_id", {"work_id": math.nan, "work_type": "echo"}, "work_id",
               "must be a string, got float"),
    BadRequest("nan_in_payload", {"work_id": "w-6", "work_type": "echo",
                                  "payload": {"ratio": math.nan}},
               "payload", "is not plain JSON", work_id="w-6"),
    BadRequest("minus_infinity_in_payload", {"work_id": "w-7", "work_type": "echo",
                                             "payload": [1, -math.inf]},
               "payload", "is not plain JSON", work_id="w-7"),
    BadRequest("nan_literal_in_json_text",
               '{"work_id": "w-8", "work_type": "echo", "payload": NaN}',
               "payload", "is not plain JSON"),
    BadRequest("nested_garbage_as_work_id",
               {"work_id": {"a": [{"b": [None, {"c": []}]}]}, "work_type": "echo"},
               "work_id", "must be a string, got dict"),
    BadRequest("deeply_nested_json_text", "[" * 100_000 + "]" * 100_000, None,
               "work request is not valid JSON"),
    BadRequest("kombu_datetime_envelope_in_payload",
               {"work_id": "w-9", "work_type": "echo",
                "payload": {"__type__": "datetime", "__value__": "2024-01-01T00:00:00"}},
               "payload", "is not plain JSON", work_id="w-9"),
    BadRequest("bytes_that_are_not_utf8", b"\xff\xfe{\x00}", None,
               "work request is not UTF-8 text"),
    BadRequest("bytes_repr_as_text", "b'{\"work_id\": \"w\", \"work_type\": \"echo\"}'", None,
               "work request is not valid JSON"),
    BadRequest("oversized_json_text", OVERSIZED_TEXT, None,
               f"the limit is {MAX_MESSAGE_BYTES}"),
    BadRequest("oversized_payload_object",
               {"work_id": "big", "work_type": "echo", "payload": "x" * (MAX_MESSAGE_BYTES + 1)},
               "payload", f"the limit is {MAX_MESSAGE_BYTES}", work_id="big"),
    BadRequest("newline_in_work_id_forges_log_lines",
               {"work_id": "w-10\n[2024-01-01 00:00:00: ERROR/MainProcess] forged",
                "work_type": "echo"},
               "work_id", "must not contain control characters"),
]


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.id,
                 marks=[pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else [])
    for case in REQUESTS])
def test_bad_request_gets_an_error_result(agent: Agent, case: BadRequest) -> None:
    result = agent.submit(case.raw)
    assert isinstance(result, dict), result
    assert result["status"] == "error", result
    assert result["output"] is None
    assert result["agent_id"] == agent.agent_id
    assert result["work_id"] == case.work_id
    error = result["error"]
    expected = "malformed work request: " + (f"{case.field}: " if case.field else "")
    assert error.startswith(expected), error
    assert case.problem in error, error
    assert "\n" not in error
    assert WorkResult.from_json(result).status == "error"  # a valid WorkResult on the wire


def test_good_request_still_succeeds_after_the_table(agent: Agent) -> None:
    result = agent.submit(good_request("after-table"))
    assert result["status"] == "success", result
    assert result["output"] == STUB_OUTPUT
    assert result["work_id"] == "after-table"
    assert result["error"] is None
    assert agent.alive()
    assert agent.starts == 1


@pytest.mark.parametrize(("args", "kwargs"), [
    pytest.param([], None, id="no_argument"),
    pytest.param([good_request("w-11"), "extra"], None, id="two_arguments"),
    pytest.param([good_request("w-12")], {"priority": 1}, id="unexpected_keyword"),
])
def test_wrong_arity_gets_an_error_result(agent: Agent, args: list[Any],
                                          kwargs: dict[str, Any] | None) -> None:
    result = agent.submit(None, args=args, kwargs=kwargs)
    assert result["status"] == "error", result
    assert "exactly one argument" in result["error"]


def test_wrong_arity_leaves_the_agent_serving(agent: Agent) -> None:
    try:
        outcome = agent.submit(None, args=[])
    except TypeError:  # today: the task fails; the message is acknowledged, not redelivered
        pass
    else:  # after the fix: an error WorkResult
        assert outcome["status"] == "error", outcome
    assert agent.submit(good_request("after-arity"))["status"] == "success"
    assert agent.alive()
    assert agent.ready_messages() == 0


# -- transport-level garbage ----------------------------------------------------------------------

def test_unregistered_task_is_refused_and_the_agent_keeps_serving(agent: Agent) -> None:
    result = agent.client.send_task("chiffon.no_such_task", args=[good_request("w-13")],
                                    queue=agent.pool)
    with pytest.raises(NotRegistered, match=r"chiffon\.no_such_task"):
        result.get(timeout=RESULT_TIMEOUT)
    assert agent.submit(good_request("after-unregistered"))["status"] == "success"
    assert agent.alive()


class _Evil:
    """Unpickling this runs ``touch <marker>``: proof that pickle was (not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _headers(**changes: Any) -> dict[str, Any]:
    headers: dict[str, Any] = {"lang": "py", "task": EXECUTE_WORK, "id": str(uuid.uuid4()),
                               "root_id": None, "parent_id": None, "group": None,
                               "retries": 0, "timelimit": [None, None], "eta": None,
                               "expires": None}
    headers.update(changes)
    return headers


@dataclass(frozen=True)
class RawMessage:
    """A message published straight to the pool queue with kombu."""

    id: str
    body: Callable[[Path], bytes]  # given the marker path
    content_type: str
    headers: Callable[[], dict[str, Any]] = _headers
    content_encoding: str = "utf-8"
    xfail: str | None = None


def _json(value: Any) -> Callable[[Path], bytes]:
    return lambda _marker: json.dumps(value).encode()


RAW_MESSAGES: list[RawMessage] = [
    RawMessage("pickle_content_type",
               lambda marker: pickle.dumps(((_Evil(marker),), {}, {})),
               "application/x-python-serialize", content_encoding="binary"),
    RawMessage("yaml_content_type_with_python_tag",
               lambda marker: f"!!python/object/apply:os.system ['touch {marker}']".encode(),
               "application/x-yaml"),
    RawMessage("unknown_content_type", lambda _m: b"\x00\x01garbage\xff",
               "application/x-garbage", content_encoding="binary"),
    RawMessage("json_content_type_with_binary_garbage", lambda _m: b"\x00\xff not json",
               "application/json"),
    RawMessage("json_content_type_with_truncated_json",
               lambda _m: b'[["w"], {}, {"callbacks": nu', "application/json"),
    RawMessage("kombu_envelope_of_unknown_type",
               _json([[{"__type__": "no-such-type", "__value__": 1}], {}, {}]),
               "application/json"),
    RawMessage("no_headers_at_all", _json({"hello": "world"}), "application/json",
               headers=dict),
    RawMessage("task_header_not_a_string", _json([[], {}, {}]), "application/json",
               headers=lambda: _headers(task=5)),
    RawMessage("args_not_a_list", _json([5, {}, {}]), "application/json"),
    RawMessage("kwargs_not_an_object", _json([[good_request("w")], [], {}]),
               "application/json"),
    RawMessage("body_is_a_json_object", _json({"work_id": "w", "work_type": "echo"}),
               "application/json"),
    RawMessage("body_is_a_two_element_list", _json([[good_request("w")], {}]),
               "application/json"),
    RawMessage("body_is_null", _json(None), "application/json"),
    RawMessage("body_is_empty", lambda _m: b"", "application/json"),
    RawMessage("id_header_missing", _json([[good_request("w")], {}, {}]), "application/json",
               headers=lambda: {"lang": "py", "task": EXECUTE_WORK}),
]
_SURVIVABLE = [m for m in RAW_MESSAGES if not m.xfail]


def _send_raw_then_prove_serving(agent: Agent, message: RawMessage, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    agent.publish_raw(message.body(marker), message.content_type, message.content_encoding,
                      message.headers())
    # prefetch 1, one slot, FIFO: the raw message is dealt with before this request
    result = agent.submit(good_request(f"after-{message.id}"))
    assert result["status"] == "success", result
    assert result["output"] == STUB_OUTPUT
    assert agent.alive(), f"the agent died\n{agent.log_tail()}"
    assert agent.ready_messages() == 0, "the bad message is still queued (redelivery loop)"
    assert not marker.exists(), "the message body was deserialised with an unsafe loader"


@pytest.mark.parametrize("message", [pytest.param(m, id=m.id) for m in _SURVIVABLE])
def test_transport_garbage_is_dropped_and_the_agent_keeps_serving(
        agent: Agent, message: RawMessage, tmp_path: Path) -> None:
    _send_raw_then_prove_serving(agent, message, tmp_path)


def test_agent_is_still_the_same_live_process_at_the_end(agent: Agent) -> None:
    assert agent.alive()
    assert agent.starts == 1, "the agent had to be restarted"
    result = agent.submit(good_request("the-end"))
    assert (result["status"], result["output"]) == ("success", STUB_OUTPUT)
    assert list(agent.cwd.iterdir()) == [], "the agent littered its working directory"
