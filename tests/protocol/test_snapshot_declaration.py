"""The snapshot declaration (``chiffon_worker.snapshot``) and the validation derived from it.

Schema 1's keys are pinned here on purpose: they are on the wire, so a change to the
declaration that moves them must fail a test. Validation is checked against every
declared constraint, one behaviour per case. The orchestrator's roles (columns, gauges,
needs) are tested in ``tests/orchestrator/test_snapshot_roles.py``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from chiffon_worker import protocol, snapshot
from chiffon_worker.errors import ProtocolError
from chiffon_worker.signing import SIGNATURE_KEY
from chiffon_worker.snapshot import FIELDS, GPU_ENTRY_FIELDS, REQUIRED_FIELDS, Field
from tests.samples import GOOD_SNAPSHOT

SCHEMA_1_KEYS = (
    "schema", "agent_id", "hostname", "pool", "boot_id", "seq", "started_at", "collected_at",
    "heartbeat_interval_seconds", "heartbeat_timeout_seconds", "capabilities", "version",
    "gpus", "gpu_probe", "cpu_percent", "cpu_load_1min", "cpu_load_5min", "cpu_load_15min",
    "cpu_cores_physical", "cpu_cores_available", "memory_percent", "memory_available_gb",
    "memory_total_gb", "gpu_vram_total_gb", "gpu_vram_available_gb", "gpu_type", "gpu_count",
)

def broken(**changes: Any) -> dict[str, Any]:
    snap = copy.deepcopy(GOOD_SNAPSHOT)
    snap.update(changes)
    return snap


def refusal(snap: dict[str, Any]) -> tuple[str | None, str]:
    with pytest.raises(ProtocolError) as raised:
        protocol.validate_snapshot(snap)
    return raised.value.field, raised.value.problem


def fields_where(condition: Any, fields: tuple[Field, ...] = REQUIRED_FIELDS) -> list[Any]:
    return [pytest.param(f, id=f.name) for f in fields if condition(f)]


# -- the declaration and its public names -----------------------------------------------------

def test_schema_1_keys_are_the_required_fields_in_check_order() -> None:
    assert protocol.SNAPSHOT_KEYS == SCHEMA_1_KEYS
    assert tuple(f.name for f in REQUIRED_FIELDS) == SCHEMA_1_KEYS


def test_the_public_names_of_protocol_are_derived_from_the_declaration() -> None:
    assert protocol.SNAPSHOT_SCHEMA == snapshot.SNAPSHOT_SCHEMA == 1
    assert protocol.GPU_TYPES == ("nvidia", "amd", "intel", "none")
    assert protocol.PROBE_STATES == ("ok", "stale", "timeout", "error", "absent")
    assert protocol.SNAPSHOT_METRIC_KEYS["cpu_cores_physical"] == (int,)
    assert protocol.SNAPSHOT_ENVELOPE_KEYS["started_at"] == (int, float)
    assert protocol.GPU_FIELDS["vram_available_gb"] == ((int, float), True)


def test_every_field_is_documented_and_named_once() -> None:
    names = [f.name for f in FIELDS]
    assert len(names) == len(set(names))
    assert all(f.doc for f in (*FIELDS, *GPU_ENTRY_FIELDS, *snapshot.GPU_PROBE_FIELDS))


def test_every_flat_metric_and_stored_field_has_a_label_for_tables_and_charts() -> None:
    labelled = [f for f in FIELDS if f.required and (f.section == "metric" or f.column)]
    assert all(f.label for f in labelled)
    assert all(f.label == f.label.lower() for f in labelled)


def test_the_signature_key_is_declared_as_an_optional_field() -> None:
    assert not snapshot.FIELDS_BY_NAME[SIGNATURE_KEY].required


def test_relations_name_declared_fields() -> None:
    for relation in snapshot.RELATIONS:
        assert {relation.field, relation.other} <= set(snapshot.FIELDS_BY_NAME)


# -- validation honours every declared constraint ---------------------------------------------

@pytest.mark.parametrize("field", fields_where(lambda f: f.numeric and f.name != "schema"))
def test_a_negative_number_is_refused(field: Field) -> None:
    assert refusal(broken(**{field.name: -1})) == (field.name, "must not be negative, got -1")


@pytest.mark.parametrize("field", fields_where(lambda f: float in f.types))
def test_a_non_finite_number_is_refused(field: Field) -> None:
    assert refusal(broken(**{field.name: float("inf")})) == (field.name,
                                                              "must be a finite number")


@pytest.mark.parametrize("field", fields_where(lambda f: f.maximum is not None))
def test_a_number_above_its_maximum_is_refused(field: Field) -> None:
    assert field.maximum is not None
    assert refusal(broken(**{field.name: field.maximum + 0.5})) == (
        field.name, f"must be at most {field.maximum:g}, got {field.maximum + 0.5}")


@pytest.mark.parametrize("field", fields_where(lambda f: f.positive))
def test_zero_is_refused_where_a_number_must_be_positive(field: Field) -> None:
    assert refusal(broken(**{field.name: 0})) == (field.name, "must be greater than 0")


@pytest.mark.parametrize("field", fields_where(lambda f: bool(f.choices)))
def test_a_value_outside_the_choices_is_refused(field: Field) -> None:
    assert refusal(broken(**{field.name: "other"})) == (
        field.name, f"must be one of {', '.join(field.choices)}")


@pytest.mark.parametrize("field", fields_where(lambda f: f.identifier))
def test_an_empty_identifier_is_refused(field: Field) -> None:
    assert refusal(broken(**{field.name: ""})) == (field.name, "must not be empty")


@pytest.mark.parametrize("field", fields_where(lambda f: f.name != "schema"))
def test_a_value_of_another_json_type_is_refused(field: Field) -> None:
    expected = " or ".join(t.__name__ for t in field.types)
    wrong = "text" if str not in field.types else 5
    assert refusal(broken(**{field.name: wrong})) == (
        field.name, f"must be {expected}, got {type(wrong).__name__}")


@pytest.mark.parametrize("field", fields_where(lambda f: f.nullable, GPU_ENTRY_FIELDS))
def test_a_nullable_gpu_field_may_be_null(field: Field) -> None:
    gpu = dict(GOOD_SNAPSHOT["gpus"][0], **{field.name: None})
    protocol.validate_snapshot(broken(gpus=[gpu]))


@pytest.mark.parametrize("field", fields_where(lambda f: not f.nullable and f.required,
                                                GPU_ENTRY_FIELDS))
def test_a_gpu_field_that_is_not_nullable_refuses_null(field: Field) -> None:
    gpu = dict(GOOD_SNAPSHOT["gpus"][0], **{field.name: None})
    assert refusal(broken(gpus=[gpu]))[0] == f"gpus[0].{field.name}"


@pytest.mark.parametrize("field", fields_where(
    lambda f: not f.required and f not in snapshot.CHECKED_OPTIONAL_FIELDS, FIELDS))
def test_optional_text_fields_without_a_role_are_documented_but_never_checked(field: Field
                                                                               ) -> None:
    assert protocol.validate_snapshot(broken(**{field.name: ["anything"]}))


@pytest.mark.parametrize("field", fields_where(
    lambda f: f in snapshot.CHECKED_OPTIONAL_FIELDS, FIELDS))
def test_an_optional_field_that_is_present_must_have_its_type(field: Field) -> None:
    assert refusal(broken(**{field.name: ["anything"]}))[0] == field.name


@pytest.mark.parametrize("field", fields_where(
    lambda f: f in snapshot.CHECKED_OPTIONAL_FIELDS, FIELDS))
def test_an_optional_field_may_be_left_out(field: Field) -> None:
    snap = broken()
    snap.pop(field.name, None)
    assert protocol.validate_snapshot(snap)


@pytest.mark.parametrize("field", fields_where(
    lambda f: f in snapshot.CHECKED_OPTIONAL_FIELDS and bool(f.choices), FIELDS))
def test_an_optional_field_with_choices_refuses_other_text(field: Field) -> None:
    assert refusal(broken(**{field.name: "bogus"})) == (
        field.name, f"must be one of {', '.join(field.choices)}")


def test_an_optional_count_must_not_be_negative() -> None:
    assert refusal(broken(gpu_processes=-1)) == ("gpu_processes", "must not be negative, got -1")


def test_an_optional_flag_refuses_a_number() -> None:
    assert refusal(broken(gpu_vram_known=1)) == ("gpu_vram_known", "must be bool, got int")


def test_a_snapshot_of_unusual_but_valid_values_passes() -> None:
    class Cores(int):
        pass

    protocol.validate_snapshot(broken(cpu_cores_physical=Cores(8), seq=(1 << 63),
                                      heartbeat_interval_seconds=30))
