"""The exception hierarchy: every error the project raises on purpose is a ``ChiffonError``.

Callers that face users (the CLI, the worker start-up, the orchestrator consumer) catch
``ChiffonError`` and show its message as one line; anything else is a bug.
"""

from __future__ import annotations

#: Exit statuses of every chiffon entry point (the ``chiffon`` command and the worker).
EXIT_OK = 0
#: A deliberate failure that is not about configuration (work failed, registry gone, ...).
EXIT_ERROR = 1
#: The configuration is unusable (bad file, key or value; a broker that refuses the login).
EXIT_CONFIG = 2
#: Interrupted by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130


def one_line(text: str) -> str:
    """``text`` with line breaks escaped, so a message is always exactly one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class ChiffonError(Exception):
    """Base of every deliberate chiffon error; ``str()`` is a complete one-line message."""


class MissingExtra(ChiffonError):
    """A command needs an optional part of chiffon that is not installed (exit status 2:
    the installation, like the configuration, is what to fix)."""


class WorkHandedBack(ChiffonError):
    """Running work stopped to go back to the pool queue (the owner rules asked)."""


class ConfigError(ChiffonError):
    """The configuration is unusable: names the file (or environment variable), key and problem."""

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(one_line(f"{where}: {problem}"))


class ProtocolError(ChiffonError, ValueError):
    """A message (work request, work result or heartbeat snapshot) failed validation."""

    def __init__(self, field: str | None, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(one_line(f"{field}: {problem}" if field else problem))


class GpuProbeError(ChiffonError):
    """A GPU source is present but could not be read (driver error, lost GPU, bad output)."""


class GpuSourceUnavailable(ChiffonError):
    """A GPU source does not exist on this machine (no library, no tool, no sysfs entries)."""


class ProbeTimeout(GpuProbeError):
    """A GPU probe ran past ``gpu_detection_timeout_seconds``."""


class RegistryError(ChiffonError):
    """The orchestrator's registry cannot be opened, read or written."""


class RoutingError(ChiffonError):
    """Work cannot be routed: no pool, or no online agent fits the request."""


class BrokerLoginRefused(ChiffonError):
    """The broker refused the login (or the user's access to what was asked): a
    configuration problem, so every entry point stops with ``EXIT_CONFIG`` (2) instead of
    retrying. ``masked_url`` must already hide the password."""

    def __init__(self, masked_url: str, problem: str) -> None:
        self.masked_url = masked_url
        self.problem = problem
        super().__init__(one_line(f"broker {masked_url}: {problem}"))

    @classmethod
    def from_error(cls, masked_url: str, exc: BaseException) -> BrokerLoginRefused | None:
        """The refusal ``exc`` carries (itself, or its ``__cause__``/``__context__`` chain),
        or None when it is some other fault (an outage, a missing vhost, ...).

        Refusals: AMQP ``ACCESS_REFUSED`` (:class:`amqp.exceptions.AccessRefused`: a wrong
        user or password, or a user without permission on a queue or exchange) and Redis
        ``AuthenticationError``.
        """
        refusal = refusal_in_chain(exc)
        if refusal is None:
            return None
        return cls(masked_url, _refusal_problem(refusal))


class BrokerTlsFailed(BrokerLoginRefused):
    """The TLS handshake with the broker failed for a reason retrying cannot fix: an
    untrusted, expired or misnamed broker certificate, a client certificate the broker
    requires or rejects, no TLS version in common, no TLS on that port. Like a refused
    login it is a configuration problem (exit status 2, no retry), so it is one: every
    place that stops on BrokerLoginRefused stops on it too. Made by
    :meth:`chiffon_worker.broker_tls.BrokerTls.failure`, which names the file or the check
    at fault; ``masked_url`` must already hide the password."""


class BrokerPermissionRefused(BrokerLoginRefused):
    """The broker let the user in but refused it a permission (RabbitMQ ``ACCESS_REFUSED``
    on a declare, bind, consume or publish): the user's permissions do not fit its role, a
    configuration problem like a refused login (exit status 2, no retry). One line naming
    ``what`` was refused (``chiffon submit``, ``the agent``...), its ``role`` (``agent``,
    ``orchestrator``, ``submitter``, ``flower``), the user, the missing ``permission``
    (``configure``, ``write``, ``read``) and the resource. Made by
    :func:`chiffon_worker.broker_permissions.permission_refused`."""

    def __init__(self, what: str, role: str, *, permission: str, kind: str, name: str,
                 vhost: str, user: str) -> None:
        self.what = what
        self.role = role
        self.permission = permission
        self.kind = kind
        self.name = name
        self.vhost = vhost
        self.user = user
        self.masked_url = ""
        self.problem = (f"user '{user}' has no {permission} permission on {kind} '{name}' "
                        f"in vhost '{vhost}'")
        ChiffonError.__init__(self, one_line(
            f"the broker refused {what} ({role}): {self.problem}; see docs/security.md"))


#: What to fix when the broker refuses a login.
LOGIN_HINT = "check broker_url's user and password"
#: The same for RabbitMQ, whose URL may be built from the ``rabbitmq_*`` keys.
AMQP_LOGIN_HINT = f"{LOGIN_HINT} (or rabbitmq_user and rabbitmq_password)"
#: What to fix when the broker refuses a logged-in user access to a queue or exchange.
PERMISSION_HINT = "check the user's permissions on the vhost (rabbitmqctl set_permissions)"


def _refusal_types() -> tuple[type[BaseException], ...]:
    """The exception classes of a refused broker login (imported late: this module is
    imported everywhere, the broker clients only where a broker is used)."""
    from amqp.exceptions import AccessRefused
    from redis.exceptions import AuthenticationError

    return (AccessRefused, AuthenticationError)


def refusal_in_chain(exc: BaseException) -> BaseException | None:
    """The first refused-login exception among ``exc``, its cause and its context."""
    refusals = _refusal_types()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, refusals):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _refusal_problem(refusal: BaseException) -> str:
    """``login refused (ACCESS_REFUSED): <hint>`` and the like, for one refusal."""
    reply = getattr(refusal, "reply_text", None)
    if not isinstance(reply, str):  # Redis: the server's words
        return f"login refused ({refusal}): {LOGIN_HINT}"
    code, _sep, detail = reply.partition(" - ")
    if "login was refused" in detail.lower() or not detail:
        return f"login refused ({code or 'ACCESS_REFUSED'}): {AMQP_LOGIN_HINT}"
    return f"access refused ({reply}): {PERMISSION_HINT}"
