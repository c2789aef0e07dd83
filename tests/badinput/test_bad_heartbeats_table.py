"""Bad heartbeat snapshots against ``validate_snapshot``: the exact field and problem.

A table of snapshots an agent (buggy, older, newer or hostile) could put on
``chiffon.heartbeats``; each must be refused with one ProtocolError naming the field and
the problem. The end-to-end version, through the orchestrator's consumer, will reuse
``HEARTBEATS`` once that consumer exists. ``tests/protocol`` has the unit-level basics
(every key required, a few wrong types); these are the cases beyond them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from chiffon_worker.errors import ProtocolError
from chiffon_worker.protocol import validate_snapshot
from tests.samples import GOOD_SNAPSHOT

_UNSET = object()
GPU = GOOD_SNAPSHOT["gpus"][0]


@dataclass(frozen=True)
class BadHeartbeat:
    """``changes`` applied to the good snapshot (or ``raw`` sent as is); the expected error."""

    id: str
    field: str | None
    problem: str
    changes: dict[str, Any] = field(default_factory=dict)
    raw: Any = _UNSET
    as_text: bool = False  # send json.dumps(snapshot) instead of the object
    xfail: str | None = None

    def data(self) -> Any:
        if self.raw is not _UNSET:
            return self.raw
        snap = copy.deepcopy(GOOD_SNAPSHOT)
        snap.update(copy.deepcopy(self.changes))
        return json.dumps(snap) if self.as_text else snap


def _text_with(key: str, token: str) -> str:
    """The good snapshot as JSON text with ``key``'s value replaced by a raw JSON token."""
    snap = dict(GOOD_SNAPSHOT, **{key: "@@"})
    return json.dumps(snap).replace('"@@"', token)


NO_GPU = {"gpu_type": "none", "gpu_count": 0, "gpus": [], "gpu_vram_total_gb": 0.0,
          "gpu_vram_available_gb": 0.0}

HEARTBEATS: list[BadHeartbeat] = [
    # -- the message as a whole
    BadHeartbeat("not_json_text", None,
                 "heartbeat snapshot is not valid JSON: Expecting value: line 1 column 1 "
                 "(char 0)", raw="cpu=12.5 mem=40"),
    BadHeartbeat("json_array_text", None, "heartbeat snapshot must be a JSON object, got list",
                 raw=json.dumps([GOOD_SNAPSHOT])),
    BadHeartbeat("number_argument", None, "heartbeat snapshot must be a JSON object, got int",
                 raw=1),
    BadHeartbeat("non_utf8_bytes", None, "heartbeat snapshot is not UTF-8 text",
                 raw=b'{"schema": 1, "hostname": "r\xe9g"}'),
    # -- schema version
    BadHeartbeat("schema_as_string", "schema", "unsupported schema '1'; expected 1",
                 {"schema": "1"}),
    BadHeartbeat("schema_null", "schema", "unsupported schema None; expected 1",
                 {"schema": None}),
    BadHeartbeat("schema_float_equal_to_one", "schema", "must be int, got float",
                 {"schema": 1.0}),
    BadHeartbeat("schema_true_equal_to_one", "schema", "must be int, got bool",
                 {"schema": True}),
    # -- envelope
    BadHeartbeat("seq_negative", "seq", "must not be negative, got -1", {"seq": -1}),
    BadHeartbeat("seq_float", "seq", "must be int, got float", {"seq": 12.0}),
    BadHeartbeat("collected_at_nan_object", "collected_at", "must be a finite number",
                 {"collected_at": float("nan")}),
    BadHeartbeat("collected_at_nan_token_in_text", "collected_at", "must be a finite number",
                 raw=_text_with("collected_at", "NaN")),
    BadHeartbeat("started_at_minus_infinity_token_in_text", "started_at",
                 "must be a finite number", raw=_text_with("started_at", "-Infinity")),
    BadHeartbeat("started_at_iso_string", "started_at", "must be int or float, got str",
                 {"started_at": "2024-01-01T00:00:00Z"}),
    BadHeartbeat("interval_zero", "heartbeat_interval_seconds", "must be greater than 0",
                 {"heartbeat_interval_seconds": 0}),
    BadHeartbeat("timeout_as_string", "heartbeat_timeout_seconds",
                 "must be int or float, got str", {"heartbeat_timeout_seconds": "90"}),
    BadHeartbeat("agent_id_list", "agent_id", "must be str, got list",
                 {"agent_id": ["rig-1"]}),
    BadHeartbeat("hostname_blank", "hostname", "must not be empty", {"hostname": "   "}),
    BadHeartbeat("pool_257_characters", "pool", "is longer than 256 characters",
                 {"pool": "p" * 257}),
    BadHeartbeat("boot_id_integer", "boot_id", "must be str, got int", {"boot_id": 42}),
    BadHeartbeat("capabilities_list", "capabilities", "must be dict, got list",
                 {"capabilities": ["gpu"]}),
    BadHeartbeat("version_number", "version", "must be str, got int", {"version": 1}),
    # -- metrics
    BadHeartbeat("cpu_percent_negative", "cpu_percent", "must not be negative, got -0.5",
                 {"cpu_percent": -0.5}),
    BadHeartbeat("memory_percent_over_100", "memory_percent", "must be at most 100, got 100.01",
                 {"memory_percent": 100.01}),
    BadHeartbeat("load_null", "cpu_load_15min", "must be int or float, got null",
                 {"cpu_load_15min": None}),
    BadHeartbeat("memory_available_exceeds_total", "memory_available_gb",
                 "exceeds memory_total_gb", {"memory_available_gb": 31.31}),
    BadHeartbeat("vram_available_without_vram", "gpu_vram_available_gb",
                 "exceeds gpu_vram_total_gb", {**NO_GPU, "gpu_vram_available_gb": 1.0}),
    # -- GPUs
    BadHeartbeat("gpu_type_upper_case", "gpu_type", "must be one of nvidia, amd, intel, none",
                 {"gpu_type": "NVIDIA"}),
    BadHeartbeat("gpu_type_null", "gpu_type", "must be str, got null", {"gpu_type": None}),
    BadHeartbeat("gpu_count_negative", "gpu_count", "must not be negative, got -1",
                 {**NO_GPU, "gpu_count": -1}),
    BadHeartbeat("gpu_count_zero_with_one_gpu_listed", "gpu_count", "is 0 but gpus lists 1",
                 {"gpu_count": 0}),
    BadHeartbeat("gpus_object", "gpus", "must be list, got dict", {"gpus": {"0": GPU}}),
    BadHeartbeat("gpus_null_entry", "gpus[0]", "must be an object",
                 {"gpus": [None]}),
    BadHeartbeat("gpus_second_entry_number", "gpus[1]", "must be an object",
                 {"gpus": [GPU, 5], "gpu_count": 2}),
    BadHeartbeat("gpu_probe_list", "gpu_probe", "must be dict, got list",
                 {"gpu_probe": ["ok"]}),
    BadHeartbeat("gpu_probe_without_state", "gpu_probe.state",
                 "must be one of ok, stale, timeout, error, absent",
                 {"gpu_probe": {"source": "nvml"}}),
    BadHeartbeat("gpu_entry_vram_as_text", "gpus[0].vram_total_gb",
                 "must be int or float or null, got str",
                 {"gpus": [dict(GPU, vram_total_gb="24 GiB")]}),
    BadHeartbeat("gpu_entry_negative_temperature", "gpus[0].temperature_c",
                 "must be a finite, non-negative number",
                 {"gpus": [dict(GPU, temperature_c=-5)]}),
    BadHeartbeat("gpu_entry_without_vendor", "gpus[0].vendor", "is missing",
                 {"gpus": [{k: v for k, v in GPU.items() if k != "vendor"}]}),
    BadHeartbeat("agent_id_with_newline", "agent_id", "must not contain control characters",
                 {"agent_id": "rig-1\nrig-2"}),
]


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.id,
                 marks=[pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else [])
    for case in HEARTBEATS])
def test_bad_heartbeat_is_refused_naming_field_and_problem(case: BadHeartbeat) -> None:
    with pytest.raises(ProtocolError) as raised:
        validate_snapshot(case.data())
    error = raised.value
    assert (error.field, error.problem) == (case.field, case.problem)
    assert str(error) == (f"{case.field}: {case.problem}" if case.field else case.problem)


def test_the_table_starts_from_a_valid_snapshot() -> None:
    assert validate_snapshot(copy.deepcopy(GOOD_SNAPSHOT)) == GOOD_SNAPSHOT
    assert validate_snapshot(json.dumps({**GOOD_SNAPSHOT, **NO_GPU}))["gpu_type"] == "none"
    assert len({case.id for case in HEARTBEATS}) == len(HEARTBEATS)
