"""Signed heartbeats: HMAC-SHA256 over the canonical JSON of a snapshot.

A leaf module (standard library only) so both the agent, which signs, and the
orchestrator, which verifies, can import it without importing each other.

The signature covers every key of the snapshot except ``signature`` itself, serialised as
``json.dumps(snapshot_without_signature, sort_keys=True, separators=(",", ":"))`` (ASCII,
so the bytes do not depend on the platform). The hex digest goes into the snapshot key
``signature``. A float survives a JSON round trip unchanged, so the orchestrator can
recompute the canonical form from the decoded message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any, Literal

from chiffon_worker.errors import ProtocolError

#: Snapshot key holding the hex HMAC-SHA256 digest.
SIGNATURE_KEY = "signature"

Reason = Literal["unsigned", "forged"]


class SignatureError(ProtocolError):
    """A heartbeat is unsigned or its signature does not match (``reason`` says which)."""

    def __init__(self, reason: Reason, problem: str) -> None:
        self.reason: Reason = reason
        super().__init__(SIGNATURE_KEY, problem)


def canonical_json(snapshot: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, ASCII, ``signature`` left out."""
    body = {key: value for key, value in snapshot.items() if key != SIGNATURE_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def signature_of(snapshot: Mapping[str, Any], secret: str) -> str:
    """The hex HMAC-SHA256 of ``canonical_json(snapshot)`` keyed with ``secret`` (UTF-8)."""
    if not secret:
        raise ValueError("a heartbeat secret must not be empty")
    return hmac.new(secret.encode(), canonical_json(snapshot), hashlib.sha256).hexdigest()


def sign_snapshot(snapshot: Mapping[str, Any], secret: str) -> dict[str, Any]:
    """Return a copy of ``snapshot`` with ``signature`` set (any old signature replaced)."""
    signed = {key: value for key, value in snapshot.items() if key != SIGNATURE_KEY}
    signed[SIGNATURE_KEY] = signature_of(signed, secret)
    return signed


def verify_snapshot(snapshot: Mapping[str, Any], secret: str) -> None:
    """Check ``snapshot``'s signature against ``secret``; constant-time comparison.

    Raises :class:`SignatureError` with reason ``unsigned`` (no signature, or not a
    64-character hex string) or ``forged`` (the digest does not match). Returns None
    when the signature is good.
    """
    given = snapshot.get(SIGNATURE_KEY)
    if not isinstance(given, str) or len(given) != 64:
        raise SignatureError("unsigned", "is missing or not a hex HMAC-SHA256 digest")
    try:
        expected = signature_of(snapshot, secret)
    except (TypeError, ValueError) as exc:  # NaN or an unserialisable value cannot be signed
        raise SignatureError("forged", f"cannot be checked: {exc}") from None
    if not hmac.compare_digest(expected, given.lower()):
        raise SignatureError("forged", "does not match the snapshot (wrong secret or altered)")
