"""``chiffon status --json`` and ``/metrics`` made fast for 10,000 agents (issue 16) write
what they wrote before: status's objects equal :func:`status_object` of the decoded
records (keys in order), the metrics page is byte for byte what prometheus_client writes
for the collector. Compact JSON unless stdout is a terminal. How fast is measured in
``bench/registry.py``, never here."""

from __future__ import annotations

import gzip
import json
import math
import os
import pty
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from wsgiref.util import setup_testing_defaults

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder, make_wsgi_app
from prometheus_client.utils import floatToGoString

from chiffon_worker.cli import main
from chiffon_worker.errors import RegistryError
from chiffon_worker.orchestrator import exporter
from chiffon_worker.orchestrator.agent_view import (
    STATUS_FIELDS,
    snapshot_members,
    status_json,
    status_object,
)
from chiffon_worker.orchestrator.exporter import MetricsServer, OrchestratorCollector
from chiffon_worker.orchestrator.registry import AgentRecord, Registry
from chiffon_worker.signing import SIGNATURE_KEY, sign_snapshot

from .conftest import RegistryFactory
from .feeding import Feeder
from .snapshots import make_snapshot

#: Reset to the start of each test by the autouse ``fresh_now`` fixture (conftest.py).
NOW = time.time()
CHIFFON = [sys.executable, "-m", "chiffon_worker.cli"]
TASK = {"task": "chiffon.heartbeat", "id": "t-1"}
#: What Prometheus 3 asks for: OpenMetrics first.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
                     "application/openmetrics-text;version=0.0.1;q=0.4,"
                     "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,"
                     "text/plain;version=0.0.4;q=0.2,*/*;q=0.1")


def task_body(snapshot: dict[str, Any], **dumps: Any) -> bytes:
    """A Celery protocol-2 heartbeat body, the snapshot serialised with ``dumps`` options."""
    return json.dumps([[snapshot], {}, {"callbacks": None}], **dumps).encode()


def fill(registry: Registry) -> None:
    """Agents that take every branch of the status view and the metrics page: stored from
    dicts (compact text) and as received (the agent's spacing, line breaks, non-ASCII,
    escapes), signed, lost, stopped, conflicting, drained, with GPU health or none, keys
    that clash with the registry's fields at the top and nested, brackets in strings."""
    feeder = Feeder(registry)
    feeder.snapshot(make_snapshot("plain"), received_at=NOW)
    feeder.snapshot(sign_snapshot(make_snapshot("signed", pool="p2"), "k"), received_at=NOW)
    feeder.snapshot(make_snapshot("lost-box", gpu=False, pool="p2"), received_at=NOW - 1000)
    feeder.snapshot(make_snapshot(
        "clashing", state="mine", liveness=["x"], drain={"agent_id": "nested"},
        conflict={"state": "nested", "list": [1, {"seq": 2}]}, note="plain words",
        extra={"agent_id": "inner", "deeper": [{"hostname": "h"}]},
        gpu_health="degraded", gpu_power_draw_w=312.5, gpu_processes=3), received_at=NOW)
    feeder.snapshot(make_snapshot("brackets", note="[", tags=["a]"]), received_at=NOW)
    feeder.snapshot(make_snapshot("bracket-host", hostname="a{b}[c]"), received_at=NOW)
    feeder.snapshot(make_snapshot("escaped", hostname='we"ird\\host'), received_at=NOW)
    as_sent: list[tuple[str, dict[str, Any]]] = [
        ("spaced", {}), ("unicode", {"ensure_ascii": False}),
        ("sorted", {"sort_keys": True, "separators": (",", ":")})]
    for n, (agent_id, dumps) in enumerate(as_sent):
        snap = make_snapshot(agent_id, hostname="hôte" if agent_id == "unicode" else None,
                             gpu_health="ok")
        outcome = feeder.message(task_body(snap, **dumps), {**TASK, "id": f"t-{n}"},
                                 "application/json", "utf-8", received_at=NOW)
        assert outcome.kind == "accepted", outcome
    bare = json.dumps(make_snapshot("lines"), indent=1).encode()  # stored as sent
    escaped_key = task_body(make_snapshot("escaped-key")).replace(b'"pool"', b'"po\\u006fl"')
    for n, (body, headers) in enumerate([(bare, {}), (escaped_key, {**TASK, "id": "t-9"})]):
        outcome = feeder.message(body, headers, "application/json", "utf-8",
                                 received_at=NOW + n)
        assert outcome.kind == "accepted", outcome
    feeder.commit()
    registry.write_signs([{"agent_id": "stopped-box", "worker_name": "celery@stopped",
                           "last_event_at": NOW - 30, "event_interval_seconds": 2.0,
                           "offline_at": NOW - 20}])
    late = Feeder(registry)
    late.snapshot(make_snapshot("stopped-box"), received_at=NOW - 30)
    late.commit()
    registry.write_batch([], [], [{"agent_id": "plain", "hostname": "clone", "boot_id": "b2",
                                   "seen_at": NOW}])
    registry.drain("signed", "ops@desk", now=NOW - 60)


@pytest.fixture
def filled(registry: Registry) -> Registry:
    fill(registry)
    return registry


def ordered(value: Any) -> Any:
    """``value`` with every object as its list of items: equality then checks key order."""
    if isinstance(value, dict):
        return [(key, ordered(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [ordered(item) for item in value]
    return value


# -- chiffon status --json ---------------------------------------------------------------------

def test_status_json_of_each_agent_is_its_status_object_keys_in_order(filled: Registry) -> None:
    decoded = filled.agents(with_snapshot=True)
    rows = filled.agents_with_snapshot_text()
    assert [record.agent_id for record, _ in rows] == [r.agent_id for r in decoded]
    assert len(decoded) == 13
    for (record, text), full in zip(rows, decoded, strict=True):
        assert record.snapshot == {}, "the text is not decoded"
        assert json.loads(text) == full.snapshot
        assert record == AgentRecord(**{**{name: getattr(full, name) for name in
                                           AgentRecord.__dataclass_fields__}, "snapshot": {}})
        shown = json.loads(status_json(record, text, NOW))
        assert ordered(shown) == ordered(status_object(full, NOW)), record.agent_id
    by_id = {r.agent_id: json.loads(status_json(r, t, NOW)) for r, t in rows}
    assert SIGNATURE_KEY not in by_id["signed"] and by_id["signed"]["drain"] == "draining"
    clashing = by_id["clashing"]
    assert clashing["state"] == "online" and clashing["drain"] is None
    assert clashing["conflict"] is None and clashing["liveness"] == "online"
    assert clashing["extra"] == {"agent_id": "inner", "deeper": [{"hostname": "h"}]}
    assert by_id["plain"]["liveness"] == "conflict"
    assert by_id["stopped-box"]["liveness"] == "stopped"
    assert by_id["escaped-key"]["pool"] == "desktop_pool_1"


def test_agent_values_carry_each_agent_columns_and_the_liveness_its_record_has(
        filled: Registry) -> None:
    records = filled.agents()
    values = filled.agent_values(("agent_id", "pool", "missed"), NOW)
    assert [(liveness, tuple(row[:3])) for liveness, row in values] == [
        (r.liveness(NOW), (r.agent_id, r.pool, r.missed)) for r in records]
    assert {liveness for liveness, _ in values} == {"online", "lost", "stopped", "conflict"}


def test_the_stored_text_is_copied_not_decoded_where_it_can_be(filled: Registry) -> None:
    texts = {r.agent_id: text for r, text in filled.agents_with_snapshot_text()}
    copied = {agent_id for agent_id, text in texts.items()
              if snapshot_members(text) is not None}
    # task messages' snapshots are stored as orjson writes them: an escaped key arrives
    # unescaped, and is copied too
    assert copied == {"plain", "signed", "lost-box", "clashing", "brackets", "spaced",
                      "sorted", "stopped-box", "escaped-key"}, "not: bracket-host, " \
                                                               "escaped, unicode, lines"
    assert "\n" in texts["lines"] and "\\u006f" not in texts["escaped-key"]
    assert ", " not in status_json(next(r for r, _ in filled.agents_with_snapshot_text()
                                        if r.agent_id == "spaced"), texts["spaced"], NOW), \
        "a task message's snapshot is stored compact, whatever its sender's spacing"


_KEYS = st.one_of(st.sampled_from([*STATUS_FIELDS, SIGNATURE_KEY, "schema", "gpus", "a b",
                                   'q"uote', "br{ace", "back\\slash", "é", "state_x"]),
                  st.text(max_size=8))
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(),
                     st.floats(allow_nan=False, allow_infinity=False),
                     st.text(alphabet=st.sampled_from('ab{}[]":,\\ \né'), max_size=6))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_KEYS, inner, max_size=3)), max_leaves=12)
_DUMPS = st.sampled_from([{}, {"separators": (",", ":")}, {"indent": 1},
                          {"ensure_ascii": False}, {"separators": (" ,", " : ")}])
#: What agents send: ASCII keys and text without quotes, backslashes or line breaks.
_PLAIN_KEYS = st.one_of(st.sampled_from([*STATUS_FIELDS, SIGNATURE_KEY, "gpus", "x"]),
                        st.text(alphabet=st.sampled_from("abs_{["), min_size=1, max_size=5))
_PLAIN_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(),
              st.floats(allow_nan=False, allow_infinity=False),
              st.text(alphabet=st.sampled_from("ab :,{}[]"), max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(_PLAIN_KEYS, inner, max_size=3)), max_leaves=12)
_PLAIN_DUMPS = st.sampled_from([{}, {"separators": (",", ":")},
                                {"separators": (" ,", " : ")}])


def _strings(value: Any) -> Iterator[str]:
    """Every string in ``value``, keys too."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)


def _check_members(snapshot: dict[str, Any], dumps: dict[str, Any]) -> str | None:
    text = json.dumps(snapshot, **dumps)
    members = snapshot_members(text)
    kept = {k: v for k, v in snapshot.items() if k not in STATUS_FIELDS and k != SIGNATURE_KEY}
    if members is not None:
        assert ordered(json.loads("{" + members + "}")) == ordered(kept)
        assert "\n" not in members
    return members


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshot=st.dictionaries(_KEYS, _VALUES, max_size=8), dumps=_DUMPS)
def test_members_cut_from_any_object_text_are_those_decoding_would_keep(
        snapshot: dict[str, Any], dumps: dict[str, Any]) -> None:
    _check_members(snapshot, dumps)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshot=st.dictionaries(_PLAIN_KEYS, _PLAIN_VALUES, max_size=8), dumps=_PLAIN_DUMPS)
def test_plain_object_texts_are_cut_unless_a_string_holds_a_bracket(
        snapshot: dict[str, Any], dumps: dict[str, Any]) -> None:
    members = _check_members(snapshot, dumps)
    if not any(c in string for string in _strings(snapshot) for c in "{}[]"):
        assert members is not None


@pytest.mark.parametrize("dumps", [{}, {"separators": (",", ":")}])
def test_a_plain_snapshot_is_always_copied(dumps: dict[str, Any]) -> None:
    for snap in (make_snapshot(), make_snapshot(gpu=False),
                 sign_snapshot(make_snapshot(conflict={"hostname": "x"}), "k")):
        members = snapshot_members(json.dumps(snap, **dumps))
        assert members is not None
        assert json.loads("{" + members + "}") == {
            k: v for k, v in snap.items() if k not in STATUS_FIELDS and k != SIGNATURE_KEY}


def _cli_url(registry: Registry) -> str:
    """The registry's URL for a ``chiffon`` process (a PostgreSQL schema on the path)."""
    if registry.schema is None:
        return registry.url
    options = urllib.parse.quote(f"-csearch_path={registry.schema}")
    return f"{registry.url}?options={options}"


def test_status_json_prints_what_it_printed_before(
        registry_factory: RegistryFactory, clean_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    registry = registry_factory()
    fill(registry)
    monkeypatch.setenv("CHIFFON_DATABASE_URL", _cli_url(registry))
    monkeypatch.setattr(time, "time", lambda: NOW)
    before = [status_object(r, NOW) for r in registry.agents(with_snapshot=True)]
    assert main(["status", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("]\n") and out.count("\n") == 1, "compact: one line when piped"
    assert ordered(json.loads(out)) == ordered(before)
    assert main(["status", "--json", "--pool", "p2"]) == 0
    assert [a["agent_id"] for a in json.loads(capsys.readouterr().out)] == [
        "lost-box", "signed"]


def _run_on_a_terminal(argv: list[str], env: dict[str, str]) -> str:
    """``argv``'s stdout when it is a terminal (a pseudo-terminal), line ends as written."""
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(argv, stdout=follower, stderr=subprocess.PIPE, env=env)
    finally:
        os.close(follower)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    assert process.wait(timeout=60) == 0, process.stderr.read() if process.stderr else ""
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_status_json_is_indented_on_a_terminal_and_compact_in_a_pipe(
        sqlite_registry: Registry, clean_env: Path) -> None:
    fill(sqlite_registry)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CHIFFON_")},
           "CHIFFON_DATABASE_URL": sqlite_registry.url}
    piped = subprocess.run([*CHIFFON, "status", "--json"], env=env, capture_output=True,
                           text=True, timeout=60, check=True).stdout
    shown = _run_on_a_terminal([*CHIFFON, "status", "--json"], env)
    assert piped.count("\n") == 1
    assert shown.startswith('[\n  {\n    "agent_id": ')
    assert shown == json.dumps(json.loads(shown), indent=2) + "\n", "json.dumps(indent=2)"
    volatile = {"age_seconds", "state", "liveness", "drain"}
    assert [{k: v for k, v in a.items() if k not in volatile} for a in json.loads(shown)] == \
        [{k: v for k, v in a.items() if k not in volatile} for a in json.loads(piped)]
    helped = subprocess.run([*CHIFFON, "status", "--help"], env=env, capture_output=True,
                            text=True, timeout=60, check=True).stdout
    assert "indented on a terminal" in " ".join(helped.split())


# -- /metrics ----------------------------------------------------------------------------------

@pytest.fixture
def collector(filled: Registry) -> OrchestratorCollector:
    feeder = Feeder(filled)
    feeder.message(b"garbage", {}, "application/json", received_at=NOW)
    return OrchestratorCollector(filled, feeder.stats, clock=lambda: NOW)


def reference(collector: OrchestratorCollector, accept: str) -> tuple[bytes, str]:
    """What prometheus_client writes for ``collector`` given ``accept``, and its type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


@pytest.mark.parametrize("accept", ["", "text/plain;version=0.0.4", PROMETHEUS_ACCEPT,
                                    "application/openmetrics-text"])
def test_the_page_is_what_prometheus_client_writes_for_the_collector(
        collector: OrchestratorCollector, accept: str) -> None:
    expected, content_type = reference(collector, accept)
    encoder, _ = choose_encoder(accept)
    page = collector.page(encoder, content_type.startswith("application/openmetrics-text"))
    assert page == expected
    text = page.decode()
    assert 'hostname="we\\"ird\\\\host"' in text
    assert 'chiffon_agent_liveness{agent_id="stopped-box",hostname="host-stopped-box",' \
           'pool="desktop_pool_1",state="stopped"} 1.0' in text
    assert "chiffon_agent_gpu_power_draw_watts{" in text
    assert text.endswith("# EOF\n") == content_type.startswith("application/openmetrics")


def test_the_page_without_a_registry_says_so_as_before(collector: OrchestratorCollector
                                                       ) -> None:
    class Down:
        def agents(self) -> list[AgentRecord]:
            raise RegistryError("cannot read registry sqlite:///x: disk I/O error")

        def agent_values(self, *_args: Any) -> list[Any]:
            return self.agents()

    down = OrchestratorCollector(cast(Registry, Down()), collector.stats, clock=lambda: NOW)
    expected, _ = reference(down, "")
    assert down.page(generate_latest, False) == expected
    assert b"chiffon_registry_up 0.0\n" in expected


def _get(port: int, path: str = "/metrics", method: str = "GET", **headers: str
         ) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers,
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def served(collector: OrchestratorCollector) -> Iterator[MetricsServer]:
    server = MetricsServer(collector, 0, "127.0.0.1")
    yield server
    server.close()


@pytest.mark.parametrize("accept", ["", PROMETHEUS_ACCEPT])
@pytest.mark.parametrize("encoding", ["", "gzip"])
def test_metrics_over_http_serve_that_page_as_prometheus_asks(
        served: MetricsServer, collector: OrchestratorCollector, accept: str,
        encoding: str) -> None:
    expected, content_type = reference(collector, accept)
    status, headers, body = _get(served.port, Accept=accept, **{"Accept-Encoding": encoding})
    assert status == 200 and headers["Content-Type"] == content_type
    if encoding:
        assert headers["Content-Encoding"] == "gzip"
        body = gzip.decompress(body)
    assert body == expected


def prometheus_client_answer(collector: OrchestratorCollector, method: str, path: str
                             ) -> tuple[int, dict[str, str], bytes]:
    """What prometheus_client's own WSGI app answers for ``collector`` (as served before)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    route, _, query = path.partition("?")
    environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": route,
                               "QUERY_STRING": query}
    setup_testing_defaults(environ)
    answer: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answer.update(status=int(status[:3]), headers=dict(headers))

    body = b"".join(make_wsgi_app(registry)(environ, start_response))
    return answer["status"], answer["headers"], body


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/metrics?name[]=chiffon_agent_up"), ("GET", "/favicon.ico"),
    ("OPTIONS", "/metrics"), ("POST", "/metrics")])
def test_other_requests_are_answered_as_prometheus_client_answers_them(
        served: MetricsServer, collector: OrchestratorCollector, method: str, path: str
        ) -> None:
    status, headers, body = _get(served.port, path, method)
    expected_status, expected_headers, expected_body = prometheus_client_answer(
        collector, method, path)
    assert (status, body) == (expected_status, expected_body)
    assert expected_headers.items() <= headers.items()


@given(st.one_of(st.floats(), st.integers(min_value=-(10**18), max_value=10**18)))
def test_sample_values_are_written_as_prometheus_client_writes_them(value: float) -> None:
    written = exporter._value_text(value)
    assert written == floatToGoString(value)  # type: ignore[no-untyped-call]
    if not math.isnan(value):
        assert float(written.replace("+Inf", "inf").replace("-Inf", "-inf")) == float(value)
