"""The real stack, started once per test session.

A single-node Kafka broker (the project's own launcher), the topics, ingest,
the Faust worker and both sinks, each its own process exactly as `make run`
starts them; the downstream mail server is the programmable one in
``downstream.py``. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import smtplib
import subprocess
import sys
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest

from bulwark.devstack import LocalStack, environment, free_port, private_environment
from bulwark.kafka import Record, read_topics
from bulwark.settings import Settings
from schemas.topics import ALL_TOPICS

from tests.outbound_servers import Nsd
from tests.outbound_servers import free_port as free_dual_port
from tests.sender_auth_keys import ARC_TRUSTED, ED25519, RSA, txt

from .downstream import Downstream, start_downstream
from .verification_servers import VerificationServers, start_verification_servers

LOCAL_DOMAIN = "example.test"
TRUSTED_SERVER_IP = "127.0.0.10"
#: Allow-listed in the test policy: Dynamic Screening never bans it (test_screening.py).
SCREENING_ALLOW_LISTED_IP = "127.0.0.60"
#: Another organisation's domain, found by MX lookup in NSD (test_outbound.py):
#: its mail servers listen on 127.0.1.50 and .51 at the gateway's MX port.
REMOTE_DOMAIN = "partner-mx.test"
REMOTE_MX = {"mx1": "127.0.1.50", "mx2": "127.0.1.51"}
#: The quarantine digests' period in the test stack (BULWARK_DIGEST_PERIOD_SECONDS).
DIGEST_PERIOD_SECONDS = 15


#: Sender authentication (test_sender_auth.py): a domain with SPF, DKIM
#: (RSA and Ed25519) and DMARC p=reject whose mail server is 127.0.2.201, a
#: mailing list the policy trusts for ARC at 127.0.2.203, and the local
#: domain's own DMARC record (p=none: the gateway protects it anyway).
AUTH_DOMAIN = "auth-test.test"
AUTH_SENDER_IP = "127.0.2.201"
FORWARDER_DOMAIN = "fwd-test.test"
FORWARDER_IP = "127.0.2.203"


def remote_zone() -> dict[str, list[str]]:
    return {REMOTE_DOMAIN: [
        "@ MX 10 mx1", "@ MX 20 mx2", *(f"{name} A {ip}" for name, ip in REMOTE_MX.items()),
        "null MX 0 .",  # RFC 7505: a domain that accepts no mail
    ], **sender_auth_zones()}


def sender_auth_zones() -> dict[str, list[str]]:
    # The keys are made when tests.sender_auth_keys is imported: the test
    # module that signs imports the same module in this process.
    return {
        AUTH_DOMAIN: [
            txt("@", f"v=spf1 ip4:{AUTH_SENDER_IP} -all"),
            f"mail A {AUTH_SENDER_IP}", txt("mail", "v=spf1 a -all"),
            txt("rsa._domainkey", RSA.record()), txt("ed._domainkey", ED25519.record()),
            txt("_dmarc", "v=DMARC1; p=reject"),
            txt("q", "v=spf1 -all"), txt("_dmarc.q", "v=DMARC1; p=quarantine"),
        ],
        FORWARDER_DOMAIN: [txt("@", f"v=spf1 ip4:{FORWARDER_IP} -all"), txt("arc._domainkey", ARC_TRUSTED.record())],
        LOCAL_DOMAIN: [txt("@", f"v=spf1 ip4:{TRUSTED_SERVER_IP} -all"), txt("_dmarc", "v=DMARC1; p=none")],
        # The domain most tests send from and the name their clients give in
        # HELO: authorised on loopback, so their mail authenticates as a
        # legitimate sender's does (test_pipeline.py: every check passes).
        "partner.test": [txt("@", "v=spf1 ip4:127.0.0.0/8 -all")],
        "client.test": [txt("@", "v=spf1 ip4:127.0.0.0/8 -all")],
    }




def write_policy(path: Path, downstream_port: int, verification: VerificationServers | None = None) -> None:
    # User verification (test_verification.py): its own domains and sources;
    # example.test keeps no sources, so any recipient there is accepted.
    domains = ", ".join([LOCAL_DOMAIN, *(verification.domains if verification else [])])
    path.write_text(
        f"""
hostname: gateway.example.test
local_domains: [{domains}]
mail_servers:
  - name: downstream
    host: 127.0.0.1
    port: {downstream_port}
    default: true
    trusted_addresses: [{TRUSTED_SERVER_IP}/32]
relay_control:
  # Tests send outbound mail from the domain mail server with senders no
  # account exists for; test_policy.py checks the default (refused) itself.
  exceptions: {{unknown_local_sender_from_domain_mail_servers: true}}
delivery:
  retry_schedule_seconds: [1, 2]
  give_up_after_seconds: 6
  connect_timeout_seconds: 5
  smarthost: 127.0.0.1:{downstream_port}
checks:
  outbreak:
    threshold_senders: 5
  # Data Leak Prevention (test_dlp.py): one rule redirects to its own
  # compliance mailbox, one tags; every other rule keeps its default
  # (quarantine, outbound only, so mail from partner.test is untouched).
  dlp:
    rules:
      US_SSN: {{action: redirect, redirect_to: compliance@{LOCAL_DOMAIN}}}
      BIC: {{action: tag}}
  # Sender authentication (test_sender_auth.py): the mailing list whose ARC
  # sets may vouch for mail DMARC fails, and a person no outsider may name.
  arc:
    trusted_forwarders: [{FORWARDER_DOMAIN}]
  impersonation:
    people: [Cora Chief]
tag_subject_prefix: "[SENSITIVE]"
# DMARC aggregate reports (test_dmarc_reports.py) are read from mail to this address.
dmarc_reports:
  addresses: [dmarc-reports@{LOCAL_DOMAIN}]
# Backscatter Protection (test_backscatter.py) refuses forged returns here;
# no other test sends from the null sender.
backscatter:
  reject: true
# Dynamic Screening and Account Hijack Detection (test_screening.py and
# test_hijack.py ban and limit 127.0.0.50-79 and their own accounts): limits
# the other tests never reach from their addresses, a short ban, and one
# allow-listed client that is never banned.
screening:
  failed_rcpt_limit: 20
  connection_limit: 30
  failed_auth_limit: 6
  rset_limit: 30
  ban_minutes: 1
hijack:
  message_limit: 12
  window_minutes: 10
allow_list:
  # 127.0.0.1 is where most tests connect from: together they open more
  # sessions than Dynamic Screening allows one address, which is right for a
  # client and wrong for a test suite.
  addresses: [{SCREENING_ALLOW_LISTED_IP}/32, 127.0.0.1/32]
""" + (verification.policy_yaml if verification else "")
    )


@dataclass
class Gateway:
    settings: Settings
    stack: LocalStack
    downstream: Downstream
    #: slapd, the call-forward's mail server, the Microsoft 365 stub, Minger.
    verification: VerificationServers | None = None
    #: The DNS the delivery sink resolves other domains with, and the port
    #: their MX hosts listen on.
    nsd: Nsd | None = None
    mx_port: int = 25

    def message(self, sender: str, rcpts: list[str], subject: str, body: str = "Hello.\n") -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = ", ".join(rcpts)
        msg["Subject"] = subject
        msg["Message-ID"] = make_msgid(domain="client.test")
        msg.set_content(body)
        return msg

    def smtp(self, source_ip: str = "127.0.0.1") -> smtplib.SMTP:
        return smtplib.SMTP(self.settings.smtp_host, self.settings.smtp_port, timeout=60,
                            source_address=(source_ip, 0))

    def send(self, msg: EmailMessage, source_ip: str = "127.0.0.1") -> str:
        """Send one message and return the gateway's queue id (from its 250 reply)."""
        with self.smtp(source_ip) as client:
            client.ehlo("client.test")
            client.mail(msg["From"])
            for rcpt in [a.strip() for a in msg["To"].split(",")]:
                code, reply = client.rcpt(rcpt)
                assert code == 250, (code, reply)
            # SMTP lines end in CRLF (RFC 5321 2.3.8); smtplib leaves bytes as they are.
            code, reply = client.data(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
            assert code == 250, (code, reply)
        return reply.decode().rsplit(" ", 1)[1]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = self.stack.run_cli(list(args), check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"bulwark {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def records(self, topics: list[str] | None = None, keys: set[str] | None = None) -> list[Record]:
        return asyncio.run(read_topics(
            self.settings, topics or [t.name for t in ALL_TOPICS],
            keys={k.encode() for k in keys} if keys else None,
        ))

    def wait_records(self, predicate, topics: list[str], keys: set[str] | None = None,
                     timeout: float = 30, what: str = "events") -> list[Record]:
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.records(topics, keys) if predicate(r)]
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} on {topics} within {timeout:.0f}s")
            time.sleep(0.3)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory) -> Gateway:
    root = tmp_path_factory.mktemp("bulwark")
    downstream_port = free_port()
    downstream, controller = start_downstream(downstream_port)
    verification = start_verification_servers(root / "verification")
    nsd = Nsd(root / "nsd", remote_zone()).start()
    mx_port = free_dual_port(REMOTE_MX["mx1"])
    policy = root / "policy.yaml"
    write_policy(policy, downstream_port, verification)
    env = {
        **private_environment(root, policy),
        "BULWARK_DNS_RESOLVER": nsd.address,
        "BULWARK_MX_PORT": str(mx_port),
        # Short enough that the outage test's 451 comes quickly.
        "BULWARK_KAFKA_REQUEST_TIMEOUT_MS": "5000",
        "BULWARK_DELIVERY_POLL_SECONDS": "0.2",
        # Quarantine digests (off in the policy unless a test enables them)
        # every 15 seconds, not every day: test_console_browser.py sees a
        # period boundary pass.
        "BULWARK_DIGEST_PERIOD_SECONDS": str(DIGEST_PERIOD_SECONDS),
    }
    with environment(env):
        settings = Settings.from_env()
        stack = LocalStack.from_settings(settings)
        try:
            stack.start_kafka()
            stack.start_clamd()
            stack.ensure_topics()
            stack.start_components(skip=("mailbox",))  # the test's own downstream server plays that part
            gw = Gateway(settings, stack, downstream, verification, nsd, mx_port)
            # Warm-up: the first message proves every stage is consuming.
            msg = gw.message("warmup@partner.test", [f"warmup@{LOCAL_DOMAIN}"], "warm-up")
            gw.send(msg)
            downstream.wait_for(lambda d: "warm-up" in d.text, timeout=120, what="warm-up delivery")
            yield gw
        except BaseException:
            print(stack.log_tails(), file=sys.stderr)
            raise
        finally:
            try:
                stack.stop_all()
                controller.stop()
            finally:
                verification.stop()  # slapd and the others, even when stopping the stack failed
                nsd.stop()
