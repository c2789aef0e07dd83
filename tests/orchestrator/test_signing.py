"""Signed heartbeats: HMAC-SHA256 over canonical JSON, hex digest in ``signature``."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from chiffon_worker.signing import (
    SignatureError,
    canonical_json,
    sign_snapshot,
    verify_snapshot,
)

from .snapshots import make_snapshot

SECRET = "lab-secret-\u00e9t\u00e9"


def test_the_signature_is_hmac_sha256_of_the_sorted_compact_json_without_signature() -> None:
    snap = make_snapshot()
    signed = sign_snapshot(snap, SECRET)
    expected = hmac.new(SECRET.encode(), json.dumps(
        snap, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256).hexdigest()
    assert signed["signature"] == expected
    assert "signature" not in snap, "signing must not modify its input"


def test_a_signed_snapshot_verifies_after_a_json_round_trip() -> None:
    signed = sign_snapshot(make_snapshot(load_1min=0.1 + 0.2), SECRET)
    verify_snapshot(json.loads(json.dumps(signed)), SECRET)


def test_canonical_form_ignores_key_order_and_an_existing_signature() -> None:
    snap = make_snapshot()
    reordered = dict(reversed(list(snap.items())))
    assert canonical_json(snap) == canonical_json({**reordered, "signature": "x" * 64})


@pytest.mark.parametrize(("tamper", "reason"), [
    pytest.param(lambda s: s.pop("signature"), "unsigned", id="no signature"),
    pytest.param(lambda s: s.update(signature=12), "unsigned", id="signature not a string"),
    pytest.param(lambda s: s.update(signature="abc"), "unsigned", id="signature too short"),
    pytest.param(lambda s: s.update(gpu_vram_available_gb=0.5), "forged", id="value altered"),
    pytest.param(lambda s: s.update(extra=1), "forged", id="key added"),
    pytest.param(lambda s: s.update(signature=sign_snapshot(s, "other")["signature"]),
                 "forged", id="signed with another secret"),
])
def test_unsigned_and_forged_snapshots_fail_verification_with_their_reason(
        tamper: object, reason: str) -> None:
    signed = sign_snapshot(make_snapshot(), SECRET)
    tamper(signed)  # type: ignore[operator]
    with pytest.raises(SignatureError) as caught:
        verify_snapshot(signed, SECRET)
    assert caught.value.reason == reason
    assert caught.value.field == "signature"


def test_an_empty_secret_cannot_sign() -> None:
    with pytest.raises(ValueError, match="secret"):
        sign_snapshot(make_snapshot(), "")
