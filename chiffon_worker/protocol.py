"""Wire formats: ``WorkRequest``, ``WorkResult`` and the heartbeat snapshot (schema 1).

Every parser takes JSON text, bytes or an already-decoded object and either returns a
validated value or raises :class:`~chiffon_worker.errors.ProtocolError` naming the field.
No other exception escapes a parser.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from chiffon_worker.errors import ProtocolError

SNAPSHOT_SCHEMA = 1
#: Largest message a parser accepts (bytes of JSON); a heartbeat is ~2 KiB.
MAX_MESSAGE_BYTES = 1 << 20
_MAX_ID_LENGTH = 256

Status = Literal["success", "error"]
_NUMBER = (int, float)

#: Flat snapshot keys the orchestrator routes on, with their JSON types.
SNAPSHOT_METRIC_KEYS: dict[str, tuple[type, ...]] = {
    "cpu_percent": _NUMBER,
    "cpu_load_1min": _NUMBER,
    "cpu_load_5min": _NUMBER,
    "cpu_load_15min": _NUMBER,
    "cpu_cores_physical": (int,),
    "cpu_cores_available": _NUMBER,
    "memory_percent": _NUMBER,
    "memory_available_gb": _NUMBER,
    "memory_total_gb": _NUMBER,
    "gpu_vram_total_gb": _NUMBER,
    "gpu_vram_available_gb": _NUMBER,
    "gpu_type": (str,),
    "gpu_count": (int,),
}
#: The envelope every heartbeat carries.
SNAPSHOT_ENVELOPE_KEYS: dict[str, tuple[type, ...]] = {
    "schema": (int,),
    "agent_id": (str,),
    "hostname": (str,),
    "pool": (str,),
    "boot_id": (str,),
    "seq": (int,),
    "started_at": _NUMBER,
    "collected_at": _NUMBER,
    "heartbeat_interval_seconds": _NUMBER,
    "heartbeat_timeout_seconds": _NUMBER,
    "capabilities": (dict,),
    "version": (str,),
    "gpus": (list,),
    "gpu_probe": (dict,),
}
SNAPSHOT_KEYS: tuple[str, ...] = (*SNAPSHOT_ENVELOPE_KEYS, *SNAPSHOT_METRIC_KEYS)
GPU_TYPES = ("nvidia", "amd", "intel", "none")
PROBE_STATES = ("ok", "stale", "timeout", "error", "absent")
_PERCENT_KEYS = ("cpu_percent", "memory_percent")
_POSITIVE_KEYS = ("heartbeat_interval_seconds", "heartbeat_timeout_seconds")


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
        raise ProtocolError(None, f"{what} must be a JSON object, got {_kind(data)}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(None, f"{what} is {len(data)} characters; the limit is "
                                  f"{MAX_MESSAGE_BYTES}")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(None, f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(None, f"{what} must be a JSON object, got {_kind(value)}")
    return value


def _text(obj: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        problem = "is missing" if key not in obj else f"must be a string, got {_kind(value)}"
        raise ProtocolError(key, problem)
    if required and not value.strip():
        raise ProtocolError(key, "must not be empty")
    if len(value) > _MAX_ID_LENGTH and key != "error":
        raise ProtocolError(key, f"is longer than {_MAX_ID_LENGTH} characters")
    if key != "error" and any(unicodedata.category(ch) == "Cc" for ch in value):
        raise ProtocolError(key, "must not contain control characters")
    return value


def _finite(value: float) -> bool:
    """``math.isfinite`` that treats an int too large for a float as not finite."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


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
                self.duration_seconds, _NUMBER) or not _finite(self.duration_seconds) \
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
            raise ProtocolError("error", f"must be a string or null, got {_kind(error)}")
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


#: Fields of each ``gpus`` entry: (JSON types, may be null).
GPU_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "index": ((int,), False),
    "vendor": ((str,), False),
    "name": ((str,), False),
    "vram_total_gb": (_NUMBER, True),
    "vram_available_gb": (_NUMBER, True),
    "utilization_percent": (_NUMBER, True),
    "temperature_c": (_NUMBER, True),
    "source": ((str,), False),
}


def _check_gpu(gpu: Any, where: str) -> None:
    if not isinstance(gpu, dict):
        raise ProtocolError(where, "must be an object")
    for key, (types, nullable) in GPU_FIELDS.items():
        name = f"{where}.{key}"
        if key not in gpu:
            raise ProtocolError(name, "is missing")
        value = gpu[key]
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join(t.__name__ for t in types) + (" or null" if nullable else "")
            raise ProtocolError(name, f"must be {expected}, got {_kind(value)}")
        if isinstance(value, _NUMBER) and (not _finite(value) or value < 0):
            raise ProtocolError(name, "must be a finite, non-negative number")
    if gpu["vendor"] not in GPU_TYPES[:-1]:
        raise ProtocolError(f"{where}.vendor", f"must be one of {', '.join(GPU_TYPES[:-1])}")


def validate_snapshot(data: str | bytes | bytearray | Mapping[str, Any]) -> dict[str, Any]:
    """Validate a heartbeat snapshot (schema 1) and return it as a dict.

    Checks presence and JSON type of every envelope and flat metric key, the schema
    version, finite non-negative numbers, percentages within 0-100, and known enums.
    Extra keys are allowed (newer agents may add some).
    """
    snap = _decode(data, "heartbeat snapshot")
    schema = snap.get("schema")
    if schema != SNAPSHOT_SCHEMA:
        raise ProtocolError("schema", f"unsupported schema {schema!r}; expected "
                                      f"{SNAPSHOT_SCHEMA}")
    for table in (SNAPSHOT_ENVELOPE_KEYS, SNAPSHOT_METRIC_KEYS):
        for key, types in table.items():
            if key not in snap:
                raise ProtocolError(key, "is missing")
            value = snap[key]
            if isinstance(value, bool) or not isinstance(value, types):
                expected = " or ".join(t.__name__ for t in types)
                raise ProtocolError(key, f"must be {expected}, got {_kind(value)}")
            if isinstance(value, _NUMBER):
                if not _finite(value):
                    raise ProtocolError(key, "must be a finite number")
                if value < 0:
                    raise ProtocolError(key, f"must not be negative, got {value}")
    for key in ("agent_id", "hostname", "pool", "boot_id"):
        _text(snap, key)
    for key in _PERCENT_KEYS:
        if snap[key] > 100:
            raise ProtocolError(key, f"must be at most 100, got {snap[key]}")
    for key in _POSITIVE_KEYS:
        if snap[key] <= 0:
            raise ProtocolError(key, "must be greater than 0")
    if snap["gpu_type"] not in GPU_TYPES:
        raise ProtocolError("gpu_type", f"must be one of {', '.join(GPU_TYPES)}")
    if snap["gpu_count"] != len(snap["gpus"]):
        raise ProtocolError("gpu_count", f"is {snap['gpu_count']} but gpus lists "
                                         f"{len(snap['gpus'])}")
    if snap["gpu_vram_available_gb"] > snap["gpu_vram_total_gb"] + 1e-6:
        raise ProtocolError("gpu_vram_available_gb", "exceeds gpu_vram_total_gb")
    if snap["memory_available_gb"] > snap["memory_total_gb"] + 1e-6:
        raise ProtocolError("memory_available_gb", "exceeds memory_total_gb")
    for position, gpu in enumerate(snap["gpus"]):
        _check_gpu(gpu, f"gpus[{position}]")
    state = snap["gpu_probe"].get("state")
    if state not in PROBE_STATES:
        raise ProtocolError("gpu_probe.state", f"must be one of {', '.join(PROBE_STATES)}")
    return snap
