"""``Config``: the agent's settings as one frozen, typed, validated object.

Layers, lowest to highest precedence::

    defaults < /etc/chiffon/agent.yml < ~/.chiffon/agent.yml < $CHIFFON_CONFIG
             < environment (CHIFFON_<KEY>, plus CHIFFON_HEARTBEAT_INTERVAL, CHIFFON_AGENT_ID)
             < keyword arguments of Config()

Every setting is declared once, as a field of :class:`Config` built with
:func:`~chiffon_worker.settings_spec.setting` (type, default, unit, doc, check, secret/URL,
extra environment names). ``KEYS`` and everything else derive from those fields.
Construction validates everything and raises one
:class:`~chiffon_worker.errors.ConfigError` naming the file (or ``environment
CHIFFON_X``), the key and the problem. The object remembers where each value came from
(``Config.sources``) for ``chiffon config show``.

**What dynaconf does.** It is the layered store: each layer is handed, weakest first, to
one dynaconf settings object, tagged with a dynaconf ``SourceMetadata`` (loader ``yaml``
and the file path, ``env`` and the variable name, ``default``, ``argument``). dynaconf's
override order gives the effective values, and its load history
(``dynaconf.utils.inspect.get_history``) gives each key's source. YAML is parsed by
dynaconf's YAML parser (its vendored ruamel), safe loader only. The store is set up inert:
no files, loaders, ``.env`` or environment of its own, no auto-casting (YAML values are
data: ``@int``, ``@format``, ``@read_file`` stay text). dynaconf lets a ``*_FOR_DYNACONF``
environment variable override any of that (``AUTO_CAST_FOR_DYNACONF=true``,
``YAML_LOADER_FOR_DYNACONF=load``), so those are removed from the environment before the
store is built.

**What stays our own code, and why** (each point tried with dynaconf 3.3.5):

* Finding and reading the files. Given ``settings_files``, dynaconf also loads an
  ``agent.local.yml`` found next to a file, follows ``dynaconf_include`` keys to other
  files, silently ignores a file whose name does not end in ``.yml``/``.yaml``, turns an
  unreadable file or a directory into a ``warnings.warn`` and carries on, and raises
  ``UnicodeDecodeError`` / ``AttributeError`` (text that is not UTF-8; a file holding a
  list) without the file's name. We read each file ourselves (missing system and user
  files are skipped, ``$CHIFFON_CONFIG`` must exist), so each of those is a one-line
  ConfigError naming the file, with the line number for malformed YAML.
* The environment. dynaconf's environment loader reads ``os.environ`` only (so
  ``Config(environ=...)`` could not work), parses every value as TOML (``0x1628`` becomes
  5672, a password ``true`` a bool, ``1_000`` 1000, ``"x"`` loses its quotes), also reads
  ``DYNACONF_*``, has no aliases, and records only the prefix, not the variable. We take
  ``CHIFFON_<KEY>`` and the aliases as literal text and hand each variable to the store as
  its own source.
* Coercion and checks. dynaconf ``Validator`` messages are templates of name, value and
  operation (``PORT must lte 65535 but it is 70000 in env main``): they cannot say
  ``scheme 'http' is not one of ...``, do not know the file a value came from, print URL
  passwords, and running them writes each key back through ``set(loader_identifier=
  "validator")``, adding an entry to the very history the sources are read from. So each
  value is coerced in its own layer (a wrong type names that layer) and each key's check
  runs once, explicitly, on the effective value (naming the layer it came from).
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

from chiffon_worker.errors import ConfigError
from chiffon_worker.settings_spec import (
    ENV_PREFIX,
    Check,
    InvalidValue,
    Key,
    bounded,
    declared_keys,
    name_or_blank,
    nonblank_name,
    one_of,
    setting,
    url_with_scheme,
)
from chiffon_worker.signing import agent_key_problem, lab_secret_problem

if TYPE_CHECKING:
    from chiffon_worker.broker_tls import BrokerTls

log = logging.getLogger(__name__)

SYSTEM_CONFIG_FILE = Path("/etc/chiffon/agent.yml")
USER_CONFIG_RELATIVE = Path(".chiffon") / "agent.yml"
#: Environment variables that are ours but not settings (they must not warn as unknown keys).
ENV_NOT_SETTINGS = frozenset({"CHIFFON_CONFIG", "CHIFFON_BOOT_ID"})
#: A machine's ID namespace for ``uuid5`` (changing it changes every derived agent_id).
_AGENT_ID_NAMESPACE = uuid.UUID("5b0e6f2e-4b8e-4d53-9c43-2f1c6a0f9a51")
#: ``Config.sources["agent_id"]`` of a derived id.
DERIVED_AGENT_ID_SOURCE = "derived from machine-id and hostname"
_BROKER_SCHEMES = ("amqp", "amqps", "pyamqp", "redis", "rediss", "memory")
_DATABASE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg")
_POOLS = ("solo", "threads", "prefork")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: ``queue_type`` values (``wire.CLASSIC_QUEUE``, ``wire.QUORUM_QUEUE``; config imports no kombu).
_QUEUE_TYPES = ("classic", "quorum")
_AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
#: Separates the URLs of a failover list in ``broker_url`` (kombu's and Celery's syntax).
FAILOVER_SEPARATOR = ";"

#: dynaconf ``SourceMetadata.loader`` of each layer we stack.
_DEFAULT, _FILE, _ENV, _ARGUMENT = "default", "yaml", "env", "argument"


def default_state_dir() -> str:
    """Per-user state directory: ``$XDG_STATE_HOME/chiffon`` or ``~/.local/state/chiffon``."""
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return str(base / "chiffon")


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``**`` (safe to log); each URL of a
    failover list (``amqp://...;amqp://...``) is masked."""
    if FAILOVER_SEPARATOR in url:
        return FAILOVER_SEPARATOR.join(mask_url(part) for part in url.split(FAILOVER_SEPARATOR))
    try:
        parts = urlsplit(url)
        password, port = parts.password, parts.port
    except ValueError:
        return "**"
    if password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if port is not None:
        host = f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=f"{user}:**@{host}"))


def failover_urls(*schemes: str) -> Check:
    """Blank, or one URL, or a ``;``-separated failover list of URLs, each with a scheme
    of ``schemes`` and all with the same scheme (one transport serves the whole list)."""
    single = url_with_scheme(*schemes)

    def check(value: Any) -> str | None:
        parts = [part.strip() for part in value.split(FAILOVER_SEPARATOR)]
        if len(parts) == 1:
            return single(value)
        for number, part in enumerate(parts, 1):
            if not part:
                return f"URL {number} of the failover list is blank"
            problem = single(part)
            if problem:
                return f"URL {number} of the failover list: {problem}"
        found = sorted({urlsplit(part).scheme for part in parts})
        if len(found) > 1:
            return f"the failover list mixes schemes {', '.join(found)}; use one"
        return None

    return check


def _tls_mode_check(value: Any) -> str | None:
    from chiffon_worker.broker_tls import TLS_MODES  # ssl: only when a config is checked

    return one_of(*TLS_MODES)(value)


def _tls_version_check(value: Any) -> str | None:
    from chiffon_worker.broker_tls import MIN_VERSIONS

    return one_of(*MIN_VERSIONS)(value)


@dataclass(frozen=True, init=False)
class Config:
    """The effective configuration; read-only after construction.

    ``Config()`` loads the standard layers. Keyword arguments override every layer
    (source ``"argument"``), which is how tests and embedding code pin values. ``environ``
    and ``home`` replace ``os.environ`` and the home directory for the lookup;
    ``system_file`` replaces ``/etc/chiffon/agent.yml``.
    """

    # -- heartbeats ----------------------------------------------------------------------
    heartbeat_interval_seconds: float = setting(
        30.0, "time between heartbeats", unit="s", check=bounded(0.1, 86400),
        env_aliases=("CHIFFON_HEARTBEAT_INTERVAL",))
    heartbeat_timeout_seconds: float = setting(
        90.0, "time without a heartbeat before the agent counts as offline; heartbeat "
        "messages expire after it (at least heartbeat_interval_seconds)", unit="s",
        check=bounded(0.1, 7 * 86400))
    gpu_detection_timeout_seconds: float = setting(
        5.0, "upper bound on one GPU probe (NVML, nvidia-smi, rocm-smi, sysfs)", unit="s",
        check=bounded(0.05, 600))
    # -- identity ------------------------------------------------------------------------
    agent_id: str = setting(
        "", "this agent's id; blank derives a stable UUID from the machine",
        check=name_or_blank, env_aliases=("CHIFFON_AGENT_ID",))
    agent_pool_name: str = setting(
        "desktop_pool_1", "the pool queue this agent consumes", check=nonblank_name)
    # -- broker --------------------------------------------------------------------------
    rabbitmq_host: str = setting("127.0.0.1", "RabbitMQ host (used when broker_url is blank)")
    rabbitmq_port: int = setting(5672, "RabbitMQ TCP port", check=bounded(1, 65535))
    rabbitmq_user: str = setting("guest", "RabbitMQ user")
    rabbitmq_password: str = setting("guest", "RabbitMQ password", secret=True)
    rabbitmq_vhost: str = setting("/", "RabbitMQ virtual host")
    broker_url: str = setting(
        "", "full broker URL (amqp://, redis://); overrides rabbitmq_*. Several URLs "
        "separated by ';' are a failover list (the nodes of a RabbitMQ cluster): a client "
        "connects to the first that answers and moves on when it fails",
        check=failover_urls(*_BROKER_SCHEMES), url=True)
    queue_type: str = setting(
        "classic", "RabbitMQ type of the durable queues (pool, agent, heartbeats): classic, "
        "or quorum (replicated on a cluster's nodes, so they survive a node's loss). "
        "Default classic: RabbitMQ refuses to redeclare an existing queue with another type "
        "(PRECONDITION_FAILED), and one node gains nothing from quorum; to switch, delete "
        "the old queues (or use new names) and move every agent and orchestrator at once",
        check=one_of(*_QUEUE_TYPES))
    # -- TLS to the broker (chiffon_worker/broker_tls.py; docs/security.md) ---------------
    broker_tls: str = setting(
        "auto", "auto: TLS when the broker URL says amqps:// or rediss://; yes: TLS "
        "required (the rabbitmq_* keys build an amqps:// URL: set rabbitmq_port to the TLS "
        "port, 5671; a broker_url without TLS is an error)", check=_tls_mode_check)
    broker_tls_ca_file: str = setting(
        "", "PEM file of the CA certificate(s) the broker's certificate must be signed by; "
        "blank: the system's trust store")
    broker_tls_cert_file: str = setting(
        "", "PEM client certificate, for a broker that requires one (RabbitMQ "
        "ssl_options.fail_if_no_peer_cert); blank: none")
    broker_tls_key_file: str = setting(
        "", "unencrypted PEM private key of broker_tls_cert_file (its contents are never "
        "shown or logged); blank: the key is in broker_tls_cert_file")
    broker_tls_server_name: str = setting(
        "", "the name the broker's certificate must hold; blank: the host of the broker "
        "URL. The name is always checked")
    broker_tls_min_version: str = setting(
        "TLSv1.2", "the oldest TLS version accepted: TLSv1.2 or TLSv1.3",
        check=_tls_version_check)
    result_backend: str = setting(
        "", "result backend; blank: rpc:// (Redis broker: the same Redis)", url=True)
    database_url: str = setting(
        "", "orchestrator registry; blank: SQLite in state_dir",
        check=url_with_scheme(*_DATABASE_SCHEMES), url=True)
    # -- paths ---------------------------------------------------------------------------
    state_dir: str = setting(
        "", "directory for the registry and beat state; blank: per-user")
    sysfs_root: str = setting(
        "/sys", "where sysfs is mounted (like node_exporter --path.sysfs)")
    # -- execution -----------------------------------------------------------------------
    worker_pool: str = setting("threads", "Celery pool for execute_work", check=one_of(*_POOLS))
    worker_concurrency: int = setting(1, "execute_work slots", check=bounded(1, 1024))
    log_level: str = setting("INFO", "log level", check=one_of(*_LOG_LEVELS))
    # -- the machine's owner: when a desktop someone uses takes pool work ----------------
    owner_idle_minutes: float = setting(
        0.0, "take pool work only after no keyboard or mouse input for this long; 0: "
        "whatever the owner does", unit="min", check=bounded(0, 7 * 24 * 60))
    work_on_battery: str = setting(
        "yes", "take pool work while the machine runs on battery: yes or no",
        check=one_of("yes", "no"))
    foreign_gpu_memory_below_gb: float = setting(
        0.0, "take pool work only while other programs' GPU processes (a game) hold less "
        "GPU memory than this; 0: no such rule", unit="GiB", check=bounded(0, 1 << 20))
    gpu_temperature_below_c: float = setting(
        0.0, "take pool work only while the hottest GPU is cooler than this; 0: no such "
        "rule", unit="degC", check=bounded(0, 150))
    owner_returns: str = setting(
        "finish", "what running work does when the owner rules say no: finish (default), or "
        "requeue (it stops and goes back to the pool queue for another agent; work that "
        "cannot stop early finishes)", check=one_of("finish", "requeue"))
    owner_check_seconds: float = setting(
        5.0, "how often the owner rules are checked", unit="s", check=bounded(0.2, 3600))
    dev_root: str = setting(
        "/dev", "where /dev is (owner input: the access times of input/event*)")
    wake_broadcast_address: str = setting(
        "255.255.255.255", "where `chiffon wake` sends Wake-on-LAN packets (the LAN's "
        "broadcast address)")
    wake_port: int = setting(9, "UDP port of Wake-on-LAN packets", check=bounded(1, 65535))
    # -- orchestrator side ---------------------------------------------------------------
    # signed heartbeats (chiffon_worker/signing.py; docs/security.md, "Signed heartbeats")
    heartbeat_secret: str = setting(
        "", "older shared HMAC key signing heartbeats: agents sign with it unless "
        "heartbeat_key is set, the orchestrator accepts it for any agent id; blank: none",
        secret=True)
    heartbeat_key: str = setting(
        "", "agent: this agent's own heartbeat signing key, 64 hex digits (`chiffon "
        "signing-key AGENT_ID` on the orchestrator's host); it signs for this agent_id "
        "only; blank: none", secret=True, check=agent_key_problem)
    heartbeat_lab_secret: str = setting(
        "", "orchestrator: the lab secret every agent's key is derived from (`chiffon "
        "init-config --with-secret` generates one); keep it on the orchestrator's host only; "
        "blank: no agent keys", secret=True, check=lab_secret_problem)
    heartbeat_lab_secret_previous: str = setting(
        "", "orchestrator, during a rotation: the lab secret being replaced; agent keys "
        "derived from it stay accepted until it is removed", secret=True,
        check=lab_secret_problem)
    require_signed_heartbeats: str = setting(
        "auto", "orchestrator: reject unsigned heartbeats. auto: when heartbeat_lab_secret "
        "or heartbeat_secret is set; yes; no (a signature that is present is still "
        "checked)", check=one_of("auto", "yes", "no"))
    metrics_port: int = setting(
        9808, "orchestrator Prometheus TCP port; 0 disables it", check=bounded(0, 65535))
    reservation_ttl_seconds: float = setting(
        3600.0, "longest a placement holds the capacity it asked for when the end of its "
        "work is never seen (a lost submitter, an orchestrator that was down)", unit="s",
        check=bounded(1, 30 * 86400))

    #: this machine's host name, for display (not a setting)
    hostname: str = field(default="")
    #: key -> where its value came from: "default", a file path, "environment CHIFFON_X",
    #: "argument", "derived from machine-id and hostname" (agent_id), "system" (hostname)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    #: the config files that were found and loaded, lowest precedence first
    files_loaded: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __init__(
        self,
        *,
        environ: Mapping[str, str] | None = None,
        home: str | os.PathLike[str] | None = None,
        system_file: str | os.PathLike[str] | None = None,
        **overrides: Any,
    ) -> None:
        env = os.environ if environ is None else environ
        home_dir = Path(home) if home is not None else Path.home()
        layers = _Layers()
        layers.add(_DEFAULT, "default", {name: key.default for name, key in KEYS.items()})
        loaded: list[str] = []
        for path in _config_files(env, home_dir, system_file):
            if not path.exists():
                continue
            layers.add(_FILE, str(path), _file_layer(path))
            loaded.append(str(path))
        for name, key, raw in _env_settings(env):
            layers.add(_ENV, name, {key.name: _coerce(key, raw, f"environment {name}")})
        for name in overrides:
            if name not in KEYS:
                raise TypeError(f"Config() got an unknown setting {name!r}{_closest(name)}")
        layers.add(_ARGUMENT, "argument",
                   {name: _coerce(KEYS[name], raw, "argument") for name, raw in overrides.items()})
        values, sources = layers.effective()
        _validate(values, sources)
        if not values["state_dir"]:
            values["state_dir"] = default_state_dir()
        values["state_dir"] = str(Path(values["state_dir"]).expanduser())
        values["hostname"] = socket.gethostname()
        sources["hostname"] = "system"
        if not values["agent_id"]:
            values["agent_id"] = _machine_agent_id(Path(values["state_dir"]), values["hostname"])
            sources["agent_id"] = DERIVED_AGENT_ID_SOURCE
        for name, value in values.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "sources", dict(sources))
        object.__setattr__(self, "files_loaded", tuple(loaded))
        log.debug("config loaded from %s", ", ".join(loaded) or "defaults and environment")

    # -- derived values ---------------------------------------------------------------

    @property
    def effective_broker_url(self) -> str:
        """``broker_url`` if set, else the AMQP URL built from the ``rabbitmq_*`` keys
        (``amqps://`` with ``broker_tls: yes``)."""
        return _effective_broker_url({name: getattr(self, name) for name in _BROKER_URL_KEYS})

    @property
    def tls_to_broker(self) -> BrokerTls:
        """TLS to the broker (the ``broker_tls_*`` keys), for every broker connection."""
        from chiffon_worker.broker_tls import BrokerTls

        return BrokerTls(self.broker_tls_ca_file, self.broker_tls_cert_file,
                         self.broker_tls_key_file, self.broker_tls_server_name,
                         self.broker_tls_min_version)

    @property
    def effective_result_backend(self) -> str:
        """``result_backend`` if set; the broker's Redis for a Redis broker; else ``rpc://``."""
        if self.result_backend:
            return self.result_backend
        broker = self.effective_broker_url
        if urlsplit(broker).scheme in ("redis", "rediss"):
            return broker
        return "rpc://"

    @property
    def effective_database_url(self) -> str:
        """``database_url`` if set, else SQLite at ``state_dir/registry.sqlite3``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.state_dir) / 'registry.sqlite3'}"

    @property
    def pool_queue(self) -> str:
        """The shared work queue of this agent's pool."""
        return self.agent_pool_name

    @property
    def agent_queue(self) -> str:
        """The queue only this agent consumes."""
        from chiffon_worker.wire import agent_queue_name  # kombu: only when asked

        return agent_queue_name(self.agent_id)

    def __repr__(self) -> str:
        """The masked view: a logged Config shows no secret."""
        shown = ", ".join(f"{name}={value!r}" for name, value in self.masked().items())
        return f"{type(self).__name__}({shown})"

    def masked(self) -> dict[str, Any]:
        """Every setting (and the hostname) with secrets as ``**`` and URL passwords masked."""
        out = {name: _shown(key, getattr(self, name)) for name, key in KEYS.items()}
        out["hostname"] = self.hostname
        return out


#: The keys the broker URL is made of.
_BROKER_URL_KEYS = ("broker_url", "broker_tls", "rabbitmq_user", "rabbitmq_password",
                    "rabbitmq_host", "rabbitmq_port", "rabbitmq_vhost")


def _effective_broker_url(values: Mapping[str, Any]) -> str:
    """``broker_url`` if set, else the AMQP URL built from the ``rabbitmq_*`` values."""
    if values["broker_url"]:
        return str(values["broker_url"])
    user = quote(values["rabbitmq_user"], safe="")
    password = quote(values["rabbitmq_password"], safe="")
    # kombu reads "amqp://host:port//" as the default vhost "/"
    vhost = "/" if values["rabbitmq_vhost"] == "/" else quote(values["rabbitmq_vhost"], safe="")
    scheme = "amqps" if values["broker_tls"] == "yes" else "amqp"
    return (f"{scheme}://{user}:{password}@{values['rabbitmq_host']}:"
            f"{values['rabbitmq_port']}/{vhost}")


#: name -> declared setting, in declaration order (derived from the fields of Config).
KEYS: Mapping[str, Key] = MappingProxyType(declared_keys(Config))
#: Short environment names kept for operators' muscle memory; the long form wins if both are set.
ENV_ALIASES: Mapping[str, str] = MappingProxyType(
    {alias: name for name, key in KEYS.items() for alias in key.spec.env_aliases})
#: Keys whose values are never shown or logged.
SECRET_KEYS = frozenset(name for name, key in KEYS.items() if key.spec.secret)
#: Keys that are URLs which may carry a password.
URL_KEYS = frozenset(name for name, key in KEYS.items() if key.spec.url)


# -- the layers ------------------------------------------------------------------------------


class _Layers:
    """The dynaconf settings object the layers are stacked in, weakest first."""

    def __init__(self) -> None:
        _drop_dynaconf_switches()
        from dynaconf import Dynaconf

        self._store: Any = Dynaconf(
            settings_files=[], core_loaders=[], loaders=[], includes=[], preload=[],
            secrets=None, environments=False, load_dotenv=False, sysenv_fallback=False,
            fresh_vars=[], auto_cast=False, merge_enabled=False, dotted_lookup=False,
            nested_separator="__", index_separator=None, lowercase_read=True,
            validate_on_update=False, redis_enabled=False, vault_enabled=False,
            yaml_loader="safe_load",
        )

    def add(self, loader: str, identifier: str, values: Mapping[str, Any]) -> None:
        """Stack ``values`` (already coerced) over what is there, as source ``identifier``."""
        from dynaconf.loaders.base import SourceMetadata

        if values:
            self._store.update({name.upper(): value for name, value in values.items()},
                               loader_identifier=SourceMetadata(loader, identifier, "global"),
                               tomlfy=False, merge=False, dotted_lookup=False, validate=False)

    def effective(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(name -> effective value, name -> its source) for every key, from dynaconf."""
        from dynaconf.utils.inspect import get_history

        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name in KEYS:
            values[name] = self._store.get(name.upper())
            # oldest first; dynaconf's own entries (its defaults, init kwargs) filtered out
            history = get_history(self._store, name.upper(),
                                  filter_callable=lambda meta: meta.loader in _SOURCE_TEXT)
            last = history[-1]
            sources[name] = _SOURCE_TEXT[last["loader"]].format(last["identifier"])
        return values, sources


def _drop_dynaconf_switches() -> None:
    """Remove dynaconf's own ``*_FOR_DYNACONF`` variables from the process environment.

    dynaconf lets each of them override what its constructor is given (its
    ``default_loader`` reads them last): ``YAML_LOADER_FOR_DYNACONF=load`` switches its
    YAML reading to the unsafe loader, ``AUTO_CAST_FOR_DYNACONF=true`` would evaluate
    ``@read_file`` and ``@format`` in our values, ``NESTED_SEPARATOR_FOR_DYNACONF=_``
    would split our keys into nested ones. chiffon sets dynaconf up itself.
    """
    found = sorted(name for name in os.environ if name.endswith("_FOR_DYNACONF"))
    for name in found:
        os.environ.pop(name, None)
    if found:  # quietly: other programs' dynaconf settings are no concern of the user here
        log.debug("ignoring %s in the environment: chiffon configures dynaconf itself",
                  ", ".join(found))


#: How each layer's SourceMetadata reads in ``Config.sources`` and error messages.
_SOURCE_TEXT = {_DEFAULT: "{}", _FILE: "{}", _ENV: "environment {}", _ARGUMENT: "{}"}


def _config_files(env: Mapping[str, str], home_dir: Path,
                  system_file: str | os.PathLike[str] | None) -> list[Path]:
    """The config files to try, weakest first; ``$CHIFFON_CONFIG`` must exist."""
    files = [Path(system_file).expanduser() if system_file else SYSTEM_CONFIG_FILE,
             home_dir / USER_CONFIG_RELATIVE]
    explicit = env.get("CHIFFON_CONFIG", "").strip()
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_dir():
            raise ConfigError("CHIFFON_CONFIG", None, f"{path} is a directory, not a config file")
        if not path.is_file():
            raise ConfigError("CHIFFON_CONFIG", None, f"{path} does not exist")
        files.append(path)
    # a file named twice is read once, where it is strongest (one source per path)
    return list(reversed(dict.fromkeys(reversed(files))))


#: The owner rules (``agents/owner_rules.py``): an unknown key that looks like one of them
#: is an error, not a warning, since a misspelled rule would leave the machine offered
#: whatever its owner does.
OWNER_RULE_KEYS = ("owner_idle_minutes", "work_on_battery", "foreign_gpu_memory_below_gb",
                   "gpu_temperature_below_c")
_OWNER_RULE_PREFIXES = ("owner_", "work_on", "foreign_gpu", "gpu_temp")


def _file_layer(path: Path) -> dict[str, Any]:
    """The known keys of one config file, coerced; unknown keys warn and are dropped,
    except one that looks like an owner rule (ConfigError)."""
    layer: dict[str, Any] = {}
    for raw_key, raw in _read_yaml(path).items():
        name = str(raw_key).lower()
        if name not in KEYS:
            hint = _closest(name)
            if name.startswith(_OWNER_RULE_PREFIXES) or any(
                    f"{rule!r}" in hint for rule in OWNER_RULE_KEYS):
                raise ConfigError(str(path), name, f"unknown owner rule{hint or ''} (known: "
                                  f"{', '.join(OWNER_RULE_KEYS)})")
            log.warning("%s: unknown key %r ignored%s", path, name, hint)
            continue
        layer[name] = _coerce(KEYS[name], raw, str(path))
    return layer


def _read_yaml(path: Path) -> dict[Any, Any]:
    """One YAML file as a mapping (dynaconf's YAML parser, safe loader); failures: ConfigError."""
    source = str(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(source, None, "is not UTF-8 text") from None
    from dynaconf.vendor.ruamel import yaml
    from dynaconf.vendor.ruamel.yaml.error import (
        MarkedYAMLError,
        MarkedYAMLFutureWarning,
        YAMLError,
    )

    try:
        data = yaml.safe_load(text)
    except (MarkedYAMLError, MarkedYAMLFutureWarning) as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = (exc.problem or exc.context or "invalid YAML").strip()
        raise ConfigError(source, None, f"invalid YAML at {line}{problem}") from None
    except YAMLError as exc:
        raise ConfigError(source, None, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(source, None, "invalid YAML: recursive alias") from None
    if data is None:  # empty, or only comments
        return {}
    if not isinstance(data, dict):
        raise ConfigError(source, None, "must be a mapping of key: value lines")
    return data


def _env_settings(environ: Mapping[str, str]) -> list[tuple[str, Key, str]]:
    """(variable, key, raw text) for every setting in the environment, one per key.

    Of a key's names the strongest one set wins (``CHIFFON_<KEY>`` over an alias). Other
    ``CHIFFON_*`` variables warn, with the closest key, and are ignored.
    """
    found: list[tuple[str, Key, str]] = []
    known: set[str] = set(ENV_NOT_SETTINGS)
    for key in KEYS.values():
        known.update(key.env_names)
        present = [name for name in key.env_names if name in environ]
        if present:
            found.append((present[-1], key, environ[present[-1]]))
    for name in environ:
        if name.startswith(ENV_PREFIX) and name not in known:
            log.warning("ignoring unknown environment variable %s%s", name,
                        _closest(name[len(ENV_PREFIX):].lower()))
    return found


def _coerce(key: Key, raw: Any, source: str) -> Any:
    try:
        return key.coerce(raw)
    except InvalidValue as exc:
        raise ConfigError(source, key.name, str(exc)) from None


def _closest(name: str) -> str:
    match = difflib.get_close_matches(name, list(KEYS), n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def _shown(key: Key, value: Any) -> Any:
    """``value`` as it may be shown: secrets as ``**``, URLs with the password masked."""
    if key.spec.secret and value:
        return "**"
    if key.spec.url and value:
        return mask_url(value)
    return value


def _validate(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """Each key's check on its effective value, then the checks across keys."""
    for name, key in KEYS.items():
        problem = key.spec.check(values[name]) if key.spec.check else None
        if problem:
            raise ConfigError(sources[name], name,
                              f"{problem} (got {_shown(key, values[name])!r})")
    _check_timeout_covers_interval(values, sources)
    _check_quorum_needs_amqp(values, sources)
    _check_broker_tls(values, sources)


def _check_timeout_covers_interval(values: Mapping[str, Any],
                                   sources: Mapping[str, str]) -> None:
    interval, timeout = "heartbeat_interval_seconds", "heartbeat_timeout_seconds"
    unit = KEYS[timeout].spec.unit
    if values[timeout] < values[interval]:
        raise ConfigError(
            sources[timeout], timeout,
            f"{values[timeout]:g} {unit} is shorter than {interval} {values[interval]:g} "
            f"{unit} (from {sources[interval]}); use about 3x the interval",
        )


def _check_quorum_needs_amqp(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """``queue_type: quorum`` is a RabbitMQ queue type: refuse it with another broker
    (Redis would silently ignore it)."""
    if values["queue_type"] != "quorum" or not values["broker_url"]:
        return  # the rabbitmq_* keys always build an amqp:// URL
    scheme = urlsplit(values["broker_url"].split(FAILOVER_SEPARATOR)[0].strip()).scheme
    if scheme not in _AMQP_SCHEMES:
        raise ConfigError(sources["queue_type"], "queue_type",
                          f"quorum queues need a RabbitMQ broker, but broker_url (from "
                          f"{sources['broker_url']}) is {scheme}://")


def _check_broker_tls(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """Options in broker_url that kombu cannot take (TLS ones belong in the broker_tls_*
    keys), then TLS to the broker: keys that fit the URL, files that load, a key that
    matches its certificate (``broker_tls.settings_problem``)."""
    from chiffon_worker.broker_tls import BrokerTls, settings_problem, url_option_problem

    if values["broker_url"]:
        problem = url_option_problem(values["broker_url"])
        if problem:
            raise ConfigError(sources["broker_url"], "broker_url", problem)
    if not _uses_broker_tls(values):
        return
    tls = BrokerTls(values["broker_tls_ca_file"], values["broker_tls_cert_file"],
                    values["broker_tls_key_file"], values["broker_tls_server_name"],
                    values["broker_tls_min_version"])
    found = settings_problem(tls, _effective_broker_url(values), values["broker_tls"])
    if found:
        key, problem = found
        # a key left at its default is blamed on where the broker URL (or broker_tls) was set
        where = next((sources[name] for name in (key, "broker_url", "broker_tls")
                      if sources[name] != "default"), "default")
        raise ConfigError(where, key, problem)


def _uses_broker_tls(values: Mapping[str, Any]) -> bool:
    """Whether any TLS key is set or the URL says TLS (else the check reads nothing)."""
    if any(values[name] for name in ("broker_tls_ca_file", "broker_tls_cert_file",
                                     "broker_tls_key_file", "broker_tls_server_name")):
        return True
    url = _effective_broker_url(values).split(FAILOVER_SEPARATOR)[0].strip()
    return values["broker_tls"] == "yes" or urlsplit(url).scheme in ("amqps", "rediss")


def derive_agent_id(machine_id: str, hostname: str) -> str:
    """The agent id of a machine: a UUID from its machine id *and* its hostname.

    Cloned machines (VM templates, disk images) share ``/etc/machine-id``; with the
    hostname in the derivation, clones with different hostnames get different ids (clones
    that share both stay identical: the orchestrator reports them as a conflict, and a
    second agent of one name on one host stops at start).
    """
    return str(uuid.uuid5(_AGENT_ID_NAMESPACE, f"{machine_id}\n{hostname}"))


def _machine_agent_id(state_dir: Path, hostname: str) -> str:
    """A UUID stable across restarts of this machine and different between machines.

    Derived from ``/etc/machine-id`` (systemd) or ``/var/lib/dbus/machine-id`` and the
    hostname (:func:`derive_agent_id`); on a machine with neither file, a random UUID is
    kept in ``state_dir/agent-id``.
    """
    for candidate in (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id")):
        try:
            machine_id = candidate.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if machine_id:
            return derive_agent_id(machine_id, hostname)
    id_file = state_dir / "agent-id"
    try:
        return str(uuid.UUID(id_file.read_text(encoding="ascii").strip()))
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    new_id = str(uuid.uuid4())
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(new_id + "\n", encoding="ascii")
    except OSError as exc:
        raise ConfigError(str(id_file), "agent_id",
                          f"no machine-id and cannot store a generated one: {exc.strerror}"
                          ) from None
    return new_id

