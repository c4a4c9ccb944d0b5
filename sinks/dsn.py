"""Delivery status notifications (RFC 3464) for recipients given up on.

Sent from the null sender, so a DSN is never answered by another DSN.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from email.message import Message as RawMessage
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import BytesHeaderParser
from email.utils import format_datetime, make_msgid

from schemas.events import Envelope, RecipientResult


_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")


def _status(result: RecipientResult) -> str:
    """RFC 3463 status: the server's enhanced code when it gave one."""
    if result.reply_code is None or result.reply_code < 500:
        return "4.4.7"  # still deferred when the delivery period expired
    match = _ENHANCED.match(result.reply or "")
    return match.group(1) if match else "5.0.0"


def _text(body: str, subtype: str = "plain") -> MIMEText:
    return MIMEText(body, subtype, "us-ascii" if body.isascii() else "utf-8")


def build_dsn(
    hostname: str,
    message_id: str,
    envelope: Envelope,
    bounced: list[RecipientResult],
    remote: str | None,
    original: bytes,
) -> bytes:
    now = datetime.now(timezone.utc)
    lines = [
        f"This is the mail system at {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "It is attached below.",
        "",
    ]
    for result in bounced:
        lines.append(f"<{result.recipient}>: {result.reply or 'delivery period expired'}")
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = envelope.mail_from
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = format_datetime(now)
    report["Message-ID"] = make_msgid(domain=hostname)
    report["Auto-Submitted"] = "auto-replied"
    report.attach(_text("\n".join(lines) + "\n"))

    status = MIMEBase("message", "delivery-status")
    per_message = RawMessage()
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-Bulwark-Queue-ID"] = message_id
    per_message["Arrival-Date"] = format_datetime(envelope.received_at)
    blocks = [per_message]
    for result in bounced:
        block = RawMessage()
        block["Final-Recipient"] = f"rfc822; {result.recipient}"
        block["Action"] = "failed"
        block["Status"] = _status(result)
        if remote:
            block["Remote-MTA"] = f"dns; {remote}"
        if result.reply:
            block["Diagnostic-Code"] = f"smtp; {result.reply_code} {result.reply}"
        blocks.append(block)
    status.set_payload(blocks)
    report.attach(status)

    headers = BytesHeaderParser().parsebytes(original)
    header_text = "".join(f"{k}: {v}\n" for k, v in headers.items())
    report.attach(_text(header_text, "rfc822-headers"))
    return report.as_bytes()
