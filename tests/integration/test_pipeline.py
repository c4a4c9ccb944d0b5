"""The foundation end to end: SMTP in, Kafka through, SMTP out, all traced."""

from __future__ import annotations


import pytest

from schemas import events as ev
from schemas.topics import DELIVERIES, QUARANTINE, RECEIVED, SESSIONS, VERDICTS

from .conftest import LOCAL_DOMAIN, TRUSTED_SERVER_IP

pytestmark = pytest.mark.integration


def test_message_is_delivered_with_every_step_on_its_topic(gateway):
    msg = gateway.message("alice@partner.test", [f"bob@{LOCAL_DOMAIN}"], "end to end")
    queue_id = gateway.send(msg, source_ip="127.0.0.2")

    [delivered] = gateway.downstream.wait_for(lambda d: "end to end" in d.text)
    assert delivered.rcpt_to == [f"bob@{LOCAL_DOMAIN}"]
    assert delivered.mail_from == "alice@partner.test"
    # The hop through the gateway is on record in the message itself.
    first_header = delivered.text.split("\r\n\r\n", 1)[0]
    assert first_header.startswith("Received: from client.test ([127.0.0.2])")
    assert f"by gateway.example.test (Bulwark) with ESMTP id {queue_id}" in first_header
    assert msg["Message-ID"] in delivered.text

    # Every stage recorded its step, tied together by the ids.
    [attempt] = gateway.wait_records(
        lambda r: isinstance(r.event, ev.DeliveryAttempted), [DELIVERIES.name], keys={queue_id}
    )
    [received] = gateway.records([RECEIVED.name], keys={queue_id})
    [verdict] = gateway.records([VERDICTS.name], keys={queue_id})
    session_id = received.event.session_id
    session = [r for r in gateway.records([SESSIONS.name], keys={"127.0.0.2"}) if r.event.session_id == session_id]
    types = [r.event.TYPE for r in session]
    assert types[:5] == ["session.connected", "session.ehlo", "session.mail", "session.rcpt", "session.data"]
    assert types[-1] == "session.disconnected"
    data = next(r.event for r in session if isinstance(r.event, ev.SessionData))
    assert data.message_id == queue_id and data.accepted and data.reply_code == 250

    assert verdict.event.action == "deliver"
    assert verdict.event.session_id == session_id
    assert verdict.event.policy_version
    # Every enabled check reported, and all of them found the message clean.
    assert "ATTACHMENT_TYPE_OK" in [r.name for r in verdict.event.results]
    assert {r.outcome for r in verdict.event.results} == {"pass"}
    assert attempt.event.recipients[0].outcome == "delivered"

    # Causal order holds in event time (the 250 is answered once the
    # message is recorded, so session.data follows message.received).
    assert received.event.occurred_at <= data.occurred_at
    times = [
        received.event.occurred_at,
        verdict.event.occurred_at,
        attempt.event.occurred_at,
    ]
    assert times == sorted(times)
    # And the record timestamp is the event's own time (event-time windows).
    assert received.event.envelope.sha256 == verdict.event.envelope.sha256


def test_trace_shows_the_whole_timeline(gateway):
    msg = gateway.message("carol@partner.test", [f"dave@{LOCAL_DOMAIN}"], "trace me")
    queue_id = gateway.send(msg, source_ip="127.0.0.3")
    gateway.wait_records(lambda r: isinstance(r.event, ev.DeliveryAttempted), [DELIVERIES.name], keys={queue_id})

    out = gateway.cli("trace", queue_id).stdout
    lines = out.splitlines()
    kinds = [line.split()[3] for line in lines]
    for expected in ["session.connected", "session.ehlo", "session.mail", "session.rcpt", "session.data",
                     "message.received", "message.verdict", "delivery.queued", "delivery.attempted"]:
        assert expected in kinds, out
    # In order: the dialogue, then the message, then its fate.
    assert kinds.index("session.connected") < kinds.index("message.received") < kinds.index("message.verdict")
    assert kinds.index("message.verdict") < kinds.index("delivery.queued") < kinds.index("delivery.attempted")
    assert "verdict deliver" in out and f"dave@{LOCAL_DOMAIN} delivered 250" in out

    # The same timeline is reachable from the session id.
    [received] = gateway.records([RECEIVED.name], keys={queue_id})
    by_session = gateway.cli("trace", received.event.session_id).stdout
    assert "message.verdict" in by_session and queue_id in gateway.cli("trace", "--json", received.event.session_id).stdout


def test_trace_of_an_unknown_id_says_so(gateway):
    result = gateway.cli("trace", "no-such-id", check=False)
    assert result.returncode == 1
    assert "nothing on the topics for no-such-id" in result.stderr


def test_relaying_is_refused_and_recorded(gateway):
    with gateway.smtp("127.0.0.4") as client:
        client.ehlo("client.test")
        client.mail("spammer@elsewhere.test")
        code, reply = client.rcpt("victim@third-party.test")
        assert code == 554 and b"Relay access denied" in reply
        code, _ = client.rcpt(f"ok@{LOCAL_DOMAIN}")
        assert code == 250
    [refused] = gateway.wait_records(
        lambda r: isinstance(r.event, ev.SessionRcpt) and r.event.recipient == "victim@third-party.test",
        [SESSIONS.name], keys={"127.0.0.4"},
    )
    assert refused.event.accepted is False and refused.event.reason == "relay denied"


def test_domain_mail_server_may_send_outbound(gateway):
    msg = gateway.message(f"erin@{LOCAL_DOMAIN}", ["frank@partner.test"], "outbound via smarthost")
    queue_id = gateway.send(msg, source_ip=TRUSTED_SERVER_IP)
    gateway.downstream.wait_for(lambda d: "outbound via smarthost" in d.text)
    [received] = gateway.records([RECEIVED.name], keys={queue_id})
    assert received.event.direction == "outbound"


def test_downstream_4xx_is_retried_then_delivered(gateway):
    rcpt = f"flaky@{LOCAL_DOMAIN}"
    gateway.downstream.scripted[rcpt] = ["451 4.3.0 Try again later"]
    queue_id = gateway.send(gateway.message("grace@partner.test", [rcpt], "retry me"))

    gateway.downstream.wait_for(lambda d: "retry me" in d.text)
    attempts = gateway.wait_records(
        lambda r: isinstance(r.event, ev.DeliveryAttempted), [DELIVERIES.name], keys={queue_id}
    )
    attempts = [r.event for r in gateway.records([DELIVERIES.name], keys={queue_id})
                if isinstance(r.event, ev.DeliveryAttempted)]
    assert [a.recipients[0].outcome for a in attempts] == ["deferred", "delivered"]
    assert attempts[0].recipients[0].reply_code == 451 and attempts[0].next_attempt_at is not None
    assert gateway.downstream.rcpt_attempts[rcpt] == 2


def test_downstream_5xx_returns_a_dsn_to_the_sender(gateway):
    rcpt = f"nobody@{LOCAL_DOMAIN}"
    gateway.downstream.refused[rcpt] = "550 5.1.1 No such user here"
    queue_id = gateway.send(gateway.message("heidi@partner.test", [rcpt], "to a missing user"))

    [dsn] = gateway.downstream.wait_for(lambda d: d.rcpt_to == ["heidi@partner.test"] and d.mail_from == "",
                                        what="DSN")
    assert "multipart/report" in dsn.text and "report-type=\"delivery-status\"" in dsn.text
    assert f"Final-Recipient: rfc822; {rcpt}" in dsn.text
    assert "Status: 5.1.1" in dsn.text
    assert "Subject: to a missing user" in dsn.text  # the original headers come back
    [bounced] = gateway.wait_records(lambda r: isinstance(r.event, ev.DeliveryBounced), [DELIVERIES.name],
                                     keys={queue_id})
    assert bounced.event.dsn_message_id and bounced.event.recipients[0].reply_code == 550


def test_recipient_deferred_past_the_delivery_period_bounces(gateway):
    rcpt = f"busy@{LOCAL_DOMAIN}"
    gateway.downstream.scripted[rcpt] = ["452 4.2.2 Mailbox full"] * 50
    gateway.send(gateway.message("ivan@partner.test", [rcpt], "never fits"))
    [dsn] = gateway.downstream.wait_for(
        lambda d: d.rcpt_to == ["ivan@partner.test"] and f"Final-Recipient: rfc822; {rcpt}" in d.text,
        timeout=40, what="DSN after the delivery period",
    )
    assert "Status: 4.4.7" in dsn.text
    assert not gateway.downstream.matching(lambda d: "never fits" in d.text and d.rcpt_to == [rcpt])


def test_a_verdict_consumed_twice_delivers_once(gateway):
    queue_id = gateway.send(gateway.message("judy@partner.test", [f"kim@{LOCAL_DOMAIN}"], "only once"))
    gateway.downstream.wait_for(lambda d: "only once" in d.text)
    [verdict] = gateway.records([VERDICTS.name], keys={queue_id})

    # Redeliver the very same verdict record, as Kafka does after a consumer
    # crashes between acting and committing.
    import asyncio

    from bulwark.kafka import EventPublisher, make_producer

    async def republish():
        publisher = EventPublisher(make_producer(gateway.settings, "test-redelivery"))
        await publisher.start()
        try:
            await publisher.publish(verdict.event)
        finally:
            await publisher.stop()

    asyncio.run(republish())
    assert len([r for r in gateway.records([VERDICTS.name], keys={queue_id})]) == 2
    # A later message proves the sink has consumed past the duplicate.
    gateway.send(gateway.message("judy@partner.test", [f"kim@{LOCAL_DOMAIN}"], "after the duplicate"))
    gateway.downstream.wait_for(lambda d: "after the duplicate" in d.text)
    gateway.wait_records(lambda r: r.offset >= verdict.offset + 1, [VERDICTS.name], keys={queue_id})

    assert len(gateway.downstream.matching(lambda d: "only once" in d.text)) == 1
    queued = [r for r in gateway.records([DELIVERIES.name], keys={queue_id}) if isinstance(r.event, ev.DeliveryQueued)]
    assert len(queued) == 1


def test_quarantined_message_is_listed_released_and_delivered(gateway):
    msg = gateway.message("mallory@partner.test", [f"lee@{LOCAL_DOMAIN}"], "invoice attached")
    msg.add_attachment(b"MZ\x90\x00fake program", maintype="application", subtype="octet-stream",
                       filename="invoice.pdf.exe")
    queue_id = gateway.send(msg)

    gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineAdded), [QUARANTINE.name], keys={queue_id})
    listing = gateway.cli("quarantine", "list").stdout
    assert queue_id in listing and "ATTACHMENT_TYPE_BLOCKED" in listing
    shown = gateway.cli("quarantine", "show", queue_id).stdout
    assert "invoice.pdf.exe" in shown and "Subject: invoice attached" in shown
    assert not gateway.downstream.matching(lambda d: "invoice attached" in d.text)

    gateway.cli("quarantine", "release", queue_id, "--by", "admin@example.test",
                "--reason", "expected invoice, checked with the sender")
    [delivered] = gateway.downstream.wait_for(lambda d: "invoice attached" in d.text)
    assert delivered.rcpt_to == [f"lee@{LOCAL_DOMAIN}"]
    released = gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineReleased), [QUARANTINE.name],
                                    keys={queue_id})
    assert released[0].event.by == "admin@example.test"
    assert released[0].event.reason == "expected invoice, checked with the sender"
    # Who and why, in the message's story.
    assert ("released from quarantine by admin@example.test (expected invoice, checked with the sender)"
            in gateway.cli("trace", queue_id).stdout)

    # Once released it is no longer held, and cannot be released twice.
    again = gateway.cli("quarantine", "release", queue_id, "--reason", "once more", check=False)
    assert again.returncode != 0 and "already released" in again.stderr
    assert queue_id not in gateway.cli("quarantine", "list").stdout
    assert "released" in gateway.cli("quarantine", "list", "--all").stdout


def test_deleted_quarantined_message_is_never_delivered(gateway):
    msg = gateway.message("mallory@partner.test", [f"lee@{LOCAL_DOMAIN}"], "script attached")
    msg.add_attachment(b"WScript.Echo 1", maintype="text", subtype="plain", filename="run.vbs")
    queue_id = gateway.send(msg)
    gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineAdded), [QUARANTINE.name], keys={queue_id})
    gateway.cli("quarantine", "delete", queue_id, "--by", "admin", "--reason", "a script nobody asked for")
    [deleted] = gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineDeleted), [QUARANTINE.name],
                                     keys={queue_id})
    assert (deleted.event.by, deleted.event.reason) == ("admin", "a script nobody asked for")
    assert not gateway.downstream.matching(lambda d: "script attached" in d.text)


def test_smtp_reply_for_a_message_over_the_size_limit(gateway):
    with gateway.smtp() as client:
        client.ehlo("client.test")
        assert client.has_extn("size")
        limit = int(client.esmtp_features["size"])
        code, reply = client.mail("big@partner.test", [f"SIZE={limit + 1}"])
        assert code == 552
