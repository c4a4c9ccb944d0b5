"""The Dynamic Screening and Account Hijack Detection tables over HTTP (JSON).

Served over HTTPS by every Faust worker's web server on 127.0.0.1, with the
certificate and TLS policy of the SMTP listeners (``ingest/tls.py``:
``BULWARK_TLS_CERT``/``BULWARK_TLS_KEY``, else the self-signed pair in
``$BULWARK_DATA_DIR/tls/``). Workers ask each other over HTTPS too, trusting
only that certificate: every worker of a deployment must serve the same one.
Location Screening applies: a request from a country in
``location_screening.refuse_http_from`` is answered 403. A question about one key
is routed to the worker that owns the key's partition (Faust's
``topic_route``: the source topic is keyed by IP or by account, and a table
lives on the worker consuming that partition); a listing asks every worker
and merges the answers.

    GET /screening/ip/{ip}/            counters for an IP, their window, its ban
    GET /screening/bans/               active bans with their expiry
    GET /hijack/account/{address}/     message count for an account, window, state
    GET /hijack/disabled/              disabled accounts
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any

import faust
from aiohttp import ClientSession, TCPConnector, web as aioweb

from streams.screening import COUNTERS, _dt, limits, window_bounds


def _window(table, now: float) -> tuple[float, float]:
    # The oldest window holding "now": the last M minutes, as the agents count.
    return window_bounds(table.table.window.earliest(now))


def _active(ban: dict | None, now: datetime) -> bool:
    return ban is not None and datetime.fromisoformat(ban["expires_at"]) > now


class WebTls:
    """The worker's HTTPS: the server context, and the client context pinning its certificate.

    ``refresh()`` (before each request) reloads a renewed certificate into
    the server context (``ServerTls.refresh``), and adds it to what the
    client context trusts, so routed requests keep working across a renewal.
    """

    def __init__(self, settings, policy):
        from ingest.tls import client_context, server_tls

        self.server = server_tls(settings, policy)
        self._cert = self.server.cert_path
        self._stamp = self._cert.stat().st_mtime_ns
        self.client = client_context(self._cert)

    def refresh(self) -> None:
        from ingest.tls import client_context

        self.server.refresh()
        cert = self.server.cert_path
        try:
            stamp = cert.stat().st_mtime_ns
        except OSError:
            return
        if (cert, stamp) != (self._cert, self._stamp):
            try:
                fresh = client_context(cert)
            except (OSError, ValueError):
                return
            for der in fresh.get_ca_certs(binary_form=True):
                self.client.load_verify_locations(cadata=der)
            self._cert, self._stamp = cert, stamp

    def http_client(self) -> ClientSession:
        """Faust's ``HttpClient`` (the session routed requests use): HTTPS to the other workers."""
        return ClientSession(connector=TCPConnector(ssl=self.client))


def serve_https(app: faust.App, settings) -> WebTls:
    """Serve the web views over HTTPS and route between workers over HTTPS.

    Called before the worker starts (``streams.app.run_worker``). The
    canonical URL is what a worker advertises to the others (the listings'
    ``gather`` and Faust's routing use it), so it says https.
    """
    tls = WebTls(settings, app.bulwark_policy)  # type: ignore[attr-defined]
    app.conf.web_ssl_context = tls.server.context
    app.conf.canonical_url = f"https://{app.conf.web_host}:{app.conf.web_port}"  # type: ignore[assignment]
    app.conf.HttpClient = tls.http_client  # type: ignore[assignment]
    app.bulwark_web_tls = tls  # type: ignore[attr-defined]
    return tls


def middlewares(app: faust.App, holder) -> list:
    """aiohttp middlewares for the worker's web server (``web_application_options``).

    Set before the first view is added (that creates the aiohttp
    application). Each request first reloads a renewed certificate, then
    meets Location Screening.
    """
    from ingest.guards.location import LocationDatabaseError, http_refusal

    @aioweb.middleware
    async def https_and_location(request, handler):
        tls = getattr(app, "bulwark_web_tls", None)
        if tls is not None:
            tls.refresh()
        try:
            reason = http_refusal(holder.current, request.remote or "")
        except LocationDatabaseError as exc:
            # Fail closed, as the SMTP listeners do, but temporarily.
            return aioweb.json_response({"error": str(exc)}, status=503)
        if reason:
            return aioweb.json_response({"error": reason}, status=403)
        return await handler(request)

    return [https_and_location]


def install(app: faust.App, tables: dict[str, Any], sessions: faust.TopicT) -> None:
    screening, hijack = tables["screening"], tables["hijack"]
    counters, bans = screening["counters"], screening["bans"]
    messages, states, reached = hijack["counters"], hijack["states"], hijack["limits"]
    holder = app.bulwark_policy  # type: ignore[attr-defined]

    async def gather(request, path: str, local: list) -> list:
        """``local`` plus the same listing from every other worker."""
        if request.query.get("local"):
            return local
        me = str(app.conf.canonical_url).rstrip("/")
        urls = {str(url).rstrip("/") for url in app.router.tables_metadata()} - {me}

        async def ask(url: str) -> list:
            async with app.http_client.get(f"{url}{path}?local=1") as response:
                response.raise_for_status()
                return (await response.json())["items"]

        answers = await asyncio.gather(*(ask(url) for url in sorted(urls)))
        return local + [item for answer in answers for item in answer]

    @app.page("/screening/ip/{ip}/")
    @app.topic_route(topic=sessions, match_info="ip")
    async def screening_ip(web, request, ip: str):
        now = time.time()
        start, end = counters.window(now)
        counts = counters.counts(ip, now)
        ban = bans.get(ip)
        return web.json({
            "ip": ip,
            "window": {"start": _dt(start).isoformat(), "end": _dt(end).isoformat(),
                       "minutes": round((end - start) / 60, 2)},
            "counters": {name: int(counts.get(name, 0)) for name in COUNTERS},
            "limits": limits(holder.current.screening),
            "ban": ban if _active(ban, _dt(now)) else None,
            "worker": str(app.conf.canonical_url),
        })

    @app.page("/screening/bans/")
    async def screening_bans(web, request):
        now = datetime.now(timezone.utc)
        local = [ban for _, ban in bans.items() if _active(ban, now)]
        items = sorted(await gather(request, "/screening/bans/", local), key=lambda b: b["client_ip"])
        return web.json({"items": items})

    @app.page("/hijack/account/{address}/")
    @app.topic_route(topic=hijack["account_messages"], match_info="address")
    async def hijack_account(web, request, address: str):
        now = time.time()
        start, end = _window(messages, now)
        counts = messages[address].now() or {}
        limit = reached.get(address)
        if limit is not None and datetime.fromisoformat(limit["until"]) <= _dt(now):
            limit = None
        return web.json({
            "address": address,
            "window": {"start": _dt(start).isoformat(), "end": _dt(end).isoformat(),
                       "minutes": round((end - start) / 60, 2)},
            "messages": int(counts.get("messages", 0)),
            "client_ips": counts.get("client_ips", []),
            "message_limit": holder.current.hijack.message_limit,
            "limit_reached": limit,
            "state": states.get(address),
            "worker": str(app.conf.canonical_url),
        })

    @app.page("/hijack/disabled/")
    async def hijack_disabled(web, request):
        local = [state for _, state in states.items() if state and not state["enabled"]]
        items = sorted(await gather(request, "/hijack/disabled/", local), key=lambda s: s["address"])
        return web.json({"items": items})
