"""The console's web application (aiohttp, Jinja2 templates rendered on the server).

One :class:`Console` object holds what the pages share (the quarantine, the
publisher, the policy, the state views, the sessions) and is made of one
mixin per page area, each in its own module:

- ``console.web``: sessions, CSRF, Dynamic and Location Screening, roles;
- ``console.login_pages``: logging in and out, the administrators' list;
- ``console.quarantine_pages``: the quarantine, and digest release links;
- ``console.tracking``: message search and timelines;
- ``console.screening_pages``: bans and disabled accounts;
- ``console.policy_pages``: the policy's history, diff and audit;
- ``console.dashboard``: the dashboard.

:func:`make_app` lists every route in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from console.admins import AdminStore
from console.dashboard import DashboardPage
from console.login_pages import LoginPages
from console.policy_pages import PolicyPages
from console.quarantine_pages import Quarantine, QuarantinePages
from console.screening_pages import ScreeningPages
from console.tracking import TrackingPages
from console.web import CONSOLE_KEY, STATIC, TEMPLATES, Redirect, Refused, Session, see_other
from schemas import events as ev


class Console(LoginPages, QuarantinePages, TrackingPages, ScreeningPages, PolicyPages, DashboardPage):
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
        #: Releases and deletions this process published that the quarantine
        #: index does not show yet (the sink marks it a moment later): a
        #: second click in that moment is refused, not published again.
        self.requested: dict[str, tuple[str, str]] = {}


def make_app(console: Console, first: list = ()) -> web.Application:
    @web.middleware
    async def refusals(request: web.Request, handler):
        try:
            return await handler(request)
        except Refused as exc:
            return console.refuse(request, exc.status, exc.why)
        except Redirect as exc:
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
