"""Chaos with reconciliation: SIGKILL every component under load, then account for every message.

A whole local stack (real Kafka, clamd, ingest, two Faust workers, the
delivery, quarantine and DMARC-report sinks, the safety net for messages
never judged) relays to a downstream SMTP
server this script owns. Many concurrent sessions from 127.0.10.1-20 send
a mix of messages, each answered and recorded by the client:

  clean     to user@example.com                      -> delivered
  virus     an EICAR attachment                      -> 550 at the end of DATA, or quarantined
  blocked   an .exe attachment                       -> quarantined
  bounce    to a mailbox the downstream refuses      -> a DSN to the sender
  relay     to another domain, from an outsider      -> 554 at RCPT

While the load runs it SIGKILLs, in turn, ingest, each Faust worker, each
sink and the broker, and starts each again (a supervisor restarts anything
else that exits, as `bulwark up` does). Afterwards it reconciles the client's
replies with the downstream's view (deliveries, DSNs) and the topics
(mail.received, mail.verdicts, quarantine.events, mail.deliveries):

  answered 250        delivered exactly once, or quarantined, or bounced with one DSN
  answered 4xx/5xx    nowhere: not delivered, not held, no DSN (a 550 keeps a
                      forensic copy in the quarantine, marked refused)
  cut before the end of DATA               nowhere
  cut while waiting for the reply to DATA  "in doubt" (RFC 1047): at most once anywhere,
                      and once the gateway recorded it, it is accounted for like a 250

It prints accepted, delivered, quarantined, bounced, refused, duplicates and
lost, and for each kill the seconds until the gateway answered 250 again and
until a message accepted after the kill reached the downstream. It exits
non-zero on any duplicate, loss, leak or kill it did not recover from.

    python -m bench chaos                       # 1,000 messages (what `make bench` runs)
    python -m bench.chaos --messages 10000      # the full run (`make chaos`), about 10 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from email.policy import default as default_policy
from pathlib import Path

import yaml
from aiokafka.errors import KafkaConnectionError
from aiosmtpd.controller import Controller

from bulwark.devstack import LocalStack, environment, free_port, private_environment
from bulwark.kafka import iter_records
from bulwark.settings import REPO_ROOT, Settings
from schemas import events as ev
from schemas.topics import DELIVERIES, QUARANTINE, RECEIVED, VERDICTS

DOMAIN = "example.com"
SENDER_DOMAIN = "partner.test"
#: The loopback addresses the load comes from (reserved for this script and its test).
CLIENT_IPS = [f"127.0.10.{n}" for n in range(1, 21)]
#: What runs, in start order; the second Faust worker has its own store and web port.
RUNNING = ("quarantine", "delivery", "dmarc-reports", "unjudged", "streams", "streams-2", "ingest")
#: The components those processes belong to (streams twice: BULWARK_STREAMS_WORKERS=2).
COMPONENTS_RUN = ("quarantine", "delivery", "dmarc-reports", "unjudged", "streams", "ingest")
#: What is killed, in this order, once per round.
VICTIMS = ("ingest", "streams", "streams-2", "delivery", "quarantine", "dmarc-reports", "unjudged", "kafka")
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
WORDS = ("order invoice meeting report budget quarter delivery schedule contract review draft figures team "
         "customer supplier account payment reminder agenda minutes project update shipment warehouse request "
         "approval policy travel expense holiday office printer network training offer price discount").split()
#: A session answered 4xx waits this long before its next message.
BACKOFF_SECONDS = 5.0
#: While the chaos is not over, the last tenth of the messages goes one at a time, this far apart.
TRICKLE_SECONDS = 2.0
#: A second delivery whose first copy arrived this shortly before the delivery sink's kill is the kill's.
OUTBOUND_WINDOW_SECONDS = 2.0
#: ... or this long after it (the downstream stamps a message when it has taken it all).
OUTBOUND_AFTER_KILL_SECONDS = 1.0
#: One message in twenty of each kind but clean.
KINDS = {3: "virus", 7: "blocked", 11: "bounce", 15: "relay"}


def kind_of(n: int) -> str:
    return KINDS.get(n % 20, "clean")


# -- the downstream: the organisation's mail server, and where DSNs arrive ------------


@dataclass
class Arrival:
    at: float
    mail_from: str
    rcpts: list[str]
    message_id: str | None
    #: For a DSN: the Message-ID of the message it reports on.
    dsn_for: str | None = None


class Downstream:
    """aiosmtpd on a free port: accepts everything except mailboxes named bounce*."""

    def __init__(self):
        self.arrivals: list[Arrival] = []
        self.lock = threading.Lock()
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, decode_data=False)

    def __enter__(self) -> "Downstream":
        self.controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self.controller.stop()

    async def handle_RCPT(self, server, session, envelope, address, options):
        if address.lower().startswith("bounce"):
            return f"550 5.1.1 <{address}>: mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        content = envelope.original_content or b""
        headers = BytesHeaderParser().parsebytes(content)
        arrival = Arrival(time.monotonic(), "" if envelope.mail_from in ("<>", "") else envelope.mail_from,
                          [r.lower() for r in envelope.rcpt_tos], _one_line(headers.get("Message-ID")))
        if arrival.mail_from == "" and headers.get_content_type() == "multipart/report":
            arrival.dsn_for = _reported_message_id(content)
        with self.lock:
            self.arrivals.append(arrival)
        return "250 2.0.0 Ok: stored"

    def snapshot(self) -> list[Arrival]:
        with self.lock:
            return list(self.arrivals)


def _one_line(value) -> str | None:
    return " ".join(str(value).split()) if value else None


def _reported_message_id(dsn: bytes) -> str | None:
    """The Message-ID in a DSN's text/rfc822-headers part (RFC 3462)."""
    for part in BytesParser(policy=default_policy).parsebytes(dsn).walk():
        if part.get_content_type() == "text/rfc822-headers":
            return _one_line(BytesHeaderParser().parsebytes(part.get_payload(decode=True)).get("Message-ID"))
    return None


# -- the load: every reply recorded ---------------------------------------------------


@dataclass
class Attempt:
    n: int
    kind: str
    message_id: str
    rcpt: str
    source_ip: str = ""
    #: "250", "4xx", "5xx", "cut" (connection lost or no reply), or "unsent"
    outcome: str = "unsent"
    #: Where it ended: mail, rcpt, data (the DATA command) or dot (the reply to the end of DATA).
    phase: str = ""
    reply: str = ""
    queue_id: str | None = None
    started: float = 0.0
    answered: float = 0.0

    @property
    def in_doubt(self) -> bool:
        """Cut after the whole message was sent: the gateway may have recorded it (RFC 1047)."""
        return self.outcome == "cut" and self.phase == "dot"


class Cut(Exception):
    """The connection ended, or no reply came in time."""


class Client:
    """A plain SMTP client on asyncio streams: every reply is kept, nothing is retried."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self.reader, self.writer, self.timeout = reader, writer, timeout

    @classmethod
    async def connect(cls, port: int, source_ip: str, timeout: float) -> "Client":
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source_ip, 0)), timeout)
        return cls(reader, writer, timeout)

    async def reply(self) -> tuple[int, str]:
        lines = []
        try:
            while True:
                line = await asyncio.wait_for(self.reader.readline(), self.timeout)
                if not line:
                    raise Cut("connection closed")
                lines.append(line.decode(errors="replace").rstrip("\r\n"))
                if line[3:4] != b"-":
                    return int(lines[-1][:3]), lines[-1]
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            raise Cut(type(exc).__name__) from exc

    async def command(self, line: str | bytes) -> tuple[int, str]:
        try:
            self.writer.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")
            await self.writer.drain()
        except OSError as exc:
            raise Cut(type(exc).__name__) from exc
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


def build_message(run_id: str, attempt: Attempt, sender: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = attempt.rcpt
    msg["Subject"] = f"chaos {attempt.n} ({attempt.kind})"
    msg["Message-ID"] = attempt.message_id
    # Text of its own: the outbreak check fingerprints bodies (numbers aside), and this load is no outbreak.
    words = random.Random(f"{run_id}-{attempt.n}").choices(WORDS, k=300)
    msg.set_content("\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12)) + "\n")
    if attempt.kind == "virus":
        msg.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="invoice.txt")
    elif attempt.kind == "blocked":
        msg.add_attachment(f"MZ program {attempt.n} {run_id}".encode(), maintype="application",
                           subtype="octet-stream", filename=f"setup{attempt.n}.exe")
    data = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in data.split(b"\r\n"))
    return stuffed.rstrip(b"\r\n") + b"\r\n.\r\n"


@dataclass
class Load:
    run_id: str
    attempts: list[Attempt]
    connect_errors: Counter = field(default_factory=Counter)
    #: When the latest transaction answered 250 began (MAIL FROM)
    last_accepted: float = 0.0
    started: int = 0
    done: bool = False
    #: Set when every kill is done and the gateway answered 250 after the last:
    #: the last tenth of the messages waits for it, so the load outlasts the chaos.
    chaos_over: asyncio.Event = field(default_factory=asyncio.Event)


async def run_load(port: int, load: Load, sessions: int, per_session: int, timeout: float) -> None:
    pending = iter(load.attempts)
    take_lock = asyncio.Lock()

    reserve = len(load.attempts) - max(1, len(load.attempts) // 10)

    async def take() -> Attempt | None:
        async with take_lock:
            if load.started >= reserve and not load.chaos_over.is_set():
                # A trickle meanwhile: the recovery from the last kill is seen by a 250.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(load.chaos_over.wait(), TRICKLE_SECONDS)
            attempt = next(pending, None)
            if attempt is not None:
                load.started += 1
            return attempt

    async def session(worker: int) -> None:
        ip = CLIENT_IPS[worker % len(CLIENT_IPS)]
        sender = f"loader{worker}@{SENDER_DOMAIN}"
        while True:
            try:
                client = await Client.connect(port, ip, timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                load.connect_errors[type(exc).__name__] += 1
                await asyncio.sleep(0.5)
                if load.started >= len(load.attempts):
                    return
                continue
            try:
                code, _ = await client.reply()
                if code == 220:
                    code, _ = await client.command("EHLO load.partner.test")
                if code != 250:
                    load.connect_errors[f"{code} before MAIL"] += 1
                    await asyncio.sleep(0.5)
                    if load.started >= len(load.attempts):
                        return  # nothing left to send (refused at connect, e.g. banned, for ever)
                    continue
                for _ in range(per_session):
                    attempt = await take()
                    if attempt is None:
                        with contextlib.suppress(Cut):
                            await client.command("QUIT")
                        return
                    attempt.source_ip = ip
                    if not await transaction(client, attempt, sender):
                        break  # the session is over (cut, or 421)
                else:
                    with contextlib.suppress(Cut):
                        await client.command("QUIT")
            except Cut as exc:
                load.connect_errors[f"cut before MAIL ({exc})"] += 1
            finally:
                await client.close()

    async def transaction(client: Client, attempt: Attempt, sender: str) -> bool:
        """Send one message; False when the session cannot go on."""
        attempt.started = time.monotonic()
        steps = (("mail", f"MAIL FROM:<{sender}>", 250), ("rcpt", f"RCPT TO:<{attempt.rcpt}>", 250),
                 ("data", "DATA", 354), ("dot", build_message(load.run_id, attempt, sender), 250))
        for phase, line, wanted in steps:
            attempt.phase = phase
            try:
                code, reply = await client.command(line)
            except Cut as exc:
                attempt.outcome, attempt.reply, attempt.answered = "cut", str(exc), time.monotonic()
                return False
            if code != wanted:
                attempt.outcome, attempt.reply, attempt.answered = f"{code // 100}xx", reply, time.monotonic()
                if code // 100 == 4:
                    # As an MTA does: a temporary failure is retried later, not at once
                    # (the next message here, since nothing is sent twice).
                    await asyncio.sleep(BACKOFF_SECONDS)
                if code == 421:
                    return False
                if phase != "dot":
                    try:
                        await client.command("RSET")
                    except Cut:
                        return False
                return True
        attempt.outcome, attempt.reply, attempt.answered = "250", reply, time.monotonic()
        attempt.queue_id = reply.rsplit(" ", 1)[-1]
        load.last_accepted = max(load.last_accepted, attempt.started)
        return True

    await asyncio.gather(*(session(w) for w in range(sessions)))
    load.done = True


# -- the chaos: kill, restart, measure ----------------------------------------------------


@dataclass
class Kill:
    victim: str
    at: float
    restarted: float = 0.0
    pid: int = 0
    #: seconds from the kill until a transaction begun after it was answered 250
    accepted_after: float | None = None
    #: seconds from the kill until a message accepted after it reached the downstream
    delivered_after: float | None = None
    error: str = ""


def start_stack(stack: LocalStack) -> None:
    stack.start_kafka()
    stack.start_clamd()
    stack.ensure_topics()
    stack.apply_policy()
    # Two workers (BULWARK_STREAMS_WORKERS=2): streams and streams-2, each
    # with its own table directory, web and metrics ports.
    stack.start_components(only=COMPONENTS_RUN, ingest_timeout=120)


def start_kafka(stack: LocalStack, log, attempts: int = 3) -> None:
    """Start the broker again, as its service manager would, until it answers."""
    for attempt in range(1, attempts + 1):
        try:
            stack.start_kafka()
            return
        except RuntimeError as exc:
            if attempt == attempts:
                raise
            log(f"the broker did not start (attempt {attempt}): {str(exc).splitlines()[1:2]}; again")


def _locked(lock: threading.Lock, call, *args):
    with lock:
        return call(*args)


async def chaos(stack: LocalStack, lock: threading.Lock, load: Load, victims: list[str], down: float,
                recover_limit: float, log) -> list[Kill]:
    """Kill each victim when its share of the load has started, once the previous kill recovered.

    ``lock`` is the supervisor's: it never sees a process this kills before it is out of its sight.
    """
    kills: list[Kill] = []
    total = len(load.attempts)
    for i, victim in enumerate(victims):
        threshold = total * 0.9 * (i + 1) / (len(victims) + 1)
        while load.started < threshold and not load.done:
            await asyncio.sleep(0.2)
        kill = Kill(victim, time.monotonic())
        kills.append(kill)
        try:
            if victim == "kafka":
                kill.pid = await asyncio.to_thread(stack.kill_kafka)
            else:
                kill.pid = await asyncio.to_thread(_locked, lock, stack.kill, victim)
            log(f"killed {victim} (pid {kill.pid}) with {load.started} of {total} messages started")
            await asyncio.sleep(down)
            if victim == "kafka":
                await asyncio.to_thread(start_kafka, stack, log)
            else:
                await asyncio.to_thread(_locked, lock, stack.restart, victim)
            kill.restarted = time.monotonic()
            log(f"restarted {victim} after {kill.restarted - kill.at:.1f}s")
        except Exception as exc:  # reported, and the run fails
            kill.error = f"{type(exc).__name__}: {exc}"
            log(f"{victim}: {kill.error}")
        # The next kill only once a transaction begun after this one was answered 250 (or gave up waiting).
        deadline = time.monotonic() + recover_limit
        while load.last_accepted < kill.at and time.monotonic() < deadline and not load.done:
            await asyncio.sleep(0.2)
    load.chaos_over.set()
    return kills


async def supervise(stack: LocalStack, lock: threading.Lock, exits: list[str], stop: asyncio.Event) -> None:
    """What a service manager does: start again whatever exited on its own (not what chaos killed)."""
    while not stop.is_set():
        try:
            await asyncio.to_thread(_locked, lock, stack.restart_exited, exits.append)
        except RuntimeError as exc:
            exits.append(f"gave up: {exc}")
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


# -- reconciliation ------------------------------------------------------------------------


@dataclass
class Topics:
    #: header Message-ID -> queue ids recorded with it (committed mail.received)
    received: dict[str, list[str]] = field(default_factory=dict)
    verdicts: dict[str, list[str]] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    #: queue id -> copies of its mail.received record beyond the first (the safety net's re-sends)
    copies: Counter = field(default_factory=Counter)
    quarantined: Counter = field(default_factory=Counter)
    bounced: Counter = field(default_factory=Counter)
    #: queue id -> delivery attempts that the delivery sink recorded as delivered
    delivered: Counter = field(default_factory=Counter)


async def read_state(settings: Settings, quarantine_only: bool = False) -> Topics:
    # A partition whose leader is still being elected after the broker's restart is retried; no need to say so.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    state = Topics()
    topics = [QUARANTINE.name] if quarantine_only else [RECEIVED.name, VERDICTS.name, QUARANTINE.name,
                                                        DELIVERIES.name]
    types = {ev.MessageReceived.TYPE, ev.Verdict.TYPE, ev.MessageRefused.TYPE, ev.QuarantineAdded.TYPE,
             ev.DeliveryBounced.TYPE, ev.DeliveryAttempted.TYPE}
    async for record in iter_records(settings, topics, types=types):
        e = record.event
        if isinstance(e, ev.MessageReceived) and e.header_message_id:
            # Once per queue id: the safety net (sinks/unjudged.py) may have written a record again.
            ids = state.received.setdefault(_one_line(e.header_message_id), [])
            if e.message_id in ids:
                state.copies[e.message_id] += 1
            else:
                ids.append(e.message_id)
        elif isinstance(e, ev.Verdict):
            state.verdicts.setdefault(e.message_id, []).append(e.action)
        elif isinstance(e, ev.MessageRefused):
            state.refused.add(e.message_id)
        elif isinstance(e, ev.QuarantineAdded):
            state.quarantined[e.message_id] += 1
        elif isinstance(e, ev.DeliveryBounced):
            state.bounced[e.message_id] += 1
        elif isinstance(e, ev.DeliveryAttempted):
            state.delivered[e.message_id] += sum(r.outcome == "delivered" for r in e.recipients)
    return state


@dataclass
class Fate:
    delivered: int = 0
    #: when each copy reached the downstream (monotonic)
    arrived: list[float] = field(default_factory=list)
    dsns: int = 0
    quarantined: bool = False
    refused_inline: bool = False
    recorded: bool = False

    @property
    def copies(self) -> int:
        """Places the message ended up; more than one is a duplicate."""
        return self.delivered + self.dsns + (1 if self.quarantined else 0)


def fates(attempts: list[Attempt], arrivals: list[Arrival], topics: Topics) -> dict[str, Fate]:
    by_id = {a.message_id: a for a in attempts}
    result = {mid: Fate() for mid in by_id}
    for arrival in arrivals:
        if arrival.dsn_for in result:
            result[arrival.dsn_for].dsns += 1
        elif arrival.message_id in result and by_id[arrival.message_id].rcpt.lower() in arrival.rcpts:
            result[arrival.message_id].delivered += 1
            result[arrival.message_id].arrived.append(arrival.at)
    for mid, fate in result.items():
        queue_ids = topics.received.get(mid, [])
        fate.recorded = bool(queue_ids)
        fate.refused_inline = any(q in topics.refused for q in queue_ids)
        # A message refused with 550 keeps a forensic copy, marked refused: not a place it ended up.
        fate.quarantined = any(topics.quarantined[q] for q in queue_ids) and not fate.refused_inline
    return result


@dataclass
class Report:
    messages: int
    replies: Counter
    connect_errors: Counter
    accepted: int = 0
    delivered: int = 0
    quarantined: int = 0
    bounced: int = 0
    refused: int = 0
    duplicates: int = 0
    lost: int = 0
    #: refused or cut before the end of DATA, and yet found downstream or held
    leaked: int = 0
    in_doubt: Counter = field(default_factory=Counter)
    kills: list[Kill] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)
    #: monotonic time the load began; the report's times count from it
    origin: float = 0.0
    #: of the duplicates, those a delivery sink's kill explains (``outbound_window``)
    outbound_window: int = 0
    verdict_actions: Counter = field(default_factory=Counter)
    second_verdicts: int = 0
    #: messages the safety net sent again (no verdict in time), and the copies it wrote
    resent_messages: int = 0
    resent_copies: int = 0
    problems: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    drain_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.duplicates == 0 and self.lost == 0 and self.leaked == 0 and self.accepted > 0
                and all(k.accepted_after is not None and not k.error for k in self.kills))


def outbound_window(fate: Fate, recorded_deliveries: int, kills: list[Kill]) -> Kill | None:
    """The delivery sink's kill that explains a second delivery, if one does: the
    first copy reached the downstream shortly before the sink was killed, and
    the sink recorded one delivery fewer than arrived. That is RFC 1047's window
    on the outbound hop: the downstream had the message and said 250, and the
    sink died before it could write that down, so it sent it again; no SMTP
    client can close it (the sink writes the 250 down before anything else)."""
    if fate.delivered < 2 or recorded_deliveries >= fate.delivered:
        return None
    first = min(fate.arrived)
    # The first copy may also be stamped just after the kill: the sink had
    # sent the final dot, died, and the downstream finished taking the
    # message and answered a socket nobody read any more. The same window.
    return next((k for k in kills if k.victim == "delivery"
                 and -OUTBOUND_AFTER_KILL_SECONDS <= k.at - first < OUTBOUND_WINDOW_SECONDS), None)


def reconcile(attempts: list[Attempt], arrivals: list[Arrival], topics: Topics, report: Report) -> None:
    by_fate = fates(attempts, arrivals, topics)
    for attempt in attempts:
        fate = by_fate[attempt.message_id]
        where = f"{attempt.message_id} ({attempt.kind}, {attempt.outcome} at {attempt.phase}, queue id {attempt.queue_id})"
        if fate.copies > 1 or fate.delivered > 1:
            report.duplicates += 1
            recorded = sum(topics.delivered[q] for q in topics.received.get(attempt.message_id, []))
            window = outbound_window(fate, recorded, report.kills)
            arrived = ", ".join(f"{t - report.origin:.2f}" for t in sorted(fate.arrived))
            explained = (f"; the delivery sink was killed {window.at - min(fate.arrived):.2f}s after the first "
                         f"copy arrived and recorded {recorded} delivery: RFC 1047 window on the outbound hop"
                         if window else "")
            if window:
                report.outbound_window += 1
            report.problems.append(f"duplicate: {where}: delivered {fate.delivered} (at {arrived}s), recorded "
                                   f"delivered {recorded}, DSNs {fate.dsns}, quarantined {fate.quarantined}"
                                   + explained)
        if attempt.outcome == "250":
            report.accepted += 1
            if fate.delivered:
                report.delivered += 1
            elif fate.quarantined:
                report.quarantined += 1
            elif fate.dsns:
                report.bounced += 1
            else:
                report.lost += 1
                verdicts = [topics.verdicts.get(q) for q in topics.received.get(attempt.message_id, [])]
                report.problems.append(f"lost: {where}; recorded {fate.recorded}, verdicts {verdicts}")
        elif attempt.in_doubt:
            if fate.recorded and not fate.refused_inline and fate.copies == 0:
                report.lost += 1  # the gateway recorded it: it owns it now, as if it had said 250
                report.problems.append(f"recorded but lost: {where}")
            outcome = ("delivered" if fate.delivered else "quarantined" if fate.quarantined
                       else "bounced" if fate.dsns else "nowhere")
            report.in_doubt[outcome] += 1
        else:
            report.refused += attempt.outcome in ("4xx", "5xx")
            if fate.copies:
                report.leaked += 1
                report.problems.append(f"answered {attempt.reply!r} yet delivered {fate.delivered}, "
                                       f"DSNs {fate.dsns}, quarantined {fate.quarantined}: {where}")
    for actions in topics.verdicts.values():
        report.verdict_actions[actions[0]] += 1
        report.second_verdicts += len(actions) - 1
    report.resent_messages, report.resent_copies = len(topics.copies), sum(topics.copies.values())


def recovery(kills: list[Kill], attempts: list[Attempt], arrivals: list[Arrival]) -> None:
    ids = {a.message_id: a for a in attempts}
    for kill in kills:
        after = [a.answered for a in attempts if a.outcome == "250" and a.started > kill.at]
        kill.accepted_after = min(after) - kill.at if after else None
        delivered = [d.at for d in arrivals if d.message_id in ids and ids[d.message_id].outcome == "250"
                     and ids[d.message_id].started > kill.at]
        kill.delivered_after = min(delivered) - kill.at if delivered else None


async def drain(settings: Settings, load: Load, downstream: Downstream, quiet: float, settle: float, log) -> None:
    """Wait until every message answered 250 is delivered, bounced or held, or nothing moves for ``quiet`` s;
    then ``settle`` s more, for a late second copy to show itself."""
    accepted = {a.message_id for a in load.attempts if a.outcome == "250"}
    by_queue_id = {a.queue_id: a.message_id for a in load.attempts if a.outcome == "250"}
    done, changed = 0, time.monotonic()
    while True:
        arrivals = downstream.snapshot()
        seen = {d.message_id for d in arrivals} | {d.dsn_for for d in arrivals}
        try:
            held = await read_state(settings, quarantine_only=True)
        except KafkaConnectionError:
            held = Topics()
        seen |= {by_queue_id[q] for q in held.quarantined if q in by_queue_id}
        now_done = len(accepted & seen)
        if now_done != done:
            done, changed = now_done, time.monotonic()
        if done == len(accepted):
            log(f"all {done} accepted messages accounted for; {settle:.0f}s more for any second copy")
            await asyncio.sleep(settle)
            return
        if time.monotonic() - changed > quiet:
            log(f"{len(accepted) - done} accepted messages still unaccounted for after {quiet:.0f}s without progress")
            return
        await asyncio.sleep(5)


# -- the run --------------------------------------------------------------------------------


def chaos_policy(downstream_port: int) -> str:
    """The `make run` policy, relaying to the downstream; DSNs to other domains go there too.

    The load's addresses are counted by Dynamic Screening but never banned
    (a relay refusal is a failed RCPT; while the broker is down every MAIL
    gets a 451 and the loader's RSET after it counts), and nothing trusts them.
    """
    policy = yaml.safe_load((REPO_ROOT / "infra" / "policy.local.yaml").read_text())
    policy["local_domains"] = [DOMAIN]
    server = policy["mail_servers"][0]
    server.update(port=downstream_port, domains=[DOMAIN], trusted_addresses=["127.0.0.5/32"])
    policy["screening"] = {"connection_limit": 1_000_000, "failed_rcpt_limit": 1_000_000, "rset_limit": 1_000_000}
    policy["delivery"] = {"retry_schedule_seconds": [1, 2, 5, 10, 30], "give_up_after_seconds": 3600,
                          "smarthost": f"127.0.0.1:{downstream_port}"}
    return yaml.safe_dump(policy)


@dataclass
class Options:
    messages: int = 1000
    sessions: int = 20
    per_session: int = 5
    rounds: int = 1
    down: float = 1.0
    timeout: float = 120.0
    recover_limit: float = 300.0
    quiet: float = 120.0
    settle: float = 20.0
    victims: tuple[str, ...] = VICTIMS
    root: Path | None = None
    verbose: bool = True


def run_chaos(options: Options) -> Report:
    root = options.root or Path(tempfile.mkdtemp(prefix="bulwark-chaos-"))
    run_id = f"{int(time.time())}-{os.getpid()}"
    log = (lambda line: print(f"  [{time.strftime('%H:%M:%S')}] {line}", flush=True)) if options.verbose \
        else (lambda line: None)
    attempts = []
    for n in range(options.messages):
        kind = kind_of(n)
        rcpt = {"bounce": f"bounce{n}@{DOMAIN}", "relay": f"user{n}@elsewhere.test"}.get(kind, f"user{n}@{DOMAIN}")
        attempts.append(Attempt(n, kind, f"<chaos-{run_id}-{n}@{SENDER_DOMAIN}>", rcpt))
    load = Load(run_id, attempts)
    with Downstream() as downstream:
        policy = root / "policy.yaml"
        policy.write_text(chaos_policy(downstream.port))
        # A broker SIGKILLed on a busy machine can take minutes to recover its logs.
        with environment({**private_environment(root, policy), "BULWARK_KAFKA_START_TIMEOUT": "300",
                          "BULWARK_STREAMS_WORKERS": "2"}):
            settings = Settings.from_env()
            stack = LocalStack.from_settings(settings)
            try:
                log(f"starting the stack in {root}")
                start_stack(stack)
                warm_up(settings, log)
                report = asyncio.run(_run(stack, settings, load, downstream, options, log))
            except BaseException:
                for name in RUNNING:
                    tail = stack.log_tail(name, 30)
                    if tail:
                        print(f"--- {name} ---\n{tail}", file=sys.stderr)
                raise
            finally:
                stack.stop_all()
    return report


def warm_up(settings: Settings, log) -> None:
    """The first message through every stage: workers own their partitions, sinks are consuming."""
    import smtplib

    deadline = time.monotonic() + 180
    while True:
        try:
            with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=60,
                              source_address=(CLIENT_IPS[0], 0)) as client:
                client.sendmail(f"warmup@{SENDER_DOMAIN}", [f"warmup@{DOMAIN}"],
                                f"Subject: warm-up\r\nMessage-ID: <warmup-{time.time()}@{SENDER_DOMAIN}>\r\n\r\nhi\r\n")
            break
        except (smtplib.SMTPException, OSError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway never accepted the warm-up message: {exc}") from exc
            time.sleep(1)
    log("warm-up message accepted")


async def _run(stack: LocalStack, settings: Settings, load: Load, downstream: Downstream, options: Options,
               log) -> Report:
    stop = asyncio.Event()
    exits: list[str] = []
    lock = threading.Lock()
    supervisor = asyncio.create_task(supervise(stack, lock, exits, stop))
    victims = list(itertools.chain.from_iterable(itertools.repeat(options.victims, options.rounds)))
    started = time.monotonic()
    loader = asyncio.create_task(run_load(settings.smtp_port, load, options.sessions, options.per_session,
                                          options.timeout))
    try:
        kills = await chaos(stack, lock, load, victims, options.down, options.recover_limit, log)
    finally:
        load.chaos_over.set()
    await loader
    load_seconds = time.monotonic() - started
    log(f"load done in {load_seconds:.0f}s: {dict(Counter(a.outcome for a in load.attempts))}")
    drained = time.monotonic()
    await drain(settings, load, downstream, options.quiet, options.settle, log)
    stop.set()
    await supervisor
    topics = await read_state(settings)
    arrivals = downstream.snapshot()
    report = Report(options.messages, Counter(_reply_class(a) for a in load.attempts), load.connect_errors,
                    kills=kills, exits=exits, origin=started, load_seconds=load_seconds,
                    drain_seconds=time.monotonic() - drained)
    reconcile(load.attempts, arrivals, topics, report)
    recovery(kills, load.attempts, arrivals)
    return report


def _reply_class(attempt: Attempt) -> str:
    if attempt.outcome == "cut":
        return "cut awaiting the reply to DATA" if attempt.in_doubt else f"cut at {attempt.phase.upper()}"
    if attempt.outcome in ("4xx", "5xx"):
        return f"{attempt.reply[:3]} at {attempt.phase.upper() if attempt.phase != 'dot' else 'end of DATA'}"
    return attempt.outcome


def print_report(report: Report, options: Options) -> None:
    print(f"\nChaos, {report.messages} messages over {options.sessions} sessions from "
          f"{CLIENT_IPS[0]}-{CLIENT_IPS[-1].rsplit('.', 1)[1]}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on "
          f"{platform.node()} ({os.cpu_count()} cores); load {report.load_seconds:.0f}s, "
          f"drain {report.drain_seconds:.0f}s")
    print("  replies: " + ", ".join(f"{k} {v}" for k, v in sorted(report.replies.items(), key=lambda kv: -kv[1])))
    if report.connect_errors:
        print("  connections that never reached MAIL: "
              + ", ".join(f"{k} {v}" for k, v in report.connect_errors.most_common()))
    print(f"  accepted {report.accepted} = delivered {report.delivered} + quarantined {report.quarantined}"
          f" + bounced {report.bounced} + lost {report.lost}; refused {report.refused}; "
          f"duplicates {report.duplicates}; lost {report.lost}; refused yet found downstream {report.leaked}")
    if report.outbound_window:
        print(f"  of the duplicates, {report.outbound_window} in the RFC 1047 window of the outbound hop "
              f"(the delivery sink killed between the downstream's 250 and its own record of it)")
    if report.in_doubt:
        print("  in doubt (cut while waiting for the reply to DATA, RFC 1047): "
              + ", ".join(f"{k} {v}" for k, v in report.in_doubt.most_common()))
    print(f"  verdicts: {dict(report.verdict_actions)}; second verdicts (ignored by the sinks): "
          f"{report.second_verdicts}")
    print(f"  sent again by the safety net (no verdict in time): {report.resent_messages} messages, "
          f"{report.resent_copies} copies")
    print(f"  {'killed':<15}{'at s':>7}{'down s':>8}{'250 again s':>13}{'delivered again s':>19}")
    for kill in report.kills:
        down = f"{kill.restarted - kill.at:.1f}" if kill.restarted else "-"
        again = f"{kill.accepted_after:.1f}" if kill.accepted_after is not None else "never"
        delivered = f"{kill.delivered_after:.1f}" if kill.delivered_after is not None else "never"
        print(f"  {kill.victim:<15}{kill.at - report.origin:>7.1f}{down:>8}{again:>13}{delivered:>19}  {kill.error}")
    for line in report.exits:
        print(f"  exited on its own: {line}")
    for line in report.problems[:30]:
        print(f"  PROBLEM {line}")
    print(f"  {'ok' if report.ok else 'FAILED'}: duplicates {report.duplicates}, lost {report.lost}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=Options.messages)
    parser.add_argument("--sessions", type=int, default=Options.sessions, help="concurrent SMTP sessions")
    parser.add_argument("--per-session", type=int, default=Options.per_session, help="messages per session")
    parser.add_argument("--rounds", type=int, default=Options.rounds, help="times each component is killed")
    parser.add_argument("--down", type=float, default=Options.down, help="seconds a killed component stays down")
    parser.add_argument("--only", action="append", choices=VICTIMS, help="kill only these (repeatable)")
    args = parser.parse_args(argv)
    options = Options(messages=args.messages, sessions=args.sessions, per_session=args.per_session,
                      rounds=args.rounds, down=args.down, victims=tuple(args.only or VICTIMS))
    report = run_chaos(options)
    print_report(report, options)
    return 0 if report.ok else 1


def run() -> None:
    main([])


if __name__ == "__main__":
    sys.exit(main())
