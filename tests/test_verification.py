"""User verification: policy rules, the order sources are asked in, the cache, Minger's wire format.

No servers here; tests/integration/test_verification.py drives real ones.
"""

from __future__ import annotations

import asyncio

import pytest

from bulwark.policy import PolicyError, parse
from bulwark.policy.verification import default_sources, sources_for_domain
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


# draft-hathcock-minger-06. The digest below was computed outside Python:
#   printf '%s' 'MingerShared-4d1f9a7c2e6b:arvel@example.com' | openssl md5 -binary | base64
DRAFT_SECRET = "MingerShared-4d1f9a7c2e6b"
DRAFT_DIGEST = "ygTOtGDB57vUVqZI16UK6w=="


def test_minger_anonymous_query_is_the_bare_mailbox():
    # Sections 2.1 and 4: query-string = mailbox [SP "d=" digest] [SP tag-list]; anonymous has no digest.
    assert minger.encode_query("ignored", "arvel@example.com", None) == b"arvel@example.com"
    assert minger.credentials(None, "ignored", "arvel@example.com") is None


def test_minger_signed_query_is_mailbox_sp_d_equals_base64_md5_of_secret_colon_mailbox():
    # Section 2.1 (digest-text = shared-secret ":" mailbox) and 2.2 (base64 of the MD5 of it).
    query = minger.encode_query("ignored", "arvel@example.com", DRAFT_SECRET)
    assert query == b"arvel@example.com d=" + DRAFT_DIGEST.encode()
    assert DRAFT_SECRET.encode() not in query
    # No protocol name, version or query id on the wire: the id does not change the bytes.
    assert minger.encode_query("other", "arvel@example.com", DRAFT_SECRET) == query
    # The digest covers the mailbox: another address gets another digest.
    assert minger.credentials(DRAFT_SECRET, "", "kim@example.com") != DRAFT_DIGEST


def test_minger_refuses_to_put_an_inexpressible_address_in_a_query():
    for bad in ('"kim lee"@example.com', "kim@example.com\r\n", "kim", "kïm@example.com", "@example.com"):
        with pytest.raises(ValueError):
            minger.encode_query("", bad, None)


def test_minger_status_codes_are_the_drafts():
    # Section 3.1.
    assert (minger.INVALID_REQUEST, minger.ACCESS_DENIED, minger.BAD_CREDENTIALS) == (0, 1, 2)
    assert (minger.NO_SUCH_ADDRESS, minger.NOT_ACCEPTING, minger.ACCEPTING) == (3, 4, 5)


def test_minger_example_responses_from_the_draft_parse():
    # Section 3.2, verbatim.
    assert minger.decode_answer(b"arvel@example.com 3") == ("arvel@example.com", 3, "")
    assert minger.decode_answer(b"arvel@example.com 2") == ("arvel@example.com", 2, "")
    assert minger.decode_answer(b"arvel@example.com 5") == ("arvel@example.com", 5, "")
    # Every status of section 3.1, and a trailing line end.
    for status in range(6):
        assert minger.decode_answer(f"kim@example.com {status}\r\n".encode())[1] == status
    # Section 3's ABNF literally has no SP (response-string = mailbox status): accepted for the asked mailbox.
    assert minger.decode_answer(b"arvel@example.com5", "arvel@example.com") == ("arvel@example.com", 5, "")


def test_minger_foreign_datagrams_are_not_answers():
    for junk in (b"", b"5", b"HTTP/1.1 200 OK", b"MNGR 1.0 q1 5", b"arvel@example.com 6",
                 b"arvel@example.com five", b"arvel@example.com 5 yes", b"arvel@example.com5",
                 b"\xff@example.com 5"):
        with pytest.raises(ValueError):
            minger.decode_answer(junk)


def test_minger_shared_secret_must_fit_the_drafts_syntax(tmp_path):
    # Section 2.1: shared-secret = 1*50(VCHAR).
    for name, secret in (("long", "x" * 51), ("spaced", "a secret with spaces in it")):
        path = tmp_path / name
        path.write_text(secret + "\n")
        source = parse(BASE + f"""
verification_sources:
  - {{name: m, type: minger, host: a, shared_secret_file: {path}}}
""").verification_sources[0]
        with pytest.raises(LookupError) as error:
            source.shared_secret()
        assert "section 2.1" in str(error.value) and secret not in str(error.value)


class _DraftServer(asyncio.DatagramProtocol):
    """Answers every query with a fixed status, as section 3.2 writes it, and keeps the queries."""

    def __init__(self, status: str):
        self.status = status
        self.received: list[bytes] = []

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.received.append(data)
        mailbox = data.split(b" ")[0]
        self.transport.sendto(b"MNGR 1.0 x 5", addr)  # not a Minger answer: ignored
        self.transport.sendto(b"someone.else@example.com 5", addr)  # another mailbox: ignored
        self.transport.sendto(mailbox + b" " + self.status.encode(), addr)


def _ask_draft_server(monkeypatch, status: str, secret: str | None, address: str = "arvel@example.com"):
    if secret is not None:
        monkeypatch.setenv("MINGER_TEST_SECRET", secret)
    secret_line = ", shared_secret_env: MINGER_TEST_SECRET" if secret is not None else ""

    async def go():
        loop = asyncio.get_running_loop()
        transport, server = await loop.create_datagram_endpoint(
            lambda: _DraftServer(status), local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        source = parse(BASE + f"""
verification_sources:
  - {{name: m, type: minger, host: 127.0.0.1, port: {port}, timeout_seconds: 1, retries: 0{secret_line}}}
""").verification_sources[0]
        try:
            return await minger.MingerClient(source).verify(address), server.received
        finally:
            transport.close()

    return run(go())


def test_minger_client_sends_the_drafts_query_and_reads_its_answers(monkeypatch):
    finding, received = _ask_draft_server(monkeypatch, "5", DRAFT_SECRET)
    assert received == [b"arvel@example.com d=" + DRAFT_DIGEST.encode()]
    assert finding.result == "valid"
    finding, received = _ask_draft_server(monkeypatch, "3", None)
    assert received == [b"arvel@example.com"]
    assert finding.result == "invalid" and "no such address" in finding.detail
    finding, _ = _ask_draft_server(monkeypatch, "4", None)
    assert finding.result == "invalid" and "does not accept" in finding.detail


@pytest.mark.parametrize("status, words", [("0", "invalid request"), ("1", "access denied"),
                                           ("2", "bad or missing credentials")])
def test_minger_error_statuses_make_the_source_unavailable(monkeypatch, status, words):
    with pytest.raises(SourceUnavailable) as error:
        _ask_draft_server(monkeypatch, status, DRAFT_SECRET)
    assert words in str(error.value) and DRAFT_SECRET not in str(error.value)


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
    destination = run(sink._destination("newco.test"))
    [route] = destination.routes
    assert (destination.kind, route.host, route.port) == ("local", "mail.example.com", 2525)  # not out by MX
    destination = run(sink._destination("elsewhere.test"))
    assert (destination.kind, destination.routes[0].host) == ("smarthost", "relay.example.net")
