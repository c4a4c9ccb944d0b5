"""The Faust workers' web server: HTTPS with the gateway's certificate, and
Location Screening's refuse_http_from (streams/web.py), without a broker."""

from __future__ import annotations

from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web as aioweb

from bulwark.policy.runtime import PolicyHolder
from bulwark.policy import parse
from ingest.tls import client_context, self_signed
from streams import web

from .geodb import write_country_db

BASE = """hostname: gw.example.com
local_domains: [example.com]
mail_servers:
  - {name: mx, host: 10.1.1.1, default: true, trusted_addresses: [192.0.2.10]}
"""


async def serve(policy, settings):
    fake_app = SimpleNamespace()
    holder = PolicyHolder.fixed(policy)
    tls = web.WebTls(settings, holder)
    fake_app.bulwark_web_tls = tls

    async def hello(request):
        return aioweb.json_response({"ok": True})

    application = aioweb.Application(middlewares=web.middlewares(fake_app, holder))
    application.router.add_get("/", hello)
    runner = aioweb.AppRunner(application)
    await runner.setup()
    site = aioweb.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server.context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, tls, f"https://127.0.0.1:{port}/"


async def get(url, context, source="127.0.0.1"):
    connector = aiohttp.TCPConnector(ssl=context, local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url) as response:
            return response.status, await response.json()


async def test_https_with_the_gateway_certificate_and_location_screening(tmp_path):
    db = write_country_db(tmp_path / "countries.mmdb", {"127.0.0.70/32": "KP"})
    policy = parse(BASE + f"location_screening:\n  enabled: true\n  database: {db}\n"
                          "  refuse_http_from: [KP]\n")
    settings = SimpleNamespace(tls_cert_path=None, tls_key_path=None, data_dir=tmp_path)
    runner, tls, url = await serve(policy, settings)
    try:
        cert = tmp_path / "tls" / "selfsigned.crt"  # the same pair ingest serves
        assert tls.server.cert_path == cert
        assert await get(url, client_context(cert)) == (200, {"ok": True})
        status, answer = await get(url, client_context(cert), source="127.0.0.70")
        assert status == 403 and answer["error"] == "location screening: request from KP"
        # Plain HTTP is not served, and another certificate is not trusted.
        with pytest.raises(aiohttp.ClientError):
            await get(url.replace("https:", "http:"), None)
        other, _ = self_signed(tmp_path / "other", "gw.example.com")
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get(url, client_context(other))
    finally:
        await runner.cleanup()
