"""Property tests: the wire parsers never let anything but ProtocolError escape.

``WorkRequest.from_json``, ``WorkResult.from_json`` and ``validate_snapshot`` take JSON
text, bytes or a decoded object; whatever they are given, they either return a value or
raise :class:`ProtocolError` (a ``ValueError``). Valid requests round-trip through JSON.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from chiffon_worker import snapshot_validator
from chiffon_worker.errors import ProtocolError
from chiffon_worker.protocol import (
    SNAPSHOT_KEYS,
    SNAPSHOT_METRIC_KEYS,
    WorkRequest,
    WorkResult,
    validate_snapshot,
)
from chiffon_worker.snapshot import CHECKED_OPTIONAL_FIELDS
from tests.samples import CURRENT_SNAPSHOT, GOOD_SNAPSHOT

PROPERTY = settings(max_examples=200, deadline=None, database=None, print_blob=True)

Parser = Callable[[Any], Any]
PARSERS: dict[str, Parser] = {
    "WorkRequest.from_json": WorkRequest.from_json,
    "WorkResult.from_json": WorkResult.from_json,
    "validate_snapshot": validate_snapshot,
}
parser_names = st.sampled_from(sorted(PARSERS))

# Integers beyond float range are left to test_integer_beyond_float_range (a known defect);
# hypothesis' unbounded integers stay well inside this range anyway.
INT_BOUND = 2**128
json_scalars = (st.none() | st.booleans()
                | st.integers(min_value=-INT_BOUND, max_value=INT_BOUND)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda children: (st.lists(children, max_size=5)
                      | st.dictionaries(st.text(max_size=12), children, max_size=5)),
    max_leaves=30,
)
finite_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-INT_BOUND, max_value=INT_BOUND)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: (st.lists(children, max_size=5)
                      | st.dictionaries(st.text(max_size=12), children, max_size=5)),
    max_leaves=30,
)

# Objects that look like the real messages, so the validators get past their first checks.
REQUEST_KEYS = ("work_id", "work_type", "payload")
RESULT_KEYS = ("work_id", "status", "output", "error", "agent_id", "duration_seconds")
near_requests = st.dictionaries(st.sampled_from(REQUEST_KEYS) | st.text(max_size=8),
                                json_values | st.text(min_size=1, max_size=300), max_size=5)
near_results = st.dictionaries(
    st.sampled_from(RESULT_KEYS),
    json_values | st.sampled_from(["success", "error"])
    | st.floats(min_value=0, allow_infinity=True),
    max_size=len(RESULT_KEYS))


@st.composite
def near_snapshots(draw: st.DrawFn) -> dict[str, Any]:
    """The good snapshot with some keys replaced by arbitrary JSON and some removed."""
    snap = copy.deepcopy(GOOD_SNAPSHOT)
    for key in draw(st.lists(st.sampled_from(SNAPSHOT_KEYS), max_size=4, unique=True)):
        snap[key] = draw(json_values)
    for key in draw(st.lists(st.sampled_from(SNAPSHOT_KEYS), max_size=2, unique=True)):
        if draw(st.booleans()):
            del snap[key]
    if draw(st.booleans()):
        snap["gpus"] = draw(st.lists(json_values, max_size=3))
        snap["gpu_count"] = len(snap["gpus"])
    return snap


def only_protocol_errors(parse: Parser, data: Any) -> None:
    """Run a parser; a ProtocolError (which must be a ValueError) is the only allowed failure."""
    try:
        parse(data)
    except ProtocolError as exc:
        assert isinstance(exc, ValueError)
        assert str(exc)


def as_json_text(value: Any) -> str:
    return json.dumps(value)  # NaN/Infinity become the non-standard tokens, on purpose


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


@PROPERTY
@given(name=parser_names, value=json_values)
def test_any_json_value_as_object(name: str, value: Any) -> None:
    only_protocol_errors(PARSERS[name], value)


@PROPERTY
@given(name=parser_names, value=json_values)
def test_any_json_value_as_text_and_bytes(name: str, value: Any) -> None:
    text = as_json_text(value)
    only_protocol_errors(PARSERS[name], text)
    only_protocol_errors(PARSERS[name], text.encode("utf-8"))
    only_protocol_errors(PARSERS[name], bytearray(text.encode("utf-8")))


@PROPERTY
@given(name=parser_names, text=st.text())
def test_any_text(name: str, text: str) -> None:
    only_protocol_errors(PARSERS[name], text)


@PROPERTY
@given(name=parser_names, data=st.binary())
def test_any_bytes(name: str, data: bytes) -> None:
    only_protocol_errors(PARSERS[name], data)


@PROPERTY
@given(obj=near_requests)
def test_near_miss_work_requests(obj: dict[str, Any]) -> None:
    only_protocol_errors(WorkRequest.from_json, obj)
    only_protocol_errors(WorkRequest.from_json, as_json_text(obj))


@PROPERTY
@given(obj=near_results)
def test_near_miss_work_results(obj: dict[str, Any]) -> None:
    only_protocol_errors(WorkResult.from_json, obj)
    only_protocol_errors(WorkResult.from_json, as_json_text(obj))


@PROPERTY
@given(snap=near_snapshots())
def test_near_miss_snapshots(snap: dict[str, Any]) -> None:
    only_protocol_errors(validate_snapshot, snap)
    only_protocol_errors(validate_snapshot, as_json_text(snap))


def _outcome(data: Any) -> tuple[Any, ...]:
    try:
        return ("valid", validate_snapshot(copy.deepcopy(data)))
    except ProtocolError as exc:
        return ("refused", exc.field, exc.problem)


NUMERIC_KEYS = [key for key, types in SNAPSHOT_METRIC_KEYS.items() if float in types]
any_number = (st.floats() | st.integers(min_value=-INT_BOUND, max_value=INT_BOUND)
              | st.sampled_from([10**400, -(10**400), 2**1023, True]))


@st.composite
def numeric_variants(draw: st.DrawFn) -> dict[str, Any]:
    """The good snapshot with some numbers (flat or of its GPU) replaced by any number."""
    snap = copy.deepcopy(GOOD_SNAPSHOT)
    for key in draw(st.lists(st.sampled_from(NUMERIC_KEYS), max_size=3, unique=True)):
        snap[key] = draw(any_number)
    gpu = snap["gpus"][0]
    for key in draw(st.lists(st.sampled_from(sorted(gpu)), max_size=2, unique=True)):
        gpu[key] = draw(any_number | st.none())
    return snap


OPTIONAL_KEYS = [f.name for f in CHECKED_OPTIONAL_FIELDS]


@st.composite
def current_variants(draw: st.DrawFn) -> dict[str, Any]:
    """Today's agent's snapshot (every optional key present, screened as one group) with
    some optional keys replaced by any JSON value or number, or removed."""
    snap = copy.deepcopy(CURRENT_SNAPSHOT)
    for key in draw(st.lists(st.sampled_from(OPTIONAL_KEYS), min_size=1, max_size=3,
                             unique=True)):
        snap[key] = draw(st.sampled_from(["load", "none", "ok", "logind"]) | st.none()
                         | any_number | json_values)
    if draw(st.booleans()):
        del snap[draw(st.sampled_from(OPTIONAL_KEYS))]
    return snap


def test_todays_agent_snapshot_is_valid() -> None:
    assert _outcome(CURRENT_SNAPSHOT)[0] == "valid"


@pytest.mark.parametrize("field", [f for f in CHECKED_OPTIONAL_FIELDS if f.choices],
                         ids=lambda f: f.name)
def test_an_optional_key_outside_its_choices_is_refused_in_a_full_snapshot(field: Any) -> None:
    snap = {**CURRENT_SNAPSHOT, field.name: "not-a-choice"}
    assert _outcome(snap) == ("refused", field.name,
                              f"must be one of {', '.join(field.choices)}")


@PROPERTY
@given(snap=near_snapshots() | numeric_variants())
def test_the_validators_screen_never_changes_an_outcome(snap: dict[str, Any]) -> None:
    """The fast screen only skips the exact per-key checks; with it off, the same answer."""
    _same_outcome_unscreened(snap)


@PROPERTY
@given(snap=current_variants())
def test_the_screen_of_the_optional_keys_never_changes_an_outcome(
        snap: dict[str, Any]) -> None:
    _same_outcome_unscreened(snap)


def _same_outcome_unscreened(snap: dict[str, Any]) -> None:
    screened = _outcome(snap)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(snapshot_validator._Group, "passes_screen", lambda *_args: False)
        exact = _outcome(snap)
    assert screened == exact


@st.composite
def valid_requests(draw: st.DrawFn) -> WorkRequest:
    ids = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=256)
    try:
        return WorkRequest(draw(ids), draw(ids), draw(finite_json_values))
    except ProtocolError:
        reject()  # e.g. a blank id: not a valid request


@PROPERTY
@given(request=valid_requests())
def test_valid_work_request_round_trips(request: WorkRequest) -> None:
    text = request.to_json()
    assert WorkRequest.from_json(text) == request
    assert WorkRequest.from_json(text.encode("utf-8")) == request
    assert WorkRequest.from_json(request.to_dict()) == request
    assert json.loads(text) == request.to_dict()


# -- known escapes (product defects; see the report of issue #6) ---------------------------------

HUGE = 10**400  # a JSON integer no float can hold: math.isfinite() raises OverflowError


def _result_with(**changes: Any) -> dict[str, Any]:
    result = {"work_id": "w", "status": "success", "output": 1, "error": None,
              "agent_id": "a", "duration_seconds": 0.5}
    result.update(changes)
    return result


def _snapshot_with(**changes: Any) -> dict[str, Any]:
    snap = copy.deepcopy(GOOD_SNAPSHOT)
    snap.update(changes)
    return snap


@pytest.mark.parametrize(("parse", "data"), [
    pytest.param(validate_snapshot, _snapshot_with(seq=HUGE), id="snapshot_seq_object"),
    pytest.param(validate_snapshot, json.dumps(_snapshot_with(cpu_cores_physical=HUGE)),
                 id="snapshot_cores_text"),
    pytest.param(WorkResult.from_json, _result_with(duration_seconds=HUGE),
                 id="result_duration_object"),
    pytest.param(WorkResult.from_json, json.dumps(_result_with(duration_seconds=-HUGE)),
                 id="result_duration_text"),
])
def test_integer_beyond_float_range(parse: Parser, data: Any) -> None:
    with pytest.raises(ProtocolError):
        parse(data)


def test_mapping_with_mixed_key_types() -> None:
    with pytest.raises(ProtocolError):
        WorkRequest.from_json({1: "x", "extra": "y"})

