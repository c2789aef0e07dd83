"""The agent's Celery settings as ``inspect conf`` answers (Flower's Config tab): secrets
masked and nothing else, no Python reprs."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.schedules import schedule
from celery.worker.control import Panel

from chiffon_worker.config import Config
from chiffon_worker.wire import HEARTBEAT_QUEUE, HEARTBEAT_TASK
from chiffon_worker.worker.control import chiffon_conf, register_control_commands
from chiffon_worker.worker.settings import celery_settings
from chiffon_worker.worker.shown_settings import MASK, shown_settings

BROKER = "amqp://agent:broker-pw@rabbit.lab:5672/chiffon"
RESULTS = "redis://:results-pw@redis.lab:6379/1"
POOL = "gpu_pool"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Celery]:
    """A Celery app configured exactly as an agent's is (nothing connects)."""
    config = Config(environ={}, home=tmp_path, broker_url=BROKER, result_backend=RESULTS,
                    agent_pool_name=POOL, heartbeat_secret="hb-secret",
                    state_dir=str(tmp_path / "state"))
    made = Celery("t-shown", set_as_current=False)
    made.config_from_object(celery_settings(config))
    yield made
    made.close()


def _shown(app: Celery) -> dict[str, Any]:
    return shown_settings(app.conf.table(censored=False))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_routing_keys_exchanges_and_queues_are_shown_as_they_are(app: Celery) -> None:
    shown = _shown(app)
    assert (shown["task_default_routing_key"], shown["task_default_exchange"],
            shown["task_default_queue"]) == (POOL, POOL, POOL)
    route = shown["task_routes"][HEARTBEAT_TASK]
    assert (route["routing_key"], route["exchange"], route["queue"]["name"]) == (
        HEARTBEAT_QUEUE, HEARTBEAT_QUEUE, HEARTBEAT_QUEUE)


def test_queues_show_their_binding_and_declaration(app: Celery) -> None:
    pool_queue = _shown(app)["task_queues"][0]
    assert pool_queue == {"name": POOL, "exchange": POOL, "exchange_type": "direct",
                          "routing_key": POOL, "durable": True, "queue_arguments": None}


def test_classes_are_shown_by_import_path_not_repr(app: Celery) -> None:
    shown = _shown(app)
    assert shown["worker_consumer"] == "chiffon_worker.worker.consumer:Consumer"
    assert shown["beat_scheduler"] == "chiffon_worker.worker.beat:HeartbeatScheduler"


def test_no_value_is_a_python_repr(app: Celery) -> None:
    shown = _shown(app)
    reprs = [text for text in _strings(shown) if text.startswith("<") or " at 0x" in text]
    assert reprs == []
    assert json.loads(json.dumps(shown)) == shown


def test_broker_and_result_urls_show_no_password(app: Celery) -> None:
    shown = _shown(app)
    assert shown["broker_url"] == f"amqp://agent:{MASK}@rabbit.lab:5672/chiffon"
    assert shown["result_backend"] == f"redis://:{MASK}@redis.lab:6379/1"
    assert not [text for text in _strings(shown) if "-pw" in text]


def test_every_url_of_a_failover_list_is_masked() -> None:
    shown = shown_settings({"broker_url": "amqp://u:p1@a:5672//;amqp://u:p2@b:5672//"})
    assert shown["broker_url"] == f"amqp://u:{MASK}@a:5672//;amqp://u:{MASK}@b:5672//"


@pytest.mark.parametrize("name", ["heartbeat_secret", "security_key_password",
                                  "s3_secret_access_key", "redis_password",
                                  "azureblockblob_connection_string", "api_token",
                                  "security_key"])
def test_a_setting_named_as_a_secret_is_masked(name: str) -> None:
    assert shown_settings({name: "s3cr3t"}) == {name: MASK}


def test_a_secret_nested_in_options_is_masked_and_its_neighbours_are_not() -> None:
    shown = shown_settings({"broker_transport_options": {
        "sentinel_kwargs": {"password": "s3cr3t"}, "visibility_timeout": 3600}})
    assert shown["broker_transport_options"] == {
        "sentinel_kwargs": {"password": MASK}, "visibility_timeout": 3600}


def test_an_unset_secret_shows_as_unset() -> None:
    assert shown_settings({"heartbeat_secret": "", "security_key": None}) == {
        "heartbeat_secret": "", "security_key": None}


def test_a_function_is_shown_by_import_path() -> None:
    assert shown_settings({"task_routes_fn": celery_settings}) == {
        "task_routes_fn": "chiffon_worker.worker.settings:celery_settings"}


def test_an_object_without_a_readable_text_is_shown_by_its_type() -> None:
    class Opaque:
        pass

    shown = shown_settings({"worker_thing": Opaque()})["worker_thing"]
    assert not shown.startswith("<") and shown.endswith("Opaque")


def test_tls_options_show_their_names_and_file_paths() -> None:
    shown = shown_settings({"broker_use_ssl": {
        "cert_reqs": ssl.CERT_REQUIRED, "tls_minimum_version": ssl.TLSVersion.TLSv1_2,
        "keyfile": "/etc/chiffon/tls/agent.key", "ca_certs": "/etc/chiffon/tls/ca.pem"}})
    assert shown["broker_use_ssl"] == {
        "cert_reqs": "CERT_REQUIRED", "tls_minimum_version": "TLSv1_2",
        "keyfile": "/etc/chiffon/tls/agent.key", "ca_certs": "/etc/chiffon/tls/ca.pem"}


def test_a_schedule_is_shown_by_what_its_text_says() -> None:
    shown = shown_settings({"beat_schedule": {"hb": {"schedule": schedule(30.0)}}})
    assert shown["beat_schedule"]["hb"]["schedule"] == "freq: 30.00 seconds"


def test_the_conf_inspect_command_answers_with_the_shown_settings(app: Celery) -> None:
    register_control_commands()
    assert Panel.data["conf"] is chiffon_conf and Panel.data["dump_conf"] is chiffon_conf

    class State:  # what Celery passes a command: here only the app is used
        pass

    state = State()
    state.app = app  # type: ignore[attr-defined]
    assert chiffon_conf(state) == _shown(app)
