"""The Prometheus metrics: each process counts what it does, and `bulwark stats` reads them back.

Counters are process-wide, so every test compares a value before and after
what it does. tests/integration/test_metrics.py reads them from the real
processes over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from bulwark import metrics
from bulwark.kafka import EventPublisher, LoopProducer, producer_config
from bulwark.settings import METRICS_PORTS, REPO_ROOT, Settings
from bulwark.cli.stats import endpoints, parse, quantile, render, scrape_all
from schemas import events as ev
from sinks.quarantine import QuarantineSink
from sinks.store import JsonIndex
from streams.checks import CheckModule, CheckSettings, _run_one
from tests.outbound_servers import free_port
from tests.test_delivery_queue import make_sink, run_until, verdicts
from tests.test_screening import published  # noqa: F401  (the fixture: what the agents publish, captured)


def value(component: str, name: str, **labels) -> float:
    """A sample as the component's /metrics would show it (0 when absent)."""
    return metrics.registry_for(component).get_sample_value(name, labels) or 0.0


# -- ingest --------------------------------------------------------------------------------------


def test_smtp_replies_are_counted_by_class_and_code_once_per_reply():
    before = {code: value("ingest", "bulwark_smtp_replies_total", **{"class": f"{code[0]}xx", "code": code})
              for code in ("250", "550", "421")}
    # An EHLO answer is one reply of several lines: only its last line counts.
    for line in ("250-gateway.example.test", "250-PIPELINE", "250 SMTPUTF8"):
        metrics.smtp_reply(line)
    metrics.smtp_reply("550 5.1.1 <x@example.test>: Recipient address rejected")
    metrics.smtp_reply("421 4.4.2 gateway.example.test Error: timeout exceeded")
    metrics.smtp_reply("")  # nothing to count
    after = {code: value("ingest", "bulwark_smtp_replies_total", **{"class": f"{code[0]}xx", "code": code})
             for code in before}
    assert {code: after[code] - before[code] for code in before} == {"250": 1, "550": 1, "421": 1}


def test_a_message_at_the_end_of_data_is_counted_by_the_reply_it_got():
    actions = ("accepted", "refused", "tempfailed")
    before = [value("ingest", "bulwark_messages_total", action=a) for a in actions]
    metrics.message_after_data("250 2.0.0 Ok: queued as 01J")
    metrics.message_after_data("550 5.7.1 Message refused by content policy (ANTIVIRUS_INFECTED)")
    metrics.message_after_data("550 5.7.1 Message refused by content policy (DLP_US_SSN)")
    metrics.message_after_data("451 4.3.0 Temporary failure recording the message; please try again later")
    after = [value("ingest", "bulwark_messages_total", action=a) for a in actions]
    assert [a - b for a, b in zip(after, before)] == [1, 2, 1]


# -- events published --------------------------------------------------------------------------


async def test_events_acknowledged_and_events_refused_are_counted_by_topic_and_type():
    # librdkafka's own mock cluster acknowledges as a broker does.
    config = producer_config(Settings.from_env(), "test-metrics-acks")
    config.update({"bootstrap.servers": "", "test.mock.num.brokers": 1, "enable.idempotence": False,
                   "log_level": 3})
    published = dict(topic="smtp.sessions", type="session.rset")
    before = value("ingest", "bulwark_events_published_total", **published)
    publisher = EventPublisher(LoopProducer(config))
    await publisher.start()
    try:
        for i in range(3):
            publisher.emit(ev.SessionRset(client_ip="192.0.2.1", session_id=f"s{i}"))
        await publisher.publish(ev.SessionRset(client_ip="192.0.2.1", session_id="s3"))
        for _ in range(100):
            if publisher.backlog == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        await publisher.stop()
    assert value("ingest", "bulwark_events_published_total", **published) - before == 4

    # A broker that never answers: the produce times out, and that is a failure.
    settings = Settings.from_env().with_(kafka_bootstrap=f"127.0.0.1:{free_port()}", kafka_request_timeout_ms=300)
    failed_before = value("ingest", "bulwark_event_publish_failures_total", **published)
    publisher = EventPublisher(LoopProducer({**producer_config(settings, "test-metrics-down"), "log_level": 0}))
    await publisher.start()
    try:
        with pytest.raises(Exception):
            await publisher.publish(ev.SessionRset(client_ip="192.0.2.1", session_id="lost"))
    finally:
        publisher.producer._stopping.set()  # nothing to flush to: do not wait for the timeout
        publisher._drainer.cancel()
    assert value("ingest", "bulwark_event_publish_failures_total", **published) - failed_before == 1


# -- the content stage ----------------------------------------------------------------------------


class _Slow(CheckSettings):
    timeout_seconds: float = 0.05


async def test_each_check_has_its_latency_observed_and_its_results_counted_even_when_it_times_out():
    async def fast(message, settings):
        return [ev.CheckResult(check="metrics_fast", name="METRICS_FAST_CLEAN", outcome="pass")]

    async def hangs(message, settings):
        await asyncio.sleep(10)

    checks = [CheckModule("metrics_fast", "a clean check", _Slow, {}, fast),
              CheckModule("metrics_hangs", "a check that never answers", _Slow, {}, hangs)]
    counts = {c.name: value("streams", "bulwark_check_duration_seconds_count", check=c.name) for c in checks}
    for check in checks:
        await _run_one(check, None, _Slow())
    assert value("streams", "bulwark_check_duration_seconds_count", check="metrics_fast") == counts["metrics_fast"] + 1
    assert value("streams", "bulwark_check_duration_seconds_count", check="metrics_hangs") == counts["metrics_hangs"] + 1
    # The timed-out check's time is its timeout: in the buckets above 0.05 s, not below.
    assert value("streams", "bulwark_check_duration_seconds_bucket", check="metrics_hangs", le="0.025") == 0
    assert value("streams", "bulwark_check_duration_seconds_bucket", check="metrics_hangs", le="0.1") >= 1
    assert value("streams", "bulwark_check_results_total", check="metrics_hangs", outcome="fail") >= 1
    assert value("streams", "bulwark_check_results_total", check="metrics_fast", outcome="pass") >= 1


class _FaustConsumer:
    """What record_lag asks of Faust's consumer: its assignment, end offsets and positions."""

    def __init__(self, ends: dict, positions: dict):
        self.ends, self.positions = ends, positions

    def assignment(self):
        return set(self.ends) | set(self.positions)

    async def highwaters(self, *partitions):
        return {tp: self.ends.get(tp) for tp in partitions}

    async def position(self, tp):
        return self.positions.get(tp)


async def test_the_workers_consumer_lag_is_what_it_has_not_fetched_per_topic_changelogs_aside():
    from faust.types import TP

    from streams.app import record_lag

    received, sessions, changelog = (TP("mail.received", 0), TP("mail.received", 1)), TP("smtp.sessions", 0), \
        TP("metrics-test-content-judged-changelog", 0)
    consumer = _FaustConsumer(
        ends={received[0]: 120, received[1]: 40, sessions: 10, changelog: 500},
        # smtp.sessions: nothing fetched from it yet (no position); the changelog is only written.
        positions={received[0]: 100, received[1]: 40, changelog: 0})
    assignor = SimpleNamespace(assigned_actives=lambda: {*received, sessions, changelog})
    app = SimpleNamespace(consumer=consumer, assignor=assignor, conf=SimpleNamespace(id="metrics-test-streams"),
                          tables=SimpleNamespace(changelog_topics={changelog.topic}))
    assert await record_lag(app) == {"mail.received": 20}
    assert value("streams", "bulwark_consumer_lag_records", group="metrics-test-streams",
                 topic="mail.received") == 20
    # The partitions moved to another worker: this one reports no lag for them any more.
    assignor.assigned_actives = lambda: set()
    await record_lag(app)
    assert value("streams", "bulwark_consumer_lag_records", group="metrics-test-streams",
                 topic="mail.received") == 0


async def test_bans_limits_and_disabled_accounts_are_counted_as_the_streams_issue_them(published):
    from tests.test_screening import connects, policy, received, run_hijack, run_screening

    before = [value("streams", "bulwark_screening_bans_total"),
              value("streams", "bulwark_screening_ban_triggers_total", counter="connections"),
              value("streams", "bulwark_hijack_limits_reached_total"),
              value("streams", "bulwark_hijack_accounts_disabled_total")]
    await run_screening(policy(), connects("198.51.100.70", 14))  # one ban, for its connections
    await run_hijack(policy(hijack={"message_limit": 5, "window_minutes": 10}), received("metrics@example.test", 8))
    await run_hijack(policy(hijack={"message_limit": 3, "window_minutes": 10, "disable_account": True}),
                     received("metrics2@example.test", 6))
    assert [type(e).__name__ for e in published] == ["BanIssued", "AccountLimitReached", "AccountStateChanged"]
    after = [value("streams", "bulwark_screening_bans_total"),
             value("streams", "bulwark_screening_ban_triggers_total", counter="connections"),
             value("streams", "bulwark_hijack_limits_reached_total"),
             value("streams", "bulwark_hijack_accounts_disabled_total")]
    assert [a - b for a, b in zip(after, before)] == [1, 1, 1, 1]


# -- the sinks ---------------------------------------------------------------------------------------


async def test_delivery_counts_messages_and_recipients_by_outcome_and_shows_its_queue(tmp_path):
    tries: list[str] = []

    async def send(route, req, mail_from, rcpts, data, record=None):
        tries.extend(rcpts)
        if len(tries) == 1:  # the first attempt is deferred, the retry delivered
            return [ev.RecipientResult(recipient=r, outcome="deferred", reply_code=451, reply="later")
                    for r in rcpts], None
        return [ev.RecipientResult(recipient=r, outcome="delivered", reply_code=250) for r in rcpts], None

    sink = make_sink(tmp_path, send)
    actions = ("deferred", "delivered")
    before = [value("delivery", "bulwark_messages_total", action=a) for a in actions]
    recipients_before = value("delivery", "bulwark_delivery_recipients_total", outcome="delivered")
    await sink.take(await verdicts(sink, ["erin@example.test"]))
    await sink.recover()
    assert sink.record_depth() == 1
    assert value("delivery", "bulwark_delivery_queue_messages") == 1
    await run_until(sink, lambda: len(tries) == 2, timeout=5)
    after = [value("delivery", "bulwark_messages_total", action=a) for a in actions]
    assert [a - b for a, b in zip(after, before)] == [1, 1]
    assert value("delivery", "bulwark_delivery_recipients_total", outcome="delivered") - recipients_before == 1
    assert sink.record_depth() == 0 and value("delivery", "bulwark_delivery_queue_messages") == 0


class _Publisher:
    async def publish(self, event):
        pass


async def test_quarantine_counts_each_message_once_however_often_its_verdict_comes(tmp_path):
    sink = QuarantineSink(_Publisher(), JsonIndex(tmp_path / "index"))
    envelope = ev.Envelope(mail_from="a@partner.test", rcpt_to=["b@example.test"], sha256="0" * 64, size=1,
                           client_ip="192.0.2.1", received_at=datetime.now(timezone.utc))
    verdict = ev.Verdict(message_id="q1", action="quarantine", reasons=["ANTIVIRUS_INFECTED"], results=[],
                         policy_version="p", direction="inbound", envelope=envelope)
    release = ev.QuarantineReleased(message_id="q1", envelope=envelope, by="admin", reason="expected")
    before = [value("quarantine", "bulwark_messages_total", action=a) for a in ("quarantined", "released")]
    await sink.take([verdict, verdict])
    await sink.take([verdict, release, release])
    after = [value("quarantine", "bulwark_messages_total", action=a) for a in ("quarantined", "released")]
    assert [a - b for a, b in zip(after, before)] == [1, 1]


# -- exposition and `bulwark stats` ----------------------------------------------------------------


def test_each_process_serves_only_its_own_metrics():
    served = {c: {m.describe()[0].name for m in found} for c, found in metrics.EXPOSED.items()}
    assert "bulwark_delivery_queue_messages" in served["delivery"]
    assert "bulwark_delivery_queue_messages" not in served["ingest"]
    assert "bulwark_smtp_replies" in served["ingest"] and "bulwark_smtp_replies" not in served["streams"]
    assert set(metrics.EXPOSED) == set(METRICS_PORTS)


def test_every_metric_is_documented_in_operations_md():
    text = (REPO_ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("## Metrics"):]
    for found in metrics.EXPOSED.values():
        for metric in found:
            family = metric.describe()[0]
            name = family.name + ("_total" if family.type == "counter" else "")
            assert f"`{name}`" in section, name
    for variable, port in METRICS_PORTS.values():
        assert variable in section and str(port) in section, variable


def test_ports_come_from_the_environment_and_zero_turns_one_off(monkeypatch):
    for variable, _ in METRICS_PORTS.values():  # a stack of the same test session may have set them
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("BULWARK_DELIVERY_METRICS_PORT", "19463")
    monkeypatch.setenv("BULWARK_CONSOLE_METRICS_PORT", "0")
    monkeypatch.setenv("BULWARK_METRICS_HOST", "0.0.0.0")
    settings = Settings.from_env()
    assert settings.metrics_port("delivery") == 19463 and settings.metrics_port("ingest") == 9461
    found = endpoints(settings)
    assert "console" not in found
    # Listening on every interface: asked over loopback.
    assert found["delivery"] == "http://127.0.0.1:19463/metrics"


def test_quantiles_are_interpolated_in_the_buckets_as_promql_does():
    buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.1)
    assert quantile(buckets, 0.7) == pytest.approx(0.3)
    assert quantile(buckets, 0.95) == pytest.approx(0.75)
    assert quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5) is None


@pytest.fixture
def served():
    port = free_port()
    server = metrics.serve("quarantine", "127.0.0.1", port)
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()


def test_stats_reads_a_served_endpoint_and_reports_one_that_does_not_answer(served):
    metrics.MESSAGES.labels(action="quarantined").inc()
    expected = value("quarantine", "bulwark_messages_total", action="quarantined")
    up, down = scrape_all({"quarantine": f"http://127.0.0.1:{served}/metrics",
                           "console": f"http://127.0.0.1:{free_port()}/metrics"}, timeout=2)
    assert up.up and not down.up and "not reachable" in down.error
    [series] = [s for s in up.series if s.name == "bulwark_messages_total" and s.labels == {"action": "quarantined"}]
    assert series.value == expected
    # What the process may count is served from the start, as 0 until it happens.
    assert any(s.name == "bulwark_messages_total" and s.labels == {"action": "deleted"} for s in up.series)
    table = render([up, down])
    assert re.search(rf"bulwark_messages_total\s+action=quarantined\s+{int(expected)}\n", table)
    assert "process_" not in table  # the process's own metrics only with --all
    assert "console  http://127.0.0.1:" in table and "not reachable" in table


def test_histograms_are_shown_as_count_mean_and_quantiles():
    text = """# TYPE bulwark_check_duration_seconds histogram
bulwark_check_duration_seconds_bucket{check="spf",le="0.01"} 3.0
bulwark_check_duration_seconds_bucket{check="spf",le="0.1"} 4.0
bulwark_check_duration_seconds_bucket{check="spf",le="+Inf"} 4.0
bulwark_check_duration_seconds_count{check="spf"} 4.0
bulwark_check_duration_seconds_sum{check="spf"} 0.06
"""
    [series] = parse(text)
    assert (series.name, series.labels, series.count) == ("bulwark_check_duration_seconds", {"check": "spf"}, 4)
    from bulwark.cli.stats import Scrape

    table = render([Scrape("streams", "http://x/metrics", [series])])
    assert "check=spf  4 observed, mean 15.0 ms, p50 6.7 ms, p95 " in table


def test_the_stats_command_prints_json_and_exits_1_when_a_named_process_is_down(served):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "bulwark.cli", "stats", *args], capture_output=True, text=True,
                              timeout=60, cwd=str(Path(__file__).parent.parent))

    ok = run("--url", f"http://127.0.0.1:{served}/metrics", "--json")
    assert ok.returncode == 0, ok.stderr
    [component] = json.loads(ok.stdout)["components"]
    assert component["up"] and any(m["name"] == "bulwark_audit_event_backlog" for m in component["metrics"])
    down = run("--url", f"http://127.0.0.1:{served}/metrics", "--url", f"http://127.0.0.1:{free_port()}/metrics")
    assert down.returncode == 1 and "not reachable" in down.stdout
