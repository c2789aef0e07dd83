"""Checking a decoded snapshot against its declaration (:mod:`chiffon_worker.snapshot`).

The declaration is compiled once, at import, into flat tuples. Checking a group of keys
(the top level's required keys, its checked optional ones, or one ``gpus`` entry) then
runs in two steps:

- a *screen* that does the common case in a few C-level calls: fetch every value at
  once, compare each value's class with the classes its key accepts exactly (a tuple of
  classes found acceptable once is remembered), and check that the numbers are finite
  (their sum is) and not negative (their minimum is not);
- where the screen fails (anything unusual: a missing key, a ``bool`` where a number
  belongs, an ``int`` subclass, NaN, a negative number, a sum that overflows), the
  *exact* per-key checks run from the first key and word the error. Passing the screen
  implies passing them, so the screen never changes an outcome, only its cost.

The first problem found is reported, always in the same order: the schema version;
then each required key in declaration order (present, JSON type, finite, not
negative); then identifiers, maxima, positives and choices (each in declaration order);
then the relations between fields, in declaration order; then the optional keys that
are present (:data:`~chiffon_worker.snapshot.CHECKED_OPTIONAL_FIELDS`); then each
``gpus`` entry (its keys in order, then its choices); then ``gpu_probe``.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from operator import contains, itemgetter
from typing import Any, NamedTuple

from chiffon_worker.errors import ProtocolError
from chiffon_worker.snapshot import (
    BOOL,
    CHECKED_OPTIONAL_FIELDS,
    GPU_ENTRY_FIELDS,
    GPU_PROBE_FIELDS,
    MAX_ID_LENGTH,
    RELATIONS,
    REQUIRED_FIELDS,
    SNAPSHOT_SCHEMA,
    Field,
)

_MISSING: Any = object()
#: Integers strictly inside this range convert to a finite float (checked without math).
_SAFE_INT = 1 << 1000
#: At most this many class signatures are remembered per group (a few in practice).
_MAX_SIGNATURES = 256


def kind(value: Any) -> str:
    """How an error names a value's JSON type: ``null``, ``int``, ``str``, ..."""
    return "null" if value is None else type(value).__name__


def is_finite(value: float) -> bool:
    """``math.isfinite`` that treats an int too large for a float as not finite."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def has_control_characters(text: str) -> bool:
    """Whether ``text`` holds a Unicode control character (category Cc)."""
    return not text.isprintable() and any(unicodedata.category(ch) == "Cc" for ch in text)


def check_identifier(key: str, value: str) -> None:
    """Non-empty, at most ``MAX_ID_LENGTH`` characters, no control characters."""
    if value.isprintable() and 0 < len(value) <= MAX_ID_LENGTH and not value.isspace():
        return
    if not value.strip():
        raise ProtocolError(key, "must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ProtocolError(key, f"is longer than {MAX_ID_LENGTH} characters")
    if has_control_characters(value):
        raise ProtocolError(key, "must not contain control characters")


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    """Whether ``value`` is one of the JSON ``types`` (a ``bool`` is never a number)."""
    if types is BOOL:
        return value.__class__ is bool
    return not isinstance(value, bool) and isinstance(value, types)


def _picker(items: Sequence[Any]) -> Callable[[Any], tuple[Any, ...]]:
    """A function taking ``items`` (keys or positions) of its argument, always as a tuple
    (``itemgetter`` of one item returns the bare value)."""
    if len(items) >= 2:
        return itemgetter(*items)
    return lambda container: tuple(container[item] for item in items)


class _Group:
    """The checks of one group of keys (the top level, or a ``gpus`` entry), compiled.

    ``one_problem``: a number that is not finite or is negative gets one message for
    both (as ``gpus`` entries always have); else each rule its own. ``optional``: screen
    the optional ``fields`` too, as if required (the screen then fails where one is absent).
    """

    def __init__(self, fields: Sequence[Field], *, one_problem: bool,
                 optional: bool = False) -> None:
        required = [f for f in fields if f.required or optional]
        self.fields = tuple(required)
        self.one_problem = one_problem
        self.exact = tuple(f.types + ((type(None),) if f.nullable else ()) for f in required)
        self.get_all = _picker([f.name for f in required])
        numeric = [i for i, f in enumerate(required) if f.numeric]
        self.numbers = _picker(numeric)
        self.bounded = _picker([i for i in numeric if required[i].non_negative])
        self.all_non_negative = all(required[i].non_negative for i in numeric)
        self.nullable_numbers = any(required[i].nullable for i in numeric)
        self.choices = tuple((f.name, f.choices, f"must be one of {', '.join(f.choices)}")
                             for f in required if f.choices)
        #: class signatures (one class per key) already found acceptable
        self._accepted: set[tuple[type, ...]] = set()

    def passes_screen(self, obj: Mapping[str, Any]) -> bool:
        """Whether ``obj`` certainly passes :meth:`check_exactly` (False: maybe not)."""
        if obj.__class__ is not dict:  # a subclass could answer a missing key (__missing__)
            return False
        try:
            values = self.get_all(obj)
        except KeyError:
            return False
        signature = tuple(map(type, values))
        if signature not in self._accepted:
            if not all(map(contains, self.exact, signature)):
                return False
            if len(self._accepted) < _MAX_SIGNATURES:
                self._accepted.add(signature)
        numbers = self.numbers(values)
        if self.nullable_numbers:
            numbers = tuple(filter(None, numbers))  # None and 0 change neither check
        if not numbers:
            return True
        if self.all_non_negative:  # min >= 0 first, so the sum below cannot cancel
            if not min(numbers) >= 0:  # False for a NaN too
                return False
        else:
            bounded = tuple(filter(None, self.bounded(values)))
            if bounded and not min(bounded) >= 0:
                return False
            numbers = tuple(map(abs, numbers))
        try:  # NaN, the infinities and ints beyond a float's range show in the sum
            total = float(sum(numbers))
        except OverflowError:
            return False
        return total - total == 0.0

    def check_exactly(self, obj: Mapping[str, Any], where: str = "") -> None:
        """Each key in order: present, of its type, finite and not negative."""
        for field in self.fields:
            name = where + field.name
            value: Any = obj.get(field.name, _MISSING)
            if value is _MISSING:
                raise ProtocolError(name, "is missing")
            if value is None and field.nullable:
                continue
            if not _has_type(value, field.types):
                expected = " or ".join(t.__name__ for t in field.types)
                if field.nullable:
                    expected += " or null"
                raise ProtocolError(name, f"must be {expected}, got {kind(value)}")
            if not field.numeric:
                continue
            finite = (value - value == 0.0 if value.__class__ is float
                      else -_SAFE_INT < value < _SAFE_INT or is_finite(value))
            negative = value < 0 and field.non_negative
            if self.one_problem and (not finite or negative):
                raise ProtocolError(name, "must be a finite, non-negative number")
            if not finite:
                raise ProtocolError(name, "must be a finite number")
            if negative:
                raise ProtocolError(name, f"must not be negative, got {value}")

    def check_entry(self, obj: Mapping[str, Any], position: int) -> None:
        """``gpus[position]``: every key (screened first), then the entry's choices."""
        if not self.passes_screen(obj):
            self.check_exactly(obj, f"gpus[{position}].")
        for key, choices, problem in self.choices:
            if obj[key] not in choices:
                raise ProtocolError(f"gpus[{position}].{key}", problem)


class _Rules(NamedTuple):
    """The top level's rules beyond each key's type, compiled."""

    identifiers: tuple[str, ...]
    maxima: tuple[tuple[str, float], ...]
    positives: tuple[str, ...]
    relations: tuple[tuple[bool, str, str], ...]  # (is count_of, field, other)
    probe_choices: tuple[tuple[str, tuple[str, ...], str], ...]


_TOP = _Group(REQUIRED_FIELDS, one_problem=False)
_GPU = _Group(GPU_ENTRY_FIELDS, one_problem=True)
#: The checked optional keys as one group: today's agents send all of them, so one screen
#: replaces a check per key; a heartbeat that lacks one (an older agent) is checked per key.
_OPTIONAL = _Group(CHECKED_OPTIONAL_FIELDS, one_problem=False, optional=True)
_RULES = _Rules(
    identifiers=tuple(f.name for f in REQUIRED_FIELDS if f.identifier),
    maxima=tuple((f.name, f.maximum) for f in REQUIRED_FIELDS if f.maximum is not None),
    positives=tuple(f.name for f in REQUIRED_FIELDS if f.positive),
    relations=tuple((r.kind == "count_of", r.field, r.other) for r in RELATIONS),
    probe_choices=tuple((f.name, f.choices, f"must be one of {', '.join(f.choices)}")
                        for f in GPU_PROBE_FIELDS if f.choices),
)


def check_optional(field: Field, value: Any) -> None:
    """An optional key that is present: of its type (or null where allowed), finite, not
    negative, and one of its choices."""
    if value is None and field.nullable:
        return
    if not _has_type(value, field.types):
        expected = " or ".join(t.__name__ for t in field.types)
        raise ProtocolError(field.name, f"must be {expected}{' or null' * field.nullable}, "
                                        f"got {kind(value)}")
    if field.numeric:
        if not is_finite(value):
            raise ProtocolError(field.name, "must be a finite number")
        if value < 0 and field.non_negative:
            raise ProtocolError(field.name, f"must not be negative, got {value}")
    if field.choices and value not in field.choices:
        raise ProtocolError(field.name, f"must be one of {', '.join(field.choices)}")


def check_snapshot(snap: Mapping[str, Any]) -> None:
    """Raise :class:`ProtocolError` naming the first problem of ``snap`` (see the module
    docstring for the order); return None when it is a valid schema-1 snapshot."""
    schema = snap.get("schema")
    if schema != SNAPSHOT_SCHEMA:
        raise ProtocolError("schema", f"unsupported schema {schema!r}; expected "
                                      f"{SNAPSHOT_SCHEMA}")
    if not _TOP.passes_screen(snap):
        _TOP.check_exactly(snap)
    for key in _RULES.identifiers:
        check_identifier(key, snap[key])
    for key, maximum in _RULES.maxima:
        if snap[key] > maximum:
            raise ProtocolError(key, f"must be at most {maximum:g}, got {snap[key]}")
    for key in _RULES.positives:
        if snap[key] <= 0:
            raise ProtocolError(key, "must be greater than 0")
    for key, choices, problem in _TOP.choices:
        if snap[key] not in choices:
            raise ProtocolError(key, problem)
    for is_count, key, other in _RULES.relations:
        if is_count:
            if snap[key] != len(snap[other]):
                raise ProtocolError(key, f"is {snap[key]} but {other} lists "
                                         f"{len(snap[other])}")
        elif snap[key] > snap[other] + 1e-6:
            raise ProtocolError(key, f"exceeds {other}")
    if _OPTIONAL.passes_screen(snap):
        for key, choices, problem in _OPTIONAL.choices:
            value = snap[key]
            if value is not None and value not in choices:
                raise ProtocolError(key, problem)
    else:
        for field in CHECKED_OPTIONAL_FIELDS:
            value = snap.get(field.name, _MISSING)
            if value is not _MISSING:
                check_optional(field, value)
    for position, gpu in enumerate(snap["gpus"]):
        if not isinstance(gpu, dict):
            raise ProtocolError(f"gpus[{position}]", "must be an object")
        _GPU.check_entry(gpu, position)
    probe = snap["gpu_probe"]
    for key, choices, problem in _RULES.probe_choices:
        if probe.get(key) not in choices:
            raise ProtocolError(f"gpu_probe.{key}", problem)
