"""The quarantine's pages: search, a safe message view, release and delete,
and a user's release link from a quarantine digest (no login).

The console reads the quarantine sink's index read-only and the blob store;
it changes nothing itself: a release or a deletion is the event ``bulwark
quarantine release|delete`` publishes, which the sinks act on.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import logging
import re
import secrets
from collections.abc import Callable
from typing import Any

from aiohttp import web

from bulwark import metrics
from console.web import LOGIN_COOKIE, ConsoleBase, Refused, see_other
from schemas import events as ev

log = logging.getLogger(__name__)

#: Text parts longer than this are cut in the message view.
TEXT_LIMIT = 200_000
LIST_LIMIT = 500
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
#: Why a digest link's release happened (the user types nothing: the link is the whole story).
DIGEST_REASON = "released by the recipient from the digest"


class Quarantine:
    """What the console reads the quarantine through (the sink's index, opened per request)."""

    def __init__(self, open_index: Callable[[], Any], read_blob: Callable[[str], bytes]):
        self._open = open_index
        self._read_blob = read_blob

    def records(self) -> list[dict]:
        index = self._open()
        if index is None:
            return []
        try:
            return [r for _, r in index.items()]
        finally:
            index.close()

    def get(self, message_id: str) -> dict | None:
        index = self._open()
        if index is None:
            return None
        try:
            return index.get(message_id)
        finally:
            index.close()

    def raw(self, record: dict) -> bytes | None:
        try:
            return self._read_blob(record["envelope"]["sha256"])
        except Exception as exc:  # a missing or corrupt blob: say so on the page
            log.warning("message %s unreadable from the blob store: %s", record.get("message_id"), exc)
            return None


def matches(record: dict, state: str, sender: str = "", recipient: str = "", reason: str = "",
            since: str = "", until: str = "") -> bool:
    """Whether a quarantine record passes the list's filters: case-insensitive
    substrings, and the UTC day it was held on between ``since`` and ``until`` (inclusive)."""
    if state != "all" and record.get("state") != state:
        return False
    day = record.get("quarantined_at", "")[:10]
    if (since and day < since) or (until and day > until):
        return False
    envelope = record.get("envelope", {})
    if sender and sender.lower() not in (envelope.get("mail_from") or "").lower():
        return False
    if recipient and not any(recipient.lower() in r.lower() for r in envelope.get("rcpt_to", [])):
        return False
    if reason and not any(reason.lower() in r.lower() for r in record.get("reasons", [])):
        return False
    return True


def describe(raw: bytes) -> dict:
    """A message as the view shows it: headers, text parts (as text, HTML too), attachments.

    Nothing here is ever rendered as HTML: the template escapes every string,
    and attachments are described (name, type, size, SHA-256), never served.
    """
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    headers = []
    for name, value in msg.raw_items():
        headers.append((name, " ".join(str(value).split())))
    texts, attachments = [], []
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename or part.get_content_disposition() == "attachment" or part.get_content_maintype() != "text":
            attachments.append({
                "name": filename or "(no name)", "type": part.get_content_type(), "size": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
            })
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            text = payload.decode(charset, errors="replace")
        except LookupError:  # an unknown charset name
            text = payload.decode("utf-8", errors="replace")
        texts.append({"type": part.get_content_type(), "text": text[:TEXT_LIMIT],
                      "cut": len(text) > TEXT_LIMIT})
    return {"headers": headers, "subject": str(msg.get("Subject", "")), "texts": texts,
            "attachments": attachments}


class QuarantinePages(ConsoleBase):
    async def quarantine_list(self, request: web.Request) -> web.Response:
        self.require(request, "admin", "helpdesk")
        q = {k: request.query.get(k, "").strip() for k in ("sender", "recipient", "reason", "since", "until")}
        for bound in ("since", "until"):
            if q[bound] and not DATE.match(q[bound]):
                q[bound] = ""  # not a date (a browser's date field sends YYYY-MM-DD): no bound
        state = request.query.get("state", "quarantined")
        records = await asyncio.to_thread(self.quarantine.records)
        rows = [r for r in records if matches(r, state=state, **q)]
        rows.sort(key=lambda r: r.get("quarantined_at", ""), reverse=True)
        return self.render("quarantine.html", request, {
            "rows": rows[:LIST_LIMIT], "more": max(0, len(rows) - LIST_LIMIT), "q": q, "state": state,
            "reasons": sorted({reason for r in records for reason in r.get("reasons", [])}),
        })

    async def quarantine_show(self, request: web.Request) -> web.Response:
        session = self.require(request, "admin", "helpdesk")
        record = await asyncio.to_thread(self.quarantine.get, request.match_info["message_id"])
        if record is None:
            raise Refused(404, "No such message in the quarantine.")
        raw = await asyncio.to_thread(self.quarantine.raw, record)
        return self.render("message.html", request, {
            "r": record, "parsed": describe(raw) if raw is not None else None,
            "csrf_token": session.csrf, "done": request.query.get("done"),
            "requested": self._requested(record), "reason_max": ev.REASON_MAX,
        })

    def _requested(self, record: dict) -> tuple[str, str] | None:
        """(action, by) while this console's release or deletion is not in the index yet."""
        if record["state"] != "quarantined":
            self.requested.pop(record["message_id"], None)
            return None
        return self.requested.get(record["message_id"])

    async def quarantine_act(self, request: web.Request) -> web.Response:
        session = self.require(request, "admin", "helpdesk")
        message_id, action = request.match_info["message_id"], request.match_info["action"]
        record = await asyncio.to_thread(self.quarantine.get, message_id)
        if record is None:
            raise Refused(404, "No such message in the quarantine.")
        if record["state"] != "quarantined":
            raise Refused(409, f"This message is already {record['state']}.")
        if requested := self._requested(record):
            raise Refused(409, f"{requested[1]} already asked to {requested[0]} this message.")
        by = session.admin.name
        form = await request.post()
        try:
            # Who and why: the audit trail (and `bulwark trace`) show both.
            reason = ev.audit_reason(str(form.get("reason", ""))[:4000])
        except ValueError:
            raise Refused(400, f"Not {'released' if action == 'release' else 'deleted'}: give a reason.") from None
        if action == "release":
            from console.addresses import AddressError, release_addresses

            to = None
            if "to" in form:  # the "release to another address" form
                try:
                    to = release_addresses(str(form["to"])[:4000])
                except AddressError as exc:
                    raise Refused(400, f"Not released: {exc}.") from None
            event = ev.QuarantineReleased(message_id=message_id, session_id=record.get("session_id"),
                                          envelope=ev.Envelope.model_validate(record["envelope"]), by=by, to=to,
                                          reason=reason)
        else:
            event = ev.QuarantineDeleted(message_id=message_id, session_id=record.get("session_id"), by=by,
                                         reason=reason)
        self.requested[message_id] = (action, by)
        try:
            await self.publish(event)
        except BaseException:
            self.requested.pop(message_id, None)
            raise
        metrics.CONSOLE_ACTIONS.labels(action=action).inc()
        log.info("%s %s by %s (console)%s", action, message_id, by,
                 f" to {len(event.to)} other address(es)" if getattr(event, "to", None) else "")
        return see_other(f"/quarantine/{message_id}?done={action}")

    # -- a user's release link from a quarantine digest (no login) ---------------------

    async def _digest_target(self, request: web.Request) -> tuple[dict, str]:
        """The held record and the recipient a digest link releases to, or a refusal."""
        from console.digest_links import LinkExpired, LinkInvalid
        from sinks.digest import user_releasable

        policy = self.policy.current
        try:
            message_id, recipient = self.digest_links.open(request.match_info["token"],
                                                           policy.quarantine_digest.link_hours)
        except LinkExpired:
            raise Refused(410, "This link has expired. Ask your administrator to release the message.") from None
        except LinkInvalid:
            raise Refused(404, "This link is not valid.") from None
        record = await asyncio.to_thread(self.quarantine.get, message_id)
        if record is None or recipient.lower() not in (r.lower() for r in record["envelope"]["rcpt_to"]):
            raise Refused(404, "This link is not valid.")
        if not user_releasable(record, policy):
            raise Refused(403, "Only an administrator can release this message.")
        return record, recipient

    async def digest_page(self, request: web.Request) -> web.Response:
        record, recipient = await self._digest_target(request)
        raw = await asyncio.to_thread(self.quarantine.raw, record)
        token = secrets.token_urlsafe(32)
        response = self.render("digest_release.html", request, {
            "r": record, "recipient": recipient, "subject": describe(raw)["subject"] if raw else "(unavailable)",
            "csrf_token": token, "done": request.query.get("done"), "requested": self._requested(record),
        })
        self._cookie(response, LOGIN_COOKIE, token)
        return response

    async def digest_release(self, request: web.Request) -> web.Response:
        record, recipient = await self._digest_target(request)
        message_id = record["message_id"]
        if record["state"] != "quarantined":
            raise Refused(409, f"This message is already {record['state']}.")
        if self._requested(record):
            raise Refused(409, "This message is being released already.")
        by = f"{recipient} (digest link)"
        event = ev.QuarantineReleased(message_id=message_id, session_id=record.get("session_id"),
                                      envelope=ev.Envelope.model_validate(record["envelope"]), by=by,
                                      to=[recipient], reason=DIGEST_REASON)
        self.requested[message_id] = ("release", by)
        try:
            await self.publish(event)
        except BaseException:
            self.requested.pop(message_id, None)
            raise
        log.info("release %s to its recipient by a digest link", message_id)
        response = see_other(f"/digest/{request.match_info['token']}?done=1")
        response.del_cookie(LOGIN_COOKIE, path="/")
        return response
