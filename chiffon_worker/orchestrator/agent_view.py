"""The JSON view of one agent in the registry (``chiffon status --json``).

:func:`status_object` builds it as a dict (from a record with its decoded snapshot).
:func:`status_json` writes the same object as compact JSON text from a record and the
snapshot's stored text, without decoding the snapshot where it can: the snapshot's members
are cut from the stored text (less the keys the registry fields already carry, and the
signature) and appended to the registry fields' JSON. Decoding 10,000 snapshots and
encoding them again was most of ``chiffon status --json``'s time at that many agents.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from chiffon_worker.signing import SIGNATURE_KEY

if TYPE_CHECKING:
    from chiffon_worker.orchestrator.registry import AgentRecord

#: The registry fields that open every agent's object, in order; a snapshot key of the same
#: name is not repeated after them (the registry's value stands).
STATUS_FIELDS: tuple[str, ...] = (
    "agent_id", "hostname", "pool", "state", "liveness", "age_seconds", "boot_id", "seq",
    "restarts", "missed", "first_seen", "last_seen", "clock_skew_seconds", "last_event_at",
    "conflict", "drain", "drain_requested_at")
#: Separators of compact JSON (no blanks).
COMPACT = (",", ":")

#: Snapshot keys left out of the view: the registry fields' names and the signature.
_LEFT_OUT = (*STATUS_FIELDS, SIGNATURE_KEY)
#: A member of a JSON object whose key is one of them: through a string or other plain
#: value, then blanks and a comma if one follows; up to an object or array value (group
#: ``open`` matched: the caller finds its end).
_LEFT_OUT_MEMBER = re.compile(
    '"(?:' + "|".join(re.escape(key) for key in _LEFT_OUT) + ')"'
    r'[ \t\n\r]*:[ \t\n\r]*(?:"[^"]*"|[^,{}\[\]" \t\n\r]+|(?P<open>(?=[\[{])))[ \t\n\r]*,?')
_BLANKS = " \t\n\r"  # JSON's whitespace
_AFTER_VALUE = re.compile(r"[ \t\n\r]*,?")
_RAW_DECODE = json.JSONDecoder().raw_decode
_ENCODE = json.JSONEncoder(separators=COMPACT).encode


def registry_fields(record: AgentRecord, now: float) -> dict[str, Any]:
    """The registry's fields of one agent (:data:`STATUS_FIELDS`, in that order) at ``now``
    (unix seconds); see :func:`status_object`."""
    return {
        "agent_id": record.agent_id,
        "hostname": record.hostname,
        "pool": record.pool,
        "state": record.state(now),
        "liveness": record.liveness(now),
        "age_seconds": round(record.age_seconds(now), 3),
        "boot_id": record.boot_id,
        "seq": record.seq,
        "restarts": record.restarts,
        "missed": record.missed,
        "first_seen": record.first_seen,
        "last_seen": record.last_seen,
        "clock_skew_seconds": record.clock_skew_seconds,
        "last_event_at": record.signs.last_event_at if record.signs else None,
        "conflict": None if record.conflict is None else {
            "hostname": record.conflict.hostname, "boot_id": record.conflict.boot_id,
            "seen_at": record.conflict.seen_at, "current": record.conflicting(now)},
        "drain": record.drain_state(now),
        "drain_requested_at": record.drain_requested_at,
    }


def status_object(record: AgentRecord, now: float) -> dict[str, Any]:
    """One agent for ``chiffon status --json``: registry fields, then its newest snapshot's
    keys (times in unix seconds, ``age_seconds`` since the newest heartbeat was received).

    ``liveness`` is ``online``, ``stopped``, ``lost`` or ``conflict``; ``state`` its coarse
    form, ``online`` (alive) or ``offline``, as always; ``last_event_at`` the receipt time of
    the newest Celery worker event (null until one was seen); ``conflict`` the newest
    heartbeat of a second process claiming the id (null if none ever did); ``drain``
    ``draining`` or ``drained`` once an operator drained the agent (null otherwise), and
    ``drain_requested_at`` when (unix seconds)."""
    return _with_snapshot(registry_fields(record, now), record.snapshot)


def _with_snapshot(fields: dict[str, Any], snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` followed by the snapshot's keys they lack, less the signature."""
    for key, value in snapshot.items():
        if key not in fields and key != SIGNATURE_KEY:
            fields[key] = value
    return fields


def status_json(record: AgentRecord, snapshot_text: str, now: float) -> str:
    """:func:`status_object` of ``record`` whose newest snapshot is stored as
    ``snapshot_text`` (JSON text; empty: none), as compact JSON.

    The snapshot's members are copied from ``snapshot_text`` as stored (their values
    unchanged, their spacing the agent's) where :func:`snapshot_members` can cut them out;
    otherwise the text is decoded. Either way the text decodes to the same object as
    ``json.dumps(status_object(...))``, keys in the same order."""
    fields = registry_fields(record, now)
    members = snapshot_members(snapshot_text)
    if members is None:
        snapshot = json.loads(snapshot_text) if snapshot_text else {}
        return _ENCODE(_with_snapshot(fields, snapshot))
    head = _ENCODE(fields)
    return f"{head[:-1]},{members}}}" if members else head


def snapshot_members(text: str) -> str | None:
    """The members of the stored snapshot object ``text`` (``"key":value,...``, without the
    braces) less the keys :func:`status_object` leaves out (:data:`STATUS_FIELDS` and the
    signature), cut from the text without decoding it; ``""`` for an empty text.

    ``text`` is a JSON object as the registry stores it (the judge decoded it). None when it
    cannot be cut safely, and the caller decodes it instead: text that is not ASCII or
    spans lines (the view is one line of ASCII, as ``json.dumps`` writes it), has a
    ``\\u`` or ``\\"`` escape (a key could be spelt differently, a quote may not end a
    string), or, where a left-out key's depth must be counted, a bracket inside a string.
    A key the text repeats (other than those left out) stays repeated: JSON readers keep
    the last value, as decoding would have.
    """
    if not text:
        return ""
    body = text.strip(_BLANKS)
    if (body[:1] != "{" or body[-1:] != "}" or not body.isascii() or "\n" in body
            or "\r" in body):
        return None
    if "\\" in body and ("\\u" in body or '\\"' in body):
        return None
    # Every '"' is a string's delimiter here (no \" escape), and in valid JSON a closing one
    # is never followed by a letter: a match starts a whole string followed by a colon, a
    # key. The snapshot's own when it lies at depth 1, inside the outer object only:
    # certain before the first bracket; nested when the last bracket before it opens, and
    # lies outside strings (an even number of quotes between them); else counted (exact
    # when no string holds a bracket).
    opened = [at for at in (body.find("{", 1), body.find("[", 1)) if at >= 0]
    first_bracket = min(opened) if opened else len(body)
    depth, counted_to, checked = 0, 0, False  # depth: brackets open before counted_to
    cuts: list[tuple[int, int]] = []  # [start, end) of each member left out
    for match in _LEFT_OUT_MEMBER.finditer(body):
        start, end = match.span()
        if start > first_bracket:
            last_open = max(body.rfind("{", 0, start), body.rfind("[", 0, start))
            if (last_open > max(body.rfind("}", 0, start), body.rfind("]", 0, start))
                    and body.count('"', last_open, start) % 2 == 0):
                continue  # inside the object or array opened at last_open
            if not checked:
                if _brackets_in_strings(body):
                    return None
                checked = True
            depth += _opened(body, counted_to, start)
            counted_to = start
            if depth != 1:
                continue
        if match.start("open") >= 0:  # an object or array: decoded to find its end
            after = _AFTER_VALUE.match(body, _RAW_DECODE(body, end)[1])
            end = after.end() if after else end
        cuts.append((start, end))
    if not cuts:
        return body[1:-1].strip(_BLANKS)
    parts = []
    at = 1
    for start, end in cuts:
        parts.append(body[at:start])
        at = end
    parts.append(body[at:-1])
    # cutting the last member leaves the comma before it
    return "".join(parts).strip(_BLANKS).rstrip(",").rstrip(_BLANKS)


def _brackets_in_strings(body: str) -> bool:
    """Whether a string of ``body`` holds a bracket (``body`` has no ``\\"``: its pieces
    between quotes alternate outside, inside)."""
    inside = "".join(body.split('"')[1::2])
    return "{" in inside or "}" in inside or "[" in inside or "]" in inside


def _opened(body: str, start: int, end: int) -> int:
    """Objects and arrays opened less those closed in ``body[start:end]`` (no bracket
    inside a string there)."""
    return (body.count("{", start, end) + body.count("[", start, end)
            - body.count("}", start, end) - body.count("]", start, end))
