"""TLS reports (RFC 8460) from the real topics: `bulwark tlsrpt show` and the daily job.

The day's delivery attempts to a receiving domain are published to the
gateway's Kafka (its own deliveries all go through the test smarthost,
which is never reported). The job is run for today, as the delivery
process runs it for yesterday, by a delivery sink in the test: it reads
mail.deliveries and delivery.mta-sts, finds the domain's ``_smtp._tls``
record on NSD, queues the report and delivers it (through the smarthost, to
the downstream server), and a second sink with its own queue does not
queue it again because the first one's announcement is on the topic.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from datetime import timedelta
from email import message_from_bytes
from email.policy import default as default_policy

import pytest

from bulwark.kafka import start_publisher
from bulwark.policy import load
from bulwark.policy.runtime import PolicyHolder
from schemas import events as ev
from schemas.events import utcnow
from sinks import tlsrpt
from sinks.delivery import DeliverySink
from sinks.store import JsonIndex
from tests.outbound_servers import Nsd, deliver_and_publish

pytestmark = pytest.mark.integration

DOMAIN = "partner.tlsrpt.test"
RUA = "tls-reports@reports.tlsrpt.test"
STS = "version: STSv1\r\nmode: testing\r\nmx: mx1.partner.tlsrpt.test\r\nmax_age: 86400\r\n"


def _attempt(message_id: str, **tls) -> ev.DeliveryAttempted:
    return ev.DeliveryAttempted(
        message_id=message_id, attempt=1, server="mx1.partner.tlsrpt.test[192.0.2.25]:25", destination=DOMAIN,
        mx_host="mx1.partner.tlsrpt.test", tls=ev.TlsOutcome(**tls),
        recipients=[ev.RecipientResult(recipient=f"bob@{DOMAIN}", outcome="delivered", reply_code=250)])


async def _publish(settings, events) -> None:
    publisher = await start_publisher(settings, "test-tlsrpt")
    try:
        for event in events:
            await publisher.publish(event)
    finally:
        await publisher.stop()


async def _run_job(settings, directory, day):
    """(outcomes, the sink) of one delivery process's run of the job for ``day``."""
    publisher = await start_publisher(settings, f"test-tlsrpt-{directory.name}")
    sink = DeliverySink(settings.with_(blob_dir=directory / "blobs"), PolicyHolder.fixed(load(settings.policy_path)),
                        publisher, JsonIndex(directory / "queue"))
    try:
        outcomes = await tlsrpt.send_reports(sink.settings, sink, day)
        for outcome in outcomes:
            if outcome.outcome == "queued":
                await deliver_and_publish(sink, sink.queue.get(outcome.message_id))
        return outcomes, sink
    finally:
        await publisher.stop()
        sink.queue.close()


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    nsd = Nsd(tmp_path_factory.mktemp("tlsrpt-dns"), {"tlsrpt.test": [
        f'_smtp._tls.partner TXT "v=TLSRPTv1; rua=mailto:{RUA}"',
    ]}).start()
    yield nsd
    nsd.stop()


def test_the_days_sessions_are_shown_and_reported_once(gateway, dns, tmp_path):
    now = utcnow()
    fetched = ev.MtaStsPolicyFetched(domain=DOMAIN, policy_id="1", mode="testing", mx=["mx1.partner.tlsrpt.test"],
                                     max_age=86400, expires_at=now + timedelta(days=1), policy_text=STS,
                                     occurred_at=now - timedelta(seconds=2))
    ok = dict(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", verified=True)
    asyncio.run(_publish(gateway.settings, [
        fetched,
        _attempt("attempt-1", policy="mta-sts-testing", **ok),
        _attempt("attempt-2", policy="mta-sts-testing", **ok),
        _attempt("attempt-3", policy="mta-sts-testing", version="TLSv1.2", failure="certificate-expired",
                 verify_error="certificate-expired: certificate has expired"),
    ]))

    lines = gateway.cli("tlsrpt", "show", "--json").stdout.splitlines()
    [shown] = [r for r in map(json.loads, lines) if r["policies"][0]["policy"]["policy-domain"] == DOMAIN]
    [policy] = shown["policies"]
    assert policy["policy"]["policy-type"] == "sts" and "mode: testing" in policy["policy"]["policy-string"]
    assert policy["summary"] == {"total-successful-session-count": 2, "total-failure-session-count": 1}
    assert policy["failure-details"][0]["result-type"] == "certificate-expired"
    # The gateway's own test traffic to partner.test goes through the smarthost: never reported.
    assert not [r for r in map(json.loads, lines) if r["policies"][0]["policy"]["policy-domain"] == "partner.test"]
    table = gateway.cli("tlsrpt", "show").stdout
    assert f"{DOMAIN}: 2 successful, 1 failed" in table and "certificate-expired" in table

    settings = gateway.settings.with_(dns_resolver=dns.address)
    day = now.date()
    outcomes, sink = asyncio.run(_run_job(settings, tmp_path / "one", day))
    # Other tests' mail to MX-routed domains is in the day too; the DNS here
    # knows none of them, so nothing else is queued.
    [outcome] = [o for o in outcomes if o.domain == DOMAIN]
    assert [o for o in outcomes if o.outcome == "queued"] == [outcome]
    assert (outcome.domain, outcome.outcome, outcome.rua) == (DOMAIN, "queued", (RUA,))

    [delivered] = gateway.downstream.wait_for(lambda d: d.rcpt_to == [RUA], what="the TLS report")
    assert delivered.mail_from == ""
    message = message_from_bytes(delivered.content, policy=default_policy)
    assert message.get_param("report-type") == "tlsrpt" and message["TLS-Report-Domain"] == DOMAIN
    [attachment] = [p for p in message.iter_parts() if p.get_content_type() == "application/tlsrpt+gzip"]
    report = json.loads(gzip.decompress(attachment.get_content()))
    assert report["policies"] == shown["policies"] and report["report-id"] == shown["report-id"]

    # The announcement is on mail.deliveries, with the report's source.
    queued = gateway.wait_records(lambda r: isinstance(r.event, ev.DeliveryQueued),
                                  ["mail.deliveries"], keys={outcome.message_id})
    assert queued[0].event.source == "tlsrpt"

    # Another delivery process (its own queue) runs the job too: nothing is queued twice.
    again, _ = asyncio.run(_run_job(settings, tmp_path / "two", day))
    assert [(o.domain, o.outcome) for o in again if o.domain == DOMAIN] == [(DOMAIN, "already-queued")]
    assert not [o for o in again if o.outcome == "queued"]
