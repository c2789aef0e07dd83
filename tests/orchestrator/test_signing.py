"""Signed heartbeats: HMAC-SHA256 over canonical JSON, hex digest in ``signature``; per-agent
keys derived from a lab secret, its rotation, requiring signatures, and the commands."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import stat
from pathlib import Path

import pytest

from chiffon_worker.cli import main
from chiffon_worker.config import Config
from chiffon_worker.errors import ConfigError
from chiffon_worker.orchestrator.judge import OLD_KEY_LOG_SECONDS, HeartbeatJudge, verifier_of
from chiffon_worker.orchestrator.log_limiter import LOG_BURST
from chiffon_worker.signing import (
    HeartbeatVerifier,
    SignatureError,
    agent_key_problem,
    agent_signing_key,
    canonical_json,
    derive_agent_key,
    new_lab_secret,
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


# -- per-agent keys ------------------------------------------------------------------------

LAB = "lab-secret-0123456789abcdef"
NEW_LAB = "new-lab-secret-fedcba9876543210"


def test_an_agent_key_is_hmac_sha256_of_the_lab_secret_over_the_versioned_agent_id() -> None:
    expected = hmac.new(LAB.encode(), b"chiffon agent key v1:rig-7", hashlib.sha256).hexdigest()
    assert derive_agent_key(LAB, "rig-7") == expected
    assert agent_key_problem(expected) is None


def test_agent_keys_differ_per_agent_id_and_per_lab_secret() -> None:
    keys = {derive_agent_key(lab, agent) for lab in (LAB, NEW_LAB) for agent in ("a", "b")}
    assert len(keys) == 4


def test_a_generated_lab_secret_is_256_random_bits_that_never_pass_for_an_agent_key() -> None:
    first, second = new_lab_secret(), new_lab_secret()
    assert first != second
    assert len(first) == 43 and len(base64.urlsafe_b64decode(first + "=")) == 32
    assert agent_key_problem(first) is not None, "a lab secret pasted as heartbeat_key"


def test_an_agent_signs_with_its_key_else_one_derived_from_a_lab_secret_else_the_shared_one(
        ) -> None:
    own = derive_agent_key(NEW_LAB, "rig-7")
    assert agent_signing_key("rig-7", heartbeat_key=own, lab_secret=LAB,
                             shared_secret=SECRET) == own
    assert agent_signing_key("rig-7", lab_secret=LAB, shared_secret=SECRET) == \
        derive_agent_key(LAB, "rig-7")
    assert agent_signing_key("rig-7", shared_secret=SECRET) == SECRET
    assert agent_signing_key("rig-7") == ""


def signed_by(agent_id: str, lab: str, **overrides: object) -> dict[str, object]:
    """A snapshot of ``agent_id`` signed with its agent key under ``lab``."""
    return sign_snapshot(make_snapshot(agent_id, **overrides), derive_agent_key(lab, agent_id))


def test_a_heartbeat_signed_with_its_agents_key_verifies() -> None:
    verifier = HeartbeatVerifier((LAB,), required=True)
    assert verifier.verify(signed_by("rig-7", LAB)) == "agent key"


def test_an_agents_key_cannot_sign_for_another_agent_id() -> None:
    stolen = derive_agent_key(LAB, "desk-1")
    forged = sign_snapshot(make_snapshot("rig-7"), stolen)
    with pytest.raises(SignatureError) as caught:
        HeartbeatVerifier((LAB,), required=True).verify(forged)
    assert caught.value.reason == "forged"
    assert "'rig-7'" in str(caught.value)


def test_during_a_rotation_keys_of_the_new_and_of_the_previous_lab_secret_are_accepted(
        ) -> None:
    rotating = HeartbeatVerifier((NEW_LAB, LAB), required=True)
    assert rotating.verify(signed_by("rig-7", NEW_LAB)) == "agent key"
    assert rotating.verify(signed_by("rig-7", LAB)) == "previous agent key"


def test_once_the_previous_lab_secret_is_dropped_its_keys_are_refused() -> None:
    with pytest.raises(SignatureError) as caught:
        HeartbeatVerifier((NEW_LAB,), required=True).verify(signed_by("rig-7", LAB))
    assert caught.value.reason == "forged"


def test_the_shared_secret_still_signs_for_any_agent_beside_agent_keys() -> None:
    verifier = HeartbeatVerifier((LAB,), SECRET, required=True)
    assert verifier.verify(sign_snapshot(make_snapshot("rig-7"), SECRET)) == "shared secret"
    assert verifier.verify(signed_by("rig-7", LAB)) == "agent key"


def test_a_required_signature_that_is_missing_is_unsigned() -> None:
    with pytest.raises(SignatureError) as caught:
        HeartbeatVerifier((LAB,), required=True).verify(make_snapshot("rig-7"))
    assert caught.value.reason == "unsigned"


def test_not_required_an_unsigned_heartbeat_passes_but_a_wrong_signature_does_not() -> None:
    optional = HeartbeatVerifier((LAB,), required=False)
    assert optional.verify(make_snapshot("rig-7")) == "unsigned"
    with pytest.raises(SignatureError) as caught:
        optional.verify(signed_by("rig-7", NEW_LAB))
    assert caught.value.reason == "forged"


def test_without_any_key_signatures_are_not_checked_and_cannot_be_required() -> None:
    assert HeartbeatVerifier().verify(signed_by("rig-7", LAB)) == "unsigned"
    with pytest.raises(ValueError, match="required"):
        HeartbeatVerifier(required=True)


# -- the judge: rejections counted by reason, logged rate-limited --------------------------

def judged(judge: HeartbeatJudge, snap: dict[str, object], at: float = 1000.0) -> str:
    outcome = judge.judge_snapshot(snap, received_at=at)
    return f"{outcome.kind} {outcome.reason}".strip()


@pytest.fixture
def judge() -> HeartbeatJudge:
    return HeartbeatJudge([], history_points=10,
                          verifier=HeartbeatVerifier((NEW_LAB, LAB), required=True))


def test_the_judge_counts_unsigned_cross_agent_and_replayed_heartbeats_by_reason(
        judge: HeartbeatJudge) -> None:
    good = signed_by("rig-7", NEW_LAB, seq=1)
    assert judged(judge, good) == "accepted"
    assert judged(judge, make_snapshot("rig-7", seq=2)) == "rejected unsigned"
    cross = sign_snapshot(make_snapshot("rig-7", seq=3), derive_agent_key(NEW_LAB, "desk-1"))
    assert judged(judge, cross) == "rejected forged"
    assert judged(judge, good) == "rejected replayed"
    assert judged(judge, signed_by("rig-7", LAB, seq=2)) == "accepted"
    assert (judge.stats.accepted, dict(judge.stats.rejected)) == (
        2, {"unsigned": 1, "forged": 1, "replayed": 1})


def test_forged_heartbeats_are_logged_rate_limited_but_all_counted(
        judge: HeartbeatJudge, caplog: pytest.LogCaptureFixture) -> None:
    cross = sign_snapshot(make_snapshot("rig-7"), derive_agent_key(NEW_LAB, "desk-1"))
    with caplog.at_level(logging.WARNING, logger="chiffon_worker.orchestrator.judge"):
        for n in range(20):
            judged(judge, cross, at=1000.0 + n)
    lines = [r.getMessage() for r in caplog.records if "rejected (forged)" in r.getMessage()]
    assert judge.stats.rejected["forged"] == 20
    assert 1 <= len(lines) <= LOG_BURST
    assert "'rig-7'" in lines[0]


def test_not_required_unsigned_heartbeats_are_accepted_and_a_replay_is_only_ignored() -> None:
    judge = HeartbeatJudge([], history_points=10,
                           verifier=HeartbeatVerifier((LAB,), required=False))
    unsigned = make_snapshot("rig-7", seq=1)
    assert judged(judge, unsigned) == "accepted"
    assert judged(judge, unsigned).startswith("ignored")
    assert judged(judge, signed_by("rig-7", NEW_LAB, seq=2)) == "rejected forged"


def test_an_agent_still_on_the_previous_lab_secret_is_named_once_an_hour(
        judge: HeartbeatJudge, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="chiffon_worker.orchestrator.judge"):
        for seq, at in ((1, 1000.0), (2, 1030.0), (3, 1000.0 + OLD_KEY_LOG_SECONDS)):
            assert judged(judge, signed_by("rig-7", LAB, seq=seq), at=at) == "accepted"
    named = [r.getMessage() for r in caplog.records if "heartbeat_lab_secret_previous" in
             r.getMessage()]
    assert len(named) == 2
    assert "chiffon signing-key rig-7" in named[0]


# -- the orchestrator's config -------------------------------------------------------------

def config(tmp_path: Path, **values: str) -> Config:
    return Config(environ={}, home=tmp_path, system_file=tmp_path / "none.yml",
                  state_dir=str(tmp_path / "state"), **values)


@pytest.mark.parametrize(("values", "lab_secrets", "shared", "required"), [
    pytest.param({}, (), "", False, id="nothing: unsigned accepted, as before"),
    pytest.param({"heartbeat_secret": SECRET}, (), SECRET, True,
                 id="shared secret: required, as before"),
    pytest.param({"heartbeat_lab_secret": LAB}, (LAB,), "", True, id="lab secret: required"),
    pytest.param({"heartbeat_lab_secret": NEW_LAB, "heartbeat_lab_secret_previous": LAB},
                 (NEW_LAB, LAB), "", True, id="rotating"),
    pytest.param({"heartbeat_lab_secret": LAB, "require_signed_heartbeats": "no"},
                 (LAB,), "", False, id="rolling out: not required"),
    pytest.param({"heartbeat_lab_secret": LAB, "heartbeat_secret": SECRET,
                  "require_signed_heartbeats": "yes"}, (LAB,), SECRET, True, id="migrating"),
])
def test_the_orchestrator_verifies_with_what_its_config_holds(
        clean_env: Path, tmp_path: Path, values: dict[str, str],
        lab_secrets: tuple[str, ...], shared: str, required: bool) -> None:
    assert verifier_of(config(tmp_path, **values)) == HeartbeatVerifier(
        lab_secrets, shared, required=required)


@pytest.mark.parametrize(("values", "key"), [
    pytest.param({"require_signed_heartbeats": "yes"}, "require_signed_heartbeats",
                 id="required with nothing to verify with"),
    pytest.param({"heartbeat_lab_secret_previous": LAB}, "heartbeat_lab_secret_previous",
                 id="a previous lab secret without a current one"),
    pytest.param({"heartbeat_lab_secret": "short"}, "heartbeat_lab_secret",
                 id="a lab secret under 16 characters"),
])
def test_an_orchestrator_config_that_cannot_verify_is_an_error_naming_the_key(
        clean_env: Path, tmp_path: Path, values: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        verifier_of(config(tmp_path, **values))
    assert caught.value.key == key
    assert "short" not in str(caught.value).replace("shorter", ""), "secrets never shown"


def test_a_heartbeat_key_that_is_no_agent_key_stops_the_config_without_showing_it(
        clean_env: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config(tmp_path, heartbeat_key=LAB)
    assert caught.value.key == "heartbeat_key"
    assert LAB not in str(caught.value)
    assert "chiffon signing-key" in str(caught.value)


# -- the commands --------------------------------------------------------------------------

def test_init_config_with_secret_writes_a_new_lab_secret_in_a_mode_600_file(
        clean_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = [tmp_path / "one.yml", tmp_path / "two.yml"]
    for path in paths:
        assert main(["init-config", "--path", str(path), "--with-secret"]) == 0
    loaded = [Config(environ={"CHIFFON_CONFIG": str(path)}, home=tmp_path,
                     system_file=tmp_path / "none.yml") for path in paths]
    secrets = {c.heartbeat_lab_secret for c in loaded}
    assert len(secrets) == 2 and all(len(s) == 43 for s in secrets)
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in paths)
    shown = capsys.readouterr()
    assert "chiffon signing-key" in shown.out
    assert not any(s in shown.out + shown.err for s in secrets), "the secret is never printed"


def test_init_config_without_secret_leaves_the_lab_secret_blank(
        clean_env: Path, tmp_path: Path) -> None:
    path = tmp_path / "agent.yml"
    assert main(["init-config", "--path", str(path)]) == 0
    assert Config(environ={"CHIFFON_CONFIG": str(path)}, home=tmp_path,
                  system_file=tmp_path / "none.yml").heartbeat_lab_secret == ""


def test_init_config_force_makes_an_existing_readable_file_mode_600(
        clean_env: Path, tmp_path: Path) -> None:
    path = tmp_path / "agent.yml"
    path.write_text("# old\n")
    path.chmod(0o644)
    assert main(["init-config", "--path", str(path), "--with-secret", "--force"]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_signing_key_prints_the_agents_key_derived_from_the_lab_secret(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CHIFFON_HEARTBEAT_LAB_SECRET", LAB)
    assert main(["signing-key", "rig-7"]) == 0
    assert capsys.readouterr().out == derive_agent_key(LAB, "rig-7") + "\n"


def test_signing_key_without_a_lab_secret_is_one_line_and_exit_2(
        clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["signing-key", "rig-7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chiffon: error: ") and err.count("\n") == 1
    assert "heartbeat_lab_secret" in err


def test_signing_key_refuses_a_lab_secret_the_orchestrator_would_refuse(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CHIFFON_HEARTBEAT_LAB_SECRET", "short")
    assert main(["signing-key", "rig-7"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no key derived from a secret no orchestrator accepts
    assert "heartbeat_lab_secret: is shorter than 16 characters" in captured.err


def test_config_show_masks_every_signing_secret(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    key = derive_agent_key(LAB, "rig-7")
    values = {"heartbeat_key": key, "heartbeat_lab_secret": NEW_LAB,
              "heartbeat_lab_secret_previous": LAB, "heartbeat_secret": SECRET}
    for name, value in values.items():
        monkeypatch.setenv(f"CHIFFON_{name.upper()}", value)
    assert main(["config", "show", "--json"]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out)
    assert {name: shown[name]["value"] for name in values} == dict.fromkeys(values, "**")
    assert not any(value in out for value in values.values())
