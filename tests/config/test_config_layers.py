"""The layers: only our four files and our variables, stacked in dynaconf, values kept as data.

Each test pins one way dynaconf's own file and environment handling would differ (see the
module docstring of chiffon_worker.config): those parts are ours on purpose.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from chiffon_worker.config import Config
from chiffon_worker.errors import ConfigError
from tests.config.layers import load, user_file, write

pytestmark = pytest.mark.usefixtures("clean_env")

def test_source_of_a_key_is_the_strongest_layer_that_set_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = user_file("rabbitmq_host: mq.lab\nrabbitmq_port: 5673\n")
    monkeypatch.setenv("CHIFFON_RABBITMQ_PORT", "5674")
    config = load(rabbitmq_user="pinned")
    assert config.sources["rabbitmq_host"] == str(path)
    assert config.sources["rabbitmq_port"] == "environment CHIFFON_RABBITMQ_PORT"
    assert config.sources["rabbitmq_user"] == "argument"
    assert config.sources["rabbitmq_vhost"] == "default"
    assert config.sources["hostname"] == "system"


def test_a_file_named_twice_is_read_once_where_it_is_strongest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = write(tmp_path / "shared.yml", "agent_pool_name: from_shared\n")
    user = user_file("agent_pool_name: from_user\n")
    monkeypatch.setenv("CHIFFON_CONFIG", str(shared))
    config = Config(system_file=shared)
    assert config.agent_pool_name == "from_shared"
    assert config.sources["agent_pool_name"] == str(shared)
    assert config.files_loaded == (str(user), str(shared))


def test_environ_argument_replaces_the_process_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHIFFON_AGENT_POOL_NAME", "from_process")
    config = load(environ={"CHIFFON_AGENT_POOL_NAME": "given"})
    assert config.agent_pool_name == "given"
    assert config.sources["agent_pool_name"] == "environment CHIFFON_AGENT_POOL_NAME"


@pytest.mark.parametrize("text", ["true", "1_000", '"quoted"', "2024-01-01", "[a, b]", "@int 5"])
def test_environment_values_are_literal_text(monkeypatch: pytest.MonkeyPatch,
                                             text: str) -> None:
    monkeypatch.setenv("CHIFFON_RABBITMQ_PASSWORD", text)
    assert load().rabbitmq_password == text


def test_dynaconf_prefixed_variables_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNACONF_AGENT_POOL_NAME", "sneaky")
    assert load().agent_pool_name == "desktop_pool_1"


@pytest.mark.parametrize("text", ['"@int 5"', '"@format {this.agent_id}"', '"@json [1]"'])
def test_yaml_tokens_in_a_file_stay_text(text: str) -> None:
    user_file(f"rabbitmq_password: {text}\n")
    assert load().rabbitmq_password == text.strip('"')


def test_dynaconf_switches_in_the_environment_cannot_make_yaml_values_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "name", "gpu_rigs")
    user_file(f'agent_pool_name: "@read_file {tmp_path / "name"}"\n')
    monkeypatch.setenv("AUTO_CAST_FOR_DYNACONF", "true")
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError, match="letters, digits"):
        load()
    assert "ignoring AUTO_CAST_FOR_DYNACONF in the environment" in caplog.text
    assert "AUTO_CAST_FOR_DYNACONF" not in os.environ


def test_dynaconf_nested_separator_in_the_environment_does_not_split_keys(
        monkeypatch: pytest.MonkeyPatch) -> None:
    user_file("heartbeat_interval_seconds: 60\n")
    monkeypatch.setenv("NESTED_SEPARATOR_FOR_DYNACONF", "_")
    assert load().heartbeat_interval_seconds == 60


def test_a_local_sibling_of_a_config_file_is_not_read() -> None:
    path = user_file("heartbeat_interval_seconds: 60\n")
    write(path.with_name("agent.local.yml"), "agent_pool_name: from_local\n")
    config = load()
    assert config.agent_pool_name == "desktop_pool_1"
    assert config.files_loaded == (str(path),)


def test_dynaconf_include_in_a_file_is_an_unknown_key_not_followed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    other = write(tmp_path / "other.yml", "agent_pool_name: included\n")
    user_file(f"dynaconf_include: ['{other}']\n")
    with caplog.at_level(logging.WARNING):
        config = load()
    assert config.agent_pool_name == "desktop_pool_1"
    assert "unknown key 'dynaconf_include' ignored" in caplog.text


def test_explicit_config_file_may_have_any_name(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "agent.conf", "agent_pool_name: gpu_rigs\n")
    monkeypatch.setenv("CHIFFON_CONFIG", str(path))
    config = load()
    assert config.agent_pool_name == "gpu_rigs"
    assert config.files_loaded == (str(path),)


def test_explicit_config_path_is_expanded_from_the_home_directory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    write(Path(os.environ["HOME"]) / "lab.yml", "agent_pool_name: gpu_rigs\n")
    monkeypatch.setenv("CHIFFON_CONFIG", "~/lab.yml")
    assert load().agent_pool_name == "gpu_rigs"


def test_a_wrong_type_is_an_error_in_its_own_layer_even_when_overridden(
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = user_file("rabbitmq_port: five\n")
    monkeypatch.setenv("CHIFFON_RABBITMQ_PORT", "5672")
    with pytest.raises(ConfigError) as raised:
        load()
    assert str(raised.value) == (f"{path}: rabbitmq_port: expected a number, got 'five'")


def test_a_failed_check_names_the_layer_the_effective_value_came_from(
        monkeypatch: pytest.MonkeyPatch) -> None:
    user_file("worker_concurrency: 4\n")
    monkeypatch.setenv("CHIFFON_WORKER_CONCURRENCY", "0")
    with pytest.raises(ConfigError) as raised:
        load()
    assert str(raised.value) == ("environment CHIFFON_WORKER_CONCURRENCY: worker_concurrency: "
                                 "must be between 1 and 1024 (got 0)")


def test_a_failed_check_on_a_secret_does_not_show_it() -> None:
    with pytest.raises(ConfigError) as raised:
        load(database_url="mysql://me:hunter2@db/x")
    assert "hunter2" not in str(raised.value)
    assert "mysql://me:**@db/x" in str(raised.value)
