"""What every page of the console shares: sessions, CSRF, screening, roles, rendering.

Sessions live in this process's memory, keyed by a random token in a
``__Host-`` cookie (HttpOnly, Secure, SameSite=Strict, path /): nothing about
the administrator travels in the cookie, logging out or restarting the
console ends every session, and no signing key has to be kept. Every form
carries a CSRF token (the session's; before login, one bound to a login
cookie) and every POST without the right one is refused with 403.

Roles: ``admin`` may do everything; ``helpdesk`` may use the quarantine and
tracking, and nothing else. Each page area (``login_pages``,
``quarantine_pages``, ``tracking_pages``, ``screening_pages``,
``policy_pages``, ``dashboard``) is a mixin over :class:`ConsoleBase`;
``console.app`` puts them together.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp_jinja2
from aiohttp import web

from console.admins import Admin

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
SESSION_COOKIE = "__Host-bulwark-console"
LOGIN_COOKIE = "__Host-bulwark-login"
#: A session ends after this long without a request, and after MAX_AGE in any case.
IDLE_SECONDS = 30 * 60
MAX_AGE_SECONDS = 8 * 3600

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


def see_other(location: str) -> web.Response:
    """303: after a POST the browser GETs the next page (reloading it posts nothing again)."""
    return web.Response(status=303, headers={"Location": location})


class Redirect(Exception):
    def __init__(self, location: str):
        super().__init__(location)
        self.location = location


class Refused(Exception):
    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status, self.why = status, why


class ConsoleBase:
    """Sessions, CSRF, Dynamic and Location Screening, roles and rendering.

    The attributes it reads (``sessions``, ``secure_cookies``, ``policy``,
    ``bans``) are set by ``console.app.Console``.
    """

    # -- sessions and CSRF ---------------------------------------------------------

    def session_of(self, request: web.Request) -> Session | None:
        token = request.cookies.get(SESSION_COOKIE)
        session = self.sessions.get(token) if token else None
        now = time.monotonic()
        if session is None:
            return None
        # An account removed (or given another role) since the login: its
        # sessions end now, not when they expire.
        if session.expired(now) or self.admins.role_of(session.admin.name) != session.admin.role:
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
            raise Redirect("/login")
        if session.admin.role not in roles:
            raise Refused(403, f"Your role ({session.admin.role}) may not open this page.")
        return session

    def render(self, template: str, request: web.Request, context: dict, status: int = 200) -> web.Response:
        return aiohttp_jinja2.render_template(template, request, {"session": request[SESSION_KEY], **context},
                                              status=status)
