"""Signed heartbeats: HMAC-SHA256 over the canonical JSON of a snapshot.

A leaf module (standard library only) so both the agent, which signs, and the
orchestrator, which verifies, can import it without importing each other.

The signature covers every key of the snapshot except ``signature`` itself, serialised as
``json.dumps(snapshot_without_signature, sort_keys=True, separators=(",", ":"))`` (ASCII,
so the bytes do not depend on the platform). The hex digest goes into the snapshot key
``signature``. A float survives a JSON round trip unchanged, so the orchestrator can
recompute the canonical form from the decoded message.

**Keys** (docs/security.md, "Signed heartbeats"). An agent signs with one key:

- its own *agent key* (``heartbeat_key``): :func:`derive_agent_key` of the lab secret and
  its agent id, ``HMAC-SHA256(lab_secret, "chiffon agent key v1:" + agent_id)`` as 64 hex
  digits. The orchestrator holds only the lab secret (``heartbeat_lab_secret``) and
  derives the key of the agent id a heartbeat *claims*, so a key taken from one machine
  signs for that agent id alone;
- or the older *shared secret* (``heartbeat_secret``), the same on every agent: whoever
  holds it signs for any agent id. Still accepted, for migrating.

:class:`HeartbeatVerifier` is the orchestrator's side: the lab secret, the previous one
during a rotation, the shared secret, and whether a signature is required.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from chiffon_worker.errors import ProtocolError

#: Snapshot key holding the hex HMAC-SHA256 digest.
SIGNATURE_KEY = "signature"
#: What an agent key is derived from, before the agent id (the version names the scheme).
AGENT_KEY_CONTEXT = "chiffon agent key v1:"
#: The shortest lab secret the orchestrator takes (characters); a generated one has 43.
MIN_LAB_SECRET_CHARS = 16
_AGENT_KEY_RE = re.compile(r"^[0-9a-f]{64}$")

#: Which key a good signature was made with (:meth:`HeartbeatVerifier.verify`).
KeyUsed = Literal["agent key", "previous agent key", "shared secret", "unsigned"]

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


def new_lab_secret() -> str:
    """A fresh lab secret: 256 random bits from :mod:`secrets`, URL-safe base64 (43
    characters, so it is never mistaken for an agent key's 64 hex digits)."""
    import secrets  # only here: importing this module (config does) stays light

    return secrets.token_urlsafe(32)


def derive_agent_key(lab_secret: str, agent_id: str) -> str:
    """The key agent ``agent_id`` signs with: 64 hex digits of
    ``HMAC-SHA256(lab_secret, "chiffon agent key v1:" + agent_id)`` (both UTF-8).

    One-way: an agent key tells nothing of the lab secret or of other agents' keys.
    """
    if not lab_secret:
        raise ValueError("a heartbeat lab secret must not be empty")
    return hmac.new(lab_secret.encode(), (AGENT_KEY_CONTEXT + agent_id).encode(),
                    hashlib.sha256).hexdigest()


def lab_secret_problem(value: str) -> str | None:
    """Why ``value`` cannot be a lab secret (None: blank, or long enough)."""
    if value and len(value) < MIN_LAB_SECRET_CHARS:
        return (f"is shorter than {MIN_LAB_SECRET_CHARS} characters; `chiffon init-config "
                "--with-secret` generates one")
    return None


def agent_key_problem(value: str) -> str | None:
    """Why ``value`` cannot be a ``heartbeat_key`` (None: blank, or 64 lower-case hex
    digits, as ``chiffon signing-key`` prints them)."""
    if value == "" or _AGENT_KEY_RE.match(value):
        return None
    return ("must be the 64 hex digits `chiffon signing-key AGENT_ID` prints on the "
            "orchestrator's host (not the lab secret itself)")


def agent_signing_key(agent_id: str, *, heartbeat_key: str = "", lab_secret: str = "",
                      shared_secret: str = "") -> str:
    """The key an agent signs its heartbeats with; blank: it sends them unsigned.

    Its own ``heartbeat_key`` first; else, on a host that holds the lab secret (the
    orchestrator's, running an agent too), the key derived from it; else the older
    shared ``heartbeat_secret``.
    """
    if heartbeat_key:
        return heartbeat_key
    if lab_secret:
        return derive_agent_key(lab_secret, agent_id)
    return shared_secret


@dataclass(frozen=True)
class HeartbeatVerifier:
    """The orchestrator's keys and rule (a stateless value; see the module docstring).

    ``lab_secrets``: the current lab secret, then the previous one during a rotation
    (agent keys derived from either are accepted); ``shared_secret``: the older
    ``heartbeat_secret`` (accepted for any agent id); ``required``: a heartbeat without a
    signature is rejected (``unsigned``). Not required, a heartbeat without the
    ``signature`` key is accepted unchecked, but one that carries a signature is still
    checked (for rolling signing out agent by agent). With no key at all nothing is
    verified.
    """

    lab_secrets: tuple[str, ...] = ()
    shared_secret: str = ""
    required: bool = False

    def __post_init__(self) -> None:
        if self.required and not self.verifying:
            raise ValueError("signatures cannot be required without a key to verify them")
        if any(not secret for secret in self.lab_secrets):
            raise ValueError("a heartbeat lab secret must not be empty")

    @property
    def verifying(self) -> bool:
        """Whether there is any key to verify signatures with."""
        return bool(self.lab_secrets or self.shared_secret)

    def describe(self) -> str:
        """For the start-up log line: ``required (agent keys, shared secret)``."""
        if not self.verifying:
            return "not verified (no heartbeat_lab_secret or heartbeat_secret)"
        keys = ["agent keys"] if self.lab_secrets else []
        if len(self.lab_secrets) > 1:
            keys.append("previous agent keys")
        if self.shared_secret:
            keys.append("shared secret")
        return f"{'required' if self.required else 'checked when present'} ({', '.join(keys)})"

    def verify(self, snapshot: Mapping[str, Any]) -> KeyUsed:
        """Check ``snapshot``'s signature; returns the key that made it (``unsigned``: no
        signature, and none is required or nothing is verified).

        Raises :class:`SignatureError`: ``unsigned`` (a required signature is missing, or
        is not 64 hex digits) or ``forged`` (it is no signature of this snapshot by the
        agent key of the agent id it claims, under the current or previous lab secret,
        nor by the shared secret: another agent's key, a dropped lab secret, an altered
        snapshot). Constant-time comparisons.
        """
        if not self.verifying or (SIGNATURE_KEY not in snapshot and not self.required):
            return "unsigned"
        given = snapshot.get(SIGNATURE_KEY)
        if not isinstance(given, str) or len(given) != 64:
            raise SignatureError("unsigned", "is missing or not a hex HMAC-SHA256 digest")
        given = given.lower()
        agent_id = snapshot.get("agent_id")
        try:
            body = canonical_json(snapshot)
            for n, lab_secret in enumerate(self.lab_secrets):
                if isinstance(agent_id, str) and _matches(
                        derive_agent_key(lab_secret, agent_id), body, given):
                    return "agent key" if n == 0 else "previous agent key"
        except (TypeError, ValueError) as exc:  # NaN, an unserialisable value, bad UTF-8
            raise SignatureError("forged", f"cannot be checked: {exc}") from None
        if self.shared_secret and _matches(self.shared_secret, body, given):
            return "shared secret"
        keys = [f"the agent key of {agent_id!r}"] if self.lab_secrets else []
        if self.shared_secret:
            keys.append("the shared heartbeat_secret")
        raise SignatureError("forged", f"is not made with {' or '.join(keys)} (another "
                             "agent's key, an old key, or an altered snapshot)")


def _matches(key: str, body: bytes, given: str) -> bool:
    """Whether ``given`` (lower-case hex) is the HMAC-SHA256 of ``body`` keyed with ``key``."""
    return hmac.compare_digest(hmac.new(key.encode(), body, hashlib.sha256).hexdigest(), given)
