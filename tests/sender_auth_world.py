"""A small Internet for the sender authentication unit tests: NSD zones, messages, signatures.

NSD (Debian's) serves the zones below from a private nsd.conf on a loopback
port; the checks find it through BULWARK_DNS_RESOLVER like the real worker.
A domain no zone here serves (``nowhere.test``) is answered REFUSED: a DNS
failure, the checks' temperror.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import dkim

from bulwark.policy import Policy, parse
from schemas.events import CheckResult, Envelope, Verdict
from streams.checks import run_checks
from streams.message import Message
from streams.verdict import decide
from tests.outbound_servers import Nsd
from tests.sender_auth_keys import ARC_OTHER, ARC_TRUSTED, ED25519, RSA, RSA_1024, Key, txt

SENDER_IP = "192.0.2.10"  # auth.test's mail server (its SPF and HELO name)
FORWARDER_IP = "192.0.2.30"  # forwarder.test's and untrusted.test's
STRANGER_IP = "198.51.100.7"  # nobody's
LOCAL_SERVER_IP = "10.0.0.5"  # example.test's own server, in its SPF


def zones() -> dict[str, list[str]]:
    return {
        "auth.test": [
            txt("@", f"v=spf1 ip4:{SENDER_IP} -all"),
            "mail A " + SENDER_IP,
            txt("mail", "v=spf1 a -all"),
            txt("rsa._domainkey", RSA.record()),
            txt("ed._domainkey", ED25519.record()),
            txt("small._domainkey", RSA_1024.record()),
            txt("revoked._domainkey", "v=DKIM1; k=rsa; p="),
            txt("garbled._domainkey", "v=DKIM1; k=rsa; p=bm90IGEga2V5"),
            txt("_dmarc", "v=DMARC1; p=reject; sp=quarantine; rua=mailto:dmarc@auth.test"),
            # Subdomains with records of their own.
            txt("q", "v=spf1 -all"),
            txt("_dmarc.q", "v=DMARC1; p=quarantine"),
            txt("monitor", f"v=spf1 ip4:{SENDER_IP} -all"),
            txt("_dmarc.monitor", "v=DMARC1; p=none"),
            txt("_dmarc.sampled", "v=DMARC1; p=reject; pct=0"),
            txt("_dmarc.strict", "v=DMARC1; p=reject; adkim=s; aspf=s"),
            txt("soft", "v=spf1 ~all"),
            txt("neutral", "v=spf1 ?all"),
            # Malformed records: each a recorded result, never a crash.
            txt("syntax", "v=spf1 ip4:999.1.2.3 -all"),
            txt("twice", "v=spf1 -all"),
            txt("twice", f"v=spf1 ip4:{SENDER_IP} -all"),
            txt("loop", "v=spf1 include:loop.auth.test -all"),
            txt("dangling", "v=spf1 include:gone.auth.test -all"),
            txt("_dmarc.badpolicy", "v=DMARC1; p=maybe"),
            txt("_dmarc.badrua", "v=DMARC1; p=maybe; rua=mailto:d@auth.test"),
            txt("_dmarc.notfirst", "p=reject; v=DMARC1"),
            txt("_dmarc.tworecords", "v=DMARC1; p=reject"),
            txt("_dmarc.tworecords", "v=DMARC1; p=none"),
            # SPF that needs a lookup nobody answers: temperror.
            txt("unreachable", "v=spf1 include:nowhere.test -all"),
        ],
        "example.test": [
            txt("@", f"v=spf1 ip4:{LOCAL_SERVER_IP} -all"),
            txt("rsa._domainkey", RSA.record()),
            txt("_dmarc", "v=DMARC1; p=none"),
        ],
        "forwarder.test": [
            txt("@", f"v=spf1 ip4:{FORWARDER_IP} -all"),
            txt("arc._domainkey", ARC_TRUSTED.record()),
        ],
        "untrusted.test": [
            txt("@", f"v=spf1 ip4:{FORWARDER_IP} -all"),
            txt("arc._domainkey", ARC_OTHER.record()),
        ],
        "nodmarc.test": [
            txt("@", f"v=spf1 ip4:{SENDER_IP} -all"),
        ],
    }


def start_nsd(directory: Path) -> Nsd:
    return Nsd(directory, zones()).start()


POLICY_TEXT = """hostname: gw.example.test
local_domains: [example.test]
checks:
  antivirus: {enabled: false}
  macros: {enabled: false}
  outbreak: {enabled: false}
  arc: {trusted_forwarders: [forwarder.test]}
  impersonation:
    people: [Cora Chief, {name: Bob Payne, addresses: [bob.payne@home.test]}]
"""


def policy(extra: str = "") -> Policy:
    return parse(POLICY_TEXT + extra)


def email(sender: str = "alice@auth.test", subject: str = "Quarterly numbers", body: str = "Hello.\n",
          to: str = "bob@example.test") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Fri, 20 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = make_msgid(domain="auth.test")
    msg.set_content(body)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def signed(raw: bytes, key: Key, selector: str, domain: str = "auth.test") -> bytes:
    """``raw`` with a DKIM-Signature of ``domain`` (made by dkimpy) on top."""
    return dkim.sign(raw, selector.encode(), domain.encode(), key.private, signature_algorithm=key.algorithm) + raw


def forwarded(raw: bytes, sealer: str, key: Key, saw: str, subject_prefix: str = "[list] ") -> bytes:
    """What a mailing list at ``sealer`` sends on: it records what it saw on
    arrival (``saw``: its Authentication-Results clauses), changes the
    subject (breaking the author's DKIM signature), and seals an ARC set."""
    raw = f"Authentication-Results: {sealer}; {saw}\r\n".encode() + raw.replace(b"Subject: ", b"Subject: " +
                                                                                  subject_prefix.encode(), 1)
    arc_set = dkim.arc_sign(raw, b"arc", sealer.encode(), key.private, sealer.encode())
    assert arc_set, "dkimpy made no ARC set"
    return b"".join(arc_set) + raw


def message(raw: bytes, mail_from: str = "alice@auth.test", client_ip: str = SENDER_IP,
            helo: str | None = "mail.auth.test", direction: str = "inbound", pol: Policy | None = None,
            message_id: str = "m1") -> Message:
    env = Envelope(mail_from=mail_from, rcpt_to=["bob@example.test"], sha256="0" * 64, size=len(raw),
                   client_ip=client_ip, client_helo=helo, received_at=datetime.now(timezone.utc))
    return Message(message_id, "s1", env, direction, raw, pol or policy())


def judge(msg: Message) -> tuple[Verdict, dict[str, CheckResult]]:
    """Every enabled check on ``msg``, and the verdict: (verdict, result name -> result)."""
    results = asyncio.run(run_checks(msg, msg.policy))
    verdict = decide(msg, results, msg.policy)
    return verdict, {r.name: r for r in results}


def names(results: list[CheckResult], check: str) -> list[str]:
    return [r.name for r in results if r.check == check]


def world_fixture():
    """A module's NSD with these zones, and BULWARK_DNS_RESOLVER naming it, for the module's tests."""
    import pytest

    @pytest.fixture(scope="module", autouse=True)
    def dns_world(tmp_path_factory):
        nsd = start_nsd(tmp_path_factory.mktemp("nsd"))
        env = pytest.MonkeyPatch()
        env.setenv("BULWARK_DNS_RESOLVER", nsd.address)
        try:
            yield nsd
        finally:
            env.undo()
            nsd.stop()

    return dns_world
