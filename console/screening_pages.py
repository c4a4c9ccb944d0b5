"""The Screening and Accounts pages (administrators only): bans, unban,
disabled accounts, enable, and the workers' windowed counters.

Bans and disabled accounts come from the console's own views of
``screening.bans`` and ``accounts.state`` (the ones it and ingest enforce);
the counters from a Faust worker's web server (console/tables.py). Unban and
enable publish the events ``bulwark screening unban`` and ``bulwark accounts
enable`` publish.
"""

from __future__ import annotations

import ipaddress
import logging
import urllib.parse
from datetime import datetime, timezone

from aiohttp import web

from console.web import ConsoleBase, Refused, see_other
from schemas import events as ev

log = logging.getLogger(__name__)


class ScreeningPages(ConsoleBase):
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
                raise Refused(400, "That is not an IP address.")
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
            raise Refused(409, f"{ip} is not banned (any more).")
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
            raise Refused(409, f"{address} is not disabled.")
        form = await request.post()
        reason = str(form.get("reason", "")).strip()[:200] or "enabled by an administrator"
        # The event `bulwark accounts enable` publishes; ingest follows accounts.state.
        await self.publish(ev.AccountStateChanged(address=address, enabled=True, reason=reason,
                                                  by=session.admin.name))
        log.info("enabled %s by %s (console)", address, session.admin.name)
        return see_other(f"/accounts?enabled={urllib.parse.quote(address)}")


def valid_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def screening_limits(rules) -> dict[str, int]:
    from streams.screening import limits

    return limits(rules)
