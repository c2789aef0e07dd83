"""Wire formats: ``WorkRequest``, ``WorkResult`` and the heartbeat snapshot (schema 1).

Every parser takes JSON text, bytes or an already-decoded object and either returns a
validated value or raises :class:`~chiffon_worker.errors.ProtocolError` naming the field.
No other exception escapes a parser.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from chiffon_worker.errors import ProtocolError
from chiffon_worker.snapshot import (
    GPU_FIELDS,
    GPU_TYPES,
    MAX_ID_LENGTH,
    PROBE_STATES,
    SNAPSHOT_ENVELOPE_KEYS,
    SNAPSHOT_KEYS,
    SNAPSHOT_METRIC_KEYS,
    SNAPSHOT_SCHEMA,
)
from chiffon_worker.snapshot_validator import (
    check_snapshot,
    has_control_characters,
    is_finite,
    kind,
)

__all__ = [
    "GPU_FIELDS",
    "GPU_TYPES",
    "MAX_MESSAGE_BYTES",
    "PROBE_STATES",
    "SNAPSHOT_ENVELOPE_KEYS",
    "SNAPSHOT_KEYS",
    "SNAPSHOT_METRIC_KEYS",
    "SNAPSHOT_SCHEMA",
    "WorkRequest",
    "WorkResult",
    "validate_snapshot",
]

#: Largest message a parser accepts (bytes of JSON); a heartbeat is ~2 KiB.
MAX_MESSAGE_BYTES = 1 << 20

Status = Literal["success", "error"]
_NUMBER = (int, float)


def _decode(data: str | bytes | bytearray | Mapping[str, Any], what: str) -> dict[str, Any]:
    """JSON text/bytes or a mapping -> a dict; anything else is a ProtocolError."""
    if isinstance(data, Mapping):
        return dict(data)
    if isinstance(data, bytes | bytearray):
        if len(data) > MAX_MESSAGE_BYTES:
            raise ProtocolError(None, f"{what} is {len(data)} bytes; the limit is "
                                      f"{MAX_MESSAGE_BYTES}")
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(None, f"{what} is not UTF-8 text") from None
    if not isinstance(data, str):
        raise ProtocolError(None, f"{what} must be a JSON object, got {kind(data)}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(None, f"{what} is {len(data)} characters; the limit is "
                                  f"{MAX_MESSAGE_BYTES}")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(None, f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(None, f"{what} must be a JSON object, got {kind(value)}")
    return value


def _text(obj: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        problem = "is missing" if key not in obj else f"must be a string, got {kind(value)}"
        raise ProtocolError(key, problem)
    if required and not value.strip():
        raise ProtocolError(key, "must not be empty")
    if len(value) > MAX_ID_LENGTH and key != "error":
        raise ProtocolError(key, f"is longer than {MAX_ID_LENGTH} characters")
    if key != "error" and has_control_characters(value):
        raise ProtocolError(key, "must not contain control characters")
    return value


def _check_json_value(value: Any, key: str) -> None:
    """Reject values JSON cannot carry faithfully (NaN, infinities, non-string keys)."""
    try:
        size = len(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ProtocolError(key, f"is not plain JSON: {exc}") from None
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(key, f"is {size} bytes of JSON; the limit is {MAX_MESSAGE_BYTES}")


@dataclass(frozen=True)
class WorkRequest:
    """A unit of work: ``{"work_id": str, "work_type": str, "payload": object}``."""

    work_id: str
    work_type: str
    payload: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("work_id", "work_type"):
            _text({key: getattr(self, key)}, key)
        _check_json_value(self.payload, "payload")

    @classmethod
    def from_json(cls, data: str | bytes | bytearray | Mapping[str, Any]) -> WorkRequest:
        """Parse and validate; raises ProtocolError naming the bad field."""
        obj = _decode(data, "work request")
        unknown = sorted(set(obj) - {"work_id", "work_type", "payload"}, key=str)
        if unknown:
            raise ProtocolError(str(unknown[0]), "is not a work request field")
        return cls(work_id=_text(obj, "work_id"), work_type=_text(obj, "work_type"),
                   payload=obj.get("payload", {}))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object form."""
        return {"work_id": self.work_id, "work_type": self.work_type, "payload": self.payload}

    def to_json(self) -> str:
        """Compact JSON text."""
        return json.dumps(self.to_dict(), separators=(",", ":"))


@dataclass(frozen=True)
class WorkResult:
    """The outcome of one work request; ``error`` is set exactly when ``status`` is error."""

    work_id: str
    status: Status
    output: Any
    error: str | None
    agent_id: str
    duration_seconds: float

    def __post_init__(self) -> None:
        if self.status not in ("success", "error"):
            raise ProtocolError("status", f"must be 'success' or 'error', got {self.status!r}")
        if self.status == "error" and not self.error:
            raise ProtocolError("error", "must explain an error result")
        if isinstance(self.duration_seconds, bool) or not isinstance(
                self.duration_seconds, _NUMBER) or not is_finite(self.duration_seconds) \
                or self.duration_seconds < 0:
            raise ProtocolError("duration_seconds", "must be a non-negative number")
        _check_json_value(self.output, "output")

    @classmethod
    def success(cls, request: WorkRequest, output: Any, agent_id: str,
                duration_seconds: float) -> WorkResult:
        """A success result for ``request``."""
        return cls(request.work_id, "success", output, None, agent_id, duration_seconds)

    @classmethod
    def failure(cls, work_id: str, error: str, agent_id: str,
                duration_seconds: float = 0.0) -> WorkResult:
        """An error result (``work_id`` may be ``""`` when the request had none)."""
        return cls(work_id, "error", None, error, agent_id, duration_seconds)

    @classmethod
    def from_json(cls, data: str | bytes | bytearray | Mapping[str, Any]) -> WorkResult:
        """Parse and validate; raises ProtocolError naming the bad field."""
        obj = _decode(data, "work result")
        for key in ("work_id", "status", "output", "error", "agent_id", "duration_seconds"):
            if key not in obj:
                raise ProtocolError(key, "is missing")
        error = obj["error"]
        if error is not None and not isinstance(error, str):
            raise ProtocolError("error", f"must be a string or null, got {kind(error)}")
        return cls(work_id=_text(obj, "work_id", required=False), status=obj["status"],
                   output=obj["output"], error=error, agent_id=_text(obj, "agent_id"),
                   duration_seconds=obj["duration_seconds"])

    def to_dict(self) -> dict[str, Any]:
        """The JSON object form."""
        return {"work_id": self.work_id, "status": self.status, "output": self.output,
                "error": self.error, "agent_id": self.agent_id,
                "duration_seconds": round(self.duration_seconds, 6)}

    def to_json(self) -> str:
        """Compact JSON text."""
        return json.dumps(self.to_dict(), separators=(",", ":"))


def validate_snapshot(data: str | bytes | bytearray | Mapping[str, Any]) -> dict[str, Any]:
    """Validate a heartbeat snapshot (schema 1) and return it as a dict.

    Checks presence and JSON type of every envelope and flat metric key, the schema
    version, finite non-negative numbers, percentages within 0-100, and known enums, as
    declared in :mod:`chiffon_worker.snapshot`. Extra keys are allowed (newer agents may
    add some).
    """
    snap = _decode(data, "heartbeat snapshot")
    check_snapshot(snap)
    return snap
