"""``Config``: the agent's settings as one frozen, typed, validated object.

Layers, lowest to highest precedence::

    defaults < /etc/chiffon/agent.yml < ~/.chiffon/agent.yml < $CHIFFON_CONFIG < environment

Files are read through dynaconf (YAML only, always the safe loader); the environment
gives ``CHIFFON_<KEY>`` for every key plus the short names ``CHIFFON_HEARTBEAT_INTERVAL``
and ``CHIFFON_AGENT_ID``. Construction validates everything and raises one
:class:`~chiffon_worker.errors.ConfigError` naming the file, key and problem. The object
remembers where each value came from (``Config.sources``) for ``chiffon config show``.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from chiffon_worker.errors import ConfigError

log = logging.getLogger(__name__)

SYSTEM_CONFIG_FILE = Path("/etc/chiffon/agent.yml")
USER_CONFIG_RELATIVE = Path(".chiffon") / "agent.yml"
ENV_PREFIX = "CHIFFON_"
#: Short environment names kept for operators' muscle memory; the long form wins if both are set.
ENV_ALIASES = {
    "CHIFFON_HEARTBEAT_INTERVAL": "heartbeat_interval_seconds",
    "CHIFFON_AGENT_ID": "agent_id",
}
#: Environment variables that are ours but not settings (they must not warn as unknown keys).
ENV_NOT_SETTINGS = frozenset({"CHIFFON_CONFIG", "CHIFFON_BOOT_ID"})
#: Keys whose values are never shown or logged.
SECRET_KEYS = frozenset({"rabbitmq_password", "heartbeat_secret"})
#: Keys that are URLs which may carry a password.
URL_KEYS = frozenset({"broker_url", "result_backend", "database_url"})
#: Kept in sync with ``deploy/agent.yml``; a machine's ID namespace for ``uuid5``.
_AGENT_ID_NAMESPACE = uuid.UUID("5b0e6f2e-4b8e-4d53-9c43-2f1c6a0f9a51")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_BROKER_SCHEMES = ("amqp", "amqps", "pyamqp", "redis", "rediss", "memory")
_POOLS = ("solo", "threads", "prefork")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def default_state_dir() -> str:
    """Per-user state directory: ``$XDG_STATE_HOME/chiffon`` or ``~/.local/state/chiffon``."""
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return str(base / "chiffon")


@dataclass(frozen=True)
class _Key:
    """One setting: its type, default and a check returning a problem text or None."""

    type: type
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _bounded(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"must be between {low:g} and {high:g}"

    return check


def _name_or_blank(value: Any) -> str | None:
    if value == "" or _NAME_RE.match(value):
        return None
    return "must be 1-128 characters of letters, digits, '.', '_' or '-'"


def _name(value: Any) -> str | None:
    return "must not be blank" if value == "" else _name_or_blank(value)


def _url_with_scheme(*schemes: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value == "":
            return None
        try:
            scheme = urlsplit(value).scheme
        except ValueError as exc:
            return f"is not a valid URL ({exc})"
        if scheme not in schemes:
            return f"scheme {scheme or '(none)'!r} is not one of {', '.join(schemes)}"
        return None

    return check


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


KEYS: dict[str, _Key] = {
    "heartbeat_interval_seconds": _Key(
        float, 30.0, "seconds between heartbeats", _bounded(0.1, 86400)),
    "heartbeat_timeout_seconds": _Key(
        float, 90.0, "seconds without a heartbeat before the agent counts as offline; "
        "heartbeat messages expire after it", _bounded(0.1, 7 * 86400)),
    "gpu_detection_timeout_seconds": _Key(
        float, 5.0, "upper bound in seconds on one GPU probe (NVML, nvidia-smi, sysfs)",
        _bounded(0.05, 600)),
    "agent_id": _Key(str, "", "this agent's id; blank derives a stable UUID from the machine",
                     _name_or_blank),
    "agent_pool_name": _Key(str, "desktop_pool_1", "the pool queue this agent consumes", _name),
    "rabbitmq_host": _Key(str, "127.0.0.1", "RabbitMQ host (used when broker_url is blank)"),
    "rabbitmq_port": _Key(int, 5672, "RabbitMQ port", _bounded(1, 65535)),
    "rabbitmq_user": _Key(str, "guest", "RabbitMQ user"),
    "rabbitmq_password": _Key(str, "guest", "RabbitMQ password (secret)"),
    "rabbitmq_vhost": _Key(str, "/", "RabbitMQ virtual host"),
    "broker_url": _Key(str, "", "full broker URL (amqp://, redis://); overrides rabbitmq_*",
                       _url_with_scheme(*_BROKER_SCHEMES)),
    "result_backend": _Key(str, "", "result backend; blank: rpc:// (Redis broker: the same Redis)"),
    "database_url": _Key(str, "", "orchestrator registry; blank: SQLite in state_dir",
                         _url_with_scheme("sqlite", "postgresql", "postgresql+psycopg")),
    "state_dir": _Key(str, "", "directory for the registry and beat state; blank: per-user"),
    "sysfs_root": _Key(str, "/sys", "where sysfs is mounted (like node_exporter --path.sysfs)"),
    "worker_pool": _Key(str, "threads", "Celery pool for execute_work", _one_of(*_POOLS)),
    "worker_concurrency": _Key(int, 1, "execute_work slots", _bounded(1, 1024)),
    "log_level": _Key(str, "INFO", "log level", _one_of(*_LOG_LEVELS)),
    "heartbeat_secret": _Key(str, "", "optional HMAC key signing heartbeats (secret)"),
    "metrics_port": _Key(int, 9808, "orchestrator Prometheus port", _bounded(0, 65535)),
}


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``**`` (safe to log)."""
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


def _coerce(key: str, spec: _Key, value: Any, source: str) -> Any:
    """Convert a raw value (YAML scalar or environment string) to the key's type."""
    if value is None:
        raise ConfigError(source, key, "has no value (write a value or remove the key)")
    if spec.type is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(source, key, f"expected text, got {type(value).__name__}")
        return str(value).strip()
    if spec.type in (int, float):
        if isinstance(value, bool):
            raise ConfigError(source, key, f"expected a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(source, key, f"expected a number, got {value!r}") from None
        if not isinstance(value, int | float):
            raise ConfigError(source, key, f"expected a number, got {type(value).__name__}")
        try:
            finite = math.isfinite(value)
        except OverflowError:
            raise ConfigError(source, key, "is too large") from None
        if not finite:
            raise ConfigError(source, key, f"expected a finite number, got {value!r}")
        if spec.type is int:
            if value != int(value):
                raise ConfigError(source, key, f"expected a whole number, got {value!r}")
            return int(value)
        return float(value)
    raise AssertionError(f"unhandled type for {key}")  # pragma: no cover


def _read_file(path: Path) -> dict[str, Any]:
    """Load one YAML file through dynaconf's safe loader; every failure is a ConfigError."""
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
    if not text.strip():
        return {}
    os.environ.pop("YAML_LOADER_FOR_DYNACONF", None)  # never the unsafe loader
    from dynaconf import Dynaconf
    from dynaconf.vendor.ruamel.yaml.error import (
        MarkedYAMLError,
        MarkedYAMLFutureWarning,
        YAMLError,
    )

    try:
        settings = Dynaconf(
            settings_files=[source], environments=False, core_loaders=["YAML"], loaders=[],
            load_dotenv=False, envvar_prefix="CHIFFON_NO_ENV_LOADER", merge_enabled=False,
            # values are data: no "@int", "@format", "@read_file" ... token evaluation
            auto_cast=False,
        )
        data = settings.as_dict()
    except (MarkedYAMLError, MarkedYAMLFutureWarning) as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = (exc.problem or exc.context or "invalid YAML").strip()
        raise ConfigError(source, None, f"invalid YAML at {line}{problem}") from None
    except YAMLError as exc:
        raise ConfigError(source, None, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(source, None, "invalid YAML: recursive alias") from None
    except (AttributeError, TypeError):
        # dynaconf assumes a mapping at the top level and fails this way on lists and scalars
        raise ConfigError(source, None, "must be a mapping of key: value lines") from None
    data.pop("LOAD_DOTENV", None)
    return {str(k).lower(): v for k, v in data.items()}


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, list(KEYS), n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def _env_layer(environ: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(key, raw value, variable name) for every chiffon setting in the environment."""
    found: dict[str, tuple[str, str]] = {}
    for name, key in ENV_ALIASES.items():
        if name in environ:
            found[key] = (environ[name], name)
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_ALIASES or name in ENV_NOT_SETTINGS:
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in KEYS:
            log.warning("ignoring unknown environment variable %s%s", name, _closest(key))
            continue
        found[key] = (value, name)  # the long form wins over a short alias
    return [(key, value, name) for key, (value, name) in found.items()]


def _machine_agent_id(state_dir: Path) -> str:
    """A UUID stable across restarts of this machine and different between machines.

    Derived from ``/etc/machine-id`` (systemd) or ``/var/lib/dbus/machine-id``; on a
    machine with neither, a random UUID is kept in ``state_dir/agent-id``.
    """
    for candidate in (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id")):
        try:
            machine_id = candidate.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if machine_id:
            return str(uuid.uuid5(_AGENT_ID_NAMESPACE, machine_id))
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


@dataclass(frozen=True, init=False)
class Config:
    """The effective configuration; read-only after construction.

    ``Config()`` loads the standard layers. Keyword arguments override every layer
    (source ``"argument"``), which is how tests and embedding code pin values. ``environ``
    and ``home`` replace ``os.environ`` and the home directory for the lookup.
    """

    heartbeat_interval_seconds: float
    heartbeat_timeout_seconds: float
    gpu_detection_timeout_seconds: float
    agent_id: str
    agent_pool_name: str
    rabbitmq_host: str
    rabbitmq_port: int
    rabbitmq_user: str
    rabbitmq_password: str
    rabbitmq_vhost: str
    broker_url: str
    result_backend: str
    database_url: str
    state_dir: str
    sysfs_root: str
    worker_pool: str
    worker_concurrency: int
    log_level: str
    heartbeat_secret: str
    metrics_port: int
    hostname: str
    #: key -> where its value came from ("default", a file path, "env CHIFFON_X", "argument")
    sources: Mapping[str, str] = field(compare=False, repr=False)
    #: the config files that were found and loaded, lowest precedence first
    files_loaded: tuple[str, ...] = field(compare=False, repr=False)

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
        values: dict[str, Any] = {key: spec.default for key, spec in KEYS.items()}
        sources: dict[str, str] = dict.fromkeys(KEYS, "default")
        files: list[Path] = [Path(system_file) if system_file else SYSTEM_CONFIG_FILE,
                             home_dir / USER_CONFIG_RELATIVE]
        explicit = env.get("CHIFFON_CONFIG", "").strip()
        if explicit:
            path = Path(explicit).expanduser()
            if path.is_dir():
                raise ConfigError("CHIFFON_CONFIG", None,
                                  f"{path} is a directory, not a config file")
            if not path.is_file():
                raise ConfigError("CHIFFON_CONFIG", None, f"{path} does not exist")
            files.append(path)
        loaded: list[str] = []
        for path in files:
            if not path.exists():
                continue
            for key, raw in _read_file(path).items():
                if key not in KEYS:
                    log.warning("%s: unknown key %r ignored%s", path, key, _closest(key))
                    continue
                values[key] = _coerce(key, KEYS[key], raw, str(path))
                sources[key] = str(path)
            loaded.append(str(path))
        for key, raw, name in _env_layer(env):
            values[key] = _coerce(key, KEYS[key], raw, f"environment {name}")
            sources[key] = f"environment {name}"
        for key, raw in overrides.items():
            if key not in KEYS:
                raise TypeError(f"Config() got an unknown setting {key!r}{_closest(key)}")
            values[key] = _coerce(key, KEYS[key], raw, "argument")
            sources[key] = "argument"
        _validate(values, sources)
        if not values["state_dir"]:
            values["state_dir"] = default_state_dir()
        values["state_dir"] = str(Path(values["state_dir"]).expanduser())
        if not values["agent_id"]:
            values["agent_id"] = _machine_agent_id(Path(values["state_dir"]))
            sources["agent_id"] = "derived from machine-id"
        values["hostname"] = socket.gethostname()
        sources["hostname"] = "system"
        for key, value in values.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "sources", dict(sources))
        object.__setattr__(self, "files_loaded", tuple(loaded))
        log.debug("config loaded from %s", ", ".join(loaded) or "defaults and environment")

    # -- derived values ---------------------------------------------------------------

    @property
    def effective_broker_url(self) -> str:
        """``broker_url`` if set, else the AMQP URL built from the ``rabbitmq_*`` keys."""
        if self.broker_url:
            return self.broker_url
        user = quote(self.rabbitmq_user, safe="")
        password = quote(self.rabbitmq_password, safe="")
        # kombu reads "amqp://host:port//" as the default vhost "/"
        vhost = "/" if self.rabbitmq_vhost == "/" else quote(self.rabbitmq_vhost, safe="")
        return f"amqp://{user}:{password}@{self.rabbitmq_host}:{self.rabbitmq_port}/{vhost}"

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
        return f"chiffon.agent.{self.agent_id}"

    def masked(self) -> dict[str, Any]:
        """Every setting with secrets replaced by ``**`` and URL passwords masked."""
        out: dict[str, Any] = {}
        for key in (*KEYS, "hostname"):
            value = getattr(self, key)
            if key in SECRET_KEYS and value:
                value = "**"
            elif key in URL_KEYS and value:
                value = mask_url(value)
            out[key] = value
        return out


def _validate(values: dict[str, Any], sources: dict[str, str]) -> None:
    for key, spec in KEYS.items():
        if spec.check is None:
            continue
        problem = spec.check(values[key])
        if problem:
            shown = values[key]
            if key in SECRET_KEYS:
                shown = "**"
            elif key in URL_KEYS:
                shown = mask_url(shown)
            raise ConfigError(sources[key], key, f"{problem} (got {shown!r})")
    interval = values["heartbeat_interval_seconds"]
    timeout = values["heartbeat_timeout_seconds"]
    if timeout < interval:
        raise ConfigError(
            sources["heartbeat_timeout_seconds"], "heartbeat_timeout_seconds",
            f"{timeout:g} s is shorter than heartbeat_interval_seconds {interval:g} s "
            f"(from {sources['heartbeat_interval_seconds']}); use about 3x the interval",
        )
