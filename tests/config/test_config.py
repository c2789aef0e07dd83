"""Config: layering, precedence, validation and safety."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from chiffon_worker.config import Config, derive_agent_id, mask_url
from chiffon_worker.errors import ConfigError
from tests.config.layers import load, user_file, write

pytestmark = pytest.mark.usefixtures("clean_env")

def test_defaults_match_the_design() -> None:
    config = load()
    assert config.heartbeat_interval_seconds == 30
    assert config.heartbeat_timeout_seconds == 90
    assert config.gpu_detection_timeout_seconds == 5
    assert config.agent_pool_name == "desktop_pool_1"
    assert config.sysfs_root == "/sys"
    assert config.effective_broker_url == "amqp://guest:guest@127.0.0.1:5672//"
    assert config.effective_result_backend == "rpc://"
    assert config.sources["heartbeat_interval_seconds"] == "default"


def test_user_file_sets_interval() -> None:
    path = user_file("heartbeat_interval_seconds: 60\n")
    config = load()
    assert config.heartbeat_interval_seconds == 60
    assert config.sources["heartbeat_interval_seconds"] == str(path)
    assert config.files_loaded == (str(path),)


def test_short_env_name_sets_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHIFFON_HEARTBEAT_INTERVAL", "45")
    config = load()
    assert config.heartbeat_interval_seconds == 45
    assert config.sources["heartbeat_interval_seconds"] == "environment CHIFFON_HEARTBEAT_INTERVAL"


def test_long_env_name_wins_over_short_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHIFFON_HEARTBEAT_INTERVAL", "45")
    monkeypatch.setenv("CHIFFON_HEARTBEAT_INTERVAL_SECONDS", "50")
    assert load().heartbeat_interval_seconds == 50


def test_precedence_ladder_each_layer_overrides_the_one_below(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = write(tmp_path / "etc" / "agent.yml",
                   "agent_pool_name: from_system\nrabbitmq_host: sys.lab\n"
                   "rabbitmq_port: 5601\nrabbitmq_user: sysuser\n")
    user = user_file("agent_pool_name: from_user\nrabbitmq_host: user.lab\n"
                     "rabbitmq_port: 5602\n")
    explicit = write(tmp_path / "explicit.yml",
                     "agent_pool_name: from_explicit\nrabbitmq_host: explicit.lab\n")
    monkeypatch.setenv("CHIFFON_CONFIG", str(explicit))
    monkeypatch.setenv("CHIFFON_AGENT_POOL_NAME", "from_env")
    config = Config(system_file=system)
    assert config.agent_pool_name == "from_env"
    assert config.rabbitmq_host == "explicit.lab"
    assert config.rabbitmq_port == 5602
    assert config.rabbitmq_user == "sysuser"
    assert config.rabbitmq_vhost == "/"
    assert config.sources["agent_pool_name"] == "environment CHIFFON_AGENT_POOL_NAME"
    assert config.sources["rabbitmq_host"] == str(explicit)
    assert config.sources["rabbitmq_port"] == str(user)
    assert config.sources["rabbitmq_user"] == str(system)
    assert config.files_loaded == (str(system), str(user), str(explicit))


def test_arguments_override_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHIFFON_AGENT_POOL_NAME", "from_env")
    assert load(agent_pool_name="pinned").agent_pool_name == "pinned"


def test_config_is_read_only() -> None:
    config = load()
    with pytest.raises(AttributeError):
        config.heartbeat_interval_seconds = 1  # type: ignore[misc]


def test_blank_agent_id_is_a_stable_uuid_and_hostname_is_kept() -> None:
    first, second = load(), load()
    assert first.agent_id == second.agent_id
    assert len(first.agent_id) == 36 and first.agent_id.count("-") == 4
    assert first.hostname
    assert first.sources["agent_id"] == "derived from machine-id and hostname"


def test_clones_sharing_a_machine_id_but_not_a_hostname_derive_different_ids() -> None:
    machine_id = "0123456789abcdef0123456789abcdef"
    assert derive_agent_id(machine_id, "rig-a") != derive_agent_id(machine_id, "rig-b")


def test_the_derived_id_is_stable_for_one_machine_id_and_hostname() -> None:
    machine_id = "0123456789abcdef0123456789abcdef"
    assert derive_agent_id(machine_id, "rig-a") == derive_agent_id(machine_id, "rig-a")
    assert derive_agent_id(machine_id, "rig-a") != derive_agent_id("f" * 32, "rig-a")


def test_agent_id_env_short_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHIFFON_AGENT_ID", "rig-7")
    config = load()
    assert config.agent_id == "rig-7"
    assert config.agent_queue == "chiffon.agent.rig-7"


def test_broker_url_wins_over_rabbitmq_keys_and_redis_gets_redis_results() -> None:
    config = load(broker_url="redis://127.0.0.1:6379/3", rabbitmq_host="ignored")
    assert config.effective_broker_url == "redis://127.0.0.1:6379/3"
    assert config.effective_result_backend == "redis://127.0.0.1:6379/3"


def test_rabbitmq_keys_are_quoted_into_the_url() -> None:
    config = load(rabbitmq_user="u", rabbitmq_password="p@ss/w:rd", rabbitmq_vhost="lab")
    assert config.effective_broker_url == "amqp://u:p%40ss%2Fw%3Ard@127.0.0.1:5672/lab"


def test_masked_view_hides_passwords() -> None:
    config = load(rabbitmq_password="hunter2", database_url="postgresql://me:hunter2@db/x",
                  heartbeat_secret="s3cret")
    shown = repr(config.masked())
    assert "hunter2" not in shown and "s3cret" not in shown
    assert config.masked()["database_url"] == "postgresql://me:**@db/x"


def test_mask_url_keeps_user_host_and_port() -> None:
    assert mask_url("amqp://guest:guest@127.0.0.1:5672//") == "amqp://guest:**@127.0.0.1:5672//"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_mask_url_masks_every_url_of_a_failover_list() -> None:
    url = "amqp://u:one@10.0.0.1:5672//;amqp://u:two@10.0.0.2:5673//"
    assert mask_url(url) == "amqp://u:**@10.0.0.1:5672//;amqp://u:**@10.0.0.2:5673//"


def test_a_failover_list_of_cluster_nodes_is_a_valid_broker_url() -> None:
    url = "amqp://guest:guest@127.0.0.1:5681//;amqp://guest:guest@127.0.0.1:5682//"
    assert load(broker_url=url).effective_broker_url == url


def test_queue_type_defaults_to_classic_and_accepts_quorum_on_rabbitmq() -> None:
    assert load().queue_type == "classic"
    assert load(queue_type="quorum").queue_type == "quorum"


def test_quorum_queues_on_a_redis_broker_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"queue_type.*need a RabbitMQ broker.*redis://"):
        load(queue_type="quorum", broker_url="redis://127.0.0.1:6379/0")


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("heartbeat_interval_seconds: fast\n", "heartbeat_interval_seconds", "expected a number"),
        ("heartbeat_interval_seconds: 0\n", "heartbeat_interval_seconds", "between"),
        ("heartbeat_interval_seconds: -5\n", "heartbeat_interval_seconds", "between"),
        ("heartbeat_timeout_seconds: 10\n", "heartbeat_timeout_seconds", "shorter than"),
        ("gpu_detection_timeout_seconds: 0\n", "gpu_detection_timeout_seconds", "between"),
        ("rabbitmq_port: 70000\n", "rabbitmq_port", "between"),
        ("rabbitmq_port: 56.5\n", "rabbitmq_port", "whole number"),
        ("agent_pool_name: ''\n", "agent_pool_name", "must not be blank"),
        ("agent_pool_name: 'has space'\n", "agent_pool_name", "letters, digits"),
        ("agent_id: 'bad/id'\n", "agent_id", "letters, digits"),
        ("broker_url: 'http://x'\n", "broker_url", "scheme 'http'"),
        ("heartbeat_interval_seconds: true\n", "heartbeat_interval_seconds",
         "expected a number"),
        ("heartbeat_interval_seconds:\n", "heartbeat_interval_seconds", "has no value"),
        ("agent_pool_name: [a, b]\n", "agent_pool_name", "expected text"),
        ("worker_pool: gevent\n", "worker_pool", "must be one of"),
        ("queue_type: stream\n", "queue_type", "must be one of classic, quorum"),
        ("broker_url: 'amqp://a//;http://b'\n", "broker_url",
         "URL 2 of the failover list: scheme 'http'"),
        ("broker_url: 'amqp://a//;'\n", "broker_url", "URL 2 of the failover list is blank"),
        ("broker_url: 'amqp://a//;redis://b/0'\n", "broker_url", "mixes schemes"),
    ],
)
def test_invalid_value_names_file_and_key(text: str, key: str, problem: str) -> None:
    path = user_file(text)
    with pytest.raises(ConfigError) as raised:
        load()
    message = str(raised.value)
    assert str(path) in message
    assert key in message
    assert problem in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: [1, 2\nb: 3\n", "invalid YAML at line"),
        ("- 1\n- 2\n", "must be a mapping"),
        ("just a string\n", "must be a mapping"),
        ("x: !!python/object/apply:os.system ['echo PWNED']\n", "invalid YAML"),
    ],
)
def test_malformed_file_names_the_file(text: str, problem: str) -> None:
    path = user_file(text)
    with pytest.raises(ConfigError) as raised:
        load()
    assert str(raised.value).startswith(f"{path}: ")
    assert problem in str(raised.value)


def test_non_utf8_file_is_rejected_with_its_name() -> None:
    path = Path(os.environ["HOME"]) / ".chiffon" / "agent.yml"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"agent_pool_name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load()


@pytest.mark.skipif(os.geteuid() == 0 and not os.environ.get("CHIFFON_TEST_AS_USER"),
                    reason="root reads every file regardless of mode")
def test_unreadable_file_is_rejected_with_its_name() -> None:  # pragma: no cover - non-root
    path = user_file("agent_pool_name: x\n")
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot read"):
        load()


def test_unreadable_directory_as_file_is_rejected(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "dir.yml"
    directory.mkdir()
    system = directory  # a directory where a file should be
    with pytest.raises(ConfigError, match="cannot read"):
        Config(system_file=system)


def test_invalid_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHIFFON_HEARTBEAT_INTERVAL", "soon")
    with pytest.raises(ConfigError) as raised:
        load()
    assert str(raised.value).startswith("environment CHIFFON_HEARTBEAT_INTERVAL: "
                                        "heartbeat_interval_seconds: expected a number")


def test_missing_explicit_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("CHIFFON_CONFIG", str(tmp_path / "nope.yml"))
    with pytest.raises(ConfigError, match=r"CHIFFON_CONFIG: .*nope\.yml does not exist"):
        load()


def test_unknown_key_warns_with_closest_match(caplog: pytest.LogCaptureFixture) -> None:
    user_file("heartbeat_intervl_seconds: 10\n")
    with caplog.at_level(logging.WARNING):
        config = load()
    assert config.heartbeat_interval_seconds == 30
    assert "unknown key 'heartbeat_intervl_seconds'" in caplog.text
    assert "did you mean 'heartbeat_interval_seconds'" in caplog.text


def test_unknown_env_variable_warns(monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CHIFFON_AGENT_POOL", "x")
    with caplog.at_level(logging.WARNING):
        load()
    assert "CHIFFON_AGENT_POOL" in caplog.text


def test_unsafe_yaml_loader_env_is_ignored(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    user_file(f"agent_pool_name: !!python/object/apply:os.system ['touch {marker}']\n")
    monkeypatch.setenv("YAML_LOADER_FOR_DYNACONF", "load")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load()
    assert not marker.exists()


def test_empty_file_is_fine() -> None:
    user_file("")
    assert load().heartbeat_interval_seconds == 30
