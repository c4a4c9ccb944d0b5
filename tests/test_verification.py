"""User verification: policy rules, the order sources are asked in, the cache, Minger's wire format.

No servers here; tests/integration/test_verification.py drives real ones.
"""

from __future__ import annotations

import asyncio

import pytest

from bulwark.policy import PolicyError, parse
from bulwark.policy_verification import default_sources, sources_for_domain
from ingest.verification import Verifier, minger
from ingest.verification.base import Finding, SourceUnavailable

BASE = """
hostname: gw.example.com
local_domains: [example.com, example.org, open.example.net]
"""

SOURCES = """
verification_sources:
  - {name: mailhost, type: smtp, host: mx.example.com}
  - {name: ldap, type: ldap, url: "ldaps://ldap.example.com", base_dn: "dc=example,dc=com",
     bind_dn: "cn=svc,dc=example,dc=com", bind_password_env: LDAP_PW}
  - {name: fallback, type: minger, host: mdaemon.example.com, default: true}
user_verification:
  domains:
    example.com: [ldap, mailhost]
    open.example.net: []
"""


def policy(extra: str = SOURCES):
    return parse(BASE + extra)


def test_domain_asks_its_own_sources_in_order_else_the_default_ones():
    p = policy()
    assert [s.name for s in sources_for_domain(p, "Example.COM")] == ["ldap", "mailhost"]
    assert [s.name for s in sources_for_domain(p, "example.org")] == ["fallback"]  # no list: defaults
    assert sources_for_domain(p, "open.example.net") == []  # [] turns verification off
    assert [s.name for s in default_sources(p)] == ["fallback"]


def test_defaults_follow_the_guide():
    p = policy()
    assert p.user_verification.auto_create_domains
    ldap = next(s for s in p.verification_sources if s.name == "ldap")
    assert ldap.tls_mode == "ldaps" and ldap.authenticate
    plain = parse(BASE + """
verification_sources:
  - {name: d, type: ldap, url: "ldap://dir.example.com:389", base_dn: "dc=x"}
""").verification_sources[0]
    assert plain.tls_mode == "starttls"  # never a clear-text directory unless asked for
    mailhost = p.verification_sources[0]
    assert mailhost.mail_from == "" and mailhost.starttls and mailhost.max_connections == 4
    assert p.verification_sources[2].port == 4069


@pytest.mark.parametrize("bad, message", [
    ("""
verification_sources:
  - {name: d, type: ldap, url: "ldap://x", base_dn: "dc=x", bind_dn: "cn=a", bind_password: hunter2}
""", "bind_password"),
    ("""
verification_sources:
  - {name: d, type: ldap, url: "ldap://x", base_dn: "dc=x", bind_dn: "cn=a"}
""", "bind_password_file or bind_password_env"),
    ("""
verification_sources:
  - {name: t, type: m365, tenant_id: t, client_id: c}
""", "client_secret_file or client_secret_env"),
    ("""
verification_sources:
  - {name: t, type: m365, tenant_id: t, client_id: c, client_secret_env: X, authority_host: "http://login"}
""", "https://"),
    ("""
verification_sources:
  - {name: m, type: smtp, host: a}
  - {name: m, type: minger, host: b}
""", "named more than once"),
    ("""
user_verification:
  domains: {example.com: [nothere]}
""", "not in verification_sources"),
    ("""
verification_sources:
  - {name: m, type: smtp, host: a}
user_verification:
  domains: {elsewhere.test: [m]}
""", "not in local_domains"),
    ("""
verification_sources:
  - {name: d, type: ldap, url: "ldap://x", base_dn: "dc=x", filter: "(mail=*)"}
""", "{address}"),
])
def test_invalid_verification_settings_are_refused(bad, message):
    with pytest.raises(PolicyError) as error:
        parse(BASE + bad)
    assert message in str(error.value)
    assert "hunter2" not in str(error.value)  # a secret put in the policy by mistake is not echoed


def test_minger_shared_secret_is_read_from_its_file_and_must_be_long(tmp_path):
    short = tmp_path / "short"
    short.write_text("too-short\n")
    source = parse(BASE + f"""
verification_sources:
  - {{name: m, type: minger, host: a, shared_secret_file: {short}}}
""").verification_sources[0]
    with pytest.raises(LookupError) as error:
        source.shared_secret()
    assert "16 characters" in str(error.value) and "too-short" not in str(error.value)


# -- the order sources are asked in, and the cache --------------------------------


class Scripted:
    """A source client that answers from a script and counts questions."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.asked: list[str] = []

    async def verify(self, address: str) -> Finding:
        self.asked.append(address)
        await asyncio.sleep(0.01)
        result = self.answers.get(address, "invalid")
        if result == "unavailable":
            raise SourceUnavailable("down")
        return Finding(result, f"scripted {result}")

    async def close(self):
        pass


def verifier_with(p, clients: dict[str, Scripted]) -> Verifier:
    verifier = Verifier()
    for source in p.verification_sources:
        verifier._clients[source.name] = (source.model_dump_json(), clients[source.name])
    return verifier


def run(coro):
    return asyncio.run(coro)


def test_first_valid_answer_wins_and_unavailable_is_never_a_refusal():
    p = policy()
    ldap = Scripted({"a@example.com": "invalid", "down@example.com": "unavailable"})
    mailhost = Scripted({"a@example.com": "valid"})
    verifier = verifier_with(p, {"ldap": ldap, "mailhost": mailhost, "fallback": Scripted({})})
    sources = sources_for_domain(p, "example.com")

    outcome = run(verifier.verify("a@example.com", sources, p))
    assert (outcome.result, outcome.source, outcome.asked) == ("valid", "mailhost", ("ldap", "mailhost"))

    outcome = run(verifier.verify("b@example.com", sources, p))
    assert (outcome.result, outcome.source) == ("invalid", "ldap")

    # ldap is down, mailhost says no: the user may live in ldap, so 4xx.
    outcome = run(verifier.verify("down@example.com", sources, p))
    assert outcome.result == "unavailable" and outcome.source is None and "ldap: down" in outcome.detail


def test_answers_are_cached_per_source_with_their_own_lifetimes():
    p = policy(SOURCES.replace("user_verification:", "user_verification:\n  negative_cache_seconds: 0"))
    ldap = Scripted({"yes@example.com": "valid", "down@example.com": "unavailable"})
    verifier = verifier_with(p, {"ldap": ldap, "mailhost": Scripted({}), "fallback": Scripted({})})
    sources = sources_for_domain(p, "example.com")

    first = run(verifier.verify("yes@example.com", sources, p))
    second = run(verifier.verify("YES@example.com", sources, p))
    assert not first.cached and second.cached and ldap.asked == ["yes@example.com"]

    run(verifier.verify("no@example.com", sources, p))
    run(verifier.verify("no@example.com", sources, p))
    assert ldap.asked.count("no@example.com") == 2  # negative lifetime 0: asked again

    run(verifier.verify("down@example.com", sources, p))
    run(verifier.verify("down@example.com", sources, p))
    assert ldap.asked.count("down@example.com") == 2  # "could not answer" is never cached


def test_concurrent_questions_about_one_address_share_one_query():
    p = policy()
    ldap = Scripted({"x@example.com": "valid"})
    verifier = verifier_with(p, {"ldap": ldap, "mailhost": Scripted({}), "fallback": Scripted({})})
    sources = sources_for_domain(p, "example.com")

    async def burst():
        return await asyncio.gather(*(verifier.verify("x@example.com", sources, p) for _ in range(10)))

    assert {o.result for o in run(burst())} == {"valid"}
    assert ldap.asked == ["x@example.com"]


# -- Minger's wire format -----------------------------------------------------------


def test_minger_query_is_anonymous_or_carries_a_keyed_hash_never_the_secret():
    secret = "a-shared-secret-of-32-characters"
    anonymous = minger.encode_query("q1", "kim@example.com", None).decode()
    assert anonymous == "MNGR 1.0 q1 ANONYMOUS kim@example.com"
    signed = minger.encode_query("q1", "kim@example.com", secret).decode()
    fields = signed.split(" ")
    assert fields[:3] == ["MNGR", "1.0", "q1"] and fields[4] == "kim@example.com"
    assert len(fields[3]) == 32 and secret not in signed
    # The hash covers the query id: a captured query cannot be replayed as another.
    assert minger.credentials(secret, "q2", "kim@example.com") != fields[3]


def test_minger_answers_are_parsed_and_foreign_datagrams_rejected():
    assert minger.decode_answer(b"MNGR 1.0 q1 5") == ("q1", 5, "")
    assert minger.decode_answer(b"MNGR 1.0 q1 3 no such user\r\n") == ("q1", 3, "no such user")
    for junk in (b"", b"HTTP/1.1 200 OK", b"MNGR 1.0 q1 five"):
        with pytest.raises(ValueError):
            minger.decode_answer(junk)


def test_delivery_routes_a_created_domain_to_the_domain_mail_servers(tmp_path):
    from bulwark.settings import Settings
    from sinks.delivery import DeliverySink

    p = parse(BASE + """
mail_servers:
  - {name: inside, host: mail.example.com, port: 2525, default: true}
delivery: {smarthost: "relay.example.net:587"}
""")
    sink = DeliverySink(Settings.from_env().with_(blob_dir=tmp_path), p, None, None)
    sink.created_domains.add("newco.test")
    [route] = run(sink._routes("newco.test"))
    assert (route.host, route.port) == ("mail.example.com", 2525)  # not out by MX, back to ourselves
    [route] = run(sink._routes("elsewhere.test"))
    assert route.host == "relay.example.net"
