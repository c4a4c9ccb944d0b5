"""Outbound DKIM signing: the policy section, key files, what is signed and when, and `bulwark dkim`.

Signatures are checked with dkimpy against the keys' own DNS records
(served from memory here; tests/test_outbound_delivery.py serves them from
NSD and delivers to a real receiver).
"""

from __future__ import annotations

import base64
import json
import stat
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from bulwark.cli import main
from bulwark.policy import PolicyError, parse
from bulwark.policy.dkim import DkimKey
from bulwark.policy.runtime import PolicyHolder
from schemas import events as ev
from sinks.dkim_sign import (
    KeyProblem, OutboundSigner, SigningFailed, author_domain, generate_private_key, headers_to_sign,
    read_private_key, record_value, sign_message, signing_key, txt_strings, write_private_key, zone_line,
)
from tests.dkim_keys import TestKeys, signatures, verify_all

DOMAIN = "example.com"
BASE = f"hostname: gw.example.com\nlocal_domains: [{DOMAIN}, example.org]\n"

MESSAGE = (
    "Received: from client.example.com ([10.0.0.7])\r\n\tby gw.example.com (Bulwark) with ESMTPSA id m1; "
    "Tue, 01 Dec 2026 10:00:00 +0000\r\n"
    "X-Bulwark-Tags: DLP_IBAN\r\n"
    "From: Alice Example <alice@example.com>\r\n"
    "To: Bob <bob@partner.test>\r\n"
    "Subject: The quarterly figures\r\n"
    "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
    "Message-ID: <m1@example.com>\r\n"
    "List-Unsubscribe: <mailto:leave@example.com>\r\n"
    "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
    "Hello Bob,\r\n\r\nthe figures are attached.  \r\n"
).encode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> TestKeys:
    return TestKeys(tmp_path_factory.mktemp("dkim"), DOMAIN)


def loaded(keys: TestKeys) -> list:
    return [signing_key(DkimKey(**k)) for k in keys.policy()["keys"]]


# -- signatures a downstream verifies -----------------------------------------------------


def test_rsa_and_ed25519_signatures_verify_at_the_downstream(keys):
    signed = sign_message(MESSAGE, loaded(keys)) + MESSAGE
    assert verify_all(signed, keys.dnsfunc) == [True, True]
    rsa, ed = signatures(signed)
    # RSA on top (a verifier that reads one signature reads that one), both relaxed/relaxed,
    # d= the From: domain (DMARC alignment), no l= (RFC 8460 forbids it; nothing needs it).
    assert (rsa[b"a"], ed[b"a"]) == (b"rsa-sha256", b"ed25519-sha256")
    assert (rsa[b"s"], ed[b"s"]) == (keys.rsa_selector.encode(), keys.ed_selector.encode())
    assert all(s[b"c"] == b"relaxed/relaxed" and s[b"d"] == DOMAIN.encode() and b"l" not in s
               for s in (rsa, ed))


def test_each_signature_verifies_on_its_own(keys):
    # A verifier without Ed25519 support still has the RSA signature, and the other way round.
    rsa_only = sign_message(MESSAGE, [k for k in loaded(keys) if k.algorithm == "rsa-sha256"]) + MESSAGE
    ed_only = sign_message(MESSAGE, [k for k in loaded(keys) if k.algorithm == "ed25519-sha256"]) + MESSAGE
    assert verify_all(rsa_only, keys.dnsfunc) == [True] and verify_all(ed_only, keys.dnsfunc) == [True]


def test_the_recommended_headers_are_signed_and_the_visible_ones_oversigned():
    signed = [h.decode() for h in headers_to_sign(MESSAGE)]
    assert signed[:10] == ["from", "to", "subject", "date", "message-id", "list-unsubscribe",
                           "list-unsubscribe-post", "mime-version", "content-type", "from"]
    # Oversigned: each present singleton once more, so none can be added.
    assert signed[9:] == ["from", "subject", "date", "to", "message-id"]
    # Trace and the gateway's own informational headers are not signed.
    assert "received" not in signed and "x-bulwark-tags" not in signed


@pytest.mark.parametrize("change", [
    lambda m: b"From: ceo@example.com\r\n" + m,                     # a second From on top
    lambda m: b"Subject: Urgent: wire the money\r\n" + m,           # a second Subject
    lambda m: m.replace(b"figures are", b"figures were"),           # the body
    lambda m: m.replace(b"Subject: The quarterly", b"Subject: The yearly"),
])
def test_changes_on_the_way_break_the_signatures(keys, change):
    signed = sign_message(MESSAGE, loaded(keys)) + MESSAGE
    assert verify_all(change(signed), keys.dnsfunc) == [False, False]


def test_relaxed_canonicalisation_survives_refolding_and_a_later_received(keys):
    signed = sign_message(MESSAGE, loaded(keys)) + MESSAGE
    refolded = b"Received: from gw.example.com by mx.partner.test; Tue, 01 Dec 2026 10:00:01 +0000\r\n" + \
        signed.replace(b"Subject: The quarterly figures", b"Subject: The quarterly\r\n figures ")
    assert verify_all(refolded, keys.dnsfunc) == [True, True]


@pytest.mark.parametrize("header, domain", [
    (b"From: Alice <alice@Example.COM>", "example.com"),
    (b"From: alice@example.com (Alice)", "example.com"),
    (b'From: "Smith, Alice" <alice@example.com>, bob@example.com', "example.com"),
    (b"From: alice@example.com, mallory@elsewhere.test", None),  # two domains: DMARC cannot align it
    (b"From: undisclosed", None),
])
def test_the_author_domain_is_the_from_domain(header, domain):
    assert author_domain(header + b"\r\nSubject: x\r\n\r\nbody\r\n") == domain


def test_two_from_fields_have_no_author_domain():
    assert author_domain(b"From: a@example.com\r\nFrom: b@example.com\r\n\r\nbody\r\n") is None


# -- key files -----------------------------------------------------------------------------


def test_keys_in_other_common_formats_are_read(tmp_path, keys):
    # PKCS#1 (opendkim-genkey, openssl genrsa) and dkimpy's base64 Ed25519 seed (dknewkey).
    rsa = read_private_key(keys.files[keys.rsa_selector], "rsa-sha256")
    pkcs1 = tmp_path / "pkcs1.key"
    pkcs1.write_bytes(rsa.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption()))
    assert record_value(read_private_key(pkcs1, "rsa-sha256")) == keys.records[keys.rsa_selector]
    ed = read_private_key(keys.files[keys.ed_selector], "ed25519-sha256")
    seed = tmp_path / "seed.key"
    seed.write_bytes(base64.b64encode(ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                       serialization.NoEncryption())) + b"\n")
    assert record_value(read_private_key(seed, "ed25519-sha256")) == keys.records[keys.ed_selector]


def test_unusable_key_files_say_why_and_never_show_the_key(tmp_path, keys):
    secret = keys.files[keys.rsa_selector].read_text()
    garbage = tmp_path / "garbage.key"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(read_private_key(keys.files[keys.rsa_selector], "rsa-sha256").private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass phrase")))
    cases = [
        (tmp_path / "missing.key", "rsa-sha256", "cannot read the key file"),
        (garbage, "rsa-sha256", "no private key"),
        (encrypted, "rsa-sha256", "encrypted"),
        (keys.files[keys.rsa_selector], "ed25519-sha256", "not an Ed25519 key"),
        (keys.files[keys.ed_selector], "rsa-sha256", "not an RSA key"),
    ]
    for path, algorithm, why in cases:
        with pytest.raises(KeyProblem) as caught:
            read_private_key(path, algorithm)
        assert why in str(caught.value) and str(path) in str(caught.value)
        assert secret[40:80] not in str(caught.value)
    assert secret[40:80] not in repr(loaded(keys))


def test_a_generated_key_is_written_for_its_owner_only_and_never_over_another(tmp_path):
    path = tmp_path / "k" / "example.com.s1.key"
    write_private_key(path, generate_private_key("rsa-sha256"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_private_key(path, "rsa-sha256").key_size == 2048
    with pytest.raises(FileExistsError):
        write_private_key(path, generate_private_key("rsa-sha256"))


def test_the_record_is_split_in_strings_of_255_octets(keys):
    value = record_value(read_private_key(keys.files[keys.rsa_selector], "rsa-sha256"))
    parts = txt_strings(value)
    assert len(parts) == 2 and all(len(p) <= 255 for p in parts) and "".join(parts) == value
    assert value.startswith("v=DKIM1; k=rsa; p=MII")
    line = zone_line("s1", DOMAIN, value)
    assert line.startswith('s1._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=') and line.count('"') == 4
    assert record_value(read_private_key(keys.files[keys.ed_selector], "ed25519-sha256"), "tlsrpt") \
        .startswith("v=DKIM1; k=ed25519; s=tlsrpt; p=")


# -- the policy section ----------------------------------------------------------------------


def test_signing_is_on_and_signs_nothing_until_keys_are_given():
    policy = parse(BASE)
    assert policy.dkim_signing.enabled and policy.dkim_signing.keys == []


def test_keys_validate_with_file_line_and_field(tmp_path):
    text = BASE + (
        "dkim_signing:\n"
        "  keys:\n"
        "    - {domain: example.com, selector: s1, key_file: /etc/bulwark/dkim/a.key}\n"         # 5: fine
        "    - {domain: exmaple.com, selector: s2, key_file: /etc/bulwark/dkim/b.key}\n"         # 6: a typo
        "    - {domain: example.com, selector: s1, algorithm: ed25519-sha256, key_file: /k/c}\n"  # 7: same selector
        "    - {domain: example.com, selector: s3, key_file: /etc/bulwark/dkim/d.key}\n"         # 8: second RSA
        "    - {domain: example.com, selector: 'bad selector', key_file: relative.key}\n"        # 9
        "    - {domain: example.com, selector: s4, algorithm: rsa-sha1, key_file: /k/e}\n"        # 10
    )
    with pytest.raises(PolicyError) as caught:
        parse(text, "p.yaml")
    lines = str(caught.value).splitlines()[1:]

    def has(prefix, *words):
        return any(line.startswith(prefix) and all(w in line for w in words) for line in lines)

    assert has("p.yaml:9: dkim_signing.keys.4.selector:", "is not a selector"), lines
    assert has("p.yaml:9: dkim_signing.keys.4.key_file:", "relative", "absolute"), lines
    assert has("p.yaml:10: dkim_signing.keys.5.algorithm:", "rsa-sha256", "ed25519-sha256"), lines
    # Cross-checks run once the sections themselves are valid.
    text = "\n".join(line for i, line in enumerate(text.splitlines(), 1) if i not in (9, 10)) + "\n"
    with pytest.raises(PolicyError) as caught:
        parse(text, "p.yaml")
    lines = str(caught.value).splitlines()[1:]
    assert has("p.yaml:6: dkim_signing.keys.1.domain:", "exmaple.com is not a local domain"), lines
    assert has("p.yaml:7: dkim_signing.keys.2.selector:", "s1._domainkey.example.com is already key 0"), lines
    assert has("p.yaml:8: dkim_signing.keys.3.algorithm:", "already the rsa-sha256 key of example.com",
               "replace that entry"), lines
    assert len(lines) == 3, lines


def test_keys_may_be_for_the_hostname_and_the_tls_reports_sender():
    policy = parse(BASE + "tls: {tls_reporting: {report_from: tlsrpt@reports.example.net}}\n"
                   "dkim_signing:\n  keys:\n"
                   "    - {domain: gw.example.com, selector: s1, key_file: /k/a}\n"
                   "    - {domain: reports.example.net, selector: s1, key_file: /k/b}\n"
                   "    - {domain: reports.example.net, selector: t1, key_file: /k/c, use: tlsrpt}\n")
    assert [(k.domain, k.use) for k in policy.dkim_signing.keys] == [
        ("gw.example.com", "all"), ("reports.example.net", "all"), ("reports.example.net", "tlsrpt")]


# -- when the delivery sink signs -----------------------------------------------------------------


def _signer(keys: TestKeys, **policy) -> OutboundSigner:
    document = {"hostname": "gw.example.com", "local_domains": [DOMAIN],
                "mail_servers": [{"name": "mx", "host": "10.0.0.5", "default": True,
                                  "trusted_addresses": ["10.0.0.5/32"]}],
                "dkim_signing": keys.policy(), **policy}
    parsed = parse(json.dumps(document))
    return OutboundSigner(SimpleNamespace(policy=PolicyHolder.fixed(parsed), created_domains={"made.example.com"}))


def _envelope(**fields) -> ev.Envelope:
    base = dict(mail_from="alice@example.com", rcpt_to=["bob@partner.test"], sha256="0" * 64, size=1,
                client_ip="203.0.113.9", received_at=datetime.now(timezone.utc))
    return ev.Envelope(**{**base, **fields})


async def _sign(signer, envelope, domain="partner.test", source="verdict", message=MESSAGE) -> bytes:
    entry = {"message_id": "m1", "session_id": "s1", "source": source, "attempts": 1}
    return await signer.sign(entry, envelope, domain, message)


async def test_the_organisations_mail_leaving_is_signed(keys):
    signer = _signer(keys)
    for envelope, source in [
        (_envelope(authenticated_user="alice@example.com"), "verdict"),  # a user's client, AUTH
        (_envelope(client_ip="10.0.0.5"), "verdict"),                     # the domain mail server
        (_envelope(client_ip="10.0.0.5"), "release"),                     # released from the quarantine
        (_envelope(mail_from="", client_ip="127.0.0.1"), "dsn"),          # the gateway's own mail
    ]:
        signed = await _sign(signer, envelope, source=source)
        assert verify_all(signed, keys.dnsfunc) == [True, True], (envelope, source)


async def test_what_is_not_signed(keys):
    signer = _signer(keys)
    authenticated = _envelope(authenticated_user="alice@example.com")
    # To local recipients (and domains made local at run time): the organisation's own servers.
    assert await _sign(signer, authenticated, domain=DOMAIN) == MESSAGE
    assert await _sign(signer, authenticated, domain="made.example.com") == MESSAGE
    # From the Internet, even when a verdict sends it out again: a forged local From never gets our signature.
    assert await _sign(signer, _envelope()) == MESSAGE
    # A From: domain without keys.
    other = MESSAGE.replace(b"alice@example.com>", b"alice@example.org>")
    assert await _sign(signer, authenticated, message=other) == other
    # Signing switched off.
    off = _signer(keys, dkim_signing={**keys.policy(), "enabled": False})
    assert await _sign(off, authenticated) == MESSAGE


async def test_a_tls_report_uses_the_domains_tlsrpt_key_when_it_has_one(keys, tmp_path):
    report = MESSAGE.replace(b"Subject:", b"TLS-Report-Domain: partner.test\r\nTLS-Report-Submitter: example.com\r\n"
                                          b"Subject:")
    envelope = _envelope(mail_from="", client_ip="127.0.0.1")
    # Without one: the domain's keys.
    signed = await _sign(_signer(keys), envelope, source="tlsrpt", message=report)
    assert [s[b"s"].decode() for s in signatures(signed)] == [keys.rsa_selector, keys.ed_selector]
    assert b"tls-report-domain" in signatures(signed)[0][b"h"]
    # With one: that key alone; its record says s=tlsrpt, which dkimpy requires when told to be strict.
    extra = TestKeys(tmp_path, DOMAIN, rsa_selector="unused", ed_selector="unused-ed")
    tlsrpt_key = extra.add("reports", "ed25519-sha256", use="tlsrpt")
    keys.records["reports"] = extra.records["reports"]
    try:
        signer = _signer(keys, dkim_signing={"keys": [*keys.policy()["keys"], tlsrpt_key]})
        signed = await _sign(signer, envelope, source="tlsrpt", message=report)
        assert [s[b"s"] for s in signatures(signed)] == [b"reports"]
        assert verify_all(signed, keys.dnsfunc, tlsrpt="strict") == [True]
        # ... and ordinary mail never uses it.
        signed = await _sign(signer, _envelope(authenticated_user="alice@example.com"))
        assert [s[b"s"].decode() for s in signatures(signed)] == [keys.rsa_selector, keys.ed_selector]
    finally:
        del keys.records["reports"]


async def test_a_broken_key_leaves_the_other_to_sign_and_no_key_defers(keys, tmp_path, caplog):
    missing = {**keys.policy_key(keys.ed_selector, "ed25519-sha256"), "key_file": str(tmp_path / "gone.key")}
    half = _signer(keys, dkim_signing={"keys": [keys.policy_key(keys.rsa_selector, "rsa-sha256"), missing]})
    authenticated = _envelope(authenticated_user="alice@example.com")
    signed = await _sign(half, authenticated)
    assert verify_all(signed, keys.dnsfunc) == [True]
    assert any("cannot read the key file" in r.getMessage() and "ed2026._domainkey" in r.getMessage()
               for r in caplog.records)

    none = _signer(keys, dkim_signing={"keys": [missing]})
    with pytest.raises(SigningFailed) as caught:
        await _sign(none, authenticated)
    assert "cannot read the key file" in str(caught.value) and str(tmp_path / "gone.key") in str(caught.value)


async def test_a_key_file_replaced_in_place_is_read_again(keys, tmp_path):
    path = tmp_path / "example.com.live.key"
    write_private_key(path, generate_private_key("ed25519-sha256"))
    entry = {"domain": DOMAIN, "selector": "live", "algorithm": "ed25519-sha256", "key_file": str(path)}
    signer = _signer(keys, dkim_signing={"keys": [entry]})
    authenticated = _envelope(authenticated_user="alice@example.com")
    first = await _sign(signer, authenticated)
    path.unlink()
    write_private_key(path, generate_private_key("ed25519-sha256"))
    keys.records["live"] = record_value(read_private_key(path, "ed25519-sha256"))
    try:
        assert verify_all(first, keys.dnsfunc) == [False]  # the old key's signature, the new key's record
        assert verify_all(await _sign(signer, authenticated), keys.dnsfunc) == [True]
    finally:
        del keys.records["live"]


# -- bulwark dkim ----------------------------------------------------------------------------


def test_keygen_writes_the_key_and_prints_its_record_and_policy_entry(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["dkim", "keygen", "Example.com", "s2026", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    path = tmp_path / "example.com.s2026.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = result.output.splitlines()
    [record] = [line for line in lines if "._domainkey." in line]
    assert record.startswith('s2026._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=')
    strings = record.split(" IN TXT ", 1)[1].strip('"').split('" "')
    assert all(len(s) <= 255 for s in strings)
    assert "".join(strings) == record_value(read_private_key(path, "rsa-sha256"))
    # The printed policy entry is one the policy accepts as it is.
    snippet = result.output[result.output.index("dkim_signing:"):]
    policy = parse(BASE + snippet)
    assert policy.dkim_signing.keys[0].key_file == path and policy.dkim_signing.keys[0].selector == "s2026"

    result = runner.invoke(main, ["dkim", "keygen", "example.com", "ed", "--algorithm", "ed25519", "--tlsrpt",
                                  "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert 'ed._domainkey.example.com. IN TXT "v=DKIM1; k=ed25519; s=tlsrpt; p=' in result.output
    assert "algorithm: ed25519-sha256" in result.output and "use: tlsrpt" in result.output

    # A selector in use is never overwritten; a bad selector is refused.
    before = path.read_bytes()
    again = runner.invoke(main, ["dkim", "keygen", "example.com", "s2026", "--dir", str(tmp_path)])
    assert again.exit_code != 0 and "exists" in again.output and path.read_bytes() == before
    bad = runner.invoke(main, ["dkim", "keygen", "example.com", "no_good!", "--dir", str(tmp_path)])
    assert bad.exit_code != 0 and "is not a selector" in bad.output


def test_check_reads_each_key_and_compares_the_published_record(tmp_path, keys, monkeypatch):
    from bulwark.cli import dkim as dkim_cli

    broken = {"domain": "gw.example.com", "selector": "gone", "key_file": str(tmp_path / "gone.key")}
    policy = tmp_path / "policy.yaml"
    policy.write_text(BASE + "dkim_signing:\n  keys:\n" + "".join(
        f"    - {json.dumps(k)}\n" for k in [*keys.policy()["keys"], broken]))
    published = {f"{keys.rsa_selector}._domainkey.{DOMAIN}.": [keys.records[keys.rsa_selector]],
                 f"{keys.ed_selector}._domainkey.{DOMAIN}.": []}

    async def lookup(settings, name):
        return published[name]

    monkeypatch.setattr(dkim_cli, "_published", lookup)
    result = CliRunner().invoke(main, ["dkim", "check", str(policy)])
    assert result.exit_code == 1, result.output
    out = result.output
    assert f"[OK] {keys.rsa_selector}._domainkey.{DOMAIN} (rsa-sha256" in out
    assert f"[FAIL] {keys.ed_selector}._domainkey.{DOMAIN} (ed25519-sha256" in out and "no record is published" in out
    assert f"publish: {keys.ed_selector}._domainkey.{DOMAIN}. IN TXT \"v=DKIM1; k=ed25519; p=" in out
    assert "[FAIL] gone._domainkey.gw.example.com (rsa-sha256): cannot read the key file" in out

    offline = CliRunner().invoke(main, ["dkim", "check", "--no-dns", str(policy)])
    assert offline.exit_code == 1 and offline.output.count("[OK]") == 2
