"""``bulwark console``: the console's process, HTTPS on the gateway's certificate."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from bulwark import metrics
from bulwark.blobstore import BlobStore
from bulwark.kafka import start_publisher
from bulwark.policy.admin import published_history
from bulwark.policy.runtime import PolicyHolder
from bulwark.service import configure_logging, run_until_signalled
from bulwark.settings import Settings
from bulwark.state import StateView
from console.admins import AdminStore, admins_path
from console.app import Console, make_app
from console.dashboard import kafka_dashboard
from console.digest_links import DigestLinks, load_key
from console.quarantine_pages import Quarantine
from console.tables import streams_tables
from console.tracking import kafka_tracking
from schemas.topics import ACCOUNT_STATE, BANS

log = logging.getLogger(__name__)


def open_quarantine_index(settings: Settings):
    """The quarantine sink's index, read-only (as ``bulwark quarantine list`` opens it); None before it exists."""
    from sinks.quarantine import index_path
    from sinks.store import JsonIndex

    path = index_path(settings)
    return JsonIndex(path, read_only=True) if path.exists() else None


async def serve(settings: Settings) -> None:
    from ingest.tls import server_tls

    configure_logging("console")
    policy = PolicyHolder(settings=settings)
    await policy.start()
    tls = server_tls(settings, policy)
    publisher = await start_publisher(settings, "bulwark-console")
    blobs = BlobStore(settings.blob_dir)
    # Dynamic Screening's bans, followed in memory as ingest follows them.
    bans = StateView(settings, BANS)
    # Disabled accounts (Account Hijack Detection or an administrator).
    account_states = StateView(settings, ACCOUNT_STATE)
    await asyncio.gather(bans.start(), account_states.start())
    console = Console(
        AdminStore(admins_path(settings.data_dir)),
        Quarantine(lambda: open_quarantine_index(settings), blobs.get_sync),
        publisher.publish,
        policy=policy,
        bans=bans,
        tracking=kafka_tracking(settings),
        account_states=account_states,
        tables=streams_tables(settings),
        policy_history=lambda: published_history(settings),
        dashboard=kafka_dashboard(settings),
        digest_links=DigestLinks(load_key(settings.data_dir)),
    )

    @web.middleware
    async def renewed_certificate(request, handler):
        # A renewed certificate goes into the listening context for the next
        # connections (two stat calls when nothing changed).
        tls.refresh()
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # the router's 404 and 405
            metrics.CONSOLE_RESPONSES.labels(code=str(exc.status)).inc()
            raise
        metrics.CONSOLE_RESPONSES.labels(code=str(response.status)).inc()
        return response

    metrics.EVENT_BACKLOG.set_function(lambda: publisher.backlog)
    metrics_server = metrics.start("console", settings)
    app = make_app(console, first=[renewed_certificate])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.console_host, settings.console_port, ssl_context=tls.context)
    await site.start()
    log.info("console on https://%s:%d/", settings.console_host, settings.console_port)
    if not console.admins.all():
        log.warning("no console administrator yet: bulwark console add-admin NAME --role admin")
    try:
        await run_until_signalled(asyncio.Event().wait())
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        await runner.cleanup()
        await bans.stop()
        await account_states.stop()
        await publisher.stop()
        await policy.stop()
