"""Each setting is declared once, as a field of Config; everything else derives from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import pytest

from chiffon_worker.config import ENV_ALIASES, KEYS, SECRET_KEYS, URL_KEYS, Config
from chiffon_worker.settings_spec import InvalidValue, coerce, declared_keys, setting
from chiffon_worker.wire import agent_queue_name
from tests.config.layers import NO_SYSTEM

pytestmark = pytest.mark.usefixtures("clean_env")

NOT_SETTINGS = {"hostname", "sources", "files_loaded"}


def test_keys_are_exactly_the_setting_fields_of_config_in_declaration_order() -> None:
    assert list(KEYS) == [f.name for f in fields(Config) if f.name not in NOT_SETTINGS]


def test_each_key_has_the_type_of_its_annotation() -> None:
    config = Config(system_file=NO_SYSTEM)
    for name, key in KEYS.items():
        assert type(getattr(config, name)) is key.type, name


def test_defaults_come_from_the_field_declarations() -> None:
    config = Config(system_file=NO_SYSTEM, agent_id="rig-1", state_dir="/srv/state")
    for name, key in KEYS.items():
        if config.sources[name] == "default":
            assert getattr(config, name) == key.default, name


def test_a_default_of_the_wrong_type_is_refused_at_declaration() -> None:
    @dataclass(frozen=True)
    class Bad:
        port: int = setting(5672.5, "a port")

    with pytest.raises(TypeError, match=r"default 5672\.5 is not int"):
        declared_keys(Bad)


def test_an_unsupported_setting_type_is_refused_at_declaration() -> None:
    @dataclass(frozen=True)
    class Bad:
        hosts: tuple[str, ...] = setting(("a",), "hosts")

    with pytest.raises(TypeError, match="unsupported type"):
        declared_keys(Bad)


def test_environment_names_are_the_aliases_then_the_long_form() -> None:
    assert KEYS["heartbeat_interval_seconds"].env_names == (
        "CHIFFON_HEARTBEAT_INTERVAL", "CHIFFON_HEARTBEAT_INTERVAL_SECONDS")
    assert KEYS["rabbitmq_port"].env_names == ("CHIFFON_RABBITMQ_PORT",)


def test_env_aliases_are_derived_from_the_declarations() -> None:
    assert dict(ENV_ALIASES) == {"CHIFFON_HEARTBEAT_INTERVAL": "heartbeat_interval_seconds",
                                 "CHIFFON_AGENT_ID": "agent_id"}


def test_secret_and_url_keys_are_derived_from_the_declarations() -> None:
    assert frozenset({"rabbitmq_password", "heartbeat_secret", "heartbeat_key",
                      "heartbeat_lab_secret", "heartbeat_lab_secret_previous"}) == SECRET_KEYS
    assert frozenset({"broker_url", "result_backend", "database_url"}) == URL_KEYS


def test_every_key_has_a_doc_and_every_seconds_key_the_unit_s() -> None:
    for name, key in KEYS.items():
        assert key.spec.doc, name
        assert (key.spec.unit == "s") == name.endswith("_seconds"), name


def test_masked_shows_a_blank_secret_as_blank_and_a_set_one_as_stars() -> None:
    shown = Config(system_file=NO_SYSTEM, rabbitmq_password="hunter2").masked()
    assert shown["rabbitmq_password"] == "**"
    assert shown["heartbeat_secret"] == ""


def test_masked_lists_every_key_then_the_hostname() -> None:
    assert list(Config(system_file=NO_SYSTEM).masked()) == [*KEYS, "hostname"]


def test_repr_of_config_shows_no_secret() -> None:
    shown = repr(Config(system_file=NO_SYSTEM, rabbitmq_password="hunter2",
                        heartbeat_secret="s3cret", result_backend="redis://:pw1@r:6379/1"))
    assert "hunter2" not in shown and "s3cret" not in shown and "pw1" not in shown
    assert "rabbitmq_password='**'" in shown


def test_unknown_argument_is_a_type_error_with_the_closest_key() -> None:
    with pytest.raises(TypeError, match=r"unknown setting 'rabbitmq_pasword'; did you mean "
                                        r"'rabbitmq_password'\?"):
        Config(system_file=NO_SYSTEM, rabbitmq_pasword="x")


def test_unknown_environment_variable_warns_with_the_closest_key(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CHIFFON_RABBITMQ_PROT", "5672")
    with caplog.at_level(logging.WARNING):
        Config(system_file=NO_SYSTEM)
    assert "CHIFFON_RABBITMQ_PROT; did you mean 'rabbitmq_port'?" in caplog.text


def test_agent_queue_is_the_wire_name_of_the_agent_queue() -> None:
    config = Config(system_file=NO_SYSTEM, agent_id="rig-7")
    assert config.agent_queue == agent_queue_name("rig-7")


@pytest.mark.parametrize(("kind", "raw", "expected"), [
    (str, "  gpu_rigs \n", "gpu_rigs"),
    (str, 42, "42"),
    (float, "2.5", 2.5),
    (float, 3, 3.0),
    (int, "5672", 5672),
    (int, 5672.0, 5672),
])
def test_coerce_converts_text_and_numbers_to_the_declared_type(
        kind: type, raw: object, expected: object) -> None:
    value = coerce(kind, raw)
    assert value == expected and type(value) is kind


@pytest.mark.parametrize(("kind", "raw", "problem"), [
    (int, True, "expected a number, got True"),
    (str, False, "expected text, got bool"),
    (float, "nan", "expected a finite number"),
    (int, "0x1628", "expected a number, got '0x1628'"),
    (int, 10**400, "is too large"),
    (str, None, "has no value"),
])
def test_coerce_refuses_what_is_not_the_declared_type(kind: type, raw: object,
                                                      problem: str) -> None:
    with pytest.raises(InvalidValue, match=problem):
        coerce(kind, raw)
