"""``bulwark screening`` and ``bulwark tables``: Dynamic Screening and Account
Hijack Detection from the command line.

``screening unban`` publishes a BanLifted event (ingest stops refusing the
address, the streams clear its counters). ``tables`` asks the Faust workers'
web server over HTTPS (any worker: a question about one key is routed to the
worker that owns it) and prints what it answers, human-readable or
``--json``. It trusts only the gateway's certificate (``--cafile``, by
default ``BULWARK_TLS_CERT`` or the self-signed one in ``$BULWARK_DATA_DIR/tls/``).
"""

from __future__ import annotations

import asyncio
import getpass
import ipaddress
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request

import click

from bulwark.settings import Settings


def _publish(event) -> None:
    from bulwark.kafka import publish_once

    asyncio.run(publish_once(Settings.from_env(), event, "bulwark-cli-screening"))


@click.group()
def screening() -> None:
    """Dynamic Screening: banned client addresses."""


@screening.command("unban")
@click.argument("ip")
@click.option("--by", default=None, help="Who lifts the ban (default: the current user)")
def screening_unban(ip: str, by: str | None) -> None:
    """End a ban early (a screening.ban_lifted event)."""
    from schemas.events import BanLifted

    try:
        ip = str(ipaddress.ip_address(ip))
    except ValueError:
        raise click.BadParameter(f"{ip!r} is not an IP address") from None
    _publish(BanLifted(client_ip=ip, by=by or getpass.getuser()))
    click.echo(f"lifted the ban on {ip}")


# -- tables -----------------------------------------------------------------------


def _context(cafile: str | None) -> ssl.SSLContext:
    from ingest.tls import certificate_path, client_context

    path = cafile or certificate_path(Settings.from_env())
    try:
        return client_context(path)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read the gateway's certificate {path}: {exc}") from None


def _get(url: str, path: str, cafile: str | None = None) -> dict:
    context = _context(cafile) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=30, context=context) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise click.ClickException(f"{url}{path}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise click.ClickException(f"no Faust worker answering at {url}: {exc}") from None


def _url_option(fun):
    fun = click.option("--json", "as_json", is_flag=True, help="The JSON the worker answers")(fun)
    fun = click.option(
        "--cafile", default=None, type=click.Path(dir_okay=False),
        help="The certificate the worker serves, the only one trusted "
             "(default: $BULWARK_TLS_CERT, else $BULWARK_DATA_DIR/tls/selfsigned.crt)",
    )(fun)
    return click.option(
        "--url", default=None,
        help="A worker's web server (default: https://127.0.0.1:$BULWARK_STREAMS_WEB_PORT)",
    )(fun)


def _url(url: str | None) -> str:
    return url or f"https://127.0.0.1:{Settings.from_env().streams_web_port}"


def _window(answer: dict) -> str:
    window = answer["window"]
    return f"{window['start'][11:19]} to {window['end'][11:19]} UTC ({window['minutes']:g} minutes)"


@click.group()
def tables() -> None:
    """The windowed tables the Faust workers keep (counters, bans, disabled accounts)."""


@tables.command("ip")
@click.argument("ip")
@_url_option
def tables_ip(ip: str, url: str | None, as_json: bool, cafile: str | None) -> None:
    """Dynamic Screening counters for a client address, and its ban."""
    answer = _get(_url(url), f"/screening/ip/{urllib.parse.quote(ip)}/", cafile)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    click.echo(f"{answer['ip']}: window {_window(answer)}")
    for name, count in answer["counters"].items():
        click.echo(f"  {name:14} {count:5}   (bans at {answer['limits'][name]})")
    ban = answer["ban"]
    click.echo(f"  banned until {ban['expires_at']}: {ban['reason']}" if ban else "  not banned")


@tables.command("bans")
@_url_option
def tables_bans(url: str | None, as_json: bool, cafile: str | None) -> None:
    """Active Dynamic Screening bans and when they expire."""
    items = _get(_url(url), "/screening/bans/", cafile)["items"]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    if not items:
        click.echo("no active bans")
    for ban in items:
        click.echo(f"{ban['client_ip']:15}  until {ban['expires_at']}  {ban['reason']}")


@tables.command("account")
@click.argument("address")
@_url_option
def tables_account(address: str, url: str | None, as_json: bool, cafile: str | None) -> None:
    """Account Hijack Detection: messages an account sent in the window, and its state."""
    answer = _get(_url(url), f"/hijack/account/{urllib.parse.quote(address.lower())}/", cafile)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    click.echo(f"{answer['address']}: {answer['messages']} messages (no more than {answer['message_limit']}), "
               f"window {_window(answer)}")
    if answer["client_ips"]:
        click.echo(f"  from {', '.join(answer['client_ips'])}")
    state = answer["state"]
    if state and not state["enabled"]:
        click.echo(f"  DISABLED by {state['by']} at {state['occurred_at']}: {state['reason']}")
    elif answer["limit_reached"]:
        click.echo(f"  at its limit: 452 until {answer['limit_reached']['until']}")
    else:
        click.echo("  enabled")


@tables.command("disabled")
@_url_option
def tables_disabled(url: str | None, as_json: bool, cafile: str | None) -> None:
    """Accounts disabled (by Account Hijack Detection or an administrator)."""
    items = _get(_url(url), "/hijack/disabled/", cafile)["items"]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    if not items:
        click.echo("no disabled accounts")
    for state in items:
        click.echo(f"{state['address']:30}  {state['occurred_at'][:19]}  by {state['by']}: {state['reason']}")

