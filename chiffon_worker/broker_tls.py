"""TLS to the broker: the ``broker_tls_*`` settings as each client library wants them, their
checks at load, and a failed handshake as one line.

Every connection chiffon makes to the broker takes its TLS options from
:class:`BrokerTls` (``Config.tls_to_broker``), the one place that knows them:

- :meth:`BrokerTls.kombu_ssl`: kombu's ``Connection(ssl=...)`` (the orchestrator's
  consumers, ``chiffon submit``'s first connection);
- :meth:`BrokerTls.celery_settings`: ``broker_use_ssl`` and ``redis_backend_use_ssl`` of a
  Celery app (the agent and so its heartbeats and Flower, ``chiffon submit``'s client app,
  the drain commands);
- :meth:`BrokerTls.ssl_context`: the same as an :class:`ssl.SSLContext` (the checks at load
  and the probe below);
- :meth:`BrokerTls.refusal`: a connection error that retrying cannot fix (a refused login,
  a failed TLS handshake) as :class:`~chiffon_worker.errors.BrokerLoginRefused` /
  :class:`~chiffon_worker.errors.BrokerTlsFailed`, so every entry point stops with one line
  and exit status 2 instead of retrying for ever.

TLS is on when the broker URL says ``amqps://`` or ``rediss://``. The broker's certificate
is always verified, against ``broker_tls_ca_file`` (blank: the system's trust store,
which ``SSL_CERT_FILE`` may name), and its name is always checked: against
``broker_tls_server_name``, else the host of the broker URL. py-amqp 5.4 takes TLS options
only as a dict of ``ssl`` arguments (an ``SSLContext`` is silently ignored), redis-py as
``ssl_*`` connection arguments; both are built here from the same five values.

A server that rejects the client's certificate under TLS 1.3 says so in an alert sent
*after* the client's handshake completed; the client's first write may then fail first with
a bare EOF (seen here half of the time against RabbitMQ 3.10). For such an EOF
:meth:`BrokerTls.refusal` asks the broker once more with a handshake followed by a read
(:func:`server_alert`), which always receives the alert, before it calls the fault
permanent; an EOF without an alert stays an outage (retried).
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from chiffon_worker.errors import BrokerLoginRefused, BrokerTlsFailed

#: Broker URL schemes that mean TLS.
TLS_SCHEMES = ("amqps", "rediss")
#: ``broker_tls_min_version`` values and what they mean to ``ssl``.
MIN_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
DEFAULT_MIN_VERSION = "TLSv1.2"
#: ``broker_tls`` values: TLS when the URL says so, or TLS required.
TLS_MODES = ("auto", "yes")
#: Default ports when a URL names none (kombu's and redis-py's).
DEFAULT_PORTS = {"amqps": 5671, "rediss": 6379}
#: URL query options kombu's Connection takes; any other one makes it raise TypeError.
URL_OPTIONS = ("heartbeat", "connect_timeout", "login_method")
#: How long :func:`server_alert` waits for the broker's verdict after the handshake (s).
PROBE_SECONDS = 2.0
#: The largest TLS file read at load (bytes): a CA bundle is well below it.
_MAX_FILE_BYTES = 4 << 20
#: The settings, for messages (keys of ``Config``).
CA_KEY, CERT_KEY, KEY_KEY = "broker_tls_ca_file", "broker_tls_cert_file", "broker_tls_key_file"
NAME_KEY, VERSION_KEY, MODE_KEY = ("broker_tls_server_name", "broker_tls_min_version",
                                   "broker_tls")
#: What to set instead of a TLS option in the URL.
_URL_TLS_OPTIONS = {"ssl_ca_certs": CA_KEY, "ssl_certfile": CERT_KEY, "ssl_keyfile": KEY_KEY,
                    "ssl_check_hostname": NAME_KEY, "server_hostname": NAME_KEY}

# OpenSSL's X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code).
_UNTRUSTED = frozenset({2, 18, 19, 20, 21, 24, 27})  # no issuer known, self-signed, not a CA
_NOT_YET_VALID, _EXPIRED, _REVOKED = 9, 10, 23
_NAME_MISMATCH = frozenset({62, 63, 64})  # hostname, e-mail, IP address
# OpenSSL reason codes (ssl.SSLError.reason) of a server's alerts and a port without TLS.
_CERT_REQUIRED = frozenset({"TLSV13_ALERT_CERTIFICATE_REQUIRED"})
_CLIENT_CERT_EXPIRED = frozenset({"SSLV3_ALERT_CERTIFICATE_EXPIRED"})
_CLIENT_CERT_REJECTED = frozenset({
    "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "TLSV1_ALERT_ACCESS_DENIED", "TLSV1_ALERT_DECRYPT_ERROR"})
_HANDSHAKE_REFUSED = frozenset({"SSLV3_ALERT_HANDSHAKE_FAILURE"})
_NO_COMMON_VERSION = frozenset({"TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL",
                                "NO_PROTOCOLS_AVAILABLE", "TLSV1_ALERT_INSUFFICIENT_SECURITY"})
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG",
                      "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL"})
#: What py-amqp raises when the peer closes the socket under it.
_PEER_CLOSED_TEXTS = ("Server unexpectedly closed connection", "Socket closed")


class _EncryptedKey(Exception):
    """A private key asked for a passphrase (raised by the password callback)."""


def _no_passphrase() -> bytes:
    """The password callback: chiffon has no passphrase to give (never prompt on a TTY)."""
    raise _EncryptedKey


def scheme_of(url: str) -> str:
    """The scheme of ``url`` (the first URL of a ``;``-separated failover list)."""
    return urlsplit(url.split(";", maxsplit=1)[0].strip()).scheme


def uses_tls(url: str) -> bool:
    """Whether ``url`` says TLS (``amqps://``, ``rediss://``)."""
    return scheme_of(url) in TLS_SCHEMES


def _urls(url: str) -> list[str]:
    return [part.strip() for part in url.split(";") if part.strip()]


def _address(url: str) -> tuple[str, int]:
    """(host, port) of one URL, with kombu's defaults (``localhost`` is 127.0.0.1)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    try:
        port = parts.port
    except ValueError:
        port = None
    return ("127.0.0.1" if host == "localhost" else host,
            port or DEFAULT_PORTS.get(parts.scheme, 5671))


@dataclass(frozen=True)
class BrokerTls:
    """TLS to the broker as configured: the ``broker_tls_*`` keys (paths may start with
    ``~``). ``BrokerTls()`` is TLS with the system's CAs and the URL's host name."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""
    min_version: str = DEFAULT_MIN_VERSION

    # -- paths ------------------------------------------------------------------------

    @property
    def ca_path(self) -> str:
        """``ca_file`` with ``~`` expanded; blank: the system's trust store."""
        return os.path.expanduser(self.ca_file) if self.ca_file else ""

    @property
    def cert_path(self) -> str:
        """``cert_file`` with ``~`` expanded; blank: no client certificate."""
        return os.path.expanduser(self.cert_file) if self.cert_file else ""

    @property
    def key_path(self) -> str:
        """``key_file`` with ``~`` expanded; blank: the key is in ``cert_file``."""
        return os.path.expanduser(self.key_file) if self.key_file else ""

    def server_name_for(self, url: str) -> str:
        """The name the broker's certificate must hold: ``server_name``, else the host of
        ``url`` (its first URL)."""
        return self.server_name or (urlsplit(_urls(url)[0]).hostname if _urls(url) else "") \
            or "localhost"

    # -- what the client libraries want -------------------------------------------------

    def kombu_ssl(self, url: str) -> dict[str, Any] | bool:
        """kombu's ``Connection(ssl=...)`` for ``url``: False for a URL without TLS, else
        a fresh dict (kombu may write into it). For py-amqp: ``_wrap_socket_sni``'s
        arguments, hostname check included (py-amqp checks it only when
        ``server_hostname`` is given); for redis-py: its ``ssl_*`` arguments."""
        scheme = scheme_of(url)
        if scheme == "amqps":
            return self.amqp_options(url)
        if scheme == "rediss":
            return self.redis_options()
        return False

    def amqp_options(self, url: str) -> dict[str, Any]:
        """py-amqp's ``ssl`` dict: verify against the CA file, check the name, offer the
        client certificate, refuse versions below ``min_version``."""
        options: dict[str, Any] = {
            "cert_reqs": ssl.CERT_REQUIRED,
            "server_hostname": self.server_name_for(url),
            "tls_minimum_version": MIN_VERSIONS[self.min_version],
        }
        if self.ca_path:
            options["ca_certs"] = self.ca_path
        if self.cert_path:
            options["certfile"] = self.cert_path
            options["keyfile"] = self.key_path or None
        return options

    def redis_options(self) -> dict[str, Any]:
        """redis-py's ``ssl_*`` arguments (kombu's Redis transport and Celery's Redis result
        backend pass them on). redis-py checks the certificate against the URL's host: it
        has no server-name override. A CA file is added to the system's trust store."""
        return {
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "ssl_check_hostname": True,
            "ssl_min_version": MIN_VERSIONS[self.min_version],
            "ssl_ca_certs": self.ca_path or None,
            "ssl_certfile": self.cert_path or None,
            "ssl_keyfile": self.key_path or None,
        }

    def celery_settings(self, broker_url: str, result_backend: str = "") -> dict[str, Any]:
        """The Celery settings for TLS: ``broker_use_ssl`` when ``broker_url`` says TLS,
        ``redis_backend_use_ssl`` when ``result_backend`` is ``rediss://``; nothing else
        (so a plain broker's settings are unchanged)."""
        settings: dict[str, Any] = {}
        broker = self.kombu_ssl(broker_url)
        if broker:
            settings["broker_use_ssl"] = broker
        if scheme_of(result_backend) == "rediss":
            settings["redis_backend_use_ssl"] = self.redis_options()
        return settings

    def ssl_context(self, *, check: bool = True) -> ssl.SSLContext:
        """The same TLS client as :meth:`amqp_options` gives py-amqp, as an SSLContext.
        Raises OSError / ssl.SSLError for a file it cannot load (see
        :func:`settings_problem`); ``check=False``: no certificate verification (the
        load-time check of the client certificate alone)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = MIN_VERSIONS[self.min_version]
        if self.cert_path:
            context.load_cert_chain(self.cert_path, self.key_path or None,
                                    password=_no_passphrase)
        if not check:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif self.ca_path:
            context.load_verify_locations(self.ca_path)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return context

    # -- a failed connection ------------------------------------------------------------

    def refusal(self, masked_url: str, exc: BaseException,
                node_url: str = "") -> BrokerLoginRefused | None:
        """A refused login (:meth:`BrokerLoginRefused.from_error`) or a failed TLS
        handshake (:meth:`failure`) carried by ``exc``; None for an outage (retry)."""
        return BrokerLoginRefused.from_error(masked_url, exc) or self.failure(
            masked_url, exc, node_url)

    def failure(self, masked_url: str, exc: BaseException,
                node_url: str = "") -> BrokerTlsFailed | None:
        """The TLS fault ``exc`` carries (itself or its cause/context chain) as
        BrokerTlsFailed, naming the file or check at fault; None when it is not one that
        retrying cannot fix. ``node_url``: the URL tried (one node of a failover list;
        blank: ``masked_url``), probed once by :func:`server_alert` after a bare EOF."""
        node = node_url or next(iter(_urls(masked_url)), "")
        error = _ssl_error_in_chain(exc)
        if (error is None or isinstance(error, ssl.SSLEOFError)) and _closed_early(exc) \
                and uses_tls(node):
            error = server_alert(self, node)
        if error is None:
            return None
        problem = self._problem(error, node)
        return None if problem is None else BrokerTlsFailed(masked_url, f"TLS: {problem}")

    def _problem(self, error: ssl.SSLError, node: str) -> str | None:
        if isinstance(error, ssl.SSLCertVerificationError):
            return self._verify_problem(error, node)
        reason = str(error.reason or "")
        text = _ssl_text(error)
        cert = f"{CERT_KEY} {self.cert_path}"
        if reason in _CERT_REQUIRED or (reason in _HANDSHAKE_REFUSED and not self.cert_path):
            return (f"the broker requires a client certificate ({text}); set {CERT_KEY} and "
                    f"{KEY_KEY}")
        if reason in _CLIENT_CERT_EXPIRED:
            return f"the broker rejected the client certificate {cert}: it has expired ({text})"
        if reason in _CLIENT_CERT_REJECTED:
            return (f"the broker rejected the client certificate {cert} ({text}); it must be "
                    f"signed by a CA the broker trusts, and be valid")
        if reason in _HANDSHAKE_REFUSED:
            return (f"the broker refused the handshake ({text}); check the client certificate "
                    f"{cert} (its key usage must allow client authentication) and "
                    f"{VERSION_KEY} {self.min_version}")
        if reason in _NO_COMMON_VERSION:
            return (f"the broker offers no TLS version allowed by {VERSION_KEY} "
                    f"{self.min_version} ({text})")
        if reason in _NOT_TLS:
            host, port = _address(node)
            return (f"the broker does not speak TLS on {host}:{port} ({text}); use its TLS "
                    f"port (RabbitMQ: 5671, listeners.ssl)")
        return None

    def _verify_problem(self, error: ssl.SSLCertVerificationError, node: str) -> str:
        code, said = error.verify_code, f"certificate verify failed: {error.verify_message}"
        if code in _UNTRUSTED:
            if self.ca_path:
                return (f"the broker's certificate is not signed by a CA in {CA_KEY} "
                        f"{self.ca_path} ({said})")
            return (f"the broker's certificate is not signed by a CA this machine trusts "
                    f"({said}); set {CA_KEY} to the certificate of the CA that signed it")
        if code == _EXPIRED:
            return f"the broker's certificate has expired ({said}); renew it on the broker"
        if code == _NOT_YET_VALID:
            return (f"the broker's certificate is not valid yet ({said}); check the clocks "
                    f"of both machines")
        if code == _REVOKED:
            return f"the broker's certificate is revoked ({said})"
        if code in _NAME_MISMATCH:
            name = self.server_name_for(node)
            where = f"{NAME_KEY} {name!r}" if self.server_name else f"{name!r} (the host of " \
                                                                    f"the broker URL)"
            # redis-py checks the URL's host and has no override (settings_problem)
            instead = "write a name it holds in the broker URL" if scheme_of(node) == "rediss" \
                else f"set {NAME_KEY} to a name it holds"
            return (f"the broker's certificate does not hold the name {where} ({said}); "
                    f"reissue it with that name, or {instead}")
        return f"the broker's certificate failed verification ({said})"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its cause or context, theirs, ... (each once)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        yield current
        seen.add(id(current))
        current = current.__cause__ or current.__context__


def _ssl_error_in_chain(exc: BaseException) -> ssl.SSLError | None:
    return next((item for item in _chain(exc) if isinstance(item, ssl.SSLError)), None)


def _closed_early(exc: BaseException) -> bool:
    """Whether the broker closed the connection under the client (which, on a TLS URL,
    may hide a TLS 1.3 alert: see the module docstring)."""
    for item in _chain(exc):
        if isinstance(item, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError):
            return True
        if isinstance(item, OSError) and str(item) in _PEER_CLOSED_TEXTS:
            return True
    return False


def _ssl_text(error: ssl.SSLError) -> str:
    """``tlsv13 alert certificate required`` from ``[SSL: ...] tlsv13 alert certificate
    required (_ssl.c:2580)``."""
    text = str(error.args[1]) if len(error.args) > 1 else str(error)
    if text.startswith("["):
        text = text.partition("] ")[2] or text
    return text.rsplit(" (_ssl.c:", 1)[0].strip()


def server_alert(tls: BrokerTls, node_url: str,
                 timeout: float = PROBE_SECONDS) -> ssl.SSLError | None:
    """Connect to ``node_url`` as the clients do, complete the handshake, then read before
    writing anything: a broker that rejects the client (TLS 1.3: after the handshake) sends
    its alert now, returned as the SSLError it raises; None when the broker accepts, is
    down, or says nothing within ``timeout`` seconds."""
    host, port = _address(node_url)
    try:
        context = tls.ssl_context()
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=tls.server_name_for(node_url)) as sock:
            sock.recv(1)
    except ssl.SSLError as exc:
        return exc
    except OSError:  # refused, timed out, reset: an outage, not a verdict
        return None
    return None


# -- the checks at load -------------------------------------------------------------------


def url_option_problem(url: str) -> str | None:
    """What is wrong with the query options of ``url`` (each URL of a failover list): TLS
    options belong in the ``broker_tls_*`` keys, and kombu takes only :data:`URL_OPTIONS`
    (any other makes it raise TypeError at connect). Values are never shown."""
    for part in _urls(url):
        for name, _value in parse_qsl(urlsplit(part).query, keep_blank_values=True):
            if name.startswith("ssl") or name in _URL_TLS_OPTIONS:
                instead = _URL_TLS_OPTIONS.get(name, "the broker_tls_* keys")
                return (f"TLS options in the URL are not supported (?{name}=); set "
                        f"{instead} in the config instead (docs/security.md)")
            if name not in URL_OPTIONS:
                return (f"URL option {name!r} is not supported (supported: "
                        f"{', '.join(URL_OPTIONS)})")
    return None


def settings_problem(tls: BrokerTls, broker_url: str, mode: str) -> tuple[str, str] | None:
    """(key, problem) for the first thing wrong with TLS to ``broker_url`` (the effective
    URL) under ``broker_tls: mode``, else None. Reads the files (never shows their text)."""
    scheme = scheme_of(broker_url)
    if mode == "yes" and scheme not in TLS_SCHEMES:
        return (MODE_KEY, f"is yes, but the broker URL is {scheme}:// (write amqps:// or "
                          f"rediss://)")
    if scheme not in TLS_SCHEMES:
        for key, value in ((CA_KEY, tls.ca_file), (CERT_KEY, tls.cert_file),
                           (KEY_KEY, tls.key_file), (NAME_KEY, tls.server_name)):
            if value:
                return (key, f"is set, but the broker URL is {scheme}:// without TLS (write "
                             f"amqps:// or rediss://, or set broker_tls: yes)")
        return None
    hosts = {urlsplit(part).hostname for part in _urls(broker_url)}
    if scheme == "amqps" and len(hosts) > 1 and not tls.server_name:
        return (NAME_KEY, "is needed with a failover list of several hosts over TLS: the "
                          "name every node's certificate holds (one name is checked for "
                          "all nodes)")
    if scheme == "rediss" and tls.server_name and tls.server_name not in hosts:
        return (NAME_KEY, "cannot be used with Redis (redis-py checks the certificate "
                          "against the host in broker_url): put that name in broker_url")
    return files_problem(tls)


def files_problem(tls: BrokerTls) -> tuple[str, str] | None:
    """(key, problem) for a TLS file that is missing, unreadable, not PEM, encrypted, or a
    key that does not match its certificate; None when they load."""
    texts: dict[str, bytes] = {}
    for key, path in ((CA_KEY, tls.ca_path), (CERT_KEY, tls.cert_path),
                      (KEY_KEY, tls.key_path)):
        if path:
            read = _read(path)
            if isinstance(read, str):
                return key, read
            texts[key] = read
    if tls.key_path and not tls.cert_path:
        return KEY_KEY, f"is set without {CERT_KEY} (the certificate it belongs to)"
    if CA_KEY in texts:
        problem = _ca_problem(tls.ca_path, texts[CA_KEY])
        if problem:
            return CA_KEY, problem
    if CERT_KEY in texts:
        return _pair_problem(tls, texts[CERT_KEY], texts.get(KEY_KEY))
    return None


def _read(path: str) -> bytes | str:
    """The file's bytes, or the problem (missing, unreadable)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(_MAX_FILE_BYTES)
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or type(exc).__name__}"


def _ca_problem(path: str, text: bytes) -> str | None:
    if b"-----BEGIN CERTIFICATE-----" not in text:
        return f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(path)
    except (ssl.SSLError, OSError) as exc:
        return f"{path} cannot be loaded as CA certificates ({_describe(exc)})"
    return None


def _pair_problem(tls: BrokerTls, cert: bytes, key: bytes | None) -> tuple[str, str] | None:
    """The client certificate and its key: PEM, unencrypted, matching."""
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        return CERT_KEY, f"{tls.cert_path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    key_key, key_path, key_text = (KEY_KEY, tls.key_path, key) if key is not None \
        else (CERT_KEY, tls.cert_path, cert)
    if b"PRIVATE KEY-----" not in key_text:
        if key is None:
            return CERT_KEY, f"{tls.cert_path} holds no private key; set {KEY_KEY}"
        return KEY_KEY, f"{key_path} holds no PEM private key (-----BEGIN PRIVATE KEY-----)"
    try:
        tls.ssl_context(check=False)
    except _EncryptedKey:
        return key_key, (f"{key_path} is encrypted (passphrase-protected); chiffon needs an "
                         f"unencrypted key readable only by its own user (openssl pkey -in "
                         f"KEY -out NEWKEY)")
    except (ssl.SSLError, OSError) as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            return key_key, (f"{key_path} does not match the certificate in {CERT_KEY} "
                             f"{tls.cert_path}")
        return CERT_KEY, (f"cannot load {tls.cert_path} with the key {key_path} "
                          f"({_describe(exc)})")
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return _ssl_text(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
