"""The console's web application (aiohttp, Jinja2 templates rendered on the server).

Sessions live in this process's memory, keyed by a random token in a
``__Host-`` cookie (HttpOnly, Secure, SameSite=Strict, path /): nothing about
the administrator travels in the cookie, logging out or restarting the
console ends every session, and no signing key has to be kept. Every form
carries a CSRF token (the session's; before login, one bound to a login
cookie) and every POST without the right one is refused with 403.

Roles: ``admin`` may do everything; ``helpdesk`` may use the quarantine and
tracking, and nothing else.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from bulwark import metrics
from console.admins import Admin, AdminStore
from schemas import events as ev

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
SESSION_COOKIE = "__Host-bulwark-console"
LOGIN_COOKIE = "__Host-bulwark-login"
#: A session ends after this long without a request, and after MAX_AGE in any case.
IDLE_SECONDS = 30 * 60
MAX_AGE_SECONDS = 8 * 3600
#: Text parts longer than this are cut in the message view.
TEXT_LIMIT = 200_000
LIST_LIMIT = 500
#: The dashboard's figures are at most this old.
DASHBOARD_SECONDS = 60

SECURITY_HEADERS = {
    # No script at all, no framing, forms only to the console itself.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Strict-Transport-Security": "max-age=31536000",
    # Not aiohttp's and Python's versions: nothing for a scanner to match.
    "Server": "Bulwark",
}

CONSOLE_KEY = web.AppKey("console", object)
SESSION_KEY = web.RequestKey("session", object)


@dataclass
class Session:
    admin: Admin
    csrf: str
    created: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)

    def expired(self, now: float) -> bool:
        return now - self.seen > IDLE_SECONDS or now - self.created > MAX_AGE_SECONDS


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


class Console:
    def __init__(self, admins: AdminStore, quarantine: Quarantine,
                 publish: Callable[[ev.Event], Awaitable[None]], secure_cookies: bool = True,
                 policy: Any = None, bans: Any = None, tracking: Any = None, account_states: Any = None,
                 tables: Any = None, policy_history: Callable[[], Awaitable[list]] | None = None,
                 dashboard: Any = None, digest_links: Any = None):
        self.admins = admins
        self.quarantine = quarantine
        self.publish = publish
        self.secure_cookies = secure_cookies
        #: The policy in force (a PolicyHolder) and the ``screening.bans``
        #: view (a StateView): the console enforces bans and Location
        #: Screening as ingest does, from memory. None: neither (unit tests).
        self.policy = policy
        self.bans = bans
        #: console.tracking.Tracking: message search and ``bulwark trace`` timelines.
        self.tracking = tracking
        #: The ``accounts.state`` view (disabled accounts) and the workers'
        #: tables (console.tables.StreamsTables): the Screening and Accounts pages.
        self.account_states = account_states
        self.tables = tables
        #: Every PolicyPublished still on config.policy, oldest first (the Policy page).
        self.policy_history = policy_history
        #: console.dashboard.Dashboard, and its last figures: reading a day of
        #: smtp.sessions is not free, so the page recomputes at most once a minute.
        self.dashboard = dashboard
        self._figures: tuple[float, Any] | None = None
        #: console.digest_links.DigestLinks: the quarantine digest's release links.
        self.digest_links = digest_links
        self.sessions: dict[str, Session] = {}
        #: Per account with TOTP, the time step of its last accepted code:
        #: that code (and older ones) are refused from then on.
        self.totp_used: dict[str, int] = {}
        #: Releases and deletions this process published that the quarantine
        #: index does not show yet (the sink marks it a moment later): a
        #: second click in that moment is refused, not published again.
        self.requested: dict[str, tuple[str, str]] = {}

    # -- sessions and CSRF ---------------------------------------------------------

    def session_of(self, request: web.Request) -> Session | None:
        token = request.cookies.get(SESSION_COOKIE)
        session = self.sessions.get(token) if token else None
        now = time.monotonic()
        if session is None:
            return None
        if session.expired(now):
            self.sessions.pop(token, None)
            return None
        session.seen = now
        return session

    def _cookie(self, response: web.StreamResponse, name: str, value: str) -> None:
        response.set_cookie(name, value, path="/", httponly=True, secure=self.secure_cookies, samesite="Strict")

    @staticmethod
    def _same(a: str | None, b: str | None) -> bool:
        return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())

    def screened(self, request: web.Request) -> tuple[int, str] | None:
        """(status, why) when Dynamic Screening or Location Screening refuses this request.

        Every request, not only logins: a banned address (banned for guessing
        console passwords, or for abusing SMTP) gets no page at all, as ingest
        answers its connections 421. ``refuse_http_auth_from`` refuses only
        the login itself.
        """
        from ingest.guards.location import LocationDatabaseError, http_refusal
        from ingest.guards.screening import DynamicScreeningGuard

        if self.policy is None:
            return None
        ip = request.remote or ""
        if self.bans is not None:
            ban = DynamicScreeningGuard(self.policy, self.bans).active_ban(ip)
            if ban is not None:
                return 403, (f"{ip} is banned by Dynamic Screening until "
                             f"{ban.expires_at.strftime('%H:%M:%S UTC')} ({ban.reason.removeprefix('Dynamic Screening: ')}).")
        try:
            reason = http_refusal(self.policy.current, ip, login=request.path == "/login" and request.method == "POST")
        except LocationDatabaseError as exc:
            # Fail closed, but temporarily, as the SMTP listeners and the
            # workers' web server do.
            log.error("%s", exc)
            return 503, "The console cannot check where this request comes from; try again later."
        if reason:
            return 403, f"Refused by Location Screening ({reason.removeprefix('location screening: ')})."
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        screened = self.screened(request)
        if screened is not None:
            status, why = screened
            log.warning("%s %s from %s refused: %s", request.method, request.path, request.remote, why)
            request[SESSION_KEY] = None
            return self.refuse(request, status, why)
        if request.path.startswith("/static/"):
            return await handler(request)
        session = self.session_of(request)
        request[SESSION_KEY] = session
        if request.method == "POST":
            form = await request.post()
            sent = form.get("csrf_token")
            # The login form's token (and a digest link's release form's: its
            # user has no session) is bound to its login cookie; every other
            # form's to the session (no session: nothing can match).
            unauthenticated = request.path == "/login" or request.path.startswith("/digest/")
            expected = request.cookies.get(LOGIN_COOKIE) if unauthenticated else \
                (session.csrf if session else None)
            if not self._same(sent if isinstance(sent, str) else None, expected):
                log.warning("POST %s from %s refused: missing or wrong CSRF token", request.path, request.remote)
                return self.refuse(request, 403, "This form has expired or did not come from the console. "
                                                 "Go back, reload the page and try again.")
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own 404 and 405
            exc.headers.update(SECURITY_HEADERS)
            raise
        response.headers.update(SECURITY_HEADERS)
        return response

    def refuse(self, request: web.Request, status: int, why: str) -> web.Response:
        response = aiohttp_jinja2.render_template(
            "error.html", request, {"status": status, "why": why, "session": request.get(SESSION_KEY)},
            status=status)
        response.headers.update(SECURITY_HEADERS)
        return response

    def require(self, request: web.Request, *roles: str) -> Session:
        session = request[SESSION_KEY]
        if session is None:
            raise _Redirect("/login")
        if session.admin.role not in roles:
            raise _Refused(403, f"Your role ({session.admin.role}) may not open this page.")
        return session

    def render(self, template: str, request: web.Request, context: dict, status: int = 200) -> web.Response:
        return aiohttp_jinja2.render_template(template, request, {"session": request[SESSION_KEY], **context},
                                              status=status)

    # -- login -------------------------------------------------------------------------

    async def login_form(self, request: web.Request, failed: bool = False, name: str = "") -> web.Response:
        token = secrets.token_urlsafe(32)
        response = self.render("login.html", request, {"csrf_token": token, "failed": failed, "name": name},
                               status=401 if failed else 200)
        self._cookie(response, LOGIN_COOKIE, token)
        return response

    async def login_page(self, request: web.Request) -> web.Response:
        if request[SESSION_KEY] is not None:
            return see_other("/")
        return await self.login_form(request)

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        name = str(form.get("name", "")).strip()[:64]
        password = str(form.get("password", ""))
        code = str(form.get("code", ""))[:16]
        admin = await asyncio.to_thread(self.admins.authenticate, name, password, code,
                                        used=self.totp_used.get(name))
        if admin is None:
            client_ip = request.remote or "unknown"
            log.warning("console login refused for %r from %s", name, client_ip)
            try:
                await self.publish(ev.ConsoleLoginFailed(login=name or "(empty)", client_ip=client_ip))
            except Exception as exc:  # the refusal stands even when the event cannot be written
                log.error("could not record the refused login: %s", type(exc).__name__)
            metrics.CONSOLE_LOGINS.labels(outcome="failure").inc()
            return await self.login_form(request, failed=True, name=name)
        if admin.totp_step is not None:
            self.totp_used[name] = admin.totp_step
        now = time.monotonic()
        for stale in [t for t, s in self.sessions.items() if s.expired(now)]:
            del self.sessions[stale]
        token = secrets.token_urlsafe(32)
        self.sessions[token] = Session(admin, secrets.token_urlsafe(32))
        metrics.CONSOLE_LOGINS.labels(outcome="success").inc()
        log.info("console login: %s (%s) from %s", admin.name, admin.role, request.remote)
        response = see_other("/")
        self._cookie(response, SESSION_COOKIE, token)
        response.del_cookie(LOGIN_COOKIE, path="/")
        return response

    async def logout(self, request: web.Request) -> web.Response:
        self.sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
        response = see_other("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    async def home(self, request: web.Request) -> web.Response:
        self.require(request, "admin", "helpdesk")
        return see_other("/quarantine")

    # -- quarantine ----------------------------------------------------------------------

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
            raise _Refused(404, "No such message in the quarantine.")
        raw = await asyncio.to_thread(self.quarantine.raw, record)
        return self.render("message.html", request, {
            "r": record, "parsed": describe(raw) if raw is not None else None,
            "csrf_token": session.csrf, "done": request.query.get("done"),
            "requested": self._requested(record),
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
            raise _Refused(404, "No such message in the quarantine.")
        if record["state"] != "quarantined":
            raise _Refused(409, f"This message is already {record['state']}.")
        if requested := self._requested(record):
            raise _Refused(409, f"{requested[1]} already asked to {requested[0]} this message.")
        by = session.admin.name
        if action == "release":
            from console.addresses import AddressError, release_addresses

            form = await request.post()
            to = None
            if "to" in form:  # the "release to another address" form
                try:
                    to = release_addresses(str(form["to"])[:4000])
                except AddressError as exc:
                    raise _Refused(400, f"Not released: {exc}.") from None
            event = ev.QuarantineReleased(message_id=message_id, session_id=record.get("session_id"),
                                          envelope=ev.Envelope.model_validate(record["envelope"]), by=by, to=to)
        else:
            event = ev.QuarantineDeleted(message_id=message_id, session_id=record.get("session_id"), by=by)
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

    # -- tracking (admin and help desk) ----------------------------------------------

    async def tracking_search(self, request: web.Request) -> web.Response:
        from console.tracking import Query

        self.require(request, "admin", "helpdesk")
        q, values = Query.from_form(request.query, datetime.now(timezone.utc))
        searched = any(request.query.get(k) for k in ("message_id", "sender", "recipient", "client_ip",
                                                       "since", "until"))
        found, more = (await self.tracking.search(q)) if searched else ([], 0)
        return self.render("tracking.html", request, {"q": values, "rows": found, "more": more,
                                                      "searched": searched})

    async def tracking_trace(self, request: web.Request) -> web.Response:
        self.require(request, "admin", "helpdesk")
        ident = request.match_info["ident"]
        timeline = await self.tracking.timeline(ident)
        if not timeline:
            raise _Refused(404, "Nothing on the topics about this message or session.")
        return self.render("trace.html", request, {"ident": ident, "timeline": timeline})

    # -- screening and accounts (admin only) ------------------------------------------

    def active_bans(self) -> list[ev.BanIssued]:
        now = datetime.now(timezone.utc)
        bans = [b for _, b in (self.bans.items() if self.bans is not None else [])
                if isinstance(b, ev.BanIssued) and b.expires_at > now]
        return sorted(bans, key=lambda b: b.expires_at)

    async def _counters(self, ask, key: str) -> tuple[dict | None, str | None]:
        from console.tables import TablesUnavailable

        try:
            return await ask(key), None
        except TablesUnavailable as exc:
            return None, str(exc)

    async def screening_page(self, request: web.Request) -> web.Response:
        session = self.require(request, "admin")
        ip, answer, unavailable = request.query.get("ip", "").strip(), None, None
        if ip:
            if not valid_ip(ip):
                raise _Refused(400, "That is not an IP address.")
            answer, unavailable = await self._counters(self.tables.ip, str(ipaddress.ip_address(ip)))
        return self.render("screening.html", request, {
            "bans": self.active_bans(), "ip": ip, "answer": answer, "unavailable": unavailable,
            "csrf_token": session.csrf, "unbanned": request.query.get("unbanned"),
            "limits": screening_limits(self.policy.current.screening) if self.policy else {},
        })

    async def unban(self, request: web.Request) -> web.Response:
        session = self.require(request, "admin")
        ip = request.match_info["ip"]
        if not valid_ip(ip) or ip not in {b.client_ip for b in self.active_bans()}:
            raise _Refused(409, f"{ip} is not banned (any more).")
        await self.publish(ev.BanLifted(client_ip=ip, by=session.admin.name))
        log.info("unbanned %s by %s (console)", ip, session.admin.name)
        return see_other(f"/screening?unbanned={ip}")

    def disabled_accounts(self) -> list[ev.AccountStateChanged]:
        states = self.account_states.items() if self.account_states is not None else []
        return sorted((s for _, s in states if isinstance(s, ev.AccountStateChanged) and not s.enabled),
                      key=lambda s: s.address)

    async def accounts_page(self, request: web.Request) -> web.Response:
        session = self.require(request, "admin")
        address, answer, unavailable = request.query.get("address", "").strip().lower(), None, None
        if address:
            answer, unavailable = await self._counters(self.tables.account, address)
        return self.render("accounts.html", request, {
            "disabled": self.disabled_accounts(), "address": address, "answer": answer,
            "unavailable": unavailable, "csrf_token": session.csrf, "enabled": request.query.get("enabled"),
        })

    async def enable_account(self, request: web.Request) -> web.Response:
        session = self.require(request, "admin")
        address = request.match_info["address"]
        if address not in {s.address for s in self.disabled_accounts()}:
            raise _Refused(409, f"{address} is not disabled.")
        form = await request.post()
        reason = str(form.get("reason", "")).strip()[:200] or "enabled by an administrator"
        # The event `bulwark accounts enable` publishes; ingest follows accounts.state.
        await self.publish(ev.AccountStateChanged(address=address, enabled=True, reason=reason,
                                                  by=session.admin.name))
        log.info("enabled %s by %s (console)", address, session.admin.name)
        return see_other(f"/accounts?enabled={urllib.parse.quote(address)}")

    # -- policy (admin only) -------------------------------------------------------------

    async def policy_page(self, request: web.Request) -> web.Response:
        from bulwark.policy.audit import as_yaml, audit

        self.require(request, "admin")
        history = await self.policy_history()
        in_force = self.policy.current
        findings = await asyncio.to_thread(audit, in_force)
        return self.render("policy.html", request, {
            "history": list(reversed(history)), "version": in_force.version,
            "findings": [(f, as_yaml(f.fix) if not f.met else "") for f in findings],
            "met": sum(f.met for f in findings),
        })

    async def policy_diff(self, request: web.Request) -> web.Response:
        from console.policy_pages import by_version, diff

        self.require(request, "admin")
        history = await self.policy_history()
        old = by_version(history, request.query.get("from", ""))
        new = by_version(history, request.query.get("to", ""))
        if old is None or new is None:
            raise _Refused(404, "Choose two versions that are on config.policy.")
        return self.render("policy_diff.html", request, {"old": old, "new": new, "lines": diff(old, new)})

    async def policy_version(self, request: web.Request) -> web.Response:
        from console.policy_pages import as_yaml, by_version

        self.require(request, "admin")
        event = by_version(await self.policy_history(), request.match_info["version"])
        if event is None:
            raise _Refused(404, "No such version on config.policy.")
        return self.render("policy_version.html", request, {"e": event, "text": "\n".join(as_yaml(event.document))})

    # -- dashboard (admin only) -----------------------------------------------------------

    async def dashboard_page(self, request: web.Request) -> web.Response:
        from console.dashboard import horizontal_bars, stacked_bars

        self.require(request, "admin")
        now = datetime.now(timezone.utc)
        if self._figures is None or time.monotonic() - self._figures[0] > DASHBOARD_SECONDS:
            self._figures = (time.monotonic(), (now, await self.dashboard.figures(now)))
        at, f = self._figures[1]
        charts = {
            "messages": stacked_bars("messages-chart", "Messages per hour by action",
                                     f"Verdicts per hour over the last {len(f.hours)} hours, stacked by action.",
                                     f.hours, f.by_action),
            "bans": stacked_bars("bans-chart", "Dynamic Screening bans per hour",
                                 f"Bans issued per hour over the last {len(f.hours)} hours.", f.hours,
                                 {"bans": f.bans}),
            "ips": horizontal_bars("ips-chart", "Top refused client addresses", f.top_ips),
            "senders": horizontal_bars("senders-chart", "Top refused senders", f.top_senders),
        }
        return self.render("dashboard.html", request, {"f": f, "at": at, "charts": charts})

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
            raise _Refused(410, "This link has expired. Ask your administrator to release the message.") from None
        except LinkInvalid:
            raise _Refused(404, "This link is not valid.") from None
        record = await asyncio.to_thread(self.quarantine.get, message_id)
        if record is None or recipient.lower() not in (r.lower() for r in record["envelope"]["rcpt_to"]):
            raise _Refused(404, "This link is not valid.")
        if not user_releasable(record, policy):
            raise _Refused(403, "Only an administrator can release this message.")
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
            raise _Refused(409, f"This message is already {record['state']}.")
        if self._requested(record):
            raise _Refused(409, "This message is being released already.")
        by = f"{recipient} (digest link)"
        event = ev.QuarantineReleased(message_id=message_id, session_id=record.get("session_id"),
                                      envelope=ev.Envelope.model_validate(record["envelope"]), by=by,
                                      to=[recipient])
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

    # -- administrators (admin only) -------------------------------------------------

    async def admins_page(self, request: web.Request) -> web.Response:
        self.require(request, "admin")
        return self.render("admins.html", request, {"admins": await asyncio.to_thread(self.admins.all)})


def valid_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def screening_limits(rules) -> dict[str, int]:
    from streams.screening import limits

    return limits(rules)


def see_other(location: str) -> web.Response:
    """303: after a POST the browser GETs the next page (reloading it posts nothing again)."""
    return web.Response(status=303, headers={"Location": location})


class _Redirect(Exception):
    def __init__(self, location: str):
        super().__init__(location)
        self.location = location


class _Refused(Exception):
    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status, self.why = status, why


DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


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


def make_app(console: Console, first: list = ()) -> web.Application:
    @web.middleware
    async def refusals(request: web.Request, handler):
        try:
            return await handler(request)
        except _Refused as exc:
            return console.refuse(request, exc.status, exc.why)
        except _Redirect as exc:
            return see_other(exc.location)

    app = web.Application(middlewares=[*first, console.middleware, refusals], client_max_size=64 * 1024)
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                         autoescape=jinja2.select_autoescape(default=True))
    app[CONSOLE_KEY] = console
    app.router.add_get("/", console.home)
    app.router.add_get("/login", console.login_page)
    app.router.add_post("/login", console.login)
    app.router.add_post("/logout", console.logout)
    app.router.add_get("/quarantine", console.quarantine_list)
    app.router.add_get("/quarantine/{message_id}", console.quarantine_show)
    app.router.add_post("/quarantine/{message_id}/{action:release|delete}", console.quarantine_act)
    app.router.add_get("/tracking", console.tracking_search)
    app.router.add_get("/tracking/{ident}", console.tracking_trace)
    app.router.add_get("/screening", console.screening_page)
    app.router.add_post("/screening/{ip}/unban", console.unban)
    app.router.add_get("/accounts", console.accounts_page)
    app.router.add_post("/accounts/{address}/enable", console.enable_account)
    app.router.add_get("/policy", console.policy_page)
    app.router.add_get("/policy/diff", console.policy_diff)
    app.router.add_get("/policy/version/{version}", console.policy_version)
    app.router.add_get("/dashboard", console.dashboard_page)
    app.router.add_get("/digest/{token}", console.digest_page)
    app.router.add_post("/digest/{token}", console.digest_release)
    app.router.add_get("/admins", console.admins_page)
    app.router.add_static("/static/", STATIC)
    return app
