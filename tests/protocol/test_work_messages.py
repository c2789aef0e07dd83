"""WorkRequest and WorkResult: JSON round trips and clear rejections."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chiffon_worker.errors import ProtocolError
from chiffon_worker.protocol import MAX_MESSAGE_BYTES, WorkRequest, WorkResult


def test_work_request_round_trips_through_json() -> None:
    request = WorkRequest("w-1", "render", {"frames": [1, 2, 3]})
    assert WorkRequest.from_json(request.to_json()) == request
    assert json.loads(request.to_json()) == {"work_id": "w-1", "work_type": "render",
                                             "payload": {"frames": [1, 2, 3]}}


def test_work_request_accepts_bytes_and_dicts() -> None:
    text = '{"work_id": "a", "work_type": "b", "payload": null}'
    assert WorkRequest.from_json(text.encode()) == WorkRequest.from_json(json.loads(text))


def test_work_request_payload_defaults_to_empty_object() -> None:
    assert WorkRequest.from_json({"work_id": "a", "work_type": "b"}).payload == {}


@pytest.mark.parametrize(
    ("raw", "field", "problem"),
    [
        ("not json", None, "not valid JSON"),
        ("[1, 2]", None, "must be a JSON object, got list"),
        ("42", None, "must be a JSON object, got int"),
        (b"\xff\xfe", None, "not UTF-8"),
        ({"work_type": "x"}, "work_id", "is missing"),
        ({"work_id": "", "work_type": "x"}, "work_id", "must not be empty"),
        ({"work_id": 7, "work_type": "x"}, "work_id", "must be a string, got int"),
        ({"work_id": "a", "work_type": None}, "work_type", "must be a string, got null"),
        ({"work_id": "a" * 300, "work_type": "x"}, "work_id", "longer than 256"),
        ({"work_id": "a", "work_type": "x", "extra": 1}, "extra", "not a work request field"),
        (12.5, None, "must be a JSON object, got float"),
    ],
)
def test_malformed_work_request_names_the_field(raw: Any, field: str | None,
                                                problem: str) -> None:
    with pytest.raises(ProtocolError) as raised:
        WorkRequest.from_json(raw)
    assert raised.value.field == field
    assert problem in str(raised.value)


def test_oversized_work_request_is_rejected_before_parsing() -> None:
    blob = '{"work_id": "a", "work_type": "b", "payload": "' + "x" * MAX_MESSAGE_BYTES + '"}'
    with pytest.raises(ProtocolError, match="the limit is"):
        WorkRequest.from_json(blob)


def test_work_result_round_trips_through_json() -> None:
    result = WorkResult("w-1", "success", {"ok": True}, None, "agent-1", 0.25)
    assert WorkResult.from_json(result.to_json()) == result


def test_failure_result_carries_the_error() -> None:
    result = WorkResult.failure("w-2", "boom", "agent-1")
    assert result.to_dict() == {"work_id": "w-2", "status": "error", "output": None,
                                "error": "boom", "agent_id": "agent-1",
                                "duration_seconds": 0.0}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"status": "done"}, "status"),
        ({"status": "error", "error": None}, "error"),
        ({"duration_seconds": -1}, "duration_seconds"),
        ({"duration_seconds": "1"}, "duration_seconds"),
        ({"error": 5}, "error"),
        ({"agent_id": ""}, "agent_id"),
    ],
)
def test_invalid_work_result_names_the_field(changes: dict[str, Any], field: str) -> None:
    base = {"work_id": "w", "status": "success", "output": 1, "error": None,
            "agent_id": "a", "duration_seconds": 0.1}
    base.update(changes)
    with pytest.raises(ProtocolError) as raised:
        WorkResult.from_json(base)
    assert raised.value.field == field


def test_nan_payload_is_not_plain_json() -> None:
    with pytest.raises(ProtocolError) as raised:
        WorkRequest("a", "b", {"x": float("nan")})
    assert raised.value.field == "payload"
