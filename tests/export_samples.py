"""One example of every event type, with fixed ids and times: the SIEM formats' golden inputs.

Values that formats must escape appear where they occur in real traffic:
a refusal reason with ``|``, ``=``, ``\\``, ``]``, ``"`` and a line break, a
HELO name that is not ASCII, masked DLP evidence, an IPv6 client.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from schemas import events as ev
from schemas.topics import record_key, topic_for
from sinks.siem.facts import ExportRecord

T0 = datetime(2026, 11, 30, 9, 15, 0, 123456, tzinfo=timezone.utc)
SESSION = "0194f1c2a3b4aa00112233445566"
MESSAGE = "0194f1c2a3b5bb00112233445566"
IP = "198.51.100.7"
IP6 = "2001:db8::25"


def _envelope(**overrides) -> ev.Envelope:
    fields = dict(mail_from="alice@partner.test", rcpt_to=["bob@example.test", "carol@example.test"],
                  sha256="5e" * 32, size=10240, client_ip=IP, client_helo="mail.partner.test", tls="TLSv1.3",
                  received_at=T0)
    return ev.Envelope(**{**fields, **overrides})


def events() -> list[ev.Event]:
    s = dict(session_id=SESSION, client_ip=IP)
    m = dict(session_id=SESSION, message_id=MESSAGE)
    results = [
        ev.CheckResult(check="antivirus", name="ANTIVIRUS_CLEAN", outcome="pass", version="ClamAV 1.4.3/27000"),
        ev.CheckResult(check="dlp", name="DLP_US_SSN", outcome="hit", detail="2 matches in the body",
                       evidence=["***-**-*399", "***-**-*112"]),
        ev.CheckResult(check="spf", name="SPF_PASS", outcome="pass"),
    ]
    return [
        ev.SessionConnected(**s, client_port=40123, listener="inbound", server_port=25),
        ev.SessionRefused(**s, phase="rcpt", reply_code=550,
                          reason='relay denied | "a=b" \\ [x]\nsecond line', argument="TO:<x@else.test>",
                          policy_version="p-2026-11-01"),
        ev.SessionFlagged(**s, phase="ehlo", reason="HELO names the gateway", detail="gateway.example.test"),
        ev.SessionEhlo(**s, hostname="mäil.partner.test", esmtp=True),
        ev.SessionStartTls(**s, outcome="success", tls_version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384"),
        ev.SessionAuth(session_id=SESSION, client_ip=IP6, mechanism="PLAIN", username="bob@example.test",
                       outcome="failure", reason=ev.AUTH_INVALID_CREDENTIALS),
        ev.SessionMail(**s, sender="alice@partner.test", parameters={"SIZE": "10240", "BODY": "8BITMIME"},
                       accepted=True, reply_code=250, policy_version="p-2026-11-01"),
        ev.SessionRcpt(**s, recipient="dave@example.test", accepted=False, reply_code=550,
                       reason="unknown user", policy_version="p-2026-11-01",
                       verification=ev.RecipientVerification(result="invalid", source="ldap-main", cached=False,
                                                             latency_ms=4.2, detail="no such entry")),
        ev.SessionRset(**s),
        ev.SessionData(**s, message_id=MESSAGE, accepted=True, reply_code=250, size=10240,
                       policy_version="p-2026-11-01"),
        ev.SessionDisconnected(**s, duration_seconds=1.25, messages_accepted=1),
        ev.MessageReceived(**m, envelope=_envelope(), direction="inbound",
                           header_message_id="<20261130091500.1@partner.test>"),
        ev.Verdict(**m, action="quarantine", reasons=["DLP_US_SSN"], results=results, policy_version="p-2026-11-01",
                   envelope=_envelope(), direction="inbound",
                   authentication_results="gateway.example.test; spf=pass smtp.mailfrom=partner.test"),
        ev.MessageRefused(**m, reply_code=550, reasons=["ANTIVIRUS_INFECTED"], policy_version="p-2026-11-01"),
        ev.DeliveryQueued(**m, source="verdict", recipients=["bob@example.test", "carol@example.test"]),
        ev.DeliveryAttempted(**m, attempt=1, server="192.0.2.25:25", destination="example.test",
                             mx_host="mx1.example.test",
                             tls=ev.TlsOutcome(policy="opportunistic", version="TLSv1.3",
                                               cipher="TLS_AES_128_GCM_SHA256", verified=False,
                                               verify_error="self-signed certificate"),
                             recipients=[ev.RecipientResult(recipient="bob@example.test", outcome="delivered",
                                                            reply_code=250, reply="2.0.0 Ok"),
                                         ev.RecipientResult(recipient="carol@example.test", outcome="deferred",
                                                            reply_code=451, reply="4.3.0 try later")],
                             next_attempt_at=T0 + timedelta(minutes=5)),
        ev.DeliveryBounced(**m, recipients=[ev.RecipientResult(recipient="carol@example.test", outcome="bounced",
                                                               reply_code=550, reply="5.1.1 no such user")],
                           dsn_message_id="0194f1c2a3b6cc00112233445566"),
        ev.TlsFallbackStarted(destination="192.0.2.25:25", until=T0 + timedelta(hours=1),
                              reason="handshake failed: wrong version number"),
        ev.MtaStsPolicyFetched(domain="partner.test", policy_id="20261101", mode="enforce",
                               mx=["mx1.partner.test"], max_age=604800, expires_at=T0 + timedelta(days=7),
                               policy_text="version: STSv1\nmode: enforce\nmx: mx1.partner.test\nmax_age: 604800\n"),
        ev.QuarantineAdded(**m, envelope=_envelope(), reasons=["DLP_US_SSN"], policy_version="p-2026-11-01"),
        ev.QuarantineReleased(**m, envelope=_envelope(), by="admin",
                              reason="expected invoice; the sender confirmed by phone"),
        ev.QuarantineDeleted(**m, by="admin", reason="phishing reported by the recipient"),
        ev.PolicyPublished(policy_version="p-2026-11-01", document={"hostname": "gateway.example.test"},
                           source="/etc/bulwark/policy.yaml", applied_by="admin"),
        ev.AccountRecorded(address="bob@example.test", domain="example.test", source="local",
                           password_hash="$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g", by="admin"),
        ev.DomainCreated(domain="sub.example.test", source="ldap-main", by="verification"),
        ev.AccountStateChanged(address="bob@example.test", enabled=False, reason="message limit", by="hijack",
                               details={"messages": 120, "window_minutes": 10}),
        ev.BanIssued(client_ip=IP, reason="failed RCPT limit", counters={"failed_rcpt": 21},
                     window_start=T0 - timedelta(minutes=5), window_end=T0, expires_at=T0 + timedelta(minutes=30)),
        ev.BanLifted(client_ip=IP, by="admin"),
        ev.AccountLimitReached(address="bob@example.test", messages=120, limit=120, window_start=T0 - timedelta(hours=1),
                               window_end=T0, client_ips=[IP], until=T0 + timedelta(hours=1)),
        ev.OutbreakObserved(message_id=MESSAGE, fingerprint="ab12" * 16, kind="attachment",
                            sender="alice@partner.test", client_ip=IP),
        ev.OutbreakDetected(fingerprint="ab12" * 16, kind="attachment", distinct_senders=25, distinct_client_ips=19,
                            window_seconds=3600, example_message_id=MESSAGE),
        ev.BackscatterKeyRotated(key_number=3, by="admin"),
        ev.DmarcReportReceived(
            report_key="google.com!1234567890", org_name="google.com", email="noreply-dmarc-support@google.com",
            report_id="1234567890", date_begin=T0 - timedelta(days=1), date_end=T0,
            policy_published=ev.DmarcPolicyPublished(domain="example.test", adkim="r", aspf="r", p="reject"),
            records=[
                ev.DmarcReportRow(source_ip="192.0.2.25", count=40, disposition="none", dkim="pass", spf="pass",
                                  header_from="example.test", envelope_from="example.test",
                                  dkim_results=[ev.DmarcDkimResult(domain="example.test", selector="s2026a",
                                                                   result="pass", human_result="ok")],
                                  spf_results=[ev.DmarcSpfResult(domain="example.test", scope="mfrom",
                                                                 result="pass")]),
                ev.DmarcReportRow(source_ip="203.0.113.9", count=3, disposition="reject", dkim="fail", spf="fail",
                                  header_from="example.test"),
            ],
            received=ev.DmarcReportMessage(mail_from="noreply-dmarc-support@google.com", client_ip=IP,
                                           dmarc="DMARC_PASS", attachment="google.com!example.test!1.xml.gz",
                                           content_type="application/gzip")),
        ev.DmarcReportUnreadable(report_key=f"{MESSAGE}#1", error="not gzip: bad magic number", size=2048,
                                 received=ev.DmarcReportMessage(mail_from="dmarc@partner.test", client_ip=IP)),
        ev.ConsoleLoginFailed(login="helpdesk-lee", client_ip=IP),
        ev.ReplayFinding(replay_id="0194f1c2a3b6cc00112233445566", replay="sessions", mode="candidate", subject=IP,
                         recorded="ban at 09:15:00 (20 failed RCPTs in 5 minutes)", replayed="none",
                         causes=["failed_rcpt_limit: 20 in the recorded policy, 40 in the candidate"],
                         details={"kind": "ban", "recorded": 1, "candidate": 0}),
        ev.ReplayCompleted(replay_id="0194f1c2a3b6cc00112233445566", replay="sessions", mode="candidate",
                           candidate_policy="p-2026-12-01", selection={"since": "2026-11-30T09:00:00+00:00"},
                           read=125000, selected=2300, findings=1, by="admin"),
    ]


def records() -> list[ExportRecord]:
    """Every sample as the exporter sees it: on its topic, at an offset, with fixed ids and times."""
    out = []
    for n, event in enumerate(events()):
        event = event.model_copy(update={"event_id": f"0194f1c2a3b4{n:016x}", "occurred_at": T0 + timedelta(seconds=n)})
        spec = topic_for(type(event))
        out.append(ExportRecord(spec.name, n % spec.partitions, 100 + n, record_key(spec, event).decode(),
                                event.occurred_at, event))
    return out
