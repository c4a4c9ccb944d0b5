"""The MTA-STS policy host of the local domains (RFC 8461 section 3.3).

Senders that support MTA-STS fetch
``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` before delivering to
DOMAIN. Bulwark, the domains' MX, serves that file for every local domain
from the policy (``tls.mta_sts``: mode, mx patterns, max_age), on the
gateway's certificate (which must then name ``mta-sts.DOMAIN`` too), over
HTTPS only, from the ingest process that owns the certificate.

The file is only half of MTA-STS: each domain also publishes
``_mta-sts.DOMAIN TXT "v=STSv1; id=..."``, whose id must change whenever the
policy does (section 3.1). The id here is derived from the policy text, so
``bulwark mta-sts show`` prints the record to publish after every change.
"""

from __future__ import annotations

import hashlib
import logging
import ssl

from aiohttp import web

log = logging.getLogger(__name__)

WELL_KNOWN = "/.well-known/mta-sts.txt"


def policy_text(policy) -> str:
    """The policy file (RFC 8461 section 3.2), CRLF-terminated lines."""
    rules = policy.tls.mta_sts
    lines = ["version: STSv1", f"mode: {rules.mode}"]
    lines += [f"mx: {mx}" for mx in (rules.mx or [policy.hostname])]
    lines.append(f"max_age: {rules.max_age_seconds}")
    return "".join(line + "\r\n" for line in lines)


def policy_id(policy) -> str:
    """An id (1-32 letters and digits, section 3.1) that changes with the policy."""
    return hashlib.sha256(policy_text(policy).encode()).hexdigest()[:20]


def txt_record(policy, domain: str) -> str:
    return f'_mta-sts.{domain}. IN TXT "v=STSv1; id={policy_id(policy)}"'


def app(current_policy) -> web.Application:
    """``current_policy()`` returns the policy in force (it follows `bulwark policy apply`)."""

    async def serve_policy(request: web.Request) -> web.Response:
        policy = current_policy()
        host = (request.host or "").partition(":")[0].lower().rstrip(".")
        domain = host.removeprefix("mta-sts.")
        if not host.startswith("mta-sts.") or not policy.is_local_domain(domain):
            return web.Response(status=404, text="no MTA-STS policy for this host\n")
        return web.Response(text=policy_text(policy), content_type="text/plain", charset="utf-8",
                            headers={"Cache-Control": "max-age=300"})

    application = web.Application()
    application.router.add_get(WELL_KNOWN, serve_policy)
    return application


async def start(current_policy, host: str, port: int, context: ssl.SSLContext,
                reuse_port: bool = False) -> web.AppRunner:
    runner = web.AppRunner(app(current_policy), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=context, reuse_port=reuse_port).start()
    log.info("serving MTA-STS policies on https://%s:%d%s", host, port, WELL_KNOWN)
    return runner
