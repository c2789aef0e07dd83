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
