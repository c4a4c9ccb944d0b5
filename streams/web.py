"""The Dynamic Screening and Account Hijack Detection tables over HTTP (JSON).

Served by every Faust worker's web server on 127.0.0.1 (plain HTTP: keep it
on loopback, or put it behind the HTTPS front end). A question about one key
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

from streams.screening import COUNTERS, _dt, limits, window_bounds


def _window(table, now: float) -> tuple[float, float]:
    # The oldest window holding "now": the last M minutes, as the agents count.
    return window_bounds(table.table.window.earliest(now))


def _active(ban: dict | None, now: datetime) -> bool:
    return ban is not None and datetime.fromisoformat(ban["expires_at"]) > now


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
        start, end = _window(counters, now)
        counts = counters[ip].now() or {}
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
