"""A demo downstream mail server: what `make run` delivers local mail to.

It stands in for the organisation's own mail server and writes every message
it receives into a Maildir, with Return-Path and Delivered-To added as a
final delivery agent would.
"""

from __future__ import annotations

import asyncio
import logging
import mailbox

from aiosmtpd.smtp import SMTP

from bulwark import metrics
from bulwark.service import configure_logging, run_until_signalled
from bulwark.settings import Settings

log = logging.getLogger(__name__)


class MaildirHandler:
    def __init__(self, directory):
        self.maildir = mailbox.Maildir(directory, create=True)

    async def handle_DATA(self, server, session, envelope):
        for rcpt in envelope.rcpt_tos:
            trace = f"Return-Path: <{envelope.mail_from}>\r\nDelivered-To: {rcpt}\r\n".encode()
            key = self.maildir.add(trace + envelope.original_content)
            metrics.MAILBOX_MESSAGES.inc()
            log.info("delivered to %s as %s", rcpt, key)
        return "250 2.0.0 Ok: delivered"


async def serve(settings: Settings) -> None:
    configure_logging("mailbox")
    handler = MaildirHandler(settings.mailbox_dir)
    metrics.start("mailbox", settings)
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(handler, hostname="mailbox.local", decode_data=False, enable_SMTPUTF8=True),
        host=settings.mailbox_host,
        port=settings.mailbox_port,
    )
    log.info("demo mailbox on %s:%d writing to %s", settings.mailbox_host, settings.mailbox_port, settings.mailbox_dir)
    try:
        await run_until_signalled(server.serve_forever())
    finally:
        server.close()
