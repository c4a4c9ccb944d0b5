"""End to end: smtp-source -> gateway -> smtp-sink, Bulwark beside Postfix in one run.

Four set-ups, one after the other on the same machine, with the same load
(``smtp-source -N``: every recipient unique, a new session per message, from
127.0.0.1, not a domain mail server):

  postfix          Postfix relaying, no content checks
  postfix+clamav   Postfix with Debian's clamav-milter against the project's clamd
  bulwark          Bulwark with the `make run` policy: inline refusal on, every default check
  bulwark-async    the same with ``inline_refusal: {enabled: false}``

Bulwark runs as ``bulwark up`` does by default: one ingest process and one
Faust worker, and every sink that reads each message (quarantine, delivery,
DMARC reports, the trace index, the unjudged-message safety net); not the
demo mailbox (smtp-sink is the downstream) nor the console. ``--only bulwark-per-core`` (not in the default run) is the
default policy with an ingest process and a worker per core
(``BULWARK_INGEST_PROCESSES=auto``, ``BULWARK_STREAMS_WORKERS=auto``), to compare.

For each it prints accepted msg/s (smtp-source's pace), relayed msg/s (at
smtp-sink), p50/p99 of end-of-DATA -> reply measured by a probe client beside
the load, deliveries and duplicates at the sink (Message-Id, recipient), and
for Bulwark the peak RSS of its own processes and a reconciliation from the
topics: accepted = delivered + quarantined + refused, twice = 0.

    python -m bench e2e_relay                       # 2,000 messages, 20 sessions, 10 KB
    python -m bench.e2e_relay --messages 10000 --sessions 20 --size 10240 --only bulwark
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from bench._relay import (DOMAIN, PeakRss, Probe, clamav_milter, cpu_seconds, postfix, require, smtp_sink, smtp_source,
                          topic_offsets, wait_delivered)
from bench._stack import local_stack
from bulwark.devstack import LocalStack, environment, private_environment
from bulwark.kafka import read_topics
from bulwark.settings import REPO_ROOT, Settings
from schemas import events as ev
from schemas.topics import QUARANTINE, RECEIVED, VERDICTS

SETUPS = ("postfix", "postfix+clamav", "bulwark", "bulwark-async")
#: Set-ups run only when asked for with --only.
EXTRA_SETUPS = ("bulwark-per-core",)
#: Bulwark's processes whose memory counts (not Kafka's, not clamd's).
BULWARK_PROCESSES = ("ingest", "streams", "delivery", "quarantine", "dmarc-reports", "trace-index", "unjudged")


@dataclass
class Result:
    setup: str
    accepted_rate: float
    relayed_rate: float
    delivered: int
    duplicates: int
    p50_ms: float | None
    p99_ms: float | None
    probe_replies: dict
    load_seconds: float
    rss_mib: float | None = None
    #: CPU milliseconds per relayed message, by process kind, over the load.
    cpu_ms: dict | None = None
    #: Kafka records (and transaction markers) per relayed message, by topic.
    records: dict | None = None
    reconciliation: str = ""
    note: str = ""


def bulwark_policy(sink_port: int, inline_refusal: bool) -> str:
    """The `make run` policy pointed at the sink.

    Two changes a benchmark needs (shared PITFALLS): the domain mail server
    trusts another address, so the load from 127.0.0.1 is ordinary inbound
    mail (Account Hijack Detection would count it otherwise), and Dynamic
    Screening's connection limit is raised so the one load generator is
    counted but not banned.
    """
    policy = yaml.safe_load((REPO_ROOT / "infra" / "policy.local.yaml").read_text())
    policy["local_domains"] = [DOMAIN]
    server = policy["mail_servers"][0]
    server.update(port=sink_port, domains=[DOMAIN], trusted_addresses=["127.0.0.5/32"])
    policy["screening"] = {"connection_limit": 1_000_000}
    if not inline_refusal:
        policy["inline_refusal"] = {"enabled": False}
    return yaml.safe_dump(policy)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def run_load(setup: str, port: int, sink, args, scopes: tuple[str, ...], rss: PeakRss | None = None,
             bootstrap: str | None = None) -> Result:
    warm_up(port, sink, args)
    probe = Probe(port)
    before = sink.transactions()
    cpu_before = cpu_seconds(scopes)
    offsets_before = topic_offsets(bootstrap) if bootstrap else {}
    started = time.perf_counter()
    probe.start()
    load = smtp_source(port, args.messages, args.sessions, args.size, timeout=args.timeout)
    probe.stop()
    expected = args.messages + len(probe.message_ids)
    count, seconds = wait_delivered(sink, before + expected, started)
    cpu_after = cpu_seconds(scopes)
    relayed = max(count - before, 1)
    offsets_after = topic_offsets(bootstrap) if bootstrap else {}
    records = {t: (n - offsets_before.get(t, 0)) / relayed for t, n in offsets_after.items()
               if n - offsets_before.get(t, 0) > 0}
    cpu_ms = {k: 1000 * (v - cpu_before.get(k, 0.0)) / relayed for k, v in cpu_after.items()
              if v - cpu_before.get(k, 0.0) > 0.005}
    deliveries = sink.deliveries()
    twice = sum(n - 1 for n in deliveries.values() if n > 1)
    problems = [line for line in load.output.splitlines() if line.strip()]
    return Result(
        setup=setup,
        accepted_rate=load.rate,
        relayed_rate=(count - before) / seconds if seconds > 0 else 0.0,
        delivered=count - before,
        duplicates=twice,
        p50_ms=_ms(probe.percentile(0.5)),
        p99_ms=_ms(probe.percentile(0.99)),
        probe_replies=dict(probe.replies),
        load_seconds=load.seconds,
        rss_mib=None if rss is None else rss.peak_kib / 1024,
        cpu_ms=cpu_ms,
        records=records or None,
        note="; ".join(problems[-3:] + probe.errors),
    )


def run_postfix(root: Path, args, milter: bool) -> Result:
    setup = "postfix+clamav" if milter else "postfix"
    with smtp_sink(root / setup) as sink:
        if not milter:
            with postfix(root / setup / "postfix", sink.port) as port:
                return run_load(setup, port, sink, args, (str(root / setup),))
        # The project's clamd, started by its own script, as Bulwark's checks use it.
        with environment(private_environment(root / setup, root / "unused-policy.yaml")):
            stack = LocalStack.from_settings(Settings.from_env())
            stack.start_clamd()
            try:
                with clamav_milter(root / setup / "milter", stack.settings.clamd_port) as milter_port:
                    with postfix(root / setup / "postfix", sink.port, milter_port) as port:
                        return run_load(setup, port, sink, args, (str(root / setup),))
            finally:
                stack.stop_clamd()


async def _reconcile(settings: Settings) -> tuple[dict, dict]:
    records = await read_topics(settings, [RECEIVED.name, VERDICTS.name, QUARANTINE.name])
    received, refused, verdicts, quarantined = set(), set(), {}, set()
    for r in records:
        e = r.event
        if isinstance(e, ev.MessageReceived):
            received.add(e.message_id)
        elif isinstance(e, ev.MessageRefused):
            refused.add(e.message_id)
        elif isinstance(e, ev.Verdict):
            verdicts[e.message_id] = e.action
        elif isinstance(e, ev.QuarantineAdded):
            quarantined.add(e.message_id)
    actions: dict[str, int] = {}
    for action in verdicts.values():
        actions[action] = actions.get(action, 0) + 1
    return ({"received": len(received), "refused": len(refused), "quarantined": len(quarantined - refused),
             "unjudged": len(received - set(verdicts))}, actions)


def run_bulwark(root: Path, args, inline_refusal: bool, per_core: bool = False) -> Result:
    setup = ("bulwark-per-core" if per_core else "bulwark") if inline_refusal else "bulwark-async"
    processes = "auto" if per_core else "1"  # 1: as bulwark up runs it by default
    scale = {"BULWARK_INGEST_PROCESSES": processes, "BULWARK_STREAMS_WORKERS": processes}
    with smtp_sink(root / setup) as sink:
        policy = bulwark_policy(sink.port, inline_refusal)
        # What `bulwark up` runs, but the demo mailbox (smtp-sink is the
        # downstream) and the console (no work per message).
        components = ("quarantine", "delivery", "dmarc-reports", "trace-index", "unjudged", "streams", "ingest")
        with local_stack(policy, components=components, extra_env=scale) as (settings, stack):
            scopes = (str(root / setup), str(stack.kafka_dir.parent))
            with PeakRss(lambda: [p.pid for n, p in stack.procs.items() if n.startswith(BULWARK_PROCESSES)]) as rss:
                result = run_load(setup, settings.smtp_port, sink, args, scopes, rss, settings.kafka_bootstrap)
            counts, actions = asyncio.run(_reconcile(settings))
            accepted = counts["received"] - counts["refused"]
            delivered = result.delivered + warm_up_count(args)
            accounted = delivered + counts["quarantined"]
            result.reconciliation = (
                f"accepted {accepted} (250) = delivered {delivered} + quarantined {counts['quarantined']}"
                f" -> {'ok' if accepted == accounted else f'MISMATCH by {accepted - accounted}'};"
                f" refused {counts['refused']}; unjudged {counts['unjudged']}; verdicts {actions}"
            )
            return result


def warm_up_count(args) -> int:
    return 1 + args.warm_up


def warm_up(port: int, sink, args) -> None:
    """Before the measured load, and not counted in it: one message through
    every stage (the workers own their partitions, clients are connected),
    then ``--warm-up`` messages at the measured load's concurrency.

    The second part is for the steady state a gateway runs in: right after a
    start, the Kafka broker's JIT compiler alone costs about 10 ms of CPU a
    message over the first thousand messages and 3-4 ms over the next
    thousand (per-thread CPU of the broker, docs/performance.md); Postfix,
    in C, has no such phase. ``--warm-up 0`` measures from a cold start.
    """
    before = sink.transactions()
    load = smtp_source(port, 1, 1, 1000, timeout=120)
    deadline = time.monotonic() + 180
    while sink.transactions() <= before:
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up message never reached the sink ({load.output})")
        time.sleep(0.2)
    if args.warm_up:
        expected = sink.transactions() + args.warm_up
        smtp_source(port, args.warm_up, args.sessions, args.size, timeout=args.timeout)
        wait_delivered(sink, expected, time.perf_counter())


def report(results: list[Result], args) -> None:
    print(f"\nEnd to end, {args.messages} messages of {args.size} bytes over {args.sessions} sessions; "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} "
          f"({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    print(f"{'set-up':<16}{'accepted/s':>11}{'relayed/s':>10}{'delivered':>10}{'twice':>6}"
          f"{'p50 ms':>8}{'p99 ms':>8}{'RSS MiB':>8}  probe replies")
    for r in results:
        p50 = f"{r.p50_ms:.1f}" if r.p50_ms is not None else "-"
        p99 = f"{r.p99_ms:.1f}" if r.p99_ms is not None else "-"
        rss = f"{r.rss_mib:.0f}" if r.rss_mib is not None else "-"
        print(f"{r.setup:<16}{r.accepted_rate:>11.1f}{r.relayed_rate:>10.1f}{r.delivered:>10}{r.duplicates:>6}"
              f"{p50:>8}{p99:>8}{rss:>8}  {r.probe_replies}")
    by = {r.setup: r for r in results}
    for mine, peer in (("bulwark", "postfix+clamav"), ("bulwark-async", "postfix"), ("bulwark", "postfix")):
        if mine in by and peer in by and by[peer].relayed_rate:
            print(f"  {mine} / {peer}: relayed {by[mine].relayed_rate / by[peer].relayed_rate:.2f}x, "
                  f"accepted {by[mine].accepted_rate / by[peer].accepted_rate:.2f}x")
    for r in results:
        if r.cpu_ms:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r.cpu_ms.items(), key=lambda kv: -kv[1]))
            print(f"  {r.setup}: CPU ms per relayed message: {parts} (total {sum(r.cpu_ms.values()):.1f})")
        if r.records:
            top = sorted(r.records.items(), key=lambda kv: -kv[1])
            parts = ", ".join(f"{t} {n:.1f}" for t, n in top[:8] if n >= 0.05)
            print(f"  {r.setup}: Kafka records per relayed message: {sum(r.records.values()):.1f} ({parts})")
    for r in results:
        if r.reconciliation:
            print(f"  {r.setup}: {r.reconciliation}")
        if r.note:
            print(f"  {r.setup}: smtp-source/probe said: {r.note[:400]}")


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=10240, help="message size in bytes (smtp-source -l)")
    parser.add_argument("--only", action="append", choices=SETUPS + EXTRA_SETUPS, help="run only these set-ups (repeatable)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds the load may take")
    parser.add_argument("--warm-up", type=int, default=1000, dest="warm_up",
                        help="messages sent through each set-up before the measured load, not counted (0: cold)")
    args = parser.parse_args(argv)
    require("smtp-source", "smtp-sink", "postfix", "clamav-milter")
    root = Path(tempfile.mkdtemp(prefix="bulwark-e2e-"))
    root.chmod(0o755)  # Postfix and smtp-sink run as the postfix user
    results = []
    for setup in args.only or SETUPS:
        print(f"-- {setup} ...", flush=True)
        if setup.startswith("postfix"):
            results.append(run_postfix(root, args, milter=setup == "postfix+clamav"))
        else:
            results.append(run_bulwark(root, args, inline_refusal=setup != "bulwark-async",
                                       per_core=setup == "bulwark-per-core"))
    report(results, args)
    return results


def run() -> None:
    main([])


if __name__ == "__main__":
    main()
