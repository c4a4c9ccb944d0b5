"""The policy file: validation that points at the line, and the questions it answers."""

from __future__ import annotations

import pytest

from bulwark.policy import PolicyError, parse

MINIMAL = """\
hostname: gw.example.test
local_domains: [example.test, other.test]
mail_servers:
  - name: main
    host: 10.0.0.5
    domains: [example.test]
    trusted_addresses: [10.0.0.5/32]
  - name: fallback
    host: 10.0.0.6
    default: true
"""


def test_a_valid_policy_has_a_stable_version():
    assert parse(MINIMAL).version == parse(MINIMAL + "\n# a comment changes nothing\n").version
    assert parse(MINIMAL).version != parse(MINIMAL.replace("10.0.0.6", "10.0.0.7")).version


def test_errors_name_the_file_the_line_and_the_field():
    bad = MINIMAL.replace("host: 10.0.0.6", "host: 10.0.0.6\n    port: 70000")
    with pytest.raises(PolicyError) as caught:
        parse(bad, "site.yaml")
    message = str(caught.value)
    assert "site.yaml:10: mail_servers.1.port: Input should be less than or equal to 65535" in message


def test_a_bad_address_range_says_what_was_expected():
    bad = MINIMAL.replace("[10.0.0.5/32]", "[10.0.0.5/32, not-a-net]")
    with pytest.raises(PolicyError, match=r":7: mail_servers.0.trusted_addresses: 'not-a-net' is not an IP"):
        parse(bad, "p.yaml")


def test_unknown_keys_are_refused_not_ignored():
    with pytest.raises(PolicyError, match=r"p.yaml:2: local_domain: Extra inputs are not permitted"):
        parse("hostname: x\nlocal_domain: [a.test]\nlocal_domains: [a.test]\n", "p.yaml")


def test_check_settings_are_validated_by_the_check():
    bad = MINIMAL + "checks:\n  attachment_type:\n    blocked_extensions: 3\n  no_such_check: {}\n"
    with pytest.raises(PolicyError) as caught:
        parse(bad, "p.yaml")
    message = str(caught.value)
    assert "p.yaml:13: checks.attachment_type.blocked_extensions" in message
    assert "checks.no_such_check: no such check" in message


def test_a_mail_server_for_a_non_local_domain_is_refused():
    with pytest.raises(PolicyError, match="not in local_domains"):
        parse(MINIMAL.replace("domains: [example.test]", "domains: [elsewhere.test]"))


def test_mail_goes_to_the_domain_server_else_the_default_one():
    policy = parse(MINIMAL)
    assert [s.name for s in policy.servers_for_domain("example.test")] == ["main"]
    assert [s.name for s in policy.servers_for_domain("OTHER.test")] == ["fallback"]


def test_domain_mail_servers_are_known_by_address():
    policy = parse(MINIMAL)
    assert policy.is_domain_mail_server("10.0.0.5")
    assert not policy.is_domain_mail_server("10.0.0.6")
    assert policy.is_local_domain("Example.Test.")


def test_yaml_syntax_errors_point_at_the_line():
    with pytest.raises(PolicyError, match=r"p.yaml:2: \(top level\): not valid YAML: while parsing a flow sequence"):
        parse("hostname: x\nlocal_domains: [a\n", "p.yaml")
