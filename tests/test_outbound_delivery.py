"""Outbound delivery against real servers: routing by MX from NSD, TLS policies, MTA-STS, REQUIRETLS, AUTH.

The delivery sink runs in the test's event loop against Debian's NSD serving
a test zone, aiosmtpd receivers on 127.0.1.x (with and without STARTTLS, one
advertising REQUIRETLS, one with a broken TLS set-up, one requiring AUTH) and
an HTTPS server publishing MTA-STS policies under a private CA that the
sink trusts through its setting. Only Kafka is replaced (by a recorder of the
events the sink publishes): what is tested is where mail goes and how.
tests/integration/test_outbound.py drives the same through the whole stack.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from bulwark.policy import Policy
from bulwark.settings import Settings
from schemas import events as ev
from sinks.delivery import DeliverySink
from sinks.store import JsonIndex
from tests.dkim_keys import TestKeys, nsd_dnsfunc, signatures, verify_all
from tests.outbound_servers import (Authority, Nsd, PolicyHost, Receiver, Recorder, deliver_and_publish, der_sha256,
                                    free_port)

ZONE = "out.test"
POLICY_HOST_IP = "127.0.1.20"


def zone_records() -> list[str]:
    sts = [f"mta-sts.{name} A {POLICY_HOST_IP}" for name in ("sts", "stsbad", "stsmx", "stsnorequire", "stsbig")]
    return [
        "pref MX 10 mx-a.pref", "pref MX 20 mx-b.pref", "mx-a.pref A 127.0.1.1", "mx-b.pref A 127.0.1.2",
        "null MX 0 .",
        "implicit A 127.0.1.3",
        'noaddr TXT "no mail here"',
        "down MX 10 mx1.down", "down MX 20 mx2.down", "mx1.down A 127.0.1.4", "mx2.down A 127.0.1.5",
        "equal MX 10 a.equal", "equal MX 10 b.equal", "a.equal A 127.0.1.6", "b.equal A 127.0.1.7",
        "tls MX 10 mx.tls", "mx.tls A 127.0.1.8",
        "untrusted MX 10 mx.untrusted", "mx.untrusted A 127.0.1.9",
        "broken MX 10 mx.broken", "mx.broken A 127.0.1.10",
        "sts MX 10 mx.sts", "mx.sts A 127.0.1.11", '_mta-sts.sts TXT "v=STSv1; id=20261201"',
        "stsbad MX 10 mx.stsbad", "mx.stsbad A 127.0.1.12", '_mta-sts.stsbad TXT "v=STSv1; id=1"',
        "stsmx MX 10 mx.stsmx", "mx.stsmx A 127.0.1.13", '_mta-sts.stsmx TXT "v=STSv1; id=1"',
        "stsnorequire MX 10 mx.stsnorequire", "mx.stsnorequire A 127.0.1.14",
        '_mta-sts.stsnorequire TXT "v=STSv1; id=1"',
        "stsbig MX 10 mx.stsbig", "mx.stsbig A 127.0.1.15", '_mta-sts.stsbig TXT "v=STSv1; id=1"',
        *sts,
    ]


def sts_policy(mode: str, *mx: str) -> str:
    return "version: STSv1\r\nmode: " + mode + "\r\n" + "".join(f"mx: {m}\r\n" for m in mx) + "max_age: 86400\r\n"


class World:
    def __init__(self, tmp):
        self.ca = Authority(tmp / "ca")
        self.stranger = Authority(tmp / "stranger", "Some other CA")
        self.nsd = Nsd(tmp / "nsd", {ZONE: zone_records()}).start()
        self.port = free_port("127.0.1.1")
        d = f".{ZONE}"
        self.receivers = {
            "mx-a.pref": Receiver("127.0.1.1", self.port),
            "mx-b.pref": Receiver("127.0.1.2", self.port),
            "implicit": Receiver("127.0.1.3", self.port),
            "a.equal": Receiver("127.0.1.6", self.port),
            "b.equal": Receiver("127.0.1.7", self.port),
            "mx.tls": Receiver("127.0.1.8", self.port, tls=self.ca.context("mx.tls" + d)),
            "mx.untrusted": Receiver("127.0.1.9", self.port, tls=self.stranger.context("mx.untrusted" + d)),
            "mx.broken": Receiver("127.0.1.10", self.port, tls=self.ca.context("mx.broken" + d), broken_tls=True),
            "mx.sts": Receiver("127.0.1.11", self.port, tls=self.ca.context("mx.sts" + d), requiretls=True),
            "mx.stsbad": Receiver("127.0.1.12", self.port, tls=self.stranger.context("mx.stsbad" + d)),
            "mx.stsmx": Receiver("127.0.1.13", self.port, tls=self.ca.context("mx.stsmx" + d)),
            "mx.stsnorequire": Receiver("127.0.1.14", self.port, tls=self.ca.context("mx.stsnorequire" + d)),
            "mx.stsbig": Receiver("127.0.1.15", self.port, tls=self.ca.context("mx.stsbig" + d)),
        }
        for receiver in self.receivers.values():
            receiver.start()
        self.auth_cert, auth_key = self.ca.issue("127.0.1.16")
        self.auth_server = Receiver("127.0.1.16", self.port, tls=_context(self.auth_cert, auth_key),
                                    auth=("gateway", "s3cret-relay"), requiretls=True).start()
        self.https_port = free_port(POLICY_HOST_IP)
        names = [f"mta-sts.{n}{d}" for n in ("sts", "stsbad", "stsmx", "stsnorequire", "stsbig")]
        self.policy_host = PolicyHost(POLICY_HOST_IP, self.https_port, self.ca.context(*names)).start()
        self.policy_host.serve("mta-sts.sts" + d, sts_policy("enforce", "mx.sts" + d))
        self.policy_host.serve("mta-sts.stsbad" + d, sts_policy("enforce", "*.stsbad" + d))
        self.policy_host.serve("mta-sts.stsmx" + d, sts_policy("enforce", "mail.elsewhere.test"))
        self.policy_host.serve("mta-sts.stsnorequire" + d, sts_policy("enforce", "mx.stsnorequire" + d))
        self.policy_host.serve("mta-sts.stsbig" + d, sts_policy("enforce", "mx.stsbig" + d) + "#" * 70_000)

    def stop(self):
        for receiver in [*self.receivers.values(), self.auth_server]:
            receiver.stop()
        self.policy_host.stop()
        self.nsd.stop()


def _context(cert, key):
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("outbound"))
    yield w
    w.stop()


def make_sink(tmp_path, world: World, **policy) -> DeliverySink:
    settings = Settings.from_env().with_(
        blob_dir=tmp_path / "blobs", dns_resolver=world.nsd.address, mx_port=world.port,
        outbound_ca_file=world.ca.ca_file, mta_sts_https_port=world.https_port,
    )
    document = {"hostname": "gw.example.test", "local_domains": ["example.test"],
                "mail_servers": [{"name": "mx", "host": "127.0.0.1", "port": 9, "default": True}],
                "delivery": {"retry_schedule_seconds": [60], "give_up_after_seconds": 3600,
                             "connect_timeout_seconds": 5}}
    document.update(policy)
    return DeliverySink(settings, Policy.model_validate(document), Recorder(), JsonIndex(tmp_path / "queue"))


_count = 0


async def send(sink: DeliverySink, rcpts: list[str], requiretls: bool = False, headers: str = "",
               mail_from: str = "alice@example.test") -> dict:
    """Queue a message for ``rcpts`` and make one delivery attempt; the queue entry after it."""
    global _count
    _count += 1
    message_id = f"out{_count}"
    raw = f"Subject: test {message_id}\r\nMessage-ID: <{message_id}@example.test>\r\n{headers}\r\nHello.\r\n".encode()
    digest = await sink.blobs.put(raw)
    envelope = ev.Envelope(mail_from=mail_from, rcpt_to=rcpts, sha256=digest, size=len(raw),
                           client_ip="127.0.0.10", received_at=datetime.now(timezone.utc), requiretls=requiretls)
    entry = sink._entry(message_id, "s1", "verdict", envelope, rcpts)
    sink.queue.put(message_id, entry)
    await deliver_and_publish(sink, entry)
    return sink.queue.get(message_id)


def got(receiver: Receiver, message_id: str) -> list:
    return [m for m in receiver.messages() if f"test {message_id}".encode() in m.content]


def state(entry: dict, rcpt: str) -> tuple[str, int | None, str]:
    s = entry["recipients"][rcpt]
    return s["state"], s["reply_code"], s["reply"] or ""


# -- routing ----------------------------------------------------------------------------


async def test_mx_in_preference_order_and_the_next_one_when_the_first_is_down(tmp_path, world):
    sink = make_sink(tmp_path, world)
    entry = await send(sink, [f"bob@pref.{ZONE}"])
    assert state(entry, f"bob@pref.{ZONE}")[0] == "delivered"
    assert got(world.receivers["mx-a.pref"], entry["message_id"]) and \
        not got(world.receivers["mx-b.pref"], entry["message_id"])

    world.receivers["mx-a.pref"].stop()
    try:
        entry = await send(sink, [f"carol@pref.{ZONE}"])
    finally:
        world.receivers["mx-a.pref"].start()
    assert state(entry, f"carol@pref.{ZONE}")[0] == "delivered"
    assert got(world.receivers["mx-b.pref"], entry["message_id"])
    attempts = sink.publisher.of(ev.DeliveryAttempted, entry["message_id"])
    assert [a.mx_host for a in attempts] == [f"mx-a.pref.{ZONE}", f"mx-b.pref.{ZONE}"]
    assert attempts[0].recipients[0].outcome == "deferred" and attempts[1].recipients[0].outcome == "delivered"


async def test_equal_preferences_share_the_load(tmp_path, world):
    sink = make_sink(tmp_path, world)
    for i in range(16):
        await send(sink, [f"user{i}@equal.{ZONE}"])
    a, b = len(world.receivers["a.equal"].messages()), len(world.receivers["b.equal"].messages())
    assert a + b == 16 and a > 0 and b > 0  # all on one: probability 2**-15


async def test_no_mx_means_the_domain_itself(tmp_path, world):
    sink = make_sink(tmp_path, world)
    entry = await send(sink, [f"dave@implicit.{ZONE}"])
    assert state(entry, f"dave@implicit.{ZONE}")[0] == "delivered"
    assert got(world.receivers["implicit"], entry["message_id"])


@pytest.mark.parametrize("domain, code, status", [
    ("null", 556, "5.1.10"),      # RFC 7505: accepts no mail
    ("missing", 550, "5.1.2"),    # NXDOMAIN
    ("noaddr", 550, "5.1.2"),     # exists, but no MX and no address
])
async def test_domains_that_take_no_mail_bounce_at_once_with_a_dsn(tmp_path, world, domain, code, status):
    sink = make_sink(tmp_path, world)
    rcpt = f"erin@{domain}.{ZONE}"
    entry = await send(sink, [rcpt])
    outcome, reply_code, reply = state(entry, rcpt)
    assert (outcome, reply_code) == ("bounced", code) and reply.startswith(status)
    bounce = sink.publisher.of(ev.DeliveryBounced, entry["message_id"])
    assert bounce and bounce[0].dsn_message_id  # the sender is told
    assert entry["done"]


async def test_every_mx_is_tried_before_deferring(tmp_path, world):
    sink = make_sink(tmp_path, world)
    rcpt = f"frank@down.{ZONE}"
    entry = await send(sink, [rcpt])
    assert state(entry, rcpt)[0] == "pending" and not entry["done"]  # deferred: tried again later
    attempts = sink.publisher.of(ev.DeliveryAttempted, entry["message_id"])
    assert [a.mx_host for a in attempts] == [f"mx1.down.{ZONE}", f"mx2.down.{ZONE}"]
    assert all(a.recipients[0].outcome == "deferred" and a.tls is None for a in attempts)


async def test_a_dns_failure_defers(tmp_path, world):
    sink = make_sink(tmp_path, world)
    sink.resolver.nameservers, sink.resolver.port = ["127.0.0.1"], free_port()  # nobody answers
    sink.resolver.lifetime = 1.0
    rcpt = f"gina@pref.{ZONE}"
    entry = await send(sink, [rcpt])
    outcome, _, reply = state(entry, rcpt)
    assert outcome == "pending" and reply.startswith("4.4.3")


# -- TLS ------------------------------------------------------------------------------


async def test_starttls_with_a_validated_certificate_is_recorded(tmp_path, world):
    sink = make_sink(tmp_path, world)
    entry = await send(sink, [f"hal@tls.{ZONE}"])
    [received] = got(world.receivers["mx.tls"], entry["message_id"])
    assert received.tls in ("TLSv1.2", "TLSv1.3")
    [attempt] = sink.publisher.of(ev.DeliveryAttempted, entry["message_id"])
    assert attempt.tls.policy == "opportunistic" and attempt.tls.verified and attempt.tls.cipher
    assert attempt.destination == f"tls.{ZONE}"


async def test_an_untrusted_certificate_is_used_opportunistically_and_recorded_as_such(tmp_path, world):
    sink = make_sink(tmp_path, world)
    entry = await send(sink, [f"ivy@untrusted.{ZONE}"])
    [received] = got(world.receivers["mx.untrusted"], entry["message_id"])
    assert received.tls is not None  # still encrypted
    [attempt] = sink.publisher.of(ev.DeliveryAttempted, entry["message_id"])
    assert attempt.tls.version and not attempt.tls.verified
    assert "certificate-not-trusted" in attempt.tls.verify_error


async def test_a_failed_negotiation_defers_then_that_destination_goes_cleartext_for_an_hour(tmp_path, world):
    sink = make_sink(tmp_path, world)
    rcpt = f"jay@broken.{ZONE}"
    entry = await send(sink, [rcpt])
    # Not downgraded within the attempt: deferred, and the fallback recorded.
    assert state(entry, rcpt)[0] == "pending" and not got(world.receivers["mx.broken"], entry["message_id"])
    [fallback] = sink.publisher.of(ev.TlsFallbackStarted)
    assert fallback.destination == f"mx.broken.{ZONE}:{world.port}"
    minutes = (fallback.until - fallback.occurred_at).total_seconds() / 60
    assert 59.9 < minutes <= 60.1
    # The next attempt goes without TLS, and says so.
    await deliver_and_publish(sink, sink.queue.get(entry["message_id"]))
    [received] = got(world.receivers["mx.broken"], entry["message_id"])
    assert received.tls is None
    attempts = sink.publisher.of(ev.DeliveryAttempted, entry["message_id"])
    assert [a.tls.policy for a in attempts] == ["opportunistic", "cleartext-retry"]
    # Another process sees the same memory through the topic (here: the event it would read).
    other = make_sink(tmp_path / "other", world)
    other.tls_fallbacks = {fallback.destination: fallback}
    entry = await send(other, [f"kim@broken.{ZONE}"])
    assert got(world.receivers["mx.broken"], entry["message_id"])


async def test_mta_sts_enforce_delivers_only_over_validated_tls_to_a_listed_mx(tmp_path, world):
    sink = make_sink(tmp_path, world)
    entry = await send(sink, [f"lee@sts.{ZONE}"])
    assert got(world.receivers["mx.sts"], entry["message_id"])
    [attempt] = sink.publisher.of(ev.DeliveryAttempted, entry["message_id"])
    assert (attempt.tls.policy, attempt.tls.verified) == ("mta-sts", True)
    [policy] = sink.publisher.of(ev.MtaStsPolicyFetched)
    assert (policy.domain, policy.mode, policy.policy_id) == (f"sts.{ZONE}", "enforce", "20261201")

    # An untrusted certificate under enforce: deferred, never sent.
    entry = await send(sink, [f"max@stsbad.{ZONE}"])
    assert state(entry, f"max@stsbad.{ZONE}")[0] == "pending"
    assert not got(world.receivers["mx.stsbad"], entry["message_id"])
    [attempt] = sink.publisher.of(ev.DeliveryAttempted, entry["message_id"])
    assert (attempt.tls.policy, attempt.tls.failure) == ("mta-sts", "certificate-not-trusted")

    # An MX the policy does not list is not even tried.
    connections = world.receivers["mx.stsmx"].connections
    entry = await send(sink, [f"ned@stsmx.{ZONE}"])
    outcome, _, reply = state(entry, f"ned@stsmx.{ZONE}")
    assert outcome == "pending" and "not in the domain's MTA-STS policy" in reply
    assert world.receivers["mx.stsmx"].connections == connections and not world.receivers["mx.stsmx"].messages()
    [attempt] = sink.publisher.of(ev.DeliveryAttempted, entry["message_id"])  # recorded, for TLS reports
    assert attempt.tls.failure and attempt.tls.version is None


async def test_the_mta_sts_policy_is_cached_until_its_id_changes(tmp_path, world):
    sink = make_sink(tmp_path, world)
    before = world.policy_host.requests.count(f"mta-sts.sts.{ZONE}")
    await send(sink, [f"olga@sts.{ZONE}"])
    await send(sink, [f"pat@sts.{ZONE}"])
    assert world.policy_host.requests.count(f"mta-sts.sts.{ZONE}") == before + 1
    # A new id in DNS: fetched again.
    records = [r.replace("id=20261201", "id=20261202") for r in zone_records()]
    world.nsd.restart({ZONE: records})
    try:
        await send(sink, [f"quinn@sts.{ZONE}"])
    finally:
        world.nsd.restart({ZONE: zone_records()})
    assert world.policy_host.requests.count(f"mta-sts.sts.{ZONE}") == before + 2
    assert [p.policy_id for p in sink.publisher.of(ev.MtaStsPolicyFetched)] == ["20261201", "20261202"]


async def test_an_oversized_policy_is_an_explained_outcome_and_mail_still_flows(tmp_path, world):
    sink = make_sink(tmp_path, world)
    before = world.policy_host.requests.count(f"mta-sts.stsbig.{ZONE}")
    await send(sink, [f"rita0@stsbig.{ZONE}"])
    entry = await send(sink, [f"rita@stsbig.{ZONE}"])
    # A failed fetch stands for a few minutes: not fetched again for every message.
    assert world.policy_host.requests.count(f"mta-sts.stsbig.{ZONE}") == before + 1
    assert got(world.receivers["mx.stsbig"], entry["message_id"])  # no usable policy: opportunistic
    [policy] = sink.publisher.of(ev.MtaStsPolicyFetched)
    assert policy.mode is None and policy.error == "sts-policy-invalid" and "64 KB" in policy.detail
    [attempt] = sink.publisher.of(ev.DeliveryAttempted, entry["message_id"])
    assert attempt.tls.policy == "opportunistic"


# -- REQUIRETLS (RFC 8689) ---------------------------------------------------------------


async def test_requiretls_goes_only_over_validated_tls_and_is_passed_on(tmp_path, world):
    sink = make_sink(tmp_path, world)
    entry = await send(sink, [f"sam@sts.{ZONE}"], requiretls=True)
    [received] = got(world.receivers["mx.sts"], entry["message_id"])
    assert "REQUIRETLS" in received.mail_options and received.tls
    [attempt] = sink.publisher.of(ev.DeliveryAttempted, entry["message_id"])
    assert (attempt.tls.policy, attempt.tls.verified, attempt.tls.requiretls_relayed) == ("requiretls", True, True)


@pytest.mark.parametrize("domain, receiver, why", [
    ("tls", "mx.tls", "no MTA-STS policy"),               # validated TLS, but the MX cannot be validated
    ("stsnorequire", "mx.stsnorequire", "REQUIRETLS"),    # the next hop does not offer REQUIRETLS
    ("untrusted", "mx.untrusted", "MTA-STS"),             # no policy and an untrusted certificate
])
async def test_requiretls_that_cannot_be_honoured_bounces_with_5_7_30(tmp_path, world, domain, receiver, why):
    sink = make_sink(tmp_path, world)
    rcpt = f"tom@{domain}.{ZONE}"
    entry = await send(sink, [rcpt], requiretls=True)
    outcome, code, reply = state(entry, rcpt)
    assert (outcome, code) == ("bounced", 550) and reply.startswith("5.7.30") and why in reply
    assert not got(world.receivers[receiver], entry["message_id"])
    assert sink.publisher.of(ev.DeliveryBounced, entry["message_id"])


async def test_tls_required_no_ignores_the_recipients_policy(tmp_path, world):
    sink = make_sink(tmp_path, world)
    entry = await send(sink, [f"uma@stsbad.{ZONE}"], headers="TLS-Required: No\r\n")
    assert got(world.receivers["mx.stsbad"], entry["message_id"])
    [attempt] = sink.publisher.of(ev.DeliveryAttempted, entry["message_id"])
    assert attempt.tls.policy == "opportunistic" and not attempt.tls.verified


# -- AUTH to a domain mail server -----------------------------------------------------------


def auth_server(world: World, **extra) -> list[dict]:
    # The password is never in the policy: a file, read when delivering.
    path = world.ca.directory / "relay-password"
    path.write_text("s3cret-relay\n")
    secret = {"username": "gateway", "password_file": str(path)}
    return [{"name": "corp", "host": "127.0.1.16", "port": world.port, "default": True,
             "requires_smtp_auth": secret, **extra}]


async def test_the_password_goes_only_to_a_validated_or_pinned_certificate(tmp_path, world):
    sink = make_sink(tmp_path, world, mail_servers=auth_server(world))
    entry = await send(sink, ["vic@example.test"])
    [received] = got(world.auth_server, entry["message_id"])
    assert received.auth_login == "gateway" and received.tls
    [attempt] = sink.publisher.of(ev.DeliveryAttempted, entry["message_id"])
    assert (attempt.tls.policy, attempt.tls.verified) == ("verified", True)

    # The same server, but its CA not trusted: no password sent, deferred.
    untrusting = make_sink(tmp_path / "untrusting", world, mail_servers=auth_server(world))
    untrusting.settings = untrusting.settings.with_(outbound_ca_file=None)
    tries = len(world.auth_server.auth_attempts)
    entry = await send(untrusting, ["wes@example.test"])
    assert state(entry, "wes@example.test")[0] == "pending"
    assert len(world.auth_server.auth_attempts) == tries and not got(world.auth_server, entry["message_id"])

    # Pinned: the CA does not matter, the certificate does.
    pinned = make_sink(tmp_path / "pinned", world,
                       mail_servers=auth_server(world, tls_pin_sha256=der_sha256(world.auth_cert)))
    pinned.settings = pinned.settings.with_(outbound_ca_file=None)
    entry = await send(pinned, ["xena@example.test"])
    assert got(world.auth_server, entry["message_id"])
    wrong = make_sink(tmp_path / "wrong", world, mail_servers=auth_server(world, tls_pin_sha256="ab" * 32))
    entry = await send(wrong, ["yul@example.test"])
    assert state(entry, "yul@example.test")[0] == "pending" and not got(world.auth_server, entry["message_id"])


async def test_no_password_leaks_into_events_or_replies(tmp_path, world):
    sink = make_sink(tmp_path, world, mail_servers=auth_server(world, tls_pin_sha256="cd" * 32))
    entry = await send(sink, ["zed@example.test"])
    text = " ".join(e.model_dump_json() for e in sink.publisher.events) + str(entry)
    assert "s3cret-relay" not in text



async def test_one_connection_carries_consecutive_messages_to_a_server(tmp_path, world):
    sink = make_sink(tmp_path, world)
    receiver = world.receivers["mx.tls"]
    before = receiver.connections
    entries = [await send(sink, [f"reuse{i}@tls.{ZONE}"]) for i in range(4)]
    assert all(got(receiver, e["message_id"]) for e in entries)
    assert receiver.connections == before + 1  # TLS and EHLO once, four messages
    attempts = [a for e in entries for a in sink.publisher.of(ev.DeliveryAttempted, e["message_id"])]
    assert all(a.tls.verified and a.tls.version for a in attempts)  # the TLS it was opened with

    # The server drops the idle connection: the next message opens a new one, nothing is lost.
    receiver.stop()
    receiver.start()
    before = receiver.connections  # (the server's own start-up check connects once)
    entry = await send(sink, [f"after-restart@tls.{ZONE}"])
    assert got(receiver, entry["message_id"]) and receiver.connections == before + 1
    await sink.connections.close()


# -- DKIM signing (sinks/dkim_sign.py) ----------------------------------------------------


@pytest.fixture(scope="module")
def dkim_dns(tmp_path_factory):
    """The local domain's RSA and Ed25519 keys, their records served by NSD as a receiver finds them."""
    keys = TestKeys(tmp_path_factory.mktemp("dkim"), "example.test")
    nsd = Nsd(tmp_path_factory.mktemp("dkim-nsd"), {"example.test": keys.zone_records()}).start()
    yield keys, nsd
    nsd.stop()


def signing_sink(tmp_path, world: World, dkim_signing: dict) -> DeliverySink:
    # 127.0.0.10, where send() says the mail came from, is the domain mail server: the organisation's mail.
    server = {"name": "mx", "host": "127.0.0.1", "port": 9, "default": True, "trusted_addresses": ["127.0.0.10/32"]}
    return make_sink(tmp_path, world, mail_servers=[server], dkim_signing=dkim_signing)


async def queue_tagged(sink: DeliverySink, rcpt: str, subject: str) -> dict:
    """A local user's message, marked by DLP's "tag" action: a header and a subject prefix the sink adds."""
    raw = (f"From: Alice <alice@example.test>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
           f"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@example.test>\r\n\r\nHello.\r\n").encode()
    digest = await sink.blobs.put(raw)
    envelope = ev.Envelope(mail_from="alice@example.test", rcpt_to=[rcpt], sha256=digest, size=len(raw),
                           client_ip="127.0.0.10", received_at=datetime.now(timezone.utc))
    entry = sink._entry(subject, "s1", "verdict", envelope, [rcpt], {"X-Bulwark-Tags": "DLP_IBAN"})
    entry["subject_prefix"] = "[SENSITIVE]"
    sink.queue.put(subject, entry)
    return entry


async def test_local_mail_leaves_dkim_signed_and_verifies_at_the_receiver(tmp_path, world, dkim_dns):
    keys, nsd = dkim_dns
    sink = signing_sink(tmp_path, world, keys.policy())
    entry = await queue_tagged(sink, f"dkim1@tls.{ZONE}", "dkim-signed")
    await deliver_and_publish(sink, entry)
    [received] = [m for m in world.receivers["mx.tls"].messages() if b"dkim-signed" in m.content]
    # Both signatures on top, above the Received header and the tags the sink added, and they
    # cover the subject as tagged: signed last. The receiver's dkimpy finds the keys in NSD.
    assert received.content.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert received.content.index(b"a=ed25519-sha256") < received.content.index(b"Received: ")
    assert b"Subject: [SENSITIVE] dkim-signed" in received.content and b"X-Bulwark-Tags: DLP_IBAN" in received.content
    assert verify_all(received.content, nsd_dnsfunc(nsd.address)) == [True, True]
    assert [s[b"d"] for s in signatures(received.content)] == [b"example.test", b"example.test"]


async def test_mail_no_key_can_sign_is_deferred_not_sent_unsigned(tmp_path, world, dkim_dns):
    keys, nsd = dkim_dns
    missing = tmp_path / "not-yet.key"
    sink = signing_sink(tmp_path, world, {"keys": [{"domain": "example.test", "selector": keys.rsa_selector,
                                                    "key_file": str(missing)}]})
    rcpt = f"dkim2@tls.{ZONE}"
    entry = await queue_tagged(sink, rcpt, "dkim-deferred")
    await deliver_and_publish(sink, entry)
    outcome, code, reply = state(sink.queue.get(entry["message_id"]), rcpt)
    assert outcome == "pending" and code is None
    assert reply.startswith("4.7.0") and "DKIM" in reply and str(missing) in reply
    assert not [m for m in world.receivers["mx.tls"].messages() if b"dkim-deferred" in m.content]
    [attempt] = sink.publisher.of(ev.DeliveryAttempted, entry["message_id"])  # recorded: `bulwark trace` says why
    assert attempt.tls is None and attempt.next_attempt_at and attempt.recipients[0].reply == reply

    # The key in place: the next attempt goes, signed.
    missing.write_bytes(keys.files[keys.rsa_selector].read_bytes())
    await deliver_and_publish(sink, sink.queue.get(entry["message_id"]))
    [received] = [m for m in world.receivers["mx.tls"].messages() if b"dkim-deferred" in m.content]
    assert verify_all(received.content, nsd_dnsfunc(nsd.address)) == [True]
