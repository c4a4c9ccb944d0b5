"""Shared by test_screening.py and test_hijack.py: SMTP clients that misbehave,
and the Faust workers' HTTP tables."""

from __future__ import annotations

import base64
import json
import smtplib
import ssl
import time
import urllib.error
import urllib.request

from bulwark.settings import Settings
from schemas import events as ev
from schemas.topics import BANS


def web_url(gateway) -> str:
    return f"https://127.0.0.1:{gateway.settings.streams_web_port}"


def web_context() -> ssl.SSLContext:
    """Trusting only the certificate the workers serve (the gateway's: ingest/tls.py)."""
    from ingest.tls import certificate_path, client_context

    return client_context(certificate_path(Settings.from_env()))


def get_json(url: str) -> dict | None:
    """The worker's answer, or None while it cannot answer (starting, rebalancing)."""
    try:
        with urllib.request.urlopen(url, timeout=30, context=web_context()) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_for(what: str, probe, timeout: float = 90, interval: float = 0.3):
    """Poll ``probe`` until it returns something truthy (waiting, not timing)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")


def counters(gateway, ip: str, base: str | None = None) -> dict | None:
    return get_json(f"{base or web_url(gateway)}/screening/ip/{ip}/")


def failed_rcpts(gateway, ip: str, n: int) -> smtplib.SMTP:
    """A session that tries ``n`` recipients it may not relay to; left open."""
    client = gateway.smtp(ip)
    client.ehlo("guesser.test")
    code, _ = client.mail("spammer@elsewhere.test")
    assert code == 250
    for i in range(n):
        code, _ = client.rcpt(f"victim{i}@elsewhere.test")
        assert code == 554, code  # relay access denied
    return client


def close_quietly(client: smtplib.SMTP) -> None:
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


def connect_refusal(gateway, ip: str) -> tuple[int, bytes] | None:
    """The gateway's refusal at connect, or None when it greets (then QUIT)."""
    try:
        client = gateway.smtp(ip)
    except smtplib.SMTPConnectError as exc:
        return exc.smtp_code, exc.smtp_error
    except smtplib.SMTPServerDisconnected:
        return 0, b"disconnected"
    close_quietly(client)
    return None


def ban_on_topic(gateway, ip: str, timeout: float = 90) -> ev.BanIssued:
    [record, *_] = gateway.wait_records(lambda r: isinstance(r.event, ev.BanIssued), [BANS.name], keys={ip},
                                        timeout=timeout, what=f"ban of {ip}")
    return record.event


def tls_context(gateway) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(gateway.settings.data_dir / "tls" / "selfsigned.crt"))


def submissions(gateway, ip: str) -> smtplib.SMTP_SSL:
    return smtplib.SMTP_SSL(gateway.settings.smtp_host, gateway.settings.submissions_port, timeout=60,
                            source_address=(ip, 0), context=tls_context(gateway))


def auth_plain(client: smtplib.SMTP, login: str, password: str) -> tuple[int, bytes]:
    blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    return client.docmd("AUTH", f"PLAIN {blob}")
