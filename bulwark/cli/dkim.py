"""``bulwark dkim``: outbound DKIM signing keys and their DNS records (sinks/dkim_sign.py)."""

from __future__ import annotations

import asyncio
import stat
import sys
from pathlib import Path

import click

ALGORITHMS = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}


@click.group()
def dkim() -> None:
    """Outbound DKIM signing: keys and their DNS records."""


def _default_dir() -> Path:
    from bulwark.settings import Settings

    return Settings.from_env().data_dir / "secrets" / "dkim"


@dkim.command("keygen")
@click.argument("domain")
@click.argument("selector")
@click.option("--algorithm", type=click.Choice(sorted(ALGORITHMS)), default="rsa", show_default=True,
              help="rsa (RSA-SHA256, 2048 bits) or ed25519 (RFC 8463)")
@click.option("--bits", type=click.Choice(["2048", "3072", "4096"]), default="2048", show_default=True,
              help="RSA key size")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write DOMAIN.SELECTOR.key (default: $BULWARK_DATA_DIR/secrets/dkim)")
@click.option("--tlsrpt", is_flag=True, help="A key only for TLS reports: its record says s=tlsrpt (RFC 8460)")
def dkim_keygen(domain: str, selector: str, algorithm: str, bits: str, directory: Path | None, tlsrpt: bool) -> None:
    """Write a new private key (mode 0600) and print its DNS record and policy entry."""
    from pydantic import ValidationError

    from bulwark.policy.dkim import DkimKey
    from sinks.dkim_sign import generate_private_key, read_private_key, record_value, write_private_key, zone_line

    directory = (directory or _default_dir()).resolve()
    try:
        key = DkimKey(domain=domain, selector=selector, algorithm=ALGORITHMS[algorithm],
                      key_file=directory / f"{domain.lower().rstrip('.')}.{selector.lower()}.key",
                      use="tlsrpt" if tlsrpt else "all")
    except ValidationError as exc:
        raise click.BadParameter("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
    if key.key_file.exists():
        raise click.ClickException(f"{key.key_file} exists: a new key gets a new selector, and a key in use is "
                                   "never overwritten (docs/admin-guide.md, \"DKIM signing\")")
    try:
        write_private_key(key.key_file, generate_private_key(key.algorithm, int(bits)))
    except OSError as exc:
        raise click.ClickException(f"cannot write {key.key_file}: {exc.strerror}") from None
    value = record_value(read_private_key(key.key_file, key.algorithm), key.use)
    click.echo(f"# wrote {key.key_file} (mode 0600: give it to the user the delivery process runs as)")
    click.echo("# 1. publish this record in the domain's DNS:")
    click.echo(zone_line(key.selector, key.domain, value))
    click.echo("# 2. once it resolves (bulwark dkim check), add the key to the policy and apply it"
               + (" (rotation: in place of the old key's entry):" if not tlsrpt else ":"))
    click.echo("dkim_signing:\n  keys:")
    click.echo(f"    - {{domain: {key.domain}, selector: {key.selector}, algorithm: {key.algorithm}, "
               f"key_file: {key.key_file}" + (", use: tlsrpt" if tlsrpt else "") + "}")


@dkim.command("check")
@click.argument("path", required=False)
@click.option("--no-dns", is_flag=True, help="Only read the key files; do not look up the published records")
def dkim_check(path: str | None, no_dns: bool) -> None:
    """Check each key of the policy file: its file, and that DNS publishes its public key.

    Run it where the delivery process runs (it reads the same files), after
    adding a key and before applying the policy. Exits 1 when a key cannot sign
    or its record is not the key's.
    """
    from bulwark.policy import PolicyError, load
    from bulwark.settings import Settings
    from sinks.dkim_sign import KeyProblem, read_private_key, record_value, zone_line

    settings = Settings.from_env()
    try:
        policy = load(path or settings.policy_path)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    keys = policy.dkim_signing.keys
    if not keys:
        click.echo("no DKIM keys in the policy: nothing is signed")
        return
    if not policy.dkim_signing.enabled:
        click.echo("dkim_signing.enabled is false: these keys sign nothing until it is true")
    bad = False
    for key in keys:
        name = f"{key.selector}._domainkey.{key.domain}"
        try:
            private = read_private_key(key.key_file, key.algorithm)
        except KeyProblem as exc:
            click.echo(f"[FAIL] {name} ({key.algorithm}): {exc}")
            bad = True
            continue
        notes = []
        mode = stat.S_IMODE(key.key_file.stat().st_mode)
        if mode & 0o077:
            notes.append(f"the key file is mode {mode:04o}: make it 0600")
        if key.algorithm == "rsa-sha256" and private.key_size < 2048:
            notes.append(f"{private.key_size}-bit RSA: RFC 8301 recommends 2048 bits or more")
        expected = record_value(private, key.use)
        status = "ok"
        if not no_dns:
            published = asyncio.run(_published(settings, f"{name}."))
            status = _compare(expected, published)
        line = f"[{'OK' if status == 'ok' else 'FAIL'}] {name} ({key.algorithm}, {key.key_file})"
        click.echo(line + ("" if status == "ok" else f": {status}"))
        for note in notes:
            click.echo(f"    note: {note}")
        if status != "ok":
            bad = True
            click.echo(f"    publish: {zone_line(key.selector, key.domain, expected)}")
    sys.exit(1 if bad else 0)


async def _published(settings, name: str) -> list[str] | str:
    """The TXT values at ``name`` (strings joined), or why none could be had."""
    import dns.exception
    import dns.resolver

    from sinks.routing import resolver_for

    try:
        answer = await resolver_for(settings.dns_resolver).resolve(name, "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as exc:
        return f"the DNS lookup failed ({type(exc).__name__})"
    return [b"".join(r.strings).decode("ascii", "replace") for r in answer]


def _tags(value: str) -> dict[str, str]:
    tags = {}
    for part in value.split(";"):
        name, eq, text = part.partition("=")
        if eq:
            tags[name.strip()] = "".join(text.split())
    return tags


def _compare(expected: str, published: list[str] | str) -> str:
    """'ok', or what is wrong with the published record."""
    if isinstance(published, str):
        return published
    if not published:
        return "no record is published"
    if len(published) > 1:
        return f"{len(published)} records are published; a selector has exactly one"
    want, have = _tags(expected), _tags(published[0])
    if have.get("p") != want["p"] or have.get("k", "rsa") != want["k"]:
        return "the published record is not this key's (a different p= or k=)"
    if have.get("s", "*") != want.get("s", "*"):
        return f"the published record's s={have.get('s', '*')} is not s={want.get('s', '*')}"
    return "ok"
