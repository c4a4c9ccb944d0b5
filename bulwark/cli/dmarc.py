"""``bulwark dmarc``: what other organisations' DMARC aggregate reports say about the local domains.

The reports are the events the DMARC reports sink published on
``dmarc.reports`` (sinks/dmarc_reports.py); this reads the topic without a
consumer group and sums them per reporting organisation and domain.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import click

from schemas import events as ev

TOP_SOURCES = 10


@dataclass
class Summary:
    """What one organisation reported about one domain, over every report it sent."""

    org_name: str
    domain: str
    policy: ev.DmarcPolicyPublished
    reports: set[str] = field(default_factory=set)
    begin: datetime | None = None
    end: datetime | None = None
    messages: int = 0
    dmarc: Counter = field(default_factory=Counter)
    dkim: Counter = field(default_factory=Counter)
    spf: Counter = field(default_factory=Counter)
    dispositions: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)
    failing_sources: Counter = field(default_factory=Counter)

    def add(self, report: ev.DmarcReportReceived) -> None:
        self.reports.add(report.report_key)
        self.begin = min(filter(None, (self.begin, report.date_begin)))
        self.end = max(filter(None, (self.end, report.date_end)))
        for row in report.records:
            self.messages += row.count
            # DMARC passes when DKIM or SPF passed aligned (RFC 7489 section 4.2).
            passed = "pass" if "pass" in (row.dkim, row.spf) else "fail"
            self.dmarc[passed] += row.count
            self.dkim[row.dkim] += row.count
            self.spf[row.spf] += row.count
            self.dispositions[row.disposition] += row.count
            self.sources[row.source_ip] += row.count
            if passed == "fail":
                self.failing_sources[row.source_ip] += row.count

    def top_sources(self, n: int = TOP_SOURCES) -> list[dict]:
        return [{"ip": ip, "messages": count, "dmarc_fail": self.failing_sources[ip]}
                for ip, count in self.sources.most_common(n)]

    def as_json(self) -> dict:
        return {
            "kind": "summary", "org_name": self.org_name, "domain": self.domain,
            "policy_published": self.policy.model_dump(mode="json"), "reports": len(self.reports),
            "begin": self.begin.isoformat(), "end": self.end.isoformat(), "messages": self.messages,
            "dmarc": _pass_fail(self.dmarc), "dkim_aligned": _pass_fail(self.dkim), "spf_aligned": _pass_fail(self.spf),
            "dispositions": dict(self.dispositions.most_common()), "top_source_ips": self.top_sources(),
        }


def _pass_fail(counter: Counter) -> dict:
    # Reporters write pass or fail; anything else is kept under its own name.
    return {"pass": counter["pass"], "fail": counter["fail"],
            **{k: v for k, v in counter.items() if k not in ("pass", "fail")}}


def summarise(events: list[ev.Event], domain: str | None = None,
              since: datetime | None = None) -> tuple[list[Summary], list[ev.DmarcReportUnreadable]]:
    """Summaries per (organisation, domain), and the unreadable reports, of the events on dmarc.reports.

    A report sent twice (or read twice) counts once: the last copy of each
    of its parts is kept. ``since``: reports whose period ends after it, and
    unreadable ones received after it. ``domain``: reports about it only
    (and no unreadable ones, which are about no domain anyone could read).
    """
    latest: dict[tuple[str, int], ev.DmarcReportReceived] = {}
    unreadable: dict[str, ev.DmarcReportUnreadable] = {}
    for event in events:
        if isinstance(event, ev.DmarcReportReceived):
            latest[(event.report_key, event.part)] = event
        elif isinstance(event, ev.DmarcReportUnreadable):
            unreadable[event.report_key] = event
    summaries: dict[tuple[str, str], Summary] = {}
    for report in sorted(latest.values(), key=lambda r: r.occurred_at):
        about = report.policy_published.domain
        if domain is not None and about != domain:
            continue
        if since is not None and report.date_end <= since:
            continue
        key = (report.org_name, about)
        if key not in summaries:
            summaries[key] = Summary(report.org_name, about, report.policy_published)
        summaries[key].policy = report.policy_published  # the newest report's view of the record
        summaries[key].add(report)
    failed = [] if domain is not None else [
        u for u in sorted(unreadable.values(), key=lambda u: u.occurred_at) if since is None or u.occurred_at >= since]
    return sorted(summaries.values(), key=lambda s: (s.domain, s.org_name.lower())), failed


def _counts(counter: Counter) -> str:
    return ", ".join(f"{name} {count}" for name, count in counter.most_common()) or "none"


def render(summaries: list[Summary], unreadable: list[ev.DmarcReportUnreadable]) -> str:
    lines = []
    for s in summaries:
        p = s.policy
        record = f"p={p.p}" + (f" sp={p.sp}" if p.sp else "") + (f" pct={p.pct}" if p.pct is not None else "")
        reports = f"{len(s.reports)} report{'s' if len(s.reports) != 1 else ''}"
        lines += [
            f"{s.domain} reported by {s.org_name} ({record}): {reports}, "
            f"{s.begin:%Y-%m-%d %H:%M} to {s.end:%Y-%m-%d %H:%M} UTC",
            f"  messages      {s.messages}",
            f"  DMARC         pass {s.dmarc['pass']}, fail {s.dmarc['fail']}",
            f"  DKIM aligned  {_counts(s.dkim)}",
            f"  SPF aligned   {_counts(s.spf)}",
            f"  dispositions  {_counts(s.dispositions)}",
            "  top source IPs (messages, of which DMARC fail):",
            *(f"    {row['ip']:39} {row['messages']:>8} {row['dmarc_fail']:>8}" for row in s.top_sources()),
            "",
        ]
    if unreadable:
        lines.append(f"unreadable reports: {len(unreadable)}")
        for u in unreadable:
            sender = u.received.from_header or u.received.mail_from or "<>"
            lines.append(f"  {u.occurred_at:%Y-%m-%d %H:%M}  {u.message_id}  from {sender} "
                         f"[{u.received.client_ip}]: {u.error}")
    return "\n".join(lines).rstrip("\n")


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD, or an ISO 8601 time)",
                                 param_hint="--since") from None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


async def read_reports(settings) -> list[ev.Event]:
    from bulwark.kafka import read_topics
    from schemas.topics import DMARC_REPORTS

    return [record.event for record in await read_topics(settings, [DMARC_REPORTS.name])]


@click.group()
def dmarc() -> None:
    """DMARC aggregate reports other organisations send about the local domains."""


@dmarc.command("report")
@click.option("--domain", default=None, help="Only reports about this domain (the policy_published domain)")
@click.option("--since", "since_text", default=None, metavar="DATE",
              help="Only reports whose period ends after DATE (YYYY-MM-DD, UTC)")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per organisation and domain (and per "
              "unreadable report)")
def dmarc_report(domain: str | None, since_text: str | None, as_json: bool) -> None:
    """Per reporting organisation and domain: messages, DMARC, aligned DKIM and SPF, dispositions, top sources."""
    from bulwark.settings import Settings

    since = _since(since_text)
    events = asyncio.run(read_reports(Settings.from_env()))
    summaries, unreadable = summarise(events, domain.lower().rstrip(".") if domain else None, since)
    if as_json:
        for s in summaries:
            click.echo(json.dumps(s.as_json()))
        for u in unreadable:
            click.echo(json.dumps({"kind": "unreadable", **u.model_dump(mode="json")}))
        return
    if not summaries and not unreadable:
        click.echo("no DMARC aggregate reports" + (f" about {domain}" if domain else "")
                   + (f" ending after {since:%Y-%m-%d %H:%M} UTC" if since else "")
                   + " (reports are read from mail to dmarc_reports.addresses: publish one as rua=mailto: in each "
                   "local domain's DMARC record)")
        return
    click.echo(render(summaries, unreadable))
