"""The heartbeat snapshot validator (schema 1)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from chiffon_worker.errors import ProtocolError
from chiffon_worker.protocol import SNAPSHOT_KEYS, validate_snapshot
from tests.samples import GOOD_SNAPSHOT

GOOD: dict[str, Any] = GOOD_SNAPSHOT


def with_change(**changes: Any) -> dict[str, Any]:
    snap = copy.deepcopy(GOOD)
    snap.update(changes)
    return snap


def test_good_snapshot_validates_from_text_and_object() -> None:
    assert validate_snapshot(json.dumps(GOOD)) == GOOD
    assert validate_snapshot(GOOD) == GOOD


@pytest.mark.parametrize("key", SNAPSHOT_KEYS)
def test_every_key_is_required(key: str) -> None:
    snap = copy.deepcopy(GOOD)
    del snap[key]
    with pytest.raises(ProtocolError) as raised:
        validate_snapshot(snap)
    assert raised.value.field == key


@pytest.mark.parametrize(
    ("changes", "field", "problem"),
    [
        ({"schema": 2}, "schema", "unsupported schema 2"),
        ({"seq": "3"}, "seq", "must be int, got str"),
        ({"seq": True}, "seq", "must be int, got bool"),
        ({"cpu_load_1min": -0.1}, "cpu_load_1min", "must not be negative"),
        ({"cpu_percent": 101}, "cpu_percent", "at most 100"),
        ({"memory_available_gb": 99.0}, "memory_available_gb", "exceeds memory_total_gb"),
        ({"gpu_vram_available_gb": 30.0}, "gpu_vram_available_gb", "exceeds"),
        ({"gpu_type": "3dfx"}, "gpu_type", "must be one of"),
        ({"gpu_count": 2}, "gpu_count", "is 2 but gpus lists 1"),
        ({"agent_id": ""}, "agent_id", "must not be empty"),
        ({"heartbeat_timeout_seconds": 0}, "heartbeat_timeout_seconds", "greater than 0"),
        ({"gpus": ["x"]}, "gpus[0]", "must be an object"),
        ({"gpu_probe": {"state": "weird"}}, "gpu_probe.state", "must be one of"),
        ({"cpu_cores_physical": 8.5}, "cpu_cores_physical", "must be int"),
        ({"memory_total_gb": None}, "memory_total_gb", "got null"),
    ],
)
def test_bad_snapshot_names_the_field(changes: dict[str, Any], field: str,
                                      problem: str) -> None:
    with pytest.raises(ProtocolError) as raised:
        validate_snapshot(with_change(**changes))
    assert raised.value.field == field
    assert problem in str(raised.value)


def test_infinite_number_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="finite"):
        validate_snapshot(with_change(cpu_load_1min=float("inf")))


def test_ten_megabyte_payload_is_rejected_by_size() -> None:
    blob = json.dumps(with_change(padding="x" * 10_000_000)).encode()
    with pytest.raises(ProtocolError, match="the limit is"):
        validate_snapshot(blob)


def test_extra_keys_from_newer_agents_are_allowed() -> None:
    assert validate_snapshot(with_change(cpu_cores_effective=1.5))["cpu_cores_effective"] == 1.5
