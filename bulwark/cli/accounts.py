"""``bulwark accounts``: local accounts and their passwords, as events.

Each command publishes to the compacted account topics that ingest follows
(``directory.accounts``: AccountRecorded; ``accounts.state``:
AccountStateChanged), so a change applies to the next AUTH on every ingest
node without a restart. Passwords are read from the terminal (or one line of
standard input with ``--password-stdin``), never from the command line,
which other users can read in the process list; only their Argon2id
verifiers are published.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import sys

import click

from bulwark.kafka import publish_once
from bulwark.policy.runtime import policy_in_force
from bulwark.settings import Settings
from schemas import events as ev
from schemas.topics import ACCOUNT_STATE, ACCOUNTS


def _settings() -> Settings:
    return Settings.from_env()


async def _directory(settings: Settings, address: str | None = None) -> dict[str, tuple]:
    """{address: (AccountRecorded, AccountStateChanged | None)} from the topics' current ends."""
    from bulwark.kafka import read_topics

    keys = {address.encode()} if address else None
    accounts: dict[str, ev.AccountRecorded] = {}
    states: dict[str, ev.AccountStateChanged] = {}
    for record in await read_topics(settings, [ACCOUNTS.name, ACCOUNT_STATE.name], keys=keys):
        key = record.key.decode() if record.key else ""
        if isinstance(record.event, ev.AccountRecorded):
            accounts[key] = record.event
        elif isinstance(record.event, ev.AccountStateChanged):
            states[key] = record.event
    return {key: (account, states.get(key)) for key, account in sorted(accounts.items())}


def _publish(settings: Settings, event: ev.Event) -> None:
    asyncio.run(publish_once(settings, event, "bulwark-cli-accounts"))


def _address(value: str) -> str:
    from ingest.accounts import account_key

    address = account_key(value)
    local, _, domain = address.rpartition("@")
    if not local or not domain or " " in address or "@" in local:
        raise click.BadParameter(f"{value!r} is not an address (user@domain expected)")
    return address


def _new_password(address: str, policy, from_stdin: bool) -> str:
    from bulwark.passwords import weaknesses

    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt(f"New password for {address}", hide_input=True, confirmation_prompt=True)
    rules = policy.auth.passwords
    problems = weaknesses(password, address, rules.min_length, rules.min_strength)
    if problems:
        click.echo(f"password refused: {'; '.join(problems)}", err=True)
        sys.exit(2)
    return password


def _account(settings: Settings, address: str) -> tuple[ev.AccountRecorded, ev.AccountStateChanged | None]:
    found = asyncio.run(_directory(settings, address)).get(address)
    if found is None:
        raise click.ClickException(f"no account {address}")
    return found


_by = click.option("--by", default=None, help="Who makes the change (default: the current user)")
_stdin = click.option("--password-stdin", is_flag=True, help="Read the password from one line of standard input")


@click.group()
def accounts() -> None:
    """Local accounts: who may authenticate (SMTP AUTH) and send."""


@accounts.command("add")
@click.argument("address")
@_stdin
@_by
def accounts_add(address: str, password_stdin: bool, by: str | None) -> None:
    """Create a local account with a password (strong passwords only)."""
    from bulwark.passwords import hash_password

    settings = _settings()
    address = _address(address)
    domain = address.rpartition("@")[2]
    policy = asyncio.run(policy_in_force(settings))
    if not policy.is_local_domain(domain):
        raise click.ClickException(f"{domain} is not a local domain (local_domains: {', '.join(policy.local_domains)})")
    if address in asyncio.run(_directory(settings, address)):
        raise click.ClickException(f"{address} already exists; use `bulwark accounts passwd` to change its password")
    password = _new_password(address, policy, password_stdin)
    _publish(settings, ev.AccountRecorded(address=address, domain=domain, source="local",
                                          password_hash=hash_password(password), by=by or getpass.getuser()))
    click.echo(f"added {address}")


@accounts.command("passwd")
@click.argument("address")
@_stdin
@_by
def accounts_passwd(address: str, password_stdin: bool, by: str | None) -> None:
    """Set a local account's password (strong passwords only)."""
    from bulwark.passwords import hash_password

    settings = _settings()
    address = _address(address)
    account, _ = _account(settings, address)
    if account.source != "local":
        raise click.ClickException(
            f"{address} comes from the verification source {account.source!r}; its password is set there")
    policy = asyncio.run(policy_in_force(settings))
    password = _new_password(address, policy, password_stdin)
    _publish(settings, account.model_copy(update={
        "event_id": ev.new_id(), "occurred_at": ev.utcnow(),
        "password_hash": hash_password(password), "by": by or getpass.getuser(),
    }))
    click.echo(f"password changed for {address}")


def _set_state(address: str, enabled: bool, reason: str, by: str | None) -> None:
    settings = _settings()
    address = _address(address)
    _account(settings, address)
    _publish(settings, ev.AccountStateChanged(address=address, enabled=enabled, reason=reason,
                                              by=by or getpass.getuser()))
    click.echo(f"{'enabled' if enabled else 'disabled'} {address}")


@accounts.command("disable")
@click.argument("address")
@click.option("--reason", default="disabled by an administrator", show_default=True)
@_by
def accounts_disable(address: str, reason: str, by: str | None) -> None:
    """Disable an account: its AUTH is refused until it is enabled again."""
    _set_state(address, False, reason, by)


@accounts.command("enable")
@click.argument("address")
@click.option("--reason", default="enabled by an administrator", show_default=True)
@_by
def accounts_enable(address: str, reason: str, by: str | None) -> None:
    """Enable a disabled account."""
    _set_state(address, True, reason, by)


@accounts.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line")
def accounts_list(as_json: bool) -> None:
    """Every account: address, source, enabled or disabled (and why)."""
    for address, (account, state) in asyncio.run(_directory(_settings())).items():
        enabled = state is None or state.enabled
        if as_json:
            click.echo(json.dumps({"address": address, "source": account.source, "enabled": enabled,
                                   "reason": state.reason if state else None}))
        else:
            status = "enabled" if enabled else f"disabled ({state.reason}, by {state.by})"
            click.echo(f"{address:40} {account.source:12} {status}")
