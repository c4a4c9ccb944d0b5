"""The delivery sink: delivers what the verdicts (and released quarantine) say to deliver.

It consumes ``mail.verdicts`` and ``quarantine.events`` and keeps its own
queue (RocksDB, like Postfix's queue directories) of what it still has to
deliver. A message enters the queue once, keyed by message id: a verdict
consumed twice finds it already there, so nothing is delivered twice. The
Kafka offset is committed only after the queue write is on disk.

Each due entry is delivered with aiosmtplib to the domain's mail servers (or
the default ones, as the guide recommends), or to a smarthost or the MX for
other domains. 4xx and connection failures are retried on the policy's
schedule; 5xx, or a recipient still deferred after the delivery period, gets
a DSN to the sender. Every attempt is a ``delivery.attempted`` event.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from datetime import datetime, timedelta
from email.utils import format_datetime

import aiosmtplib

from bulwark import auth_results, metrics
from bulwark.backscatter import Keyring, sign
from bulwark.blobstore import BlobStore
from bulwark.created_domains import CreatedDomains
from bulwark.kafka import BATCHING_LINGER_MS, EventPublisher, consume, start_publisher
from bulwark.policy import Policy
from bulwark.policy.runtime import PolicyHolder
from bulwark.service import configure_logging, run_until_signalled
from bulwark.settings import Settings
from bulwark.state import StateView
from schemas import codec
from schemas import events as ev
from schemas.events import new_id, utcnow
from schemas.topics import ACCOUNT_STATE, MTA_STS_POLICIES, QUARANTINE, TLS_FALLBACKS, VERDICTS
from sinks.connections import ConnectionCache
from sinks.dkim_sign import OutboundSigner, SigningFailed
from sinks.dsn import build_dsn
from sinks.first_verdict import FirstVerdicts
from sinks.mta_sts import MtaStsResolver, mx_matches
from sinks.notify import notifications
from sinks.outbound_tls import (TlsFailure, TlsRequirement, client_context, open_connection, requirement,
                                route_allowed, tls_required_no)
from sinks.routing import Destination, Route, RouteError, mx_routes, resolver_for
from sinks.store import JsonIndex
from sinks.tagging import tag_subject

log = logging.getLogger(__name__)


#: How often finished deliveries past the retention are forgotten.
PRUNE_EVERY_SECONDS = 3600


#: Connections at once to one destination domain (Postfix's
#: default_destination_concurrency_limit is 20; a receiving domain that
#: rate-limits by connection sees fewer).
DESTINATION_CONCURRENCY = 20
#: Deliveries at once in all (Postfix's default_process_limit is 100).
MAX_CONCURRENT_DELIVERIES = 64
#: How often the queue depth is measured: it reads the whole due index, and
#: the scheduler wakes at every finished delivery.
DEPTH_EVERY_SECONDS = 1.0


def received_header(policy: Policy, message_id: str, envelope: ev.Envelope, recipients: list[str]) -> bytes:
    """The trace header (RFC 5321 4.4) for the hop into Bulwark."""
    proto = "ESMTP" + ("S" if envelope.tls else "") + ("A" if envelope.authenticated_user else "")
    helo = envelope.client_helo or "unknown"
    header = (
        f"Received: from {helo} ([{envelope.client_ip}])\r\n"
        f"\tby {policy.hostname} (Bulwark) with {proto} id {message_id}"
    )
    if len(recipients) == 1:
        header += f"\r\n\tfor <{recipients[0]}>"
    return f"{header}; {format_datetime(envelope.received_at)}\r\n".encode()


class DeliverySink:
    def __init__(self, settings: Settings, policy: Policy | PolicyHolder, publisher: EventPublisher, queue: JsonIndex):
        self.settings = settings
        # Every read of self.policy is the policy in force now (routes,
        # retry schedule, credentials follow `bulwark policy apply`).
        self.policy = PolicyHolder.of(policy)
        self.publisher = publisher
        self.queue = queue
        self.blobs = BlobStore(settings.blob_dir)
        self._in_flight: set[str] = set()
        #: (due time, message id) of every entry still to deliver: the
        #: scheduler pops what is due instead of reading the whole queue.
        self._due: list[tuple[float, str]] = []
        self.retention = timedelta(days=settings.delivery_retention_days)
        self._pruned_at = 0.0
        self._depth_at = 0.0
        #: Entries whose outbox a broker outage left unpublished.
        self._unpublished: set[str] = set()
        #: Background syncs of the queue started by recorded attempts.
        self._syncs: set[asyncio.Task] = set()
        self._publishing: set[str] = set()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_DELIVERIES)
        self._publisher_task: asyncio.Task | None = None
        self._destination_slots: dict[str, asyncio.Semaphore] = {}
        #: The first verdict per message (sinks/first_verdict.py); None: every verdict counts.
        self.first_verdicts: FirstVerdicts | None = None
        #: Idle connections kept for the next message to the same server.
        self.connections = ConnectionCache(settings.delivery_connection_cache_seconds)
        self.resolver = resolver_for(settings.dns_resolver)
        #: MTA-STS policies (the shared cache is the delivery.mta-sts topic, set by serve()).
        self.mta_sts = MtaStsResolver(self.resolver, client_context(settings.outbound_ca_file, True, True),
                                      settings.mta_sts_https_port, publish=lambda e: self.publisher.publish(e))
        #: Destinations given cleartext after a failed TLS negotiation: the
        #: delivery.tls-fallbacks view (serve()) and this process's own.
        self.tls_fallbacks = None
        self._fallbacks: dict[str, ev.TlsFallbackStarted] = {}
        #: Domains made local by automatic domain creation: routed like local ones.
        self.created_domains = CreatedDomains()
        #: Backscatter Protection keys; None signs nothing (e.g. in unit tests).
        self.keyring: Keyring | None = None
        #: Outbound DKIM signing (the policy's dkim_signing keys).
        self.dkim = OutboundSigner(self)

    # -- taking work in -----------------------------------------------------

    def _entry(self, message_id: str, session_id: str | None, source: str, envelope: ev.Envelope,
               recipients: list[str], extra_headers: dict[str, str] | None = None) -> dict:
        now = utcnow()
        return {
            "message_id": message_id,
            "session_id": session_id,
            "source": source,
            "envelope": envelope.model_dump(mode="json"),
            "recipients": {r: {"state": "pending", "reply_code": None, "reply": None} for r in recipients},
            "extra_headers": extra_headers or {},
            "attempts": 0,
            "first_queued_at": now.isoformat(),
            "next_attempt_at": now.isoformat(),
            "done": False,
            "queued_event_sent": False,
            # Events about this entry not yet acknowledged by Kafka, oldest
            # first (an outbox): what happened is written here, with the
            # entry, before it is published, so a broker outage after a
            # remote 250 never makes the message look undelivered.
            "outbox": [],
        }

    def _work_from(self, event: ev.Event) -> dict | None:
        if isinstance(event, ev.Verdict):
            return self._mark_tags(event, self._authenticated(event, self._verdict_entry(event)))
        elif isinstance(event, ev.QuarantineReleased):
            # Released to other addresses: say whom it was for, as a redirect does.
            extra = {"X-Bulwark-Released-For": ", ".join(event.envelope.rcpt_to)} if event.to else None
            return self._entry(event.message_id, event.session_id, "release", event.envelope, event.recipients,
                               extra)
        return None

    def _verdict_entry(self, event: ev.Verdict) -> dict | None:
        if event.action == "deliver":
            return self._entry(event.message_id, event.session_id, "verdict", event.envelope, event.envelope.rcpt_to)
        if event.action == "redirect" and event.redirect_to:
            return self._entry(
                event.message_id, event.session_id, "verdict", event.envelope, [event.redirect_to],
                {"X-Bulwark-Redirected-For": ", ".join(event.envelope.rcpt_to)},
            )
        return None

    def _authenticated(self, event: ev.Verdict, entry: dict | None) -> dict | None:
        # Sender authentication (RFC 8601): the verdict's Authentication-Results
        # header, first of the headers this sink adds.
        if entry is not None and event.authentication_results:
            entry["extra_headers"] = {auth_results.FIELD: event.authentication_results, **entry["extra_headers"]}
        return entry

    def _mark_tags(self, event: ev.Verdict, entry: dict | None) -> dict | None:
        # The "tag" action (DLP): deliver, but say what was found, in a header
        # and, if the policy asks, in the subject the recipient sees.
        if entry is not None and event.tags:
            entry["extra_headers"]["X-Bulwark-Tags"] = ", ".join(event.tags)
            entry["subject_prefix"] = self.policy.tag_subject_prefix
        return entry

    async def _queue_notifications(self, events: list[ev.Event]) -> None:
        """Queue the administrators' notifications these events call for (sinks/notify.py)."""
        policy = self.policy.current if hasattr(self.policy, "current") else self.policy
        for note in notifications(policy, events):
            if note.message_id in self.queue:
                continue  # queued when this event came before
            digest = await self.blobs.put(note.raw)
            envelope = ev.Envelope(
                mail_from="", rcpt_to=note.recipients, sha256=digest, size=len(note.raw),
                client_ip="127.0.0.1", client_helo=policy.hostname, received_at=utcnow(),
            )
            entry = self._entry(note.message_id, note.session_id, "notification", envelope, envelope.rcpt_to)
            self.queue.put(note.message_id, entry)
            await self._announce(entry)
            self._schedule(entry)

    async def take(self, events: list[ev.Event]) -> None:
        """Queue the work these events ask for; idempotent on message id."""
        await self._queue_notifications(events)
        if self.first_verdicts is not None:
            events = await self.first_verdicts.admit(events)
        new: dict[str, dict] = {}
        too_old = utcnow() - self.retention
        for event in events:
            if event.occurred_at < too_old:
                # Its queue entry may be pruned already (a consumer group
                # whose offsets expired reads from the beginning): acting on
                # it could deliver a second time.
                log.warning("%s for %s is older than the delivery retention; not acted on", event.TYPE,
                            event.message_id)
                continue
            entry = self._work_from(event)
            if entry and entry["message_id"] not in self.queue and entry["message_id"] not in new:
                new[entry["message_id"]] = entry
        # On disk before the offsets are committed: an fsync shared with the deliveries'.
        self.queue.put_many(new, synced=False)
        await self.queue.sync()
        # Announce what was queued, including entries queued before a crash
        # that never got their event out; only then may they be delivered, so
        # delivery.queued always precedes delivery.attempted on the topic.
        # The queue already holds them, so the offsets may be committed even
        # if Kafka cannot take the announcements now: they are retried.
        for event in events:
            entry = self.queue.get(event.message_id) if event.message_id else None
            if entry and not entry["queued_event_sent"]:
                self._unpublished.add(entry["message_id"])
        await self._republish()

    async def _announce(self, entry: dict) -> None:
        await self.publisher.publish(
            ev.DeliveryQueued(
                message_id=entry["message_id"],
                session_id=entry["session_id"],
                source=entry["source"],
                recipients=list(entry["recipients"]),
            )
        )
        # Only the flag, on the entry as it is now: the copy in hand may be
        # stale (a delivery can finish while the publish waits), and writing
        # it back would make a delivered message due again: a duplicate.
        # Not synced: lost to a power cut, the flag only makes the
        # announcement go out again (it is at-least-once anyway), and the
        # attempt's sync puts it on disk first, since the log is written in
        # order (sinks/store.py).
        current = self.queue.get(entry["message_id"])
        if current is not None:
            current["queued_event_sent"] = True
            self.queue.put(entry["message_id"], current, synced=False)

    def _schedule(self, entry: dict) -> None:
        if not entry["done"] and entry["next_attempt_at"]:
            heapq.heappush(self._due, (datetime.fromisoformat(entry["next_attempt_at"]).timestamp(), entry["message_id"]))
            self._wake.set()

    async def recover(self) -> None:
        """After a start: schedule what is still to deliver, publish what was not published.

        The one full read of the queue; from here on the due index says what is due.
        """
        for message_id, entry in self.queue.items():
            if entry.get("outbox") or not entry["queued_event_sent"]:
                self._unpublished.add(message_id)
            elif not entry["done"]:
                self._schedule(entry)
        await self._republish()

    async def _flush_outbox(self, entry: dict) -> None:
        """Publish the entry's recorded events in order; each leaves the outbox once acknowledged."""
        while entry["outbox"]:
            head = entry["outbox"][0]
            await self.publisher.publish(codec.decode(head.encode()))
            entry["outbox"].pop(0)
            # From the entry as stored now, not this copy: a delivery may have
            # appended events (and written its outcome) while this publish waited.
            stored = self.queue.get(entry["message_id"])
            if stored is not None and stored.get("outbox") and stored["outbox"][0] == head:
                stored["outbox"].pop(0)
                # Not synced: lost to a power cut, the event goes out again
                # with its own event id, which consumers already meet after
                # a crash between the publish and this write.
                self.queue.put(entry["message_id"], stored, synced=False)

    # -- delivering ---------------------------------------------------------

    async def _destination(self, domain: str) -> Destination:
        """Where mail for ``domain`` goes (sinks/routing.py); RouteError when nowhere."""
        if self.policy.is_local_domain(domain) or domain in self.created_domains:
            servers = self.policy.servers_for_domain(domain)
            if not servers:
                raise RouteError("4.3.5", f"no mail server for local domain {domain} and no default mail server")
            return Destination(domain, "local", [Route(s.host, s.port, auth=s.requires_smtp_auth,
                                                       pin_sha256=s.tls_pin_sha256) for s in servers])
        if self.policy.delivery.smarthost:
            host, _, port = self.policy.delivery.smarthost.rpartition(":")
            return Destination(domain, "smarthost", [Route(host, int(port))])
        return Destination(domain, "mx", await mx_routes(self.resolver, domain, self.settings.mx_port))

    def _cleartext_retry(self, route: Route) -> bool:
        key = f"{route.host}:{route.port}"
        memory = [self._fallbacks.get(key), self.tls_fallbacks.get(key) if self.tls_fallbacks else None]
        return any(m is not None and m.until > utcnow() for m in memory)

    async def _remember_cleartext(self, route: Route, reason: str) -> None:
        """The guide's rule: after a failed TLS negotiation, this destination
        gets cleartext for a while (policy tls.outbound.cleartext_retry_minutes)."""
        minutes = self.policy.tls.outbound.cleartext_retry_minutes
        if not minutes:
            return
        event = ev.TlsFallbackStarted(destination=f"{route.host}:{route.port}",
                                      until=utcnow() + timedelta(minutes=minutes), reason=reason[:300])
        self._fallbacks[event.destination] = event
        log.warning("TLS with %s failed; cleartext until %s: %s", event.destination,
                    event.until.isoformat(timespec="seconds"), reason)
        try:
            await self.publisher.publish(event)
        except Exception as exc:  # the memory of this process still applies
            log.warning("could not record the TLS fallback for %s: %s", event.destination, type(exc).__name__)

    async def _send(self, route: Route, req: TlsRequirement, mail_from: str, rcpts: list[str], data: bytes,
                    record=None):
        """(per-recipient results, TLS outcome) for one SMTP transaction.

        ``record(results, tls)`` is called as soon as the server has answered
        the DATA, before QUIT: a crash after the remote 250 must find the
        recipient delivered, or it would be sent again. Raises TlsFailure
        when the TLS policy cannot be met, OSError or SMTPException when the
        server cannot be reached.
        """
        # Reused only for the same server, name, credentials and TLS requirement.
        key = (str(route), route.host, route.auth.username if route.auth else None, route.pin_sha256, req)
        cached = await self.connections.take(key)
        if cached is not None:
            client, tls, opened = cached
        else:
            opened = time.monotonic()
            client, tls = await open_connection(route, req, local_hostname=self.policy.hostname,
                                                timeout=self.policy.delivery.connect_timeout_seconds,
                                                ca_file=self.settings.outbound_ca_file)
            if route.auth is not None:
                await _login(client, route, tls)
        results: dict[str, ev.RecipientResult] = {}
        keep = False
        try:
            try:
                errors, response = await client.sendmail(mail_from, rcpts, data,
                                                         mail_options=["REQUIRETLS"] if req.requiretls else [])
                for rcpt in rcpts:
                    if rcpt in errors:
                        refusal = errors[rcpt]
                        results[rcpt] = _result(rcpt, refusal.code, refusal.message)
                    else:
                        results[rcpt] = ev.RecipientResult(recipient=rcpt, outcome="delivered", reply_code=250,
                                                           reply=response)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                for refused in exc.recipients:
                    results[refused.recipient] = _result(refused.recipient, refused.code, refused.message)
            except aiosmtplib.SMTPResponseException as exc:  # MAIL or DATA refused: all recipients share it
                for rcpt in rcpts:
                    results.setdefault(rcpt, _result(rcpt, exc.code, exc.message))
            ordered = [results[r] for r in rcpts]
            if record is not None:
                record(ordered, tls)
            # A clean transaction leaves the session ready for the next MAIL.
            keep = all(r.outcome == "delivered" for r in ordered)
        finally:
            if not (keep and self.connections.idle_seconds > 0 and self.connections.give(key, client, tls, opened)):
                try:
                    await client.quit()
                except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                    client.close()
        return ordered, tls

    def _return_path(self, mail_from: str, rcpt_domain: str) -> str:
        """Backscatter Protection: mail leaving for other domains carries a
        signed return path when its sender is local, so only genuine
        bounces and auto-replies can come back (ingest/guards/backscatter.py)."""
        policy, cfg = self.policy.current, self.policy.current.backscatter
        leaving = not (policy.is_local_domain(rcpt_domain) or rcpt_domain in self.created_domains)
        local_sender = policy.is_local_domain(mail_from.rpartition("@")[2])
        if not (cfg.enabled and self.keyring is not None and mail_from and leaving and local_sender):
            return mail_from
        now = utcnow()
        key, _ = self.keyring.keys(now, cfg.validity_days)
        return sign(mail_from, key, now, cfg.validity_days)

    async def deliver(self, entry: dict) -> None:
        with metrics.DELIVERY_SECONDS.time():
            await self._deliver(entry)

    async def _deliver(self, entry: dict) -> None:
        envelope = ev.Envelope.model_validate(entry["envelope"])
        message_id = entry["message_id"]
        pending = [r for r, s in entry["recipients"].items() if s["state"] == "pending"]
        entry["attempts"] += 1
        raw = await self.blobs.get(envelope.sha256)
        # RFC 8601 section 5: no Authentication-Results claiming this gateway's name gets past it.
        raw = auth_results.without_own(raw, self.policy.hostname)
        if entry.get("subject_prefix"):
            raw = tag_subject(raw, entry["subject_prefix"])
        extra = "".join(f"{k}: {v}\r\n" for k, v in entry["extra_headers"].items()).encode()

        by_domain: dict[str, list[str]] = {}
        for rcpt in pending:
            by_domain.setdefault(rcpt.rpartition("@")[2].lower(), []).append(rcpt)

        outcomes: list[ev.RecipientResult] = []
        last_remote = None
        ignore_policies = tls_required_no(raw)
        for domain, rcpts in by_domain.items():
            data = received_header(self.policy, message_id, envelope, rcpts) + extra + raw
            try:  # last: the signatures cover every header added above
                data = await self.dkim.sign(entry, envelope, domain, data)
            except SigningFailed as exc:
                outcomes += self.dkim.defer(entry, domain, rcpts, exc)
                continue
            mail_from = self._return_path(entry["envelope"]["mail_from"], domain)
            slots = self._destination_slots.setdefault(domain, asyncio.Semaphore(DESTINATION_CONCURRENCY))
            async with slots:
                results, remote = await self._deliver_to(entry, envelope, domain, rcpts, mail_from, data,
                                                         ignore_policies)
            last_remote = remote or last_remote
            outcomes += results

        await self._settle(entry, envelope, outcomes, last_remote, raw)

    async def _deliver_to(self, entry: dict, envelope: ev.Envelope, domain: str, rcpts: list[str],
                          mail_from: str, data: bytes, ignore_policies: bool):
        """(results, last server) for one domain's recipients; each attempt recorded as it ends.

        Every route is tried before deferring (RFC 5321 5.1); the next one
        only when this one could not be reached or could not meet the TLS
        policy. A REQUIRETLS message that no route can carry securely
        bounces with 5.7.30 (RFC 8689); anything else that failed is deferred.
        """
        def every(outcome: str, code: int | None, reply: str) -> list[ev.RecipientResult]:
            return [ev.RecipientResult(recipient=r, outcome=outcome, reply_code=code, reply=reply) for r in rcpts]

        try:
            destination = await self._destination(domain)
        except RouteError as exc:
            if exc.permanent:
                # RFC 7505 section 4.1: 556 for a null MX.
                return every("bounced", 556 if exc.status == "5.1.10" else 550, str(exc)), None
            return every("deferred", None, str(exc)), None
        sts = None
        if destination.kind == "mx" and self.policy.tls.mta_sts.enabled and (envelope.requiretls or not ignore_policies):
            sts = await self.mta_sts.policy(domain)
        tls_tried: list[TlsFailure] = []
        results: list[ev.RecipientResult] = []
        last = None
        for route in destination.routes:
            req = requirement(
                starttls_enabled=self.policy.tls.outbound.starttls, requiretls=envelope.requiretls,
                ignore_policies=ignore_policies, route_kind=destination.kind, mta_sts=sts,
                cleartext_retry=self._cleartext_retry(route), auth=route.auth is not None,
                pinned=route.pin_sha256 is not None,
            )
            refused = route_allowed(route, req)
            if refused is not None:
                # Not connected to, but recorded: TLS reports count it as a failed session.
                failure = TlsFailure(refused, f"{route}: {refused.verify_error}", permanent=req.requiretls)
                tls_tried.append(failure)
                self._record(entry, self._attempt(entry, destination, route, refused,
                                                  every("deferred", None, f"4.7.5 {failure}")))
                continue
            last = route.host
            recorded = []

            def record(results, tls, route=route, req=req):
                recorded.append(True)
                self._record(entry, self._attempt(entry, destination, route, testing_failure(route, req, tls),
                                                  results))

            try:
                results, tls = await self._send(route, req, mail_from, rcpts, data, record)
            except TlsFailure as exc:
                tls_tried.append(exc)
                if exc.negotiation and not req.strict:
                    await self._remember_cleartext(route, str(exc))
                results = every("deferred", None, f"4.7.5 {exc}")
                self._record(entry, self._attempt(entry, destination, route, exc.outcome, results))
                continue
            except (OSError, asyncio.TimeoutError, aiosmtplib.SMTPException) as exc:
                if recorded:  # answered, then the connection failed at QUIT: the answer stands
                    return results, last
                results = every("deferred", None, f"4.4.1 {route}: {exc}")
                self._record(entry, self._attempt(entry, destination, route, None, results))
                continue
            if not recorded:
                record(results, tls)
            return results, last
        if tls_tried and all(f.permanent for f in tls_tried) and envelope.requiretls:
            reasons = "; ".join(str(f) for f in tls_tried)
            return every("bounced", 550, f"5.7.30 REQUIRETLS support required: {reasons}"), last
        if tls_tried and len(tls_tried) == len(destination.routes):
            reasons = "; ".join(str(f) for f in tls_tried)
            return every("deferred", None, f"4.7.5 the TLS policy ({tls_tried[0].outcome.policy}) "
                                           f"could not be met: {reasons}"), last
        return results or every("deferred", None, "4.4.1 no server could be reached"), last

    def _record(self, entry: dict, attempt: ev.DeliveryAttempted) -> None:
        """One attempt recorded before anything else happens: its delivered
        recipients are done (never sent again, whatever crashes next) and its
        event waits in the outbox. No await between read and write.

        In the write-ahead log at once (a crash of the process keeps it), on
        disk a moment later: the fsync starts now, shared with the other
        deliveries' (``JsonIndex.sync``), and ``_settle`` waits for it.
        """
        message_id = entry["message_id"]
        stored = self.queue.get(message_id) or entry
        for result in attempt.recipients:
            if result.outcome == "delivered":
                for copy in (stored, entry):
                    copy["recipients"][result.recipient].update(state="delivered", reply_code=result.reply_code,
                                                                reply=result.reply)
        stored["outbox"] = [*stored.get("outbox", []), codec.encode(attempt)[0].decode()]
        self.queue.put(message_id, stored, synced=False)
        self._sync_soon(message_id)

    def _sync_soon(self, message_id: str) -> None:
        """Start putting the queue's relaxed writes on disk (one fsync for all
        waiting); the entry's events may be published once they are."""
        async def sync() -> None:
            await self.queue.sync()
            self._unpublished.add(message_id)

        task = asyncio.ensure_future(sync())
        self._syncs.add(task)
        task.add_done_callback(self._synced)

    def _synced(self, task: asyncio.Task) -> None:
        self._syncs.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # _settle's own sync fails too and the delivery is retried as recorded.
            log.error("the delivery queue could not be synced to disk: %s", task.exception())

    def _attempt(self, entry: dict, destination: Destination, route: Route, tls: ev.TlsOutcome | None,
                 results: list[ev.RecipientResult]) -> ev.DeliveryAttempted:
        deferred = any(r.outcome == "deferred" for r in results)
        return ev.DeliveryAttempted(
            message_id=entry["message_id"],
            session_id=entry["session_id"],
            attempt=entry["attempts"],
            server=str(route),
            destination=destination.domain,
            mx_host=route.host,
            tls=tls,
            recipients=results,
            next_attempt_at=self._next_attempt(entry) if deferred else None,
        )

    def _next_attempt(self, entry: dict) -> datetime:
        schedule = self.policy.delivery.retry_schedule_seconds
        wait = schedule[min(entry["attempts"], len(schedule)) - 1]
        return utcnow() + timedelta(seconds=wait)

    async def _settle(self, entry: dict, envelope: ev.Envelope, outcomes: list[ev.RecipientResult],
                      remote: str | None, raw: bytes) -> None:
        """Record what is left to do in the queue (one synced write), then publish.

        The queue is what says a recipient was delivered (each attempt wrote
        its own outcome already: ``_record``): once the remote server said
        250, nothing (a broker outage, a crash) may make the message due
        again. Its events wait in the entry's outbox until Kafka has them.
        """
        first = datetime.fromisoformat(entry["first_queued_at"])
        expired = utcnow() - first >= timedelta(seconds=self.policy.delivery.give_up_after_seconds)
        bounced: list[ev.RecipientResult] = []
        for result in outcomes:
            state = entry["recipients"][result.recipient]
            state.update(reply_code=result.reply_code, reply=result.reply)
            if result.outcome == "deferred" and expired:
                result = result.model_copy(update={"outcome": "bounced"})
            state["state"] = result.outcome
            if result.outcome == "bounced":
                bounced.append(result)
        still_pending = any(s["state"] == "deferred" for s in entry["recipients"].values())
        for result in outcomes:
            metrics.DELIVERY_RECIPIENTS.labels(outcome=entry["recipients"][result.recipient]["state"]).inc()
        metrics.MESSAGES.labels(action="bounced" if bounced else "deferred" if still_pending else "delivered").inc()
        for state in entry["recipients"].values():
            if state["state"] == "deferred":
                state["state"] = "pending"
        entry["done"] = not still_pending
        entry["next_attempt_at"] = self._next_attempt(entry).isoformat() if still_pending else None
        events: list[ev.Event] = []
        dsn_entry = None
        if bounced:
            dsn_entry, bounce = await self._bounce(entry, envelope, bounced, remote, raw)
            events.append(bounce)
        # The outbox and the announcement flag as stored now: publishing
        # changes them while deliveries run; this copy's are stale.
        stored = self.queue.get(entry["message_id"]) or entry
        entry["outbox"] = [*stored.get("outbox", []), *(codec.encode(e)[0].decode() for e in events)]
        entry["queued_event_sent"] = stored.get("queued_event_sent", entry["queued_event_sent"])
        self.queue.put(entry["message_id"], entry, synced=False)
        # On disk, with this delivery's attempts, before its events may go
        # out or it is due again.
        await self.queue.sync()
        self._schedule(entry)
        if dsn_entry is not None:
            self._unpublished.add(dsn_entry["message_id"])
        self._unpublished.add(entry["message_id"])
        # Published by the scheduler, not here: a delivery slot is not held
        # for the broker's acknowledgement (that bounded deliveries at 16 per
        # publish round trip).
        self._wake.set()

    async def _bounce(self, entry: dict, envelope: ev.Envelope, bounced: list[ev.RecipientResult],
                      remote: str | None, raw: bytes) -> tuple[dict | None, ev.DeliveryBounced]:
        """The DSN's queue entry (written, not yet announced) and the bounce event."""
        dsn_id, dsn_entry = None, None
        # Never answer the null sender, and never bounce a bounce (RFC 5321 6.1).
        if envelope.mail_from and entry["source"] != "dsn":
            dsn_id = new_id()
            dsn = build_dsn(self.policy.hostname, entry["message_id"], envelope, bounced, remote, raw)
            digest = await self.blobs.put(dsn)
            dsn_envelope = ev.Envelope(
                mail_from="", rcpt_to=[envelope.mail_from], sha256=digest, size=len(dsn),
                client_ip="127.0.0.1", client_helo=self.policy.hostname, received_at=utcnow(),
            )
            dsn_entry = self._entry(dsn_id, entry["session_id"], "dsn", dsn_envelope, [envelope.mail_from])
            self.queue.put(dsn_id, dsn_entry)
        return dsn_entry, ev.DeliveryBounced(
            message_id=entry["message_id"], session_id=entry["session_id"],
            recipients=bounced, dsn_message_id=dsn_id,
        )

    async def _deliver_guarded(self, entry: dict) -> None:
        message_id = entry["message_id"]
        try:
            async with self._slots:
                await self.deliver(entry)
        except Exception:
            # Never drop it, and never send it again for what was already
            # delivered: the queue as written says what is left to do.
            log.exception("delivery of %s failed unexpectedly; will retry what is left", message_id)
            current = self.queue.get(message_id)
            if current is not None:
                if current.get("outbox"):
                    self._unpublished.add(message_id)
                if not current["done"] and datetime.fromisoformat(current["next_attempt_at"]) <= utcnow():
                    # Failed before any outcome was recorded: the next try as scheduled.
                    current["next_attempt_at"] = self._next_attempt(entry).isoformat()
                    current["attempts"] = entry["attempts"]
                    self.queue.put(message_id, current)
                self._schedule(current)
        finally:
            self._in_flight.discard(message_id)

    def record_depth(self) -> int:
        """Set the queue-depth gauges: entries waiting for an attempt (the due index) or being delivered."""
        depth = len({message_id for _, message_id in self._due} | self._in_flight)
        metrics.DELIVERY_QUEUE.set(depth)
        metrics.DELIVERY_IN_FLIGHT.set(len(self._in_flight))
        return depth

    def due(self) -> list[dict]:
        """The entries whose next attempt is due, from the due index."""
        now = utcnow().timestamp()
        entries = []
        while self._due and self._due[0][0] <= now:
            _, message_id = heapq.heappop(self._due)
            entry = self.queue.get(message_id)
            if entry is None or entry["done"] or message_id in self._in_flight or not entry["next_attempt_at"]:
                continue
            if datetime.fromisoformat(entry["next_attempt_at"]).timestamp() > now:
                self._schedule(entry)  # rescheduled since it was indexed
                continue
            if any(e["message_id"] == message_id for e in entries):
                continue
            entries.append(entry)
        return entries

    async def _republish(self) -> None:
        """Publish what entries recorded but Kafka does not have yet: their outbox, and
        the announcement a new entry waits for before it may be delivered. A
        broker outage delays this, never the deliveries' own record."""
        async def publish(message_id: str) -> None:
            if message_id in self._publishing:  # another caller is at it: never publish twice
                return
            self._publishing.add(message_id)
            try:
                entry = self.queue.get(message_id)
                if entry is not None:
                    await self._flush_outbox(entry)
                    if not entry["queued_event_sent"]:
                        await self._announce(entry)
                    self._schedule(entry)
                stored = self.queue.get(message_id)
                if stored is None or not stored.get("outbox"):  # else: added while this ran, next round
                    self._unpublished.discard(message_id)
            finally:
                self._publishing.discard(message_id)

        # Concurrently: one entry's events keep their order, and the entries
        # share the producer's batches instead of waiting for one ack each
        # (a batch of 50 verdicts took a second one after the other).
        pending = list(self._unpublished)
        outcomes = await asyncio.gather(*(publish(m) for m in pending), return_exceptions=True)
        failed = [(m, o) for m, o in zip(pending, outcomes) if isinstance(o, Exception)]
        if failed:
            log.warning("events of %d entries unpublished for now (%s); retrying",
                        len(failed), type(failed[0][1]).__name__)

    def _prune_sync(self) -> int:
        cutoff = utcnow() - self.retention
        finished = [key for key, entry in self.queue.items()
                    if entry["done"] and not entry.get("outbox")
                    and datetime.fromisoformat(entry["first_queued_at"]) < cutoff]
        self.queue.delete_many(finished)
        return len(finished)

    async def prune(self) -> int:
        """Forget finished deliveries older than the retention, so the queue does
        not grow for ever. On a thread: it reads the whole queue (once an hour)."""
        pruned = await asyncio.to_thread(self._prune_sync)
        if self.first_verdicts is not None:
            await asyncio.to_thread(self.first_verdicts.prune)
        if pruned:
            log.info("forgot %d finished deliveries older than %s", pruned, self.retention)
        return pruned

    async def scheduler(self) -> None:
        await self.recover()
        while True:
            if asyncio.get_running_loop().time() - self._pruned_at > PRUNE_EVERY_SECONDS:
                self._pruned_at = asyncio.get_running_loop().time()
                await self.prune()
            if self._unpublished and (self._publisher_task is None or self._publisher_task.done()):
                # In the background: new deliveries start while events are acknowledged.
                self._publisher_task = asyncio.create_task(self._republish())
            await self.connections.sweep()
            for entry in self.due():
                self._in_flight.add(entry["message_id"])
                asyncio.create_task(self._deliver_guarded(entry))
            if asyncio.get_running_loop().time() - self._depth_at >= DEPTH_EVERY_SECONDS:
                self._depth_at = asyncio.get_running_loop().time()
                self.record_depth()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.delivery_poll_seconds)
            except asyncio.TimeoutError:
                pass


async def _login(client: aiosmtplib.SMTP, route: Route, tls: ev.TlsOutcome) -> None:
    """Log in to a domain mail server that requires SMTP AUTH (after STARTTLS).

    Only over TLS whose certificate was validated (or matched the policy's
    pin): a password sent to an unauthenticated peer is a password given to
    whoever sits in the path. The password is read only now, from its file
    or variable, and never logged: failures carry the server's reply or the
    kind of problem only.
    """
    if tls.version is None or not tls.verified:
        client.close()
        # Deferred, so a fixed TLS setup on the server gets the mail through.
        raise aiosmtplib.SMTPException("4.7.0 the server requires AUTH but its TLS certificate was not validated; "
                                       "credentials are never sent to an unauthenticated server")
    try:
        password = route.auth.password()
    except (OSError, LookupError) as exc:
        client.close()
        raise aiosmtplib.SMTPException(f"4.7.0 the SMTP AUTH password for {route} is unavailable: "
                                       f"{type(exc).__name__}") from None
    try:
        await client.login(route.auth.username, password)
    except aiosmtplib.SMTPException:
        client.close()
        raise
    finally:
        del password


def testing_failure(route: Route, req: TlsRequirement, tls: ev.TlsOutcome | None) -> ev.TlsOutcome | None:
    """Under MTA-STS testing (RFC 8461 section 5) mail goes anyway; what enforce would have refused is reported."""
    if tls is None or req.policy != "mta-sts-testing" or tls.failure is not None:
        return tls
    if not mx_matches(route.host, list(req.mx_patterns or ())):
        return tls.model_copy(update={"failure": "certificate-host-mismatch"})
    if not tls.verified:
        return tls.model_copy(update={"failure": "validation-failure" if tls.version else "starttls-not-supported"})
    return tls


def _result(rcpt: str, code: int, message: str) -> ev.RecipientResult:
    outcome = "bounced" if 500 <= code < 600 else "deferred"
    return ev.RecipientResult(recipient=rcpt, outcome=outcome, reply_code=code, reply=message)


async def serve(settings: Settings) -> None:
    from sinks.digest import digester  # per-user quarantine digests
    from sinks.tlsrpt import reporter  # the daily TLS reports (RFC 8460)

    configure_logging("delivery")
    policy = PolicyHolder(settings=settings)
    await policy.start()
    queue = JsonIndex(settings.data_dir / "delivery" / "queue")
    publisher = await start_publisher(settings, "bulwark-delivery", linger_ms=BATCHING_LINGER_MS)
    sink = DeliverySink(settings, policy, publisher, queue)
    first_verdicts = JsonIndex(settings.data_dir / "delivery" / "first-verdicts")
    sink.first_verdicts = FirstVerdicts(first_verdicts, sink.retention)
    # The TLS fallbacks and MTA-STS policies every delivery process shares.
    sink.tls_fallbacks = StateView(settings, TLS_FALLBACKS)
    sink.mta_sts.view = StateView(settings, MTA_STS_POLICIES)
    await sink.tls_fallbacks.start()
    await sink.mta_sts.view.start()
    sink.created_domains = CreatedDomains(settings)
    await sink.created_domains.start()
    sink.keyring = Keyring(settings)
    await sink.keyring.start()
    metrics.EVENT_BACKLOG.set_function(lambda: publisher.backlog)
    metrics_server = metrics.start("delivery", settings)
    try:
        await run_until_signalled(
            consume(settings, "bulwark-delivery", [VERDICTS.name, QUARANTINE.name, ACCOUNT_STATE.name], sink.take),
            sink.scheduler(),
            reporter(settings, sink),
            digester(settings, sink),
        )
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        await sink.connections.close()
        await sink.created_domains.stop()
        await sink.tls_fallbacks.stop()
        await sink.mta_sts.view.stop()
        await publisher.stop()
        queue.close()
        first_verdicts.close()
