"""Prometheus metrics: every metric declared once, and which process exposes which.

Each long-running process (ingest, the Faust worker, each sink, the console,
the demo mailbox) serves its own metrics over HTTP at ``/metrics`` on a port
of its own (``BULWARK_<COMPONENT>_METRICS_PORT``, on ``BULWARK_METRICS_HOST``,
127.0.0.1 by default), in prometheus_client's standard text exposition.
``bulwark stats`` scrapes the same endpoints for a terminal.

The metrics are declared here, not registered anywhere (``registry=None``),
and :data:`EXPOSED` says which of them each process serves (Postfix's
master.cf in spirit: one table, every service and what it offers), so a
process never shows a zero for something it cannot count: ingest has no
delivery queue, and its scrape says so by leaving the metric out.

Counters only count: the code that decides (a guard, the verdict logic, a
sink) increments them as it acts, and nothing reads them back. Labels are
bounded sets (actions, reply codes, check names, topics, event types); never
an address, an account or a message id.

One process, one port: several processes of one component on a host (ingest
per core, a second worker, a second export) each take their own port.
prometheus_client's multiprocess mode is not used: it is for forking servers
sharing one port, and every Bulwark process is started on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, start_http_server

log = logging.getLogger(__name__)

# A ``_created`` sample beside every counter doubles what a scrape carries for
# no use a dashboard has here.
disable_created_metrics()


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
    return Counter(name, doc, list(labels), registry=None)


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
    return Gauge(name, doc, list(labels), registry=None)


# -- messages, whichever process acts on them ---------------------------------------------

#: What happened to a message, counted by the process that did it:
#: ingest: accepted (250 after DATA), refused (5xx after DATA, inline refusal
#: included), tempfailed (4xx after DATA: the client keeps it);
#: quarantine sink: quarantined, released, deleted;
#: delivery sink: delivered, deferred, bounced (one per delivery attempt of a
#: message: its recipients all delivered, some still to retry, or some bounced).
MESSAGES = _counter("bulwark_messages", "Messages by what was done with them (see docs/operations.md, Metrics)",
                    ["action"])

# -- events on Kafka ------------------------------------------------------------------------

EVENTS_PUBLISHED = _counter("bulwark_events_published", "Events the broker acknowledged, by topic and event type",
                            ["topic", "type"])
PUBLISH_FAILURES = _counter("bulwark_event_publish_failures",
                            "Events the broker did not take (a failed or timed-out produce), by topic and event type",
                            ["topic", "type"])
EVENTS_DROPPED = _counter("bulwark_audit_events_dropped",
                          "Audit events dropped because the broker had not acknowledged twice the backlog limit")
EVENT_BACKLOG = _gauge("bulwark_audit_event_backlog", "Audit events emitted and not yet acknowledged by the broker")
EVENTS_CONSUMED = _counter("bulwark_events_consumed", "Records read by this process's consumer group",
                           ["group", "topic"])
CONSUMER_LAG = _gauge("bulwark_consumer_lag_records",
                      "Records on the topic not yet consumed by this process's consumer group (summed over the "
                      "partitions this process is assigned)", ["group", "topic"])

# -- ingest -------------------------------------------------------------------------------------

SMTP_REPLIES = _counter("bulwark_smtp_replies", "SMTP replies sent, by class (2xx, 3xx, 4xx, 5xx) and code",
                        ["class", "code"])
SMTP_SESSIONS = _counter("bulwark_smtp_sessions", "SMTP connections accepted, by listener", ["listener"])
SMTP_SESSIONS_OPEN = _gauge("bulwark_smtp_sessions_open", "SMTP sessions open now")

# -- the Faust worker ----------------------------------------------------------------------------

VERDICTS = _counter("bulwark_verdicts", "Verdicts published, by action (deliver, redirect, quarantine, reject)",
                    ["action"])
#: Seconds, from 5 ms to 2 minutes (a check's default timeout is 30 s).
CHECK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CHECK_SECONDS = Histogram("bulwark_check_duration_seconds", "Time each content check took on one message",
                          ["check"], buckets=CHECK_BUCKETS, registry=None)
CHECK_RESULTS = _counter("bulwark_check_results", "Check results, by check and outcome (pass, hit, fail)",
                         ["check", "outcome"])
BANS = _counter("bulwark_screening_bans", "Dynamic Screening bans issued")
BAN_TRIGGERS = _counter("bulwark_screening_ban_triggers",
                        "Counters over their limit when a ban was issued (a ban can have several)", ["counter"])
HIJACK_LIMITS = _counter("bulwark_hijack_limits_reached",
                         "Account Hijack Detection: accounts limited (452 until the window ends)")
HIJACK_DISABLED = _counter("bulwark_hijack_accounts_disabled", "Account Hijack Detection: accounts disabled")
OUTBREAKS = _counter("bulwark_outbreaks_detected", "Outbreak Protection: fingerprints marked as outbreaks", ["kind"])

# -- the delivery sink -----------------------------------------------------------------------------

DELIVERY_RECIPIENTS = _counter("bulwark_delivery_recipients", "Recipient outcomes of delivery attempts",
                               ["outcome"])
DELIVERY_QUEUE = _gauge("bulwark_delivery_queue_messages",
                        "Messages in the delivery queue waiting for an attempt or being delivered")
DELIVERY_IN_FLIGHT = _gauge("bulwark_delivery_in_flight_messages", "Messages being delivered now")
DELIVERY_SECONDS = Histogram("bulwark_delivery_attempt_duration_seconds",
                             "Time one delivery attempt of a message took (every destination domain)",
                             buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=None)

# -- the other sinks, the console, the demo mailbox -----------------------------------------------

DMARC_REPORTS = _counter("bulwark_dmarc_reports", "DMARC aggregate reports read, by outcome (received, unreadable)",
                         ["outcome"])
EXPORTED = _counter("bulwark_export_records", "Records written to the SIEM destination and committed", ["export"])
EXPORT_WRITE_FAILURES = _counter("bulwark_export_write_failures",
                                 "Writes to the SIEM destination that failed (retried)", ["export"])
CONSOLE_LOGINS = _counter("bulwark_console_logins", "Console logins, by outcome (success, failure)", ["outcome"])
CONSOLE_ACTIONS = _counter("bulwark_console_quarantine_actions",
                           "Releases and deletions asked for in the console", ["action"])
CONSOLE_RESPONSES = _counter("bulwark_console_http_responses", "Console HTTP responses, by status code", ["code"])
UNJUDGED_PENDING = _gauge("bulwark_unjudged_pending_messages",
                          "Messages on mail.received with no verdict yet, by state (waiting: within the period or "
                          "sent again; given_up: no verdict after the last re-send)", ["state"])
UNJUDGED_RESENT = _counter("bulwark_unjudged_resent",
                           "Messages written to mail.received again because no verdict came in time")
UNJUDGED_GIVEN_UP = _counter("bulwark_unjudged_given_up",
                             "Messages still without a verdict after the last re-send (logged as errors)")
MAILBOX_MESSAGES = _counter("bulwark_mailbox_messages", "Messages the demo mailbox stored (one per recipient)")

_EVENTS = (EVENTS_PUBLISHED, PUBLISH_FAILURES)
_PUBLISHER = (*_EVENTS, EVENTS_DROPPED, EVENT_BACKLOG)
_CONSUMER = (EVENTS_CONSUMED, CONSUMER_LAG)

#: component -> the metrics its process serves (beside process_* and python_*).
EXPOSED: dict[str, tuple] = {
    "ingest": (MESSAGES, SMTP_REPLIES, SMTP_SESSIONS, SMTP_SESSIONS_OPEN, *_PUBLISHER),
    "streams": (VERDICTS, CHECK_SECONDS, CHECK_RESULTS, BANS, BAN_TRIGGERS, HIJACK_LIMITS, HIJACK_DISABLED,
                OUTBREAKS, *_EVENTS, CONSUMER_LAG),
    "delivery": (MESSAGES, DELIVERY_RECIPIENTS, DELIVERY_QUEUE, DELIVERY_IN_FLIGHT, DELIVERY_SECONDS,
                 *_PUBLISHER, *_CONSUMER),
    "quarantine": (MESSAGES, *_PUBLISHER, *_CONSUMER),
    "dmarc-reports": (DMARC_REPORTS, *_PUBLISHER, *_CONSUMER),
    "export": (EXPORTED, EXPORT_WRITE_FAILURES, *_CONSUMER),
    "console": (CONSOLE_LOGINS, CONSOLE_ACTIONS, CONSOLE_RESPONSES, *_PUBLISHER),
    "mailbox": (MAILBOX_MESSAGES,),
    "trace-index": (EVENTS_CONSUMED,),
    "unjudged": (UNJUDGED_PENDING, UNJUDGED_RESENT, UNJUDGED_GIVEN_UP, EVENTS_CONSUMED),
}


#: Label values a process knows from the start, served as 0 before the first
#: increment: a rate or an alert over a series that does not exist yet sees nothing.
INITIAL: dict[str, list[tuple[object, dict[str, str]]]] = {
    "ingest": [(MESSAGES, {"action": a}) for a in ("accepted", "refused", "tempfailed")],
    "streams": [(VERDICTS, {"action": a}) for a in ("deliver", "redirect", "quarantine", "reject")],
    "delivery": [*((MESSAGES, {"action": a}) for a in ("delivered", "deferred", "bounced")),
                 *((DELIVERY_RECIPIENTS, {"outcome": o}) for o in ("delivered", "deferred", "bounced"))],
    "quarantine": [(MESSAGES, {"action": a}) for a in ("quarantined", "released", "deleted")],
    "dmarc-reports": [(DMARC_REPORTS, {"outcome": o}) for o in ("received", "unreadable")],
    "unjudged": [(UNJUDGED_PENDING, {"state": s}) for s in ("waiting", "given_up")],
    "console": [*((CONSOLE_LOGINS, {"outcome": o}) for o in ("success", "failure")),
                *((CONSOLE_ACTIONS, {"action": a}) for a in ("release", "delete"))],
}


def registry_for(component: str) -> CollectorRegistry:
    """A registry with the metrics ``component`` serves, and the process's own (CPU, memory, files, GC)."""
    registry = CollectorRegistry(auto_describe=True)
    for metric in EXPOSED[component]:
        registry.register(metric)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def serve(component: str, host: str, port: int):
    """Serve ``component``'s metrics at http://host:port/metrics from a thread; port 0: none.

    Returns the HTTP server (``shutdown()`` stops it) or None. A port that is
    taken raises OSError, so a misconfigured process fails at start, as it
    does for its other listeners.
    """
    if not port:
        return None
    for metric, labels in INITIAL.get(component, ()):
        metric.labels(**labels)
    server, _ = start_http_server(port, addr=host, registry=registry_for(component))
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server


def start(component: str, settings) -> object | None:
    """Serve ``component``'s metrics where the settings say (``Settings.metrics_port``)."""
    return serve(component, settings.metrics_host, settings.metrics_port(component))


#: Label children by their values, for the counters every SMTP command and
#: every event moves: prometheus_client's labels() costs several times the
#: increment itself (measured: 31 us against 8 us on a loaded machine).
_children: dict[tuple, object] = {}


def _child(metric, *values: str):
    key = (metric, *values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def smtp_reply(status: str) -> None:
    """Count one SMTP reply (its last line: continuation lines are the same reply)."""
    code = status[:3]
    if len(status) > 3 and status[3] == "-" or not code.isdigit():
        return
    _child(SMTP_REPLIES, f"{code[0]}xx", code).inc()


def message_after_data(reply: str) -> None:
    """Count a message at the end of DATA by ingest's reply to it."""
    first = reply[:1]
    MESSAGES.labels(action="accepted" if first == "2" else "refused" if first == "5" else "tempfailed").inc()


def event_published(topic: str, event_type: str, ok: bool = True) -> None:
    _child(EVENTS_PUBLISHED if ok else PUBLISH_FAILURES, topic, event_type).inc()


def publishing(topic: str, event_type: str, future) -> None:
    """Count the publish whose delivery future this is, once it settles."""
    def settled(done) -> None:
        event_published(topic, event_type, ok=not done.cancelled() and done.exception() is None)
    future.add_done_callback(settled)
