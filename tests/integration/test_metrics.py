"""Prometheus metrics from the real processes: what one message and one refusal move.

ingest, the Faust worker and the delivery sink each serve /metrics on their
own port (the gateway fixture gives every process a free one); the test reads
them over HTTP as Prometheus would, before and after, and then runs
`bulwark stats` against the same stack.
"""

from __future__ import annotations

import json
import time

import pytest

from bulwark.cli.stats import Scrape, endpoints, scrape

from .conftest import LOCAL_DOMAIN

pytestmark = pytest.mark.integration

COMPONENTS = ("ingest", "streams", "delivery")


def read(gateway) -> dict[str, Scrape]:
    urls = endpoints(gateway.settings, list(COMPONENTS))
    found = {name: scrape(name, url) for name, url in urls.items()}
    for name, result in found.items():
        assert result.up, f"{name}: {result.error}"
    return found


def sample(found: dict[str, Scrape], component: str, name: str, **labels) -> float:
    """A counter or gauge's value (0 when the series does not exist yet)."""
    return next((s.value for s in found[component].series if s.name == name and s.labels == labels), 0.0)


def histogram_count(found: dict[str, Scrape], component: str, name: str, **labels) -> float:
    return next((s.count for s in found[component].series if s.name == name and s.labels == labels), 0.0)


def wait_until(gateway, moved, timeout: float = 60) -> dict[str, Scrape]:
    deadline = time.monotonic() + timeout
    while True:
        found = read(gateway)
        if moved(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_one_message_and_one_refusal_move_the_counters_of_ingest_streams_and_delivery(gateway):
    before = read(gateway)
    msg = gateway.message("metrics@partner.test", [f"metrics@{LOCAL_DOMAIN}"], "metrics counted")
    gateway.send(msg)
    # A relay attempt: refused at RCPT, the session goes on.
    with gateway.smtp() as client:
        client.ehlo("client.test")
        client.mail("metrics@partner.test")
        code, _ = client.rcpt("someone@elsewhere.test")
        assert code == 554
    gateway.downstream.wait_for(lambda d: "metrics counted" in d.text, what="the counted message")

    def delta(found, component, name, **labels):
        return sample(found, component, name, **labels) - sample(before, component, name, **labels)

    def checks_counted(found, check):
        return (histogram_count(found, "streams", "bulwark_check_duration_seconds", check=check)
                - histogram_count(before, "streams", "bulwark_check_duration_seconds", check=check))

    def present(found, component, name, **labels):
        return any(s.name == name and s.labels == labels for s in found[component].series)

    expected = {
        # ingest: the message, the replies (250s, 554 to the RCPT), the sessions and their events.
        "message accepted": lambda f: delta(f, "ingest", "bulwark_messages_total", action="accepted") >= 1,
        "250 replies": lambda f: delta(f, "ingest", "bulwark_smtp_replies_total", **{"class": "2xx", "code": "250"}) >= 4,
        "554 reply": lambda f: delta(f, "ingest", "bulwark_smtp_replies_total", **{"class": "5xx", "code": "554"}) >= 1,
        "sessions": lambda f: delta(f, "ingest", "bulwark_smtp_sessions_total", listener="inbound") >= 2,
        "message.received published": lambda f: delta(f, "ingest", "bulwark_events_published_total",
                                                       topic="mail.received", type="message.received") >= 1,
        # Audit events are acknowledged after the reply: what is waited for here.
        "session.rcpt published": lambda f: delta(f, "ingest", "bulwark_events_published_total",
                                                  topic="smtp.sessions", type="session.rcpt") >= 2,
        # The worker: a verdict, every check timed, its consumer's lag per topic.
        "verdict": lambda f: delta(f, "streams", "bulwark_verdicts_total", action="deliver") >= 1,
        "checks timed": lambda f: all(checks_counted(f, c) >= 1 for c in ("antivirus", "attachment_type", "spf")),
        "verdict published": lambda f: delta(f, "streams", "bulwark_events_published_total", topic="mail.verdicts",
                                             type="message.verdict") >= 1,
        "worker lag": lambda f: present(f, "streams", "bulwark_consumer_lag_records", group="bulwark-streams",
                                        topic="mail.received"),
        # The delivery sink: the message delivered, its recipient, what it consumed, its queue.
        "delivered": lambda f: delta(f, "delivery", "bulwark_messages_total", action="delivered") >= 1,
        "recipient delivered": lambda f: delta(f, "delivery", "bulwark_delivery_recipients_total",
                                               outcome="delivered") >= 1,
        "verdicts consumed": lambda f: delta(f, "delivery", "bulwark_events_consumed_total", group="bulwark-delivery",
                                             topic="mail.verdicts") >= 1,
        "attempt published": lambda f: delta(f, "delivery", "bulwark_events_published_total",
                                             topic="mail.deliveries", type="delivery.attempted") >= 1,
        "delivery lag": lambda f: present(f, "delivery", "bulwark_consumer_lag_records", group="bulwark-delivery",
                                          topic="mail.verdicts"),
        "queue depth": lambda f: present(f, "delivery", "bulwark_delivery_queue_messages"),
    }
    after = wait_until(gateway, lambda found: all(moved(found) for moved in expected.values()))
    assert [what for what, moved in expected.items() if not moved(after)] == []

    # `bulwark stats`: the same figures, for a terminal and as JSON.
    table = gateway.cli("stats").stdout
    for name, url in endpoints(gateway.settings, list(COMPONENTS)).items():
        assert f"{name}  {url}\n" in table
    assert "bulwark_verdicts_total" in table and "action=deliver" in table
    assert "bulwark_check_duration_seconds" in table and " observed, mean " in table
    as_json = json.loads(gateway.cli("stats", "--component", "delivery", "--json").stdout)
    [delivery] = as_json["components"]
    assert delivery["up"]
    delivered = next(m["value"] for m in delivery["metrics"]
                     if m["name"] == "bulwark_messages_total" and m["labels"] == {"action": "delivered"})
    assert delivered >= sample(after, "delivery", "bulwark_messages_total", action="delivered")
