"""``bulwark dlp``: the Data Leak Prevention rules, and what they find in a file."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import click


@click.group()
def dlp() -> None:
    """Data Leak Prevention rules."""


@dlp.command("rules")
@click.option("--category", default=None, help="Only this category (payment_card, national_id, secret...)")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per rule")
def dlp_rules(category: str | None, as_json: bool) -> None:
    """List the rules: name, what it detects, its validator, default action and direction."""
    from streams.checks.dlp.rules import RULES

    rules = [r for r in RULES if category is None or r.category == category]
    if not rules:
        raise click.ClickException(f"no rules in category {category!r}")
    for r in rules:
        row = {
            "name": r.name, "result": r.result_name, "category": r.category, "detects": r.detects,
            "validator": r.validator_name, "keywords": list(r.keywords), "keyword_required": r.needs_keyword,
            "keyword_as_label": r.needs_keyword and r.validator is None,
            "default_action": r.default_action, "direction": r.default_direction,
        }
        if as_json:
            click.echo(json.dumps(row))
            continue
        if r.needs_keyword:
            keyword = "keyword required" if r.validator else "keyword required, labelling it"
        else:
            keyword = "keywords raise confidence" if r.keywords else ""
        click.echo(f"{r.name:28} {r.default_action:10} {r.default_direction:8} {r.category:15} {r.detects}")
        click.echo(f"{'':28} validator: {r.validator_name or 'format only'}" + (f"; {keyword}" if keyword else ""))
    if not as_json:
        click.echo(f"\n{len(rules)} rules; results are named DLP_<rule>, e.g. {rules[0].result_name}")


def _settings(policy_path: str | None):
    from streams.checks.dlp import Settings

    if policy_path is None:
        return Settings()
    from bulwark.policy import PolicyError, load

    try:
        policy = load(policy_path)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None
    return Settings.model_validate(policy.checks.get("dlp", {}))


def _as_message(data: bytes):
    from schemas.events import Envelope
    from streams.message import Message

    # Only the content matters here; the envelope is a placeholder.
    envelope = Envelope(mail_from="", rcpt_to=["test@invalid"], sha256="0" * 64, size=len(data),
                        client_ip="127.0.0.1", received_at=datetime.now(timezone.utc))
    return Message("dlp-test", None, envelope, "outbound", data)


@dlp.command("test")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--policy", "policy_path", default=None, help="Use this policy's DLP settings (default: the built-in ones)")
def dlp_test(path: str, policy_path: str | None) -> None:
    """Show what each rule finds in FILE (a .eml message, or a PDF, DOCX, XLSX, CSV, text or ZIP file).

    Every enabled rule is run, whatever its direction. Findings are masked as
    in the verdict. Exits 1 when anything is found, 0 when nothing is.
    """
    from streams.checks.dlp import results_from
    from streams.checks.dlp.extract import Extracted, extract_file, extract_message
    from streams.checks.dlp.scan import scan

    settings = _settings(policy_path)
    data = Path(path).read_bytes()
    if path.lower().endswith((".eml", ".msg.txt", ".mbox")):
        from streams.message import UnreadableMessage

        try:
            extracted = extract_message(_as_message(data), settings.limits(), settings.scan_attachments)
        except UnreadableMessage as exc:  # the DLP check fails on it the same way (DLP_FAIL, quarantined)
            raise click.ClickException(f"{path}: {exc}") from None
    else:
        extracted = Extracted()
        extract_file(Path(path).name, data, extracted, settings.limits())
    active = settings.active(None)
    found = scan(extracted.texts, active, settings.keyword_window)
    results = [r for r in results_from(found, extracted, settings, len(active)) if r.outcome != "pass"]
    click.echo(f"{path}: {len(extracted.texts)} text(s) read, {len(active)} rules run")
    if not results:
        click.echo("nothing found")
        sys.exit(0)
    for result in results:
        click.echo(f"\n{result.name} ({result.outcome}): {result.detail}")
        for line in result.evidence:
            click.echo(f"    {line}")
    sys.exit(1)
