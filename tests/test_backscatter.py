"""BATV prvs signatures: sign outgoing return paths, verify what comes back."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from bulwark import backscatter as batv

MASTER = b"m" * 32
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
KEY = batv.derive_key(MASTER, 3, NOW - timedelta(days=30))


def test_signed_address_has_the_prvs_form_and_verifies():
    signed = batv.sign("Alice@Example.test", KEY, NOW, 7)
    assert signed.startswith("prvs=3") and signed.endswith("=Alice@Example.test")
    check = batv.verify(signed, {3: KEY}, NOW + timedelta(days=2), 7)
    assert (check.status, check.address) == ("valid", "Alice@Example.test")


def test_the_day_stamp_is_the_last_valid_day_modulo_1000():
    signed = batv.sign("a@example.test", KEY, NOW, 7)
    assert signed[6:9] == f"{(batv.day_number(NOW) + 7) % 1000:03d}"


def test_a_forged_or_altered_signature_is_invalid():
    signed = batv.sign("alice@example.test", KEY, NOW, 7)
    forged = signed[:9] + ("0" if signed[9] != "0" else "1") + signed[10:]
    assert batv.verify(forged, {3: KEY}, NOW, 7).status == "invalid"
    other_user = signed.replace("=alice@", "=mallory@")
    assert batv.verify(other_user, {3: KEY}, NOW, 7).status == "invalid"


def test_an_expired_signature_is_refused():
    signed = batv.sign("alice@example.test", KEY, NOW, 7)
    assert batv.verify(signed, {3: KEY}, NOW + timedelta(days=8), 7).status == "expired"


def test_an_unsigned_address_is_missing_its_tag():
    check = batv.verify("alice@example.test", {3: KEY}, NOW, 7)
    assert (check.status, check.address) == ("missing", "alice@example.test")


def test_the_null_sender_is_never_signed():
    assert batv.sign("", KEY, NOW, 7) == ""


def test_after_rotation_the_previous_key_verifies_for_the_validity_period():
    rotations = [(3, NOW - timedelta(days=30)), (4, NOW)]
    current, keys = batv.usable_keys(rotations, MASTER, NOW + timedelta(days=1), 7)
    assert current.number == 4 and set(keys) == {3, 4}
    old_signature = batv.sign("alice@example.test", keys[3], NOW - timedelta(hours=1), 7)
    assert batv.verify(old_signature, keys, NOW + timedelta(days=1), 7).status == "valid"
    _, later = batv.usable_keys(rotations, MASTER, NOW + timedelta(days=8), 7)
    assert set(later) == {4}
    assert batv.verify(old_signature, later, NOW + timedelta(days=8), 7).status == "invalid"


def test_a_reused_key_number_gets_new_material():
    assert batv.derive_key(MASTER, 1, NOW).material != batv.derive_key(MASTER, 1, NOW + timedelta(days=1)).material


def test_master_secret_is_created_private(tmp_path):
    path = tmp_path / "secrets" / "backscatter.key"
    secret = batv.load_master_secret(path)
    assert len(secret) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert batv.load_master_secret(path) == secret


def test_auto_replies_are_recognised():
    assert batv.is_auto_reply({"auto-submitted": "auto-replied"})
    assert not batv.is_auto_reply({"auto-submitted": "no"})
    assert batv.is_auto_reply({"precedence": "auto_reply"})
    assert not batv.is_auto_reply({"precedence": "bulk"})
