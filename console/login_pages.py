"""Logging in and out, and the list of console administrators.

Passwords (and TOTP codes) are checked on a thread (Argon2id is slow on
purpose); a refused login is a ``console.login_failed`` event, which
Dynamic Screening counts, and never says whether the name exists.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from aiohttp import web

from bulwark import metrics
from console.web import LOGIN_COOKIE, SESSION_COOKIE, SESSION_KEY, ConsoleBase, Session, see_other
from schemas import events as ev

log = logging.getLogger(__name__)


class LoginPages(ConsoleBase):
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
        admin = await asyncio.to_thread(self.admins.authenticate, name, password, code)
        if admin is None:
            client_ip = request.remote or "unknown"
            log.warning("console login refused for %r from %s", name, client_ip)
            try:
                await self.publish(ev.ConsoleLoginFailed(login=name or "(empty)", client_ip=client_ip))
            except Exception as exc:  # the refusal stands even when the event cannot be written
                log.error("could not record the refused login: %s", type(exc).__name__)
            metrics.CONSOLE_LOGINS.labels(outcome="failure").inc()
            return await self.login_form(request, failed=True, name=name)
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

    # -- administrators (admin only) -------------------------------------------------

    async def admins_page(self, request: web.Request) -> web.Response:
        self.require(request, "admin")
        return self.render("admins.html", request, {"admins": await asyncio.to_thread(self.admins.all)})
