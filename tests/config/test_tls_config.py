"""TLS to the broker in the config: the ``broker_tls_*`` keys become the options py-amqp,
redis-py and Celery take (``chiffon_worker/broker_tls.py``, the one place that builds
them), and what can be known at start is a ConfigError at load, in the usual
``source: key: problem`` form. Certificates come from a throwaway CA (tests/throwaway_ca.py);
nothing here talks to a broker."""

from __future__ import annotations

import os
import ssl
import subprocess
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from chiffon_worker.config import Config
from chiffon_worker.errors import ConfigError
from chiffon_worker.worker.settings import celery_settings
from tests.config.layers import load, user_file
from tests.conftest import missing_service
from tests.integration.private_rabbit import free_port
from tests.throwaway_ca import Pki, make_pki
from tests.throwaway_ca import available as ca_available

pytestmark = pytest.mark.usefixtures("clean_env")

AMQPS = "amqps://chiffon:secret@rabbit.lab:5671//"
REDISS = "rediss://:secret@redis.lab:6380/0"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    why_not = ca_available()
    if why_not:
        missing_service(why_not)
    made = make_pki(tmp_path_factory.mktemp("pki"))
    subprocess.run(["openssl", "pkey", "-in", str(made.key("client")), "-aes256", "-passout",
                    "pass:secret", "-out", str(made.key("client-encrypted"))],
                   check=True, capture_output=True, timeout=60)
    bundle = made.cert("client-with-key")
    bundle.write_bytes(made.cert("client").read_bytes() + made.key("client").read_bytes())
    return made


def tls_config(pki: Pki, **overrides: object) -> Config:
    """A config for ``AMQPS`` trusting the throwaway CA, with a client certificate."""
    settings: dict[str, object] = {
        "broker_url": AMQPS, "broker_tls_ca_file": str(pki.cert("ca")),
        "broker_tls_cert_file": str(pki.cert("client")),
        "broker_tls_key_file": str(pki.key("client"))}
    settings.update(overrides)
    return load(**settings)


def load_error(**overrides: object) -> str:
    with pytest.raises(ConfigError) as raised:
        load(**overrides)
    return str(raised.value)


# -- what the client libraries get --------------------------------------------------------------


def test_a_plain_broker_gets_no_tls_settings() -> None:
    config = load()
    settings = celery_settings(config)
    assert "broker_use_ssl" not in settings and "redis_backend_use_ssl" not in settings
    assert config.tls_to_broker.kombu_ssl(config.effective_broker_url) is False


def test_an_amqps_broker_is_verified_against_the_ca_file_and_the_urls_host(pki: Pki) -> None:
    config = tls_config(pki)
    assert config.tls_to_broker.kombu_ssl(AMQPS) == {
        "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "rabbit.lab",
        "tls_minimum_version": ssl.TLSVersion.TLSv1_2, "ca_certs": str(pki.cert("ca")),
        "certfile": str(pki.cert("client")), "keyfile": str(pki.key("client"))}


def test_without_a_ca_file_the_systems_trust_store_is_used_and_the_name_still_checked() -> None:
    options = load(broker_url=AMQPS).tls_to_broker.kombu_ssl(AMQPS)
    assert options == {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "rabbit.lab",
                       "tls_minimum_version": ssl.TLSVersion.TLSv1_2}


def test_the_server_name_replaces_the_host_the_certificate_must_hold(pki: Pki) -> None:
    config = tls_config(pki, broker_tls_server_name="rabbit.internal")
    options = config.tls_to_broker.kombu_ssl(AMQPS)
    assert isinstance(options, dict) and options["server_hostname"] == "rabbit.internal"


def test_tls13_as_the_minimum_reaches_py_amqp_and_redis_py(pki: Pki) -> None:
    tls = tls_config(pki, broker_tls_min_version="TLSv1.3").tls_to_broker
    amqp = tls.kombu_ssl(AMQPS)
    assert isinstance(amqp, dict)
    assert amqp["tls_minimum_version"] == ssl.TLSVersion.TLSv1_3
    assert tls.redis_options()["ssl_min_version"] == ssl.TLSVersion.TLSv1_3


def test_each_connection_gets_a_dict_of_its_own(pki: Pki) -> None:
    tls = tls_config(pki).tls_to_broker  # kombu writes server_hostname into the dict it gets
    assert tls.kombu_ssl(AMQPS) is not tls.kombu_ssl(AMQPS)


def test_the_agents_celery_settings_carry_the_broker_tls_options(pki: Pki) -> None:
    config = tls_config(pki)
    settings = celery_settings(config)
    assert settings["broker_use_ssl"] == config.tls_to_broker.kombu_ssl(AMQPS)
    assert "redis_backend_use_ssl" not in settings  # results go back over rpc://


def test_broker_tls_yes_builds_an_amqps_url_from_the_rabbitmq_keys(pki: Pki) -> None:
    config = load(broker_tls="yes", rabbitmq_host="rabbit.lab", rabbitmq_port=5671,
                  broker_tls_ca_file=str(pki.cert("ca")))
    assert config.effective_broker_url == "amqps://guest:guest@rabbit.lab:5671//"
    assert "broker_use_ssl" in celery_settings(config)


def test_a_rediss_broker_gets_redis_py_ssl_arguments_for_broker_and_result_backend(
        pki: Pki) -> None:
    config = tls_config(pki, broker_url=REDISS)
    expected = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True,
        "ssl_min_version": ssl.TLSVersion.TLSv1_2, "ssl_ca_certs": str(pki.cert("ca")),
        "ssl_certfile": str(pki.cert("client")), "ssl_keyfile": str(pki.key("client"))}
    settings = celery_settings(config)
    assert settings["broker_use_ssl"] == expected
    assert settings["redis_backend_use_ssl"] == expected  # the result backend is that Redis


def test_redis_py_takes_every_ssl_argument_built(pki: Pki) -> None:
    options = tls_config(pki, broker_url=REDISS).tls_to_broker.redis_options()
    connection = redis.SSLConnection(host="redis.lab", port=6380, **options)
    assert connection.cert_reqs == ssl.CERT_REQUIRED
    assert connection.check_hostname is True
    assert connection.ca_certs == str(pki.cert("ca"))


def test_celerys_redis_result_backend_over_rediss_verifies_the_certificate(pki: Pki) -> None:
    config = tls_config(pki, broker_url=REDISS)
    app = Celery("t-tls", set_as_current=False)
    app.config_from_object(celery_settings(config))
    try:
        params = app.backend.connparams  # built without connecting
        assert params["connection_class"] is redis.SSLConnection
        assert params["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        assert params["ssl_ca_certs"] == str(pki.cert("ca"))
    finally:
        app.close()


def test_a_refused_connection_is_an_outage_not_a_tls_failure(pki: Pki) -> None:
    url = f"amqps://guest:guest@127.0.0.1:{free_port()}//"
    tls = tls_config(pki, broker_url=url).tls_to_broker
    conn = Connection(url, ssl=tls.kombu_ssl(url), connect_timeout=2)
    with pytest.raises(OperationalError) as raised:  # kombu's, caused by the refusal
        conn.ensure_connection(max_retries=0)
    conn.release()
    assert tls.refusal(url, raised.value) is None


# -- what stops the config at load ------------------------------------------------------------


def test_a_missing_ca_file_names_the_file_the_key_was_set_in(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "lab-ca.pem"
    path = user_file(f"broker_url: {AMQPS}\nbroker_tls_ca_file: {missing}\n")
    with pytest.raises(ConfigError) as raised:
        load()
    assert str(raised.value) == f"{path}: broker_tls_ca_file: {missing} does not exist"


def test_a_key_file_that_cannot_be_read_is_rejected(pki: Pki, tmp_path: Path) -> None:
    directory = tmp_path / "client.key"
    directory.mkdir()
    assert load_error(broker_url=AMQPS, broker_tls_cert_file=str(pki.cert("client")),
                      broker_tls_key_file=str(directory)) == (
        f"argument: broker_tls_key_file: cannot read {directory}: Is a directory")


@pytest.mark.skipif(os.geteuid() == 0 and not os.environ.get("CHIFFON_TEST_AS_USER"),
                    reason="root reads every file regardless of mode")
def test_a_key_file_without_read_permission_is_rejected(
        pki: Pki, tmp_path: Path) -> None:  # pragma: no cover - non-root
    key = tmp_path / "client.key"
    key.write_bytes(pki.key("client").read_bytes())
    key.chmod(0)
    assert load_error(broker_url=AMQPS, broker_tls_cert_file=str(pki.cert("client")),
                      broker_tls_key_file=str(key)) == (
        f"argument: broker_tls_key_file: cannot read {key}: Permission denied")


def test_a_key_that_does_not_match_the_certificate_is_rejected_without_showing_it(
        pki: Pki) -> None:
    message = load_error(broker_url=AMQPS, broker_tls_cert_file=str(pki.cert("client")),
                         broker_tls_key_file=str(pki.key("server")))
    assert message == (f"argument: broker_tls_key_file: {pki.key('server')} does not match the "
                       f"certificate in broker_tls_cert_file {pki.cert('client')}")
    secret_lines = pki.key("server").read_text().splitlines()[1:-1]
    assert not any(line in message for line in secret_lines)


def test_an_encrypted_key_is_rejected_without_asking_for_a_passphrase(pki: Pki) -> None:
    encrypted = pki.key("client-encrypted")
    assert load_error(broker_url=AMQPS, broker_tls_cert_file=str(pki.cert("client")),
                      broker_tls_key_file=str(encrypted)) == (
        f"argument: broker_tls_key_file: {encrypted} is encrypted (passphrase-protected); "
        f"chiffon needs an unencrypted key readable only by its own user (openssl pkey -in "
        f"KEY -out NEWKEY)")


def test_a_ca_file_without_a_certificate_is_rejected(pki: Pki) -> None:
    not_a_ca = pki.key("client")
    assert load_error(broker_url=AMQPS, broker_tls_ca_file=str(not_a_ca)) == (
        f"argument: broker_tls_ca_file: {not_a_ca} holds no PEM certificate "
        f"(-----BEGIN CERTIFICATE-----)")


def test_a_key_without_its_certificate_is_rejected(pki: Pki) -> None:
    assert load_error(broker_url=AMQPS, broker_tls_key_file=str(pki.key("client"))) == (
        "argument: broker_tls_key_file: is set without broker_tls_cert_file (the "
        "certificate it belongs to)")


def test_a_certificate_without_a_key_asks_for_the_key_file(pki: Pki) -> None:
    assert load_error(broker_url=AMQPS, broker_tls_cert_file=str(pki.cert("client"))) == (
        f"argument: broker_tls_cert_file: {pki.cert('client')} holds no private key; set "
        f"broker_tls_key_file")


def test_a_certificate_file_that_holds_its_key_needs_no_key_file(pki: Pki) -> None:
    bundle = pki.cert("client-with-key")
    options = load(broker_url=AMQPS, broker_tls_cert_file=str(bundle)).tls_to_broker \
        .kombu_ssl(AMQPS)
    assert isinstance(options, dict)
    assert (options["certfile"], options["keyfile"]) == (str(bundle), None)


def test_tls_files_with_a_url_without_tls_are_refused(pki: Pki) -> None:
    assert load_error(broker_url="amqp://guest:guest@rabbit.lab:5672//",
                      broker_tls_ca_file=str(pki.cert("ca"))) == (
        "argument: broker_tls_ca_file: is set, but the broker URL is amqp:// without TLS "
        "(write amqps:// or rediss://, or set broker_tls: yes)")


def test_broker_tls_yes_with_a_plain_broker_url_is_refused() -> None:
    assert load_error(broker_tls="yes", broker_url="redis://127.0.0.1:6379/0") == (
        "argument: broker_tls: is yes, but the broker URL is redis:// (write amqps:// or "
        "rediss://)")


def test_a_failover_list_of_several_hosts_over_tls_needs_a_server_name() -> None:
    urls = "amqps://guest:guest@rabbit1.lab//;amqps://guest:guest@rabbit2.lab//"
    assert load_error(broker_url=urls).startswith(
        "argument: broker_tls_server_name: is needed with a failover list of several hosts "
        "over TLS")
    assert load(broker_url=urls, broker_tls_server_name="rabbit.lab").tls_to_broker \
        .server_name_for(urls) == "rabbit.lab"


def test_a_server_name_other_than_the_host_is_refused_with_redis() -> None:
    assert load_error(broker_url=REDISS, broker_tls_server_name="redis.internal") == (
        "argument: broker_tls_server_name: cannot be used with Redis (redis-py checks the "
        "certificate against the host in broker_url): put that name in broker_url")


@pytest.mark.parametrize(("option", "instead"), [
    ("ssl_ca_certs", "broker_tls_ca_file"),
    ("ssl_certfile", "broker_tls_cert_file"),
    ("ssl_keyfile", "broker_tls_key_file"),
    ("ssl_cert_reqs", "the broker_tls_* keys"),
])
def test_tls_options_in_the_url_are_refused_naming_the_key_to_use(option: str,
                                                                  instead: str) -> None:
    assert load_error(broker_url=f"{AMQPS}?{option}=/etc/x.pem") == (
        f"argument: broker_url: TLS options in the URL are not supported (?{option}=); set "
        f"{instead} in the config instead (docs/security.md)")


def test_an_unknown_url_option_is_refused_instead_of_crashing_kombu() -> None:
    assert load_error(broker_url="amqp://guest:guest@127.0.0.1:5672//?frame_max=1") == (
        "argument: broker_url: URL option 'frame_max' is not supported (supported: "
        "heartbeat, connect_timeout, login_method)")


def test_url_options_kombu_takes_are_kept() -> None:
    url = "amqp://guest:guest@127.0.0.1:5672//?heartbeat=30"
    assert load(broker_url=url).effective_broker_url == url


def test_an_unknown_minimum_tls_version_is_refused() -> None:
    assert load_error(broker_tls_min_version="TLSv1.1") == (
        "argument: broker_tls_min_version: must be one of TLSv1.2, TLSv1.3 (got 'TLSv1.1')")
