"""``bulwark``: the one command-line entry point."""

from __future__ import annotations

import asyncio
import getpass
import json
import sys

import click

from bulwark.settings import METRICS_PORTS, Settings


def _settings() -> Settings:
    return Settings.from_env()


def _run(coro):
    return asyncio.run(coro)


@click.group()
def main() -> None:
    """Bulwark, an email security gateway on Apache Kafka.

    Where things run comes from BULWARK_* environment variables (see the
    docs/admin-guide.md); what the gateway does comes from the policy file.
    """


# -- services -----------------------------------------------------------------


@main.command()
def ingest() -> None:
    """Run the SMTP server (ingest)."""
    from ingest.server import serve

    _run(serve(_settings()))


@main.group()
def streams() -> None:
    """The Faust stream processors."""


@streams.command("worker")
@click.option("--loglevel", default="info", show_default=True)
def streams_worker(loglevel: str) -> None:
    """Run a Faust worker (content checks and verdicts)."""
    from streams.app import run_worker

    run_worker(_settings(), loglevel)


@main.group()
def sinks() -> None:
    """The sinks that act on verdicts."""


@sinks.command("delivery")
def sinks_delivery() -> None:
    """Run the delivery sink."""
    from sinks.delivery import serve

    _run(serve(_settings()))


@sinks.command("quarantine")
def sinks_quarantine() -> None:
    """Run the quarantine sink."""
    from sinks.quarantine import serve

    _run(serve(_settings()))


@sinks.command("dmarc-reports")
def sinks_dmarc_reports() -> None:
    """Run the DMARC reports sink: aggregate reports mailed to dmarc_reports.addresses become events."""
    from sinks.dmarc_reports import serve

    _run(serve(_settings()))


@sinks.command("trace-index")
def sinks_trace_index() -> None:
    """Run the trace indexer: where every record of a message, session, address or account is."""
    from sinks.trace_index import serve

    serve(_settings())


@sinks.command("unjudged")
def sinks_unjudged() -> None:
    """Run the safety net: send again any received message that got no verdict in time."""
    from sinks.unjudged import serve

    serve(_settings())


@sinks.command("export")
@click.option("--name", help="Names the consumer group bulwark-export-NAME (default siem; $BULWARK_EXPORT_NAME)")
@click.option("--format", "fmt", type=click.Choice(["ecs", "cef", "syslog"]),
              help="ECS JSON lines, CEF, or RFC 5424 syslog (default ecs; $BULWARK_EXPORT_FORMAT)")
@click.option("--to", help="A file, tls://HOST[:PORT] (syslog over TLS, RFC 5425) or - (default; $BULWARK_EXPORT_TO)")
@click.option("--topic", "topics", multiple=True,
              help="A topic to export, repeatable (default: every audit topic; $BULWARK_EXPORT_TOPICS)")
@click.option("--ca-file", type=click.Path(dir_okay=False), help="Trust anchors for the collector (PEM)")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Client certificate for the collector (PEM)")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Its private key (PEM)")
@click.option("--tls-server-name", help="Name the collector's certificate must carry (default: the host in --to)")
@click.option("--hostname", help="HOSTNAME in syslog and observer.hostname (default: this host's name)")
@click.option("--facility", help="Syslog facility name (default local0)")
@click.option("--enterprise-number", type=int, help="IANA enterprise number of the syslog SD-IDs (default 32473)")
@click.option("--start", type=click.Choice(["earliest", "latest"]),
              help="Where a new export starts (default earliest: all history kept)")
@click.option("--metrics-port", type=int,
              help="Serve Prometheus metrics here (default $BULWARK_EXPORT_METRICS_PORT, 9467; 0: none)")
def sinks_export(fmt, topics, metrics_port, **flags) -> None:
    """Export the audit topics to a SIEM, at least once and in order per key (docs/operations.md)."""
    from dataclasses import replace
    from pathlib import Path

    from bulwark.settings import ExportSettings
    from sinks.export import serve, validate

    changes = {k: v for k, v in flags.items() if v is not None}
    for name in ("ca_file", "tls_cert", "tls_key"):
        if name in changes:
            changes[name] = Path(changes[name])
    if fmt:
        changes["format"] = fmt
    if topics:
        changes["topics"] = tuple(topics)
    export = replace(ExportSettings.from_env(), **changes)
    try:
        validate(export)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    settings = _settings()
    if metrics_port is not None:  # a second export on the host needs a port of its own
        settings = settings.with_(metrics_ports=(*settings.metrics_ports, ("export", metrics_port)))
    serve(settings, export)


@main.command("demo-mailbox")
def demo_mailbox() -> None:
    """Run the demo downstream mail server (writes a Maildir)."""
    from bulwark.demo_mailbox import serve

    _run(serve(_settings()))


@main.command("up")
def up() -> None:
    """Run the whole gateway locally: Kafka, topics, ingest, worker, sinks, demo mailbox."""
    from bulwark.devstack import run_local

    sys.exit(run_local(_settings()))


# -- topics and schemas ---------------------------------------------------------


@main.group()
def topics() -> None:
    """Bulwark's Kafka topics."""


@topics.command("ensure")
def topics_ensure() -> None:
    """Create the declared topics that are missing; report the others."""
    from bulwark.kafka import ensure_topics

    from streams.app import declare_internal_topics, seed_worker_offsets

    reports = _run(ensure_topics(_settings()))
    bad = False
    for report in reports:
        click.echo(f"{report.name:20} {report.status}")
        bad |= report.status not in ("ok", "created")
    for name in _run(declare_internal_topics(_settings())):
        click.echo(f"{name:20} ok (stream processor state)")
    for name in _run(seed_worker_offsets(_settings())):
        click.echo(f"{name:20} offsets committed for the workers' group (from the first record)")
    sys.exit(1 if bad else 0)


@topics.command("list")
def topics_list() -> None:
    """Print the declared topics."""
    from schemas.topics import ALL_TOPICS

    for spec in ALL_TOPICS:
        events = ", ".join(f"{c.TYPE} v{c.VERSION}" for c in spec.carries)
        click.echo(f"{spec.name:20} key={spec.key}; {spec.kind}; {spec.partitions} partitions\n    {spec.purpose}\n    carries: {events}")


@main.group()
def kafka() -> None:
    """The secure Kafka profile: certificates, principals and ACLs (docs/operations.md, "Securing Kafka")."""


def _secure_files():
    from bulwark.kafka_secure import SecureFiles

    return SecureFiles(_settings().kafka_secure_dir)


@kafka.command("secure-init")
@click.option("--host", "hosts", multiple=True,
              help="A name or address clients reach the broker at, repeatable (default: the host of "
                   "BULWARK_KAFKA_BOOTSTRAP); the broker's certificate carries them all")
def kafka_secure_init(hosts: tuple[str, ...]) -> None:
    """Write the CA, the broker's certificate and every principal's credentials (existing files are kept)."""
    from bulwark.kafka_secure import broker_names, prepare
    from schemas.acl import BROKER, PRINCIPALS

    settings = _settings()
    files = prepare(settings.kafka_secure_dir, list(hosts) or [settings.kafka_bootstrap.rpartition(":")[0]])
    click.echo(f"CA certificate     {files.ca}   (clients: BULWARK_KAFKA_CA_FILE)")
    click.echo(f"broker keystore    {files.broker}   (valid for {', '.join(broker_names(files))})")
    for name in [BROKER, *(p.name for p in PRINCIPALS)]:
        click.echo(f"principal {name:14} {files.credentials(name)}")


@kafka.command("provision")
def kafka_provision() -> None:
    """As the broker's principal: create every principal's SCRAM credential and set its ACLs to the table's."""
    from bulwark.kafka_secure import provision

    for name, count in provision(_settings(), _secure_files()).items():
        click.echo(f"User:{name:14} {count} ACLs")


@kafka.command("add-reader")
@click.argument("name")
@click.option("--group-prefix", help="Its consumer groups' prefix (default NAME-)")
def kafka_add_reader(name: str, group_prefix: str | None) -> None:
    """A read-only principal for an outside consumer (a SIEM): the audit topics, its own consumer groups."""
    from bulwark.kafka_secure import provision
    from schemas.acl import reader

    try:
        principal = reader(name, f"{group_prefix}*" if group_prefix else None)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    files = _secure_files()
    provision(_settings(), files, (principal,))
    click.echo(f"User:{name} reads the audit topics, consumer groups {principal.groups[0]}")
    click.echo(f"credentials: {files.credentials(name)}   CA: {files.ca}")


@kafka.command("acls")
@click.option("--bindings", is_flag=True, help="Every ACL, one per line, rather than the table")
def kafka_acls(bindings: bool) -> None:
    """Print who may write and read which topic (schemas/acl.py)."""
    from schemas import acl

    if not bindings:
        click.echo(acl.table_markdown())
        return
    for principal in acl.PRINCIPALS:
        for b in acl.bindings(principal):
            click.echo(f"{b.principal:20} {b.operation:17} {b.resource_type:16} {b.pattern:8} {b.resource_name}")


@main.group()
def schemas() -> None:
    """JSON Schema files for outside consumers."""


@schemas.command("generate")
def schemas_generate() -> None:
    """Write schemas/json/ from the event definitions."""
    from schemas.jsonschema import JSON_DIR, write

    names = write()
    click.echo(f"wrote {len(names)} files to {JSON_DIR}")


@schemas.command("check")
def schemas_check() -> None:
    """Exit non-zero when schemas/json/ is out of date."""
    from schemas.jsonschema import stale

    differing = stale()
    for name in differing:
        click.echo(f"stale: {name}", err=True)
    sys.exit(1 if differing else 0)


# -- policy ---------------------------------------------------------------------


@main.group()
def policy() -> None:
    """The policy file."""


@policy.command("check")
@click.argument("path", required=False)
def policy_check(path: str | None) -> None:
    """Validate a policy file (default: $BULWARK_POLICY) and print its version."""
    from bulwark.policy import PolicyError, load

    try:
        loaded = load(path or _settings().policy_path)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    click.echo(f"policy ok, version {loaded.version}")


@policy.command("apply")
@click.argument("path")
@click.option("--by", default=None, help="Who applies it (default: the current user)")
@click.option("--if-changed", is_flag=True, help="Do nothing when this version is already active")
def policy_apply(path: str, by: str | None, if_changed: bool) -> None:
    """Validate a policy file and make it active on every component (no restart)."""
    from bulwark.policy import PolicyError
    from bulwark.policy.admin import apply

    try:
        applied = _run(apply(_settings(), path, by or getpass.getuser(), only_if_changed=if_changed))
    except PolicyError as exc:
        click.echo(f"{exc}\nnot applied: the running policy stays in force", err=True)
        sys.exit(2)
    if applied.event is None:
        click.echo(f"policy {applied.policy.version} is already active")
    else:
        was = f" (was {applied.previous})" if applied.previous else ""
        click.echo(f"applied policy {applied.policy.version}{was}")


@policy.command("show")
@click.option("--document", is_flag=True, help="Also print the active policy document (YAML)")
@click.option("--history", is_flag=True, help="List every version still on config.policy")
def policy_show(document: bool, history: bool) -> None:
    """Print the active policy version: when, by whom, from which file."""
    import yaml

    from bulwark.policy.admin import published_history
    from bulwark.policy.runtime import describe

    events = _run(published_history(_settings()))
    if not events:
        click.echo(f"no policy published; components use the file {_settings().policy_path} "
                   "(run `bulwark policy apply`)", err=True)
        sys.exit(1)
    if history:
        for event in events[:-1]:
            click.echo(f"  {describe(event)}")
    click.echo(f"active: {describe(events[-1])}")
    if document:
        click.echo(yaml.safe_dump(events[-1].document, sort_keys=False))


@policy.command("audit")
@click.argument("path", required=False)
def policy_audit(path: str | None) -> None:
    """Score the active policy (or a file) against the best-practice guide; exit 1 if any is not met."""
    from bulwark.policy import PolicyError, from_document, load
    from bulwark.policy.admin import active
    from bulwark.policy.audit import audit, render

    try:
        if path:
            loaded, source = load(path), path
        else:
            event = _run(active(_settings()))
            if event is None:
                loaded, source = load(_settings().policy_path), f"{_settings().policy_path} (nothing published)"
            else:
                loaded = from_document(event.document, "config.policy", version=event.policy_version)
                source = "the active policy"
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    findings = audit(loaded)
    click.echo(f"policy {loaded.version}, {source}")
    click.echo(render(findings))
    sys.exit(0 if all(f.met for f in findings) else 1)


# -- forensics ------------------------------------------------------------------


def _when(value: str | None):
    """A time given on the command line: ISO 8601 (UTC unless it says otherwise), or 30m, 6h, 2d ago."""
    import re
    from datetime import datetime, timedelta, timezone

    if value is None:
        return None
    ago = re.fullmatch(r"(\d+)([smhd])", value.strip())
    if ago:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[ago[2]]
        return datetime.now(timezone.utc) - timedelta(**{unit: int(ago[1])})
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither an ISO 8601 time nor a duration such as 6h") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _print_records(records, as_json: bool) -> None:
    from bulwark.trace import describe

    for record in records:
        if as_json:
            click.echo(json.dumps({"topic": record.topic, "partition": record.partition, "offset": record.offset,
                                   "event": record.event.model_dump(mode="json")}))
        else:
            when = record.event.occurred_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
            click.echo(f"{when}  {record.topic:17} {record.event.TYPE:21} {describe(record.event)}")


@main.command()
@click.argument("ident", required=False)
@click.option("--client-ip", help="Every session from this client address (with --since/--until)")
@click.option("--account", help="Every session that logged in as or sent from this address, every message "
                                "from or to it (with --since/--until)")
@click.option("--since", help="From this time: ISO 8601 (UTC unless stated) or a duration ago (30m, 6h, 2d)")
@click.option("--until", help="Up to this time (same forms); default now")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line")
def trace(ident: str | None, client_ip: str | None, account: str | None, since: str | None, until: str | None,
          as_json: bool) -> None:
    """Print the timeline of a message id or a session id, from Kafka alone.

    With the trace indexer running (`bulwark sinks trace-index`), it reads
    only the records it prints; without, it scans the topics and says so.
    """
    from bulwark.trace import Index, trace as run_trace

    if sum(x is not None for x in (ident, client_ip, account)) != 1:
        raise click.UsageError("give one of: a message or session id, --client-ip, --account")
    if ident is not None and (since or until):
        raise click.UsageError("--since and --until go with --client-ip or --account")
    settings = _settings()
    if ident is not None:
        records, index = _run(run_trace(settings, ident))
        if index is None:
            click.echo("no trace index (is `bulwark sinks trace-index` running?): scanned the topics", err=True)
        elif index.lag:
            click.echo(f"the index had {index.lag} record(s) to catch up on: read from the topics", err=True)
        if not records:
            click.echo(f"nothing on the topics for {ident}", err=True)
            sys.exit(1)
        _print_records(records, as_json)
        return
    index = Index.open(settings)
    try:
        if index.scanned:
            click.echo("no trace index (is `bulwark sinks trace-index` running?): scanned the topics", err=True)
        first, last = _when(since), _when(until)
        timelines = (index.sessions_from(client_ip, first, last) if client_ip
                     else index.account(account, first, last))
    finally:
        index.close()
    if not timelines:
        click.echo(f"nothing on the topics for {client_ip or account} in that time", err=True)
        sys.exit(1)
    for timeline in timelines:
        if not as_json:
            click.echo(f"== {timeline.title}")
        _print_records(timeline.records, as_json)


class _Progress:
    """A progress bar on stderr, made when the length is first known; silent when stderr is not a terminal."""

    def __init__(self, label: str):
        self.label = label
        self.bar = None
        self.shown = 0

    def __call__(self, done: int, total: int | None = None) -> None:
        if not sys.stderr.isatty():
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total or 0, label=self.label, file=sys.stderr,
                                         show_pos=True, show_eta=True)
            self.bar.__enter__()
        self.bar.update(done - self.shown)
        self.shown = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@main.group(invoke_without_command=True)
@click.option("--since", help="Verdicts from this time: ISO 8601 (UTC unless stated) or a duration ago (6h, 2d)")
@click.option("--until", help="Verdicts up to this time (same forms)")
@click.option("--sender", multiple=True, help="Envelope sender (repeatable)")
@click.option("--recipient", multiple=True, help="Envelope recipient (repeatable)")
@click.option("--domain", multiple=True, help="The sender's or a recipient's domain (repeatable)")
@click.option("--client-ip", multiple=True, help="Client address (repeatable)")
@click.option("--action", multiple=True, type=click.Choice(["deliver", "quarantine", "reject", "redirect"]),
              help="Recorded action (repeatable)")
@click.option("--result", multiple=True, help="A result name the recorded verdict found, e.g. VIRUS_FOUND")
@click.option("--policy-version", multiple=True, help="Recorded policy version (repeatable)")
@click.option("--policy", "candidate", type=click.Path(exists=True, dir_okay=False),
              help="A candidate policy file: which messages would change action under it, and why")
@click.option("--all", "show_all", is_flag=True, help="List every replayed message, not only those that differ")
@click.option("--concurrency", default=8, show_default=True, help="Messages judged at once")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: the figures and every message")
@click.option("--publish", is_flag=True, help="Also publish what it found to forensics.replay")
@click.pass_context
def replay(ctx, since, until, sender, recipient, domain, client_ip, action, result, policy_version, candidate,
           show_all, concurrency, as_json, publish) -> None:
    """Judge recorded messages again, from their raw copies in the blob store.

    Without --policy, each under the policy version it was judged under: the
    verdict should be the one recorded, and any difference is shown with its
    cause (exit status 1). With --policy FILE, under that candidate: which
    messages would change action, and why. Reads only; writes to no topic
    unless --publish. `bulwark replay sessions` does the same for the bans
    and limits of Dynamic Screening and Account Hijack Detection.
    """
    if ctx.invoked_subcommand is not None:
        from click.core import ParameterSource

        given = [name for name in ctx.params if ctx.get_parameter_source(name) != ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')} goes after `{ctx.invoked_subcommand}`")
        return
    from bulwark import replay as rp

    settings = _settings()
    policy = _candidate(candidate)
    selection = rp.Selection.of(_when(since), _when(until), sender, recipient, domain, client_ip, action, result,
                                policy_version)
    stats = rp.ReadStats()
    reading = _Progress("reading mail.verdicts")
    try:
        verdicts = list(rp.select(settings, selection, stats, reading))
    finally:
        reading.close()
    judging = _Progress("judging again")
    try:
        outcomes = _run(rp.replay(settings, verdicts, policy, concurrency,
                                  lambda done: judging(done, len(verdicts))))
    finally:
        judging.close()
    changed = [o for o in outcomes if o.changed]
    errors = [o for o in outcomes if o.error]
    if publish:
        from bulwark import forensics

        replay_id = _run(forensics.publish(
            settings, [forensics.verdict_finding(o) for o in outcomes if show_all or o.changed or o.error],
            replay="verdicts", mode="candidate" if policy else "recorded",
            candidate_policy=policy.version if policy else None,
            selection={k: v for k, v in ctx.params.items() if k in _SELECTORS and v not in (None, ())},
            read=stats.read, selected=stats.selected))
        click.echo(f"published to forensics.replay as replay {replay_id}", err=True)
    if as_json:
        click.echo(json.dumps({
            "mode": "candidate" if policy else "recorded",
            "candidate_policy": policy.version if policy else None,
            "read": stats.read, "selected": stats.selected, "read_seconds": round(stats.seconds, 3),
            "changed": len(changed), "not_replayed": len(errors),
            "messages": [o.as_json() for o in outcomes if show_all or o.changed or o.error],
        }, indent=2))
    else:
        what = (f"would change action under policy {policy.version}" if policy
                else "differ from the recorded verdict")
        click.echo(f"{stats.read} verdicts read in {stats.seconds:.1f}s, {stats.selected} selected and judged again: "
                   f"{len(changed)} {what}, {len(errors)} could not be replayed")
        shown = rp.table(outcomes, candidate=policy is not None, show_all=show_all)
        if shown:
            click.echo(shown)
    if policy is None and (changed or errors):
        sys.exit(1)


#: The options that select what a replay reads (what a published replay records of its selection).
_SELECTORS = {"since", "until", "sender", "recipient", "domain", "client_ip", "action", "result", "policy_version",
              "account"}


def _candidate(path: str | None):
    from bulwark.policy import PolicyError, load

    if not path:
        return None
    try:
        return load(path)
    except PolicyError as exc:
        raise click.UsageError(str(exc)) from None


@replay.command("sessions")
@click.option("--since", help="Facts from this time: ISO 8601 (UTC unless stated) or a duration ago (6h, 2d)")
@click.option("--until", help="Facts up to this time (same forms)")
@click.option("--client-ip", multiple=True, help="Dynamic Screening of this client address (repeatable)")
@click.option("--account", multiple=True, help="Account Hijack Detection of this account (repeatable)")
@click.option("--only", "features", multiple=True, type=click.Choice(["screening", "hijack"]),
              help="Only this feature (default: both, or the one the selection names)")
@click.option("--policy", "candidate", type=click.Path(exists=True, dir_okay=False),
              help="A candidate policy file: which bans and limits it would issue, and where they differ")
@click.option("--all", "show_all", is_flag=True, help="With --policy, also list the recorded policies' facts")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: the figures, the facts, the differences")
@click.option("--publish", is_flag=True, help="Also publish what it found to forensics.replay")
@click.pass_context
def replay_sessions(ctx, since, until, client_ip, account, features, candidate, show_all, as_json, publish) -> None:
    """Count smtp.sessions and mail.received again: which bans, limits and disables.

    Runs the agents' own Dynamic Screening and Account Hijack Detection code
    in event time. Without --policy, under the policy in force when each
    event happened: the facts it issues, and any the live agents published
    that it does not (exit status 1). With --policy FILE, under that
    candidate too: client address by client address and account by account,
    where the facts differ, and which settings explain it. Reads only;
    writes to no topic unless --publish.
    """
    from bulwark import replay_sessions as rs

    settings = _settings()
    policy = _candidate(candidate)
    selection = rs.Selection.of(_when(since), _when(until), client_ip, account, features)
    bars: list[_Progress] = []

    def bar(label: str) -> _Progress:
        if bars:
            bars[-1].close()
        bars.append(_Progress(label))
        return bars[-1]
    try:
        report = _run(rs.replay(settings, selection, policy, bar))
    finally:
        if bars:
            bars[-1].close()
    if publish:
        from bulwark import forensics

        replay_id = _run(forensics.publish(
            settings, forensics.session_findings(report), replay="sessions",
            mode="candidate" if policy else "recorded", candidate_policy=policy.version if policy else None,
            selection=selection.as_json(), read=report.read.read, selected=report.counted))
        click.echo(f"published to forensics.replay as replay {replay_id}", err=True)
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        line = (f"{report.read.read} records read in {report.read.seconds:.1f}s "
                f"({report.read.per_second:,.0f}/s), {report.counted} counted: "
                f"{len(report.recorded_policies)} bans, limits and disables under the recorded policies "
                f"({len(report.on_topics)} on the topics, {len(report.not_reproduced)} not reproduced)")
        if report.candidate is not None:
            line += (f"; {len(report.candidate)} under policy {report.candidate_version}, "
                     f"{len(report.differences)} client addresses or accounts differ")
        click.echo(line)
        shown = rs.table(report, show_all=show_all)
        if shown:
            click.echo(shown)
    if policy is None and report.not_reproduced:
        sys.exit(1)


# -- metrics ----------------------------------------------------------------------


@main.command()
@click.option("--component", "components", multiple=True, type=click.Choice(list(METRICS_PORTS)),
              help="Only this process, repeatable (default: every one with a metrics port)")
@click.option("--url", "urls", multiple=True,
              help="Scrape this /metrics URL instead, repeatable (a second ingest, another host)")
@click.option("--all", "include_process", is_flag=True, help="Also the process_* and python_* metrics")
@click.option("--json", "as_json", is_flag=True, help="The parsed metrics as one JSON document")
def stats(components: tuple[str, ...], urls: tuple[str, ...], include_process: bool, as_json: bool) -> None:
    """Every process's Prometheus metrics (docs/operations.md, Metrics), as a table.

    Exits 1 when a process asked for by --component or --url does not
    answer, or when none does.
    """
    from bulwark.cli.stats import endpoints, render, scrape_all

    targets = {url: url for url in urls} if urls else endpoints(_settings(), list(components) or None)
    scrapes = scrape_all(targets)
    if as_json:
        click.echo(json.dumps({"components": [s.as_json(include_process) for s in scrapes]}, indent=2))
    else:
        click.echo(render(scrapes, include_process))
    named = bool(components or urls)
    down = [s for s in scrapes if not s.up]
    sys.exit(1 if (named and down) or len(down) == len(scrapes) else 0)


@main.command()
@click.option("--json", "as_json", is_flag=True)
def outbreaks(as_json: bool) -> None:
    """Fingerprints marked as outbreaks (from the outbreak.alerts topic)."""
    from bulwark.kafka import read_topics
    from schemas.topics import OUTBREAK_ALERTS

    latest = {r.event.fingerprint: r.event for r in _run(read_topics(_settings(), [OUTBREAK_ALERTS.name]))}
    for alert in sorted(latest.values(), key=lambda a: a.occurred_at):
        if as_json:
            click.echo(alert.model_dump_json())
        else:
            click.echo(f"{alert.occurred_at:%Y-%m-%d %H:%M:%S}  {alert.kind:10} {alert.fingerprint[:40]}  "
                       f"{alert.distinct_senders} senders, {alert.distinct_client_ips} client addresses "
                       f"in {alert.window_seconds // 60} min (e.g. {alert.example_message_id})")


@main.group()
def tlsrpt() -> None:
    """SMTP TLS Reporting (RFC 8460): the daily reports to the domains Bulwark delivers to."""


@tlsrpt.command("show")
@click.option("--day", default=None, help="UTC day, YYYY-MM-DD (default: today, so far)")
@click.option("--json", "as_json", is_flag=True, help="Each domain's report in RFC 8460 JSON, one a line")
def tlsrpt_show(day: str | None, as_json: bool) -> None:
    """Outbound TLS sessions of a day per receiving domain: what its report says."""
    from datetime import date

    from schemas.events import utcnow
    from sinks.tlsrpt import render, reports, so_far

    try:
        when = date.fromisoformat(day) if day else utcnow().date()
    except ValueError:
        raise click.BadParameter(f"{day!r} is not a date (YYYY-MM-DD)", param_hint="--day") from None
    policy = _active_policy()
    found = _run(so_far(_settings(), policy, when))
    if as_json:
        for report in reports(found, policy):
            click.echo(json.dumps(report))
        return
    click.echo(f"TLS sessions on {when.isoformat()} (UTC{', so far' if day is None else ''}), "
               f"reported by {policy.hostname}"
               + ("" if policy.tls.tls_reporting.enabled else " (tls.tls_reporting is disabled: nothing is sent)"))
    click.echo(render(found) or "no TLS sessions to report")


def _active_policy():
    """The policy in force: the last one published, else the file."""
    from bulwark.policy import PolicyError, from_document, load
    from bulwark.policy.admin import active

    try:
        event = _run(active(_settings()))
        if event is None:
            return load(_settings().policy_path)
        return from_document(event.document, "config.policy", version=event.policy_version)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def backscatter() -> None:
    """Backscatter Protection keys."""


@backscatter.command("rotate-key")
@click.option("--by", default=None, help="Who rotates it (default: the current user)")
def backscatter_rotate_key(by: str | None) -> None:
    """Start signing with a new key; the previous one verifies for the validity period."""
    from bulwark.kafka import read_topics
    from schemas.events import BackscatterKeyRotated
    from schemas.topics import BACKSCATTER_KEYS

    history = [r.event for r in _run(read_topics(_settings(), [BACKSCATTER_KEYS.name]))]
    current = max(history, key=lambda e: e.occurred_at).key_number if history else 0
    event = BackscatterKeyRotated(key_number=(current + 1) % 10, by=by or getpass.getuser())
    _publish(event)
    click.echo(f"now signing with key {event.key_number} (from {event.occurred_at:%Y-%m-%d %H:%M:%S} UTC)")


# -- quarantine -----------------------------------------------------------------


@main.group()
def quarantine() -> None:
    """Messages held for review."""


def _index():
    from sinks.quarantine import index_path
    from sinks.store import JsonIndex

    path = index_path(_settings())
    if not path.exists():
        raise click.ClickException(f"no quarantine index at {path} (has the quarantine sink run here?)")
    return JsonIndex(path, read_only=True)


def _held(message_id: str) -> dict:
    record = _index().get(message_id)
    if record is None:
        raise click.ClickException(f"{message_id} is not in the quarantine")
    return record


@quarantine.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include released and deleted messages")
@click.option("--json", "as_json", is_flag=True)
def quarantine_list(show_all: bool, as_json: bool) -> None:
    """List quarantined messages."""
    rows = [r for _, r in _index().items() if show_all or r["state"] == "quarantined"]
    rows.sort(key=lambda r: r["quarantined_at"])
    for r in rows:
        if as_json:
            click.echo(json.dumps(r))
        else:
            env = r["envelope"]
            click.echo(f"{r['message_id']}  {r['state']:11} {r['quarantined_at'][:19]}  "
                       f"<{env['mail_from']}> -> {', '.join(env['rcpt_to'])}  [{', '.join(r['reasons'])}]")


@quarantine.command("show")
@click.argument("message_id")
def quarantine_show(message_id: str) -> None:
    """Show why a message is held, and its headers."""
    from email.parser import BytesHeaderParser

    from bulwark.blobstore import BlobStore

    record = _held(message_id)
    click.echo(json.dumps({k: v for k, v in record.items() if k != "announced"}, indent=2))
    try:
        raw = BlobStore(_settings().blob_dir).get_sync(record["envelope"]["sha256"])
    except OSError as exc:
        click.echo(f"(message body unavailable: {exc})")
        return
    click.echo("\n--- headers ---")
    for name, value in BytesHeaderParser().parsebytes(raw).items():
        click.echo(f"{name}: {value}")


def _publish(event) -> None:
    from bulwark.kafka import publish_once

    _run(publish_once(_settings(), event))


def _reason(value: str) -> str:
    from schemas.events import audit_reason

    try:
        return audit_reason(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--reason") from None


REASON_HELP = "Why (required: the audit trail records who and why; one line, at most 300 characters)"


@quarantine.command("release")
@click.argument("message_id")
@click.option("--reason", required=True, help=REASON_HELP)
@click.option("--by", default=None, help="Who releases it (default: the current user)")
@click.option("--to", "to", multiple=True, help="Deliver to this address instead of the recipients (repeatable)")
def quarantine_release(message_id: str, reason: str, by: str | None, to: tuple[str, ...]) -> None:
    """Release a message: the delivery sink delivers it (to its recipients, or --to others)."""
    from console.addresses import AddressError, release_addresses
    from schemas.events import Envelope, QuarantineReleased

    why = _reason(reason)
    try:
        others = release_addresses(",".join(to)) if to else None
    except AddressError as exc:
        raise click.BadParameter(str(exc), param_hint="--to") from None
    record = _held(message_id)
    if record["state"] != "quarantined":
        raise click.ClickException(f"{message_id} is already {record['state']}")
    _publish(QuarantineReleased(message_id=message_id, session_id=record.get("session_id"),
                                envelope=Envelope.model_validate(record["envelope"]), by=by or getpass.getuser(),
                                to=others, reason=why))
    click.echo(f"released {message_id}" + (f" to {', '.join(others)}" if others else ""))


@quarantine.command("delete")
@click.argument("message_id")
@click.option("--reason", required=True, help=REASON_HELP)
@click.option("--by", default=None, help="Who deletes it (default: the current user)")
def quarantine_delete(message_id: str, reason: str, by: str | None) -> None:
    """Delete a message from the quarantine (it is never delivered)."""
    from schemas.events import QuarantineDeleted

    why = _reason(reason)
    record = _held(message_id)
    if record["state"] != "quarantined":
        raise click.ClickException(f"{message_id} is already {record['state']}")
    _publish(QuarantineDeleted(message_id=message_id, session_id=record.get("session_id"),
                               by=by or getpass.getuser(), reason=why))
    click.echo(f"deleted {message_id}")


# -- the administrator's web console ----------------------------------------------


@main.group(invoke_without_command=True)
@click.pass_context
def console(ctx: click.Context) -> None:
    """The administrator's web console (HTTPS on BULWARK_CONSOLE_PORT); docs/console.md."""
    if ctx.invoked_subcommand is None:
        from console.server import serve

        _run(serve(_settings()))


@console.command("add-admin")
@click.argument("name")
@click.option("--role", type=click.Choice(["admin", "helpdesk"]), required=True,
              help="admin: everything; helpdesk: the quarantine only")
@click.option("--password-stdin", is_flag=True, help="Read the password from one line of standard input")
def console_add_admin(name: str, role: str, password_stdin: bool) -> None:
    """Create (or reset) a console administrator. The password is never an argument."""
    from console.admins import AdminStore, admins_path

    if password_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt(f"Password for {name}", hide_input=True, confirmation_prompt=True)
    try:
        AdminStore(admins_path(_settings().data_dir)).add(name, role, password)
    except ValueError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"{name} can log in to the console as {role}")


@console.command("remove-admin")
@click.argument("name")
def console_remove_admin(name: str) -> None:
    """Remove a console administrator; sessions it has open end at their next request."""
    from console.admins import AdminStore, admins_path

    try:
        AdminStore(admins_path(_settings().data_dir)).remove(name)
    except ValueError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"{name} can no longer log in to the console")


@console.command("admins")
def console_admins() -> None:
    """List the console's administrators and their roles."""
    from console.admins import AdminStore, admins_path

    for admin in AdminStore(admins_path(_settings().data_dir)).all():
        click.echo(f"{admin.name}  {admin.role}" + ("  totp" if admin.totp else ""))


@console.command("totp")
@click.argument("name")
@click.option("--off", is_flag=True, help="Remove the second factor instead")
def console_totp(name: str, off: bool) -> None:
    """Ask NAME for a one-time code (TOTP) at login, with a new secret; or no more (--off).

    The secret is printed once, here, for the authenticator app (as the
    otpauth:// URI most apps read, and as the key to type in); the console
    never shows it.
    """
    from console.admins import AdminStore, admins_path

    store = AdminStore(admins_path(_settings().data_dir))
    try:
        secret = store.set_totp(name, enabled=not off)
    except ValueError as exc:
        raise click.ClickException(str(exc))
    if secret is None:
        click.echo(f"{name} logs in with a password only")
        return
    click.echo(f"{name} now needs a one-time code at login. Enrol an authenticator app with")
    click.echo(f"  {store.provisioning_uri(name, secret)}")
    click.echo(f"or the key {secret} (TOTP, SHA-1, 6 digits, 30 seconds).")


# -- the command groups in modules of their own (bulwark/cli/*.py) ------------------
# Imported as modules, not as their groups: a group bound here under its own
# name would hide its module (``from bulwark.cli import dkim`` must give the
# module, as tests and readers expect).

from bulwark.cli import accounts as accounts_module  # noqa: E402
from bulwark.cli import dkim as dkim_module  # noqa: E402
from bulwark.cli import dlp as dlp_module  # noqa: E402
from bulwark.cli import dmarc as dmarc_module  # noqa: E402
from bulwark.cli import screening as screening_module  # noqa: E402
from bulwark.cli import sources as sources_module  # noqa: E402

for _command in (accounts_module.accounts,          # accounts
                 sources_module.sources,            # user verification sources
                 dlp_module.dlp,                    # data leak prevention
                 dkim_module.dkim,                  # outbound DKIM signing
                 dmarc_module.dmarc,                # DMARC aggregate reports received
                 screening_module.screening,        # Dynamic Screening
                 screening_module.tables):          # the windowed tables
    main.add_command(_command)


# -- MTA-STS of the local domains ---------------------------------------------------


@main.group("mta-sts")
def mta_sts() -> None:
    """The MTA-STS policy Bulwark publishes for the local domains (RFC 8461)."""


@mta_sts.command("show")
@click.argument("path", required=False)
def mta_sts_show(path: str | None) -> None:
    """Print the policy file served and the DNS records each local domain publishes."""
    from bulwark.policy import PolicyError, load
    from ingest.mta_sts_host import WELL_KNOWN, policy_text, txt_record

    try:
        loaded = load(path or _settings().policy_path)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    click.echo(f"# served at https://mta-sts.DOMAIN{WELL_KNOWN} (ingest, BULWARK_MTA_STS_PORT):")
    click.echo(policy_text(loaded).replace("\r\n", "\n"), nl=False)
    click.echo("# DNS: publish for each local domain (the id changes with the policy); mta-sts.DOMAIN must")
    click.echo("# reach the gateway, and its certificate must name mta-sts.DOMAIN:")
    for domain in loaded.local_domains:
        click.echo(txt_record(loaded, domain))
