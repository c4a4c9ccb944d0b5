"""The policy's SMTP-dialogue sections: secure defaults and clear errors."""

from __future__ import annotations

import pytest

from bulwark.policy import PolicyError, from_document, parse
from bulwark.policy.sections import LOCALDOMAIN

BASE = "hostname: gw.example.com\nlocal_domains: [example.com]\n"


def test_defaults_are_the_guides_recommendations():
    policy = parse(BASE)
    relay = policy.relay_control
    assert relay.only_domain_mail_servers_send_local_mail and relay.local_sender_must_exist
    assert relay.exceptions.enabled() == []
    shield = policy.ip_shielding
    assert shield.enabled and shield.check_from_header and shield.exempt_authenticated
    # The guide's screenshot: every local domain from the private ranges and loopback.
    assert [(p.domain, p.ip) for p in shield.pairs] == [
        (LOCALDOMAIN, "10.0.0.0/8"), (LOCALDOMAIN, "127.0.0.0/8"), (LOCALDOMAIN, "172.16.0.0/12"),
        (LOCALDOMAIN, "192.168.0.0/16"), (LOCALDOMAIN, "::1/128"), (LOCALDOMAIN, "fd00::/8"),
    ]
    assert "ip_shielding" not in policy.allow_list.skips
    assert policy.session_limits.max_recipients_per_message == 100
    assert not policy.location_screening.enabled


def test_allow_listing_a_local_address_is_refused_with_the_guides_reason():
    text = BASE + "allow_list:\n  senders:\n    - partner@partner.test\n    - Boss@Example.com\n  domains: [example.com]\n"
    with pytest.raises(PolicyError) as caught:
        parse(text, "policy.yaml")
    message = str(caught.value)
    assert "policy.yaml:6: allow_list.senders.1: boss@example.com is a local address" in message
    assert "policy.yaml:7: allow_list.domains.0: example.com is a local domain" in message
    assert "bypass many of your security settings" in message


def test_errors_name_file_line_and_field_for_each_section():
    text = BASE + (
        "ip_shielding:\n"
        "  pairs:\n"
        "    - {domain: example.com, ip: 10.0.0.0/8}\n"
        "    - {domain: example.com, ip: not-an-ip}\n"
        "location_screening:\n"
        "  refuse_connections_from: [KP, Korea]\n"
        "session_limits:\n"
        "  max_recipients_per_message: 0\n"
    )
    with pytest.raises(PolicyError) as caught:
        parse(text, "p.yaml")
    lines = str(caught.value).splitlines()[1:]
    assert any(l.startswith("p.yaml:6: ip_shielding.pairs.1.ip: 'not-an-ip' is not an IP address or CIDR range")
               for l in lines), lines
    assert any(l.startswith("p.yaml:8: location_screening.refuse_connections_from:") and "'KOREA'" in l
               and "ISO 3166-1 alpha-2" in l for l in lines), lines
    assert any(l.startswith("p.yaml:10: session_limits.max_recipients_per_message:") for l in lines), lines


def test_location_screening_needs_an_existing_database(tmp_path):
    missing = tmp_path / "nope.mmdb"
    with pytest.raises(PolicyError) as caught:
        parse(BASE + f"location_screening:\n  enabled: true\n  database: {missing}\n", "p.yaml")
    assert f"{missing} does not exist" in str(caught.value)
    assert "p.yaml:4: location_screening" in str(caught.value)


def test_delivery_credentials_never_hold_the_password():
    text = BASE + ("mail_servers:\n  - name: exchange\n    host: 10.0.0.5\n    default: true\n"
                   "    requires_smtp_auth: {username: gateway, password: hunter2}\n")
    with pytest.raises(PolicyError) as caught:
        parse(text, "p.yaml")
    assert "hunter2" not in str(caught.value)
    assert "requires_smtp_auth" in str(caught.value)


def test_delivery_password_comes_from_a_file(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    policy = parse(BASE + ("mail_servers:\n  - name: exchange\n    host: 10.0.0.5\n    default: true\n"
                           f"    requires_smtp_auth: {{username: gateway, password_file: {secret}}}\n"))
    creds = policy.mail_servers[0].requires_smtp_auth
    assert creds.password() == "s3cret"
    assert "s3cret" not in policy.model_dump_json()


def test_a_published_document_keeps_its_version_and_validates_like_a_file():
    policy = parse(BASE)
    again = from_document(policy.model_dump(mode="json"), "config.policy", version="v-published")
    assert again.version == "v-published" and again.digest == policy.digest
    with pytest.raises(PolicyError):
        from_document({**policy.model_dump(mode="json"), "relay_control": {"bogus": 1}}, "config.policy")
