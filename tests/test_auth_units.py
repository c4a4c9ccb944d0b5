"""Passwords, the TLS context and the AUTH/TLS policy sections, without services."""

from __future__ import annotations

import os
import ssl
import time

import pytest

from bulwark.passwords import hash_password, verify_password, weaknesses
from bulwark.policy import PolicyError, parse
from ingest.tls import ServerTls, self_signed

BASE = "hostname: gw.example.test\nlocal_domains: [example.test]\n"


# -- passwords ------------------------------------------------------------------


def test_password_verifier_is_argon2id_and_verifies():
    verifier = hash_password("Violet-Harbor-Lantern-93")
    assert verifier.startswith("$argon2id$") and "Violet" not in verifier
    assert verify_password(verifier, "Violet-Harbor-Lantern-93")
    assert not verify_password(verifier, "violet-harbor-lantern-93")
    # No account, or a damaged verifier, is a failure, never an exception.
    assert not verify_password(None, "Violet-Harbor-Lantern-93")
    assert not verify_password("not a hash", "Violet-Harbor-Lantern-93")


@pytest.mark.parametrize("password, why", [
    ("Ab1!xyz", "shorter than 12 characters"),
    ("password1234", "too easy to guess"),
    ("qwertyuiop123", "too easy to guess"),
    ("alice-Lantern-Harbor-81", "contains the account's name"),
    ("Lantern-example.test-81", "contains the account's domain"),
    ("Lantern-EXAMPLE-Harbor-81", "contains the account's domain"),
])
def test_weak_passwords_say_why(password, why):
    problems = weaknesses(password, "alice@example.test", min_length=12, min_strength=3)
    assert any(why in p for p in problems), problems
    assert not any(password in p for p in problems)


def test_strong_password_passes():
    assert weaknesses("Violet-Harbor-Lantern-93", "alice@example.test", 12, 3) == []


# -- policy -----------------------------------------------------------------------


def test_auth_and_tls_defaults_are_the_secure_ones():
    policy = parse(BASE)
    assert policy.tls.min_version == "TLSv1.2" and policy.tls.requiretls
    assert policy.auth.passwords.min_length == 12 and policy.auth.passwords.min_strength == 3
    # Port 25 offers no AUTH; both submission listeners require it.
    assert (policy.listeners.inbound.auth, policy.listeners.inbound.require_auth) == (False, False)
    assert policy.listeners.submission.require_auth and policy.listeners.submissions.require_auth


def test_bad_tls_and_password_settings_name_the_line():
    text = BASE + "tls:\n  min_version: TLSv1.2\n  ciphers: NOT-A-CIPHER\nauth:\n  passwords:\n    min_length: 4\n"
    with pytest.raises(PolicyError) as caught:
        parse(text, "p.yaml")
    message = str(caught.value)
    assert "p.yaml:5: tls.ciphers: no cipher matches 'NOT-A-CIPHER'" in message
    assert "p.yaml:8: auth.passwords.min_length" in message
    with pytest.raises(PolicyError, match="tls.min_version"):
        parse(BASE + "tls:\n  min_version: TLSv1.0\n")


# -- TLS ---------------------------------------------------------------------------


def _served_certificate(server: ssl.SSLContext, client: ssl.SSLContext | None = None) -> dict:
    """Handshake in memory and return the certificate the server presented."""
    client = client or ssl._create_unverified_context()
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="gw.example.test")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (c, s):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    from cryptography import x509

    cert = x509.load_der_x509_certificate(c.getpeercert(binary_form=True))
    return {"cn": cert.subject.rfc4514_string(), "version": c.version()}


def test_self_signed_certificate_is_made_once_with_a_private_key(tmp_path):
    cert, key = self_signed(tmp_path, "gw.example.test")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert self_signed(tmp_path, "gw.example.test") == (cert, key)
    tls = ServerTls(None, None, tmp_path, parse(BASE))
    assert _served_certificate(tls.context)["cn"] == "CN=gw.example.test"


def test_certificate_is_reloaded_when_its_files_change(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    cert, key = self_signed(first, "old.example.test")
    new_cert, new_key = self_signed(second, "new.example.test")
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    live_cert.write_bytes(cert.read_bytes())
    live_key.write_bytes(key.read_bytes())
    tls = ServerTls(live_cert, live_key, tmp_path, parse(BASE))
    assert _served_certificate(tls.refresh())["cn"] == "CN=old.example.test"

    # A renewal half-way through (new certificate, old key) keeps the old pair.
    later = time.time() + 5
    live_cert.write_bytes(new_cert.read_bytes())
    os.utime(live_cert, (later, later))
    assert _served_certificate(tls.refresh())["cn"] == "CN=old.example.test"
    live_key.write_bytes(new_key.read_bytes())
    os.utime(live_key, (later, later))
    assert _served_certificate(tls.refresh())["cn"] == "CN=new.example.test"


def test_min_tls_version_is_policy(tmp_path):
    tls = ServerTls(None, None, tmp_path, parse(BASE + "tls:\n  min_version: TLSv1.3\n"))
    old_client = ssl._create_unverified_context()
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        _served_certificate(tls.context, old_client)
    assert _served_certificate(tls.context)["version"] == "TLSv1.3"
    # And TLS 1.1 never, whatever the policy.
    default = ServerTls(None, None, tmp_path, parse(BASE))
    assert default.context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_argon2_runs_at_a_lower_cpu_priority_than_the_smtp_loop():
    # An AUTH flood's password checks wait for CPU that mail does not need.
    import threading

    from ingest.accounts import ARGON2_NICE, ARGON2_POOL

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    assert ARGON2_POOL.submit(nice).result() == min(19, nice() + ARGON2_NICE)
