"""``bulwark sources``: the user verification sources, and asking one of them directly."""

from __future__ import annotations

import asyncio
import sys

import click

from bulwark.settings import Settings


async def _policy(settings: Settings, from_file: bool):
    """The policy in force (published on config.policy, else the file), or the file alone."""
    if from_file:
        from bulwark.policy import load

        return load(settings.policy_path)
    from bulwark.policy.runtime import policy_in_force

    return await policy_in_force(settings)


@click.group()
def sources() -> None:
    """User verification sources (SMTP call-forward, LDAP, Active Directory, Microsoft 365, Minger)."""


@sources.command("list")
@click.option("--file", "from_file", is_flag=True, help="Read $BULWARK_POLICY, not the published policy")
def sources_list(from_file: bool) -> None:
    """Every source, and the domains that ask it."""
    policy = asyncio.run(_policy(Settings.from_env(), from_file))
    from bulwark.policy.verification import sources_for_domain

    for source in policy.verification_sources:
        domains = [d for d in policy.local_domains if source in sources_for_domain(policy, d)]
        kind = f"{source.type}{', default' if source.default else ''}"
        click.echo(f"{source.name:20} {kind:28} {', '.join(domains) or '(no domain)'}")


@sources.command("test")
@click.argument("source_name", metavar="SOURCE")
@click.argument("address")
@click.option("--file", "from_file", is_flag=True, help="Read $BULWARK_POLICY, not the published policy")
def sources_test(source_name: str, address: str, from_file: bool) -> None:
    """Ask one source about ADDRESS and print its answer and how long it took.

    Exit status: 0 valid, 1 invalid, 2 the source could not answer. Nothing
    is cached or recorded.
    """
    from ingest.verification import Verifier

    settings = Settings.from_env()
    policy = asyncio.run(_policy(settings, from_file))
    source = next((s for s in policy.verification_sources if s.name == source_name), None)
    if source is None:
        names = ", ".join(s.name for s in policy.verification_sources) or "none"
        raise click.ClickException(f"no source named {source_name!r} (the policy has: {names})")

    async def ask():
        verifier = Verifier(helo=policy.hostname)
        try:
            finding, _ = await verifier.ask(source, address, _NoCache())
            return finding
        finally:
            await verifier.close()

    import time

    started = time.monotonic()
    finding = asyncio.run(ask())
    took = (time.monotonic() - started) * 1000
    click.echo(f"{source.name} ({source.type}): {address} is {finding.result} in {took:.1f} ms: {finding.detail}")
    sys.exit({"valid": 0, "invalid": 1}.get(finding.result, 2))


class _NoCache:
    """A policy stand-in whose cache lifetimes are zero: a test asks every time."""

    class user_verification:  # noqa: N801 (mirrors the policy's section)
        positive_cache_seconds = 0
        negative_cache_seconds = 0
