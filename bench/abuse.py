"""Abuse: idle floods, slowloris, STARTTLS stalls, oversize, 1,000 recipients, AUTH floods; a probe's latency.

Starts a private stack (Kafka, the topics, one Faust worker for Dynamic
Screening and the content verdicts, ingest) with the default policy plus one
allow-listed probe address. A probe client (its own process, from
127.0.4.1) sends a normal message every PROBE_INTERVAL seconds throughout;
the attacks run one after another from their own loopback addresses. For
each, the script prints what was attempted, how the gateway answered (the
replies the attackers saw, bans issued), how long until it had shed the
attack, ingest's memory and open files, and the probe's latency from
connect to banner and from end of DATA to the reply, and its failures,
against a quiet baseline.

    .venv/bin/python -m bench abuse        (or: .venv/bin/python -m bench.abuse)
"""

from __future__ import annotations

import asyncio
import base64
import collections
import multiprocessing
import os
import resource
import secrets
import smtplib
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench._stack import local_stack
from bench.enforcement_latency import worker_ready
from bulwark.devstack import wait_for_port
from bulwark.kafka import read_topics
from schemas import events as ev
from schemas.topics import BANS

PROBE_IP = "127.0.4.1"
PROBE_INTERVAL = 0.25
#: How long an attack's connections are left for the gateway to close: past
#: the 300-second command timeout counted from the last connection opened,
#: so what the gateway does about the last of them (once it is no longer
#: under stress) is seen too.
HOLD_SECONDS = float(os.environ.get("BENCH_ABUSE_HOLD", "400"))
#: Only these scenarios (comma-separated keys of SCENARIOS), e.g. "starttls-silence,auth"; default all.
ONLY = [k for k in os.environ.get("BENCH_ABUSE_SCENARIOS", "").split(",") if k]

POLICY = f"""
hostname: bench.example.test
local_domains: [example.test]
mail_servers:
  - {{name: sink, host: 127.0.0.1, port: 9, default: true}}
allow_list:
  # The probe: never banned by Dynamic Screening, however many sessions it opens.
  addresses: [{PROBE_IP}/32]
"""

BODY = ("From: probe@partner.test\r\nTo: b@example.test\r\nSubject: probe\r\n\r\n"
        + ("x" * 76 + "\r\n") * 40).encode()


def addresses(*prefixes: str, per_prefix: int = 254, first: int = 1) -> list[str]:
    return [f"{p}.{n}" for p in prefixes for n in range(first, first + per_prefix)]


# -- the probe (its own process, so the attackers' event loop never delays it) -------------


def _probe_loop(host: str, port: int, ip: str, interval: float, out, stop) -> None:
    n = 0
    while not stop.is_set():
        started = time.monotonic()
        banner = data = whole = None
        error = None
        client = smtplib.SMTP(timeout=30, source_address=(ip, 0))
        try:
            code, reply = client.connect(host, port)
            banner = time.monotonic() - started
            if code != 220:
                raise smtplib.SMTPResponseException(code, reply)
            client.ehlo("probe.test")
            client.mail("probe@partner.test")
            code, reply = client.rcpt("b@example.test")
            if code != 250:
                raise smtplib.SMTPResponseException(code, reply)
            code, reply = client.docmd("DATA")
            if code != 354:
                raise smtplib.SMTPResponseException(code, reply)
            client.send(BODY + f"n={n}\r\n.\r\n".encode())
            sent = time.monotonic()
            code, reply = client.getreply()
            data = time.monotonic() - sent
            if code != 250:
                raise smtplib.SMTPResponseException(code, reply)
            whole = time.monotonic() - started
            client.quit()
        except smtplib.SMTPResponseException as exc:
            error = f"{exc.smtp_code} {exc.smtp_error[:40].decode(errors='replace')}"
        except (OSError, smtplib.SMTPException) as exc:
            error = type(exc).__name__
        finally:
            client.close()
        out.send((started, banner, data, error, whole))
        n += 1
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


class Probe:
    def __init__(self, host: str, port: int):
        ctx = multiprocessing.get_context("spawn")
        self._recv, send = ctx.Pipe(duplex=False)
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_probe_loop, args=(host, port, PROBE_IP, PROBE_INTERVAL, send, self._stop),
                                 daemon=True)
        self.records: list[tuple] = []

    def __enter__(self) -> "Probe":
        self._proc.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._proc.join(40)
        if self._proc.is_alive():
            self._proc.kill()

    def between(self, start: float, end: float) -> list[tuple]:
        while self._recv.poll():
            self.records.append(self._recv.recv())
        return [r for r in self.records if start <= r[0] < end]

    def summary(self, start: float, end: float) -> str:
        records = self.between(start, end)
        ok = [r for r in records if r[3] is None]
        failed = collections.Counter(r[3] for r in records if r[3] is not None)
        banner = sorted(r[1] for r in records if r[1] is not None)
        data = sorted(r[2] for r in ok)
        text = f"{len(ok)}/{len(records)} delivered"
        if banner:
            text += f", connect->banner p50 {ms(pct(banner, 50))} p99 {ms(pct(banner, 99))}"
        if data:
            text += f", end of DATA->250 p50 {ms(pct(data, 50))} p99 {ms(pct(data, 99))} max {ms(data[-1])}"
            whole = sorted(r[4] for r in ok)
            text += f", connect->250 p50 {ms(pct(whole, 50))} p99 {ms(pct(whole, 99))}"
        if failed:
            text += "; failed: " + ", ".join(f"{n}x {why}" for why, n in failed.most_common(4))
        return text

    def recovered_after(self, end: float, patience: float = 60) -> float | None:
        """Seconds from ``end`` to the first probe started after it that was served."""
        while True:
            served = [r[0] for r in self.between(end, float("inf")) if r[3] is None]
            if served or time.monotonic() > end + patience:
                return served[0] - end if served else None
            time.sleep(0.5)


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


# -- ingest's resources --------------------------------------------------------------------


@dataclass
class Resources:
    pid: int
    rss_mb: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def sample(self) -> None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            self.rss_mb.append(rss / 1024)
            self.fds.append(len(os.listdir(f"/proc/{self.pid}/fd")))
        except (OSError, StopIteration):
            pass

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            await asyncio.sleep(0.5)

    def summary(self) -> str:
        if not self.rss_mb:
            return "no samples"
        return (f"RSS {self.rss_mb[0]:.0f} MB -> peak {max(self.rss_mb):.0f} -> {self.rss_mb[-1]:.0f} MB; "
                f"open files {self.fds[0]} -> peak {max(self.fds)} -> {self.fds[-1]}")


# -- attacker connections ------------------------------------------------------------------


@dataclass
class Conn:
    ip: str
    error: str | None = None
    banner: bytes = b""
    ready_at: float | None = None  # when the attack's own part was done (greeted, STARTTLS said...)
    closed_at: float | None = None  # when the gateway closed it
    last: bytes = b""  # what the gateway said last

    @property
    def greeted(self) -> bool:
        return self.banner.startswith(b"220")


async def connect(ip: str, port: int, conn: Conn, timeout: float = 60):
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0)), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        conn.error = type(exc).__name__
        return None
    try:
        conn.banner = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        conn.error = f"banner: {type(exc).__name__}"
        writer.close()
        return None
    if not conn.greeted:
        conn.closed_at = time.monotonic()
        conn.last = conn.banner
        writer.close()
        return None
    return reader, writer


async def until_closed(reader: asyncio.StreamReader, writer, conn: Conn, deadline: float) -> None:
    """Wait for the gateway to close the connection (or the deadline: then close it ourselves)."""
    try:
        data = await asyncio.wait_for(reader.read(), max(0.1, deadline - time.monotonic()))
        conn.closed_at = time.monotonic()
        conn.last = data.strip().splitlines()[-1] if data.strip() else b"(closed without a reply)"
    except asyncio.TimeoutError:
        pass
    except OSError as exc:
        conn.closed_at = time.monotonic()
        conn.last = type(exc).__name__.encode()
    writer.close()


async def command(reader, writer, line: bytes) -> bytes:
    writer.write(line + b"\r\n")
    while True:
        reply = await asyncio.wait_for(reader.readline(), 60)
        if not reply:
            return b"(connection closed)"
        if reply[3:4] != b"-":
            return reply


def describe_conns(conns: list[Conn], since: float) -> list[str]:
    errors = collections.Counter(c.error for c in conns if c.error)
    refused = collections.Counter(c.banner[:9].decode(errors="replace") for c in conns
                                  if c.banner and not c.greeted)
    greeted = [c for c in conns if c.greeted]
    lines = [f"connections: {len(greeted)} greeted 220"
             + "".join(f", {n} refused '{why}...'" for why, n in refused.items())
             + "".join(f", {n} failed ({why})" for why, n in errors.items())]
    closed = [c for c in greeted if c.closed_at is not None]
    ends = collections.Counter(c.last[:40].decode(errors="replace") for c in closed)
    if greeted:
        lines.append(f"closed by the gateway: {len(closed)}/{len(greeted)}: "
                     + "; ".join(f"{n}x '{why}'" for why, n in ends.most_common(4)))
    if closed:
        lived = sorted(c.closed_at - (c.ready_at or since) for c in closed)
        lines.append(f"open after the attack's setup (banner, STARTTLS...): min {ms(lived[0])}, "
                     f"p10 {ms(pct(lived, 10))}, p50 {ms(pct(lived, 50))}, p90 {ms(pct(lived, 90))}, "
                     f"max {ms(lived[-1])}; all closed "
                     f"{ms(max(c.closed_at for c in closed) - since)} after the attack began")
    return lines


# -- the scenarios --------------------------------------------------------------------------


async def idle_flood(settings, count: int = 10_000) -> tuple[str, list[str], set[str]]:
    ips = addresses("127.0.4", "127.0.5", first=2, per_prefix=253)
    conns = [Conn(ips[i % len(ips)]) for i in range(count)]
    started = time.monotonic()
    deadline = started + HOLD_SECONDS
    gate = asyncio.Semaphore(500)  # connects in flight at once

    async def one(conn: Conn) -> None:
        async with gate:
            opened = await connect(conn.ip, settings.smtp_port, conn)
        if opened:
            conn.ready_at = time.monotonic()
            await until_closed(*opened, conn, deadline)

    tasks = [asyncio.create_task(one(c)) for c in conns]
    peak = 0
    while not all(t.done() for t in tasks):
        open_now = sum(1 for c in conns if c.greeted and c.closed_at is None)
        peak = max(peak, open_now)
        await asyncio.sleep(0.5)
    attempt = f"{count} connections from {len(ips)} addresses (127.0.4.2-127.0.5.254), silent after the banner"
    lines = describe_conns(conns, started)
    last_open = max((c.ready_at for c in conns if c.ready_at), default=started)
    lines.insert(1, f"all {count} attempted in {ms(last_open - started)}; at most {peak} open at once")
    return attempt, lines, set(ips)


async def slowloris(settings, count: int = 2_000) -> tuple[str, list[str], set[str]]:
    ips = addresses("127.0.10", "127.0.11", per_prefix=100)  # 10 connections each: within the connection limit
    conns = [Conn(ips[i % len(ips)]) for i in range(count)]
    started = time.monotonic()
    deadline = started + HOLD_SECONDS

    async def trickle(conn: Conn, in_data: bool) -> None:
        opened = await connect(conn.ip, settings.smtp_port, conn)
        if not opened:
            return
        reader, writer = opened
        conn.ready_at = time.monotonic()
        try:
            if in_data:
                for line in (b"EHLO slow.test", b"MAIL FROM:<slow@partner.test>", b"RCPT TO:<b@example.test>",
                             b"DATA"):
                    await command(reader, writer, line)
                payload = b"Subject: slow\r\n\r\n" + b"x" * 10_000
            else:
                payload = b"EHLO slowloris.test\r\n" * 500
            closing = asyncio.ensure_future(reader.read())
            for byte in payload:
                writer.write(bytes([byte]))
                done, _ = await asyncio.wait({closing}, timeout=3)
                if done or time.monotonic() > deadline:
                    break
            if closing.done():
                data = closing.result()
                conn.closed_at = time.monotonic()
                conn.last = data.strip().splitlines()[-1] if data.strip() else b"(closed without a reply)"
            else:
                closing.cancel()
        except (OSError, asyncio.TimeoutError) as exc:
            conn.error = conn.error or f"during: {type(exc).__name__}"
        writer.close()

    await asyncio.gather(*(trickle(c, i % 2 == 1) for i, c in enumerate(conns)))
    attempt = (f"{count} connections from {len(ips)} addresses, a byte every 3 s: half in the EHLO line, "
               "half in the DATA body")
    return attempt, describe_conns(conns, started), set(ips)


async def starttls_stall(settings, then: bytes | None, count: int = 1000) -> tuple[str, list[str], set[str]]:
    prefix = "127.0.12" if then is None else "127.0.13"
    ips = addresses(prefix, per_prefix=100)  # 10 sessions each: within the connection limit
    conns = [Conn(ips[i % len(ips)]) for i in range(count)]
    started = time.monotonic()

    async def one(conn: Conn) -> None:
        opened = await connect(conn.ip, settings.smtp_port, conn)
        if not opened:
            return
        reader, writer = opened
        try:
            await command(reader, writer, b"EHLO stall.test")
            reply = await command(reader, writer, b"STARTTLS")
        except (OSError, asyncio.TimeoutError) as exc:
            conn.error = f"during: {type(exc).__name__}"
            writer.close()
            return
        if not reply.startswith(b"220"):
            conn.error = f"STARTTLS answered {reply[:20]!r}"
        if then is not None:
            writer.write(then)
        conn.ready_at = time.monotonic()
        await until_closed(reader, writer, conn, time.monotonic() + 120)

    await asyncio.gather(*(one(c) for c in conns))
    what = "then silence" if then is None else f"then plaintext {then.strip().decode()!r}"
    return f"{count} sessions from {len(ips)} addresses: EHLO, STARTTLS (220), {what}", \
        describe_conns(conns, started), set(ips)


async def oversize(settings, limit: int) -> tuple[str, list[str], set[str]]:
    ips = addresses("127.0.14", per_prefix=6)
    results: list[str] = []

    async def declared(ip: str) -> str:
        conn = Conn(ip)
        opened = await connect(ip, settings.smtp_port, conn)
        if not opened:
            return f"connect: {conn.error or conn.banner[:20]!r}"
        reader, writer = opened
        await command(reader, writer, b"EHLO big.test")
        started = time.monotonic()
        reply = await command(reader, writer, f"MAIL FROM:<big@partner.test> SIZE={limit * 2}".encode())
        writer.close()
        return f"declared SIZE={limit * 2}: {reply[:48].decode().strip()} after {ms(time.monotonic() - started)}"

    async def undeclared(ip: str) -> str:
        conn = Conn(ip)
        opened = await connect(ip, settings.smtp_port, conn)
        if not opened:
            return f"connect: {conn.error or conn.banner[:20]!r}"
        reader, writer = opened
        for line in (b"EHLO big.test", b"MAIL FROM:<big@partner.test>", b"RCPT TO:<b@example.test>", b"DATA"):
            await command(reader, writer, line)
        started = time.monotonic()
        line = b"y" * 996 + b"\r\n"
        chunk = line * 1024  # ~1 MB
        sent = 0
        answer = None
        reading = asyncio.ensure_future(reader.readline())
        while sent < limit * 1.2:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
            if reading.done():  # the gateway answered before the end of DATA
                answer = reading.result()
                break
        body_done = time.monotonic()
        if answer is None:
            writer.write(b".\r\n")
            answer = await asyncio.wait_for(reading, 120)
        replied = time.monotonic()
        writer.close()
        return (f"{sent / 1e6:.0f} MB undeclared: {answer[:48].decode().strip()} "
                f"{ms(replied - body_done)} after the final dot (the body took {ms(body_done - started)} to send)")

    results += await asyncio.gather(*(declared(ip) for ip in ips[:3]))
    results += await asyncio.gather(*(undeclared(ip) for ip in ips[3:]))
    return (f"3 sessions declaring SIZE twice the limit ({limit} bytes), 3 sending {limit * 1.2 / 1e6:.0f} MB "
            "without declaring it, at once"), results, set(ips)


async def many_recipients(settings, count: int = 1000) -> tuple[str, list[str], set[str]]:
    ip = "127.0.14.100"
    conn = Conn(ip)
    opened = await connect(ip, settings.smtp_port, conn)
    if not opened:
        return "1,000 recipients", [f"connect: {conn.error or conn.banner!r}"], {ip}
    reader, writer = opened
    await command(reader, writer, b"EHLO many.test")
    await command(reader, writer, b"MAIL FROM:<many@partner.test>")
    started = time.monotonic()
    # Pipelined (RFC 2920), as a bulk sender would.
    writer.write(b"".join(f"RCPT TO:<r{i}@example.test>\r\n".encode() for i in range(count)))
    replies = collections.Counter()
    for _ in range(count):
        line = await asyncio.wait_for(reader.readline(), 60)
        replies[line[:9].decode() or "no reply (closed)"] += 1
        if not line:
            break
    rcpt_time = time.monotonic() - started
    try:
        data = await command(reader, writer, b"DATA")
        writer.write(b"Subject: many\r\n\r\nHello.\r\n.\r\n")
        final = await asyncio.wait_for(reader.readline(), 60)
    except OSError as exc:  # the gateway ended the session before DATA
        data, final = f"({type(exc).__name__})".encode(), b""
    writer.close()
    return (f"one message to {count} recipients, RCPTs pipelined",
            ["RCPT replies: " + ", ".join(f"{n}x {code}" for code, n in sorted(replies.items()))
             + f" in {ms(rcpt_time)}",
             f"DATA: {data[:40].decode().strip()}, then {final[:40].decode().strip() or '(connection closed)'}"],
            {ip})


async def auth_flood(settings, per_address: int = 5) -> tuple[str, list[str], set[str]]:
    ips = addresses("127.0.15", per_prefix=100)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    outcomes = collections.Counter()
    gate = asyncio.Semaphore(50)
    started = time.monotonic()

    async def attempt(ip: str, n: int) -> None:
        conn = Conn(ip)
        async with gate:
            opened = await connect(ip, settings.submission_port, conn)
            if not opened:
                outcomes[f"at connect: {conn.banner[:9].decode() or conn.error}"] += 1
                return
            reader, writer = opened
            try:
                await command(reader, writer, b"EHLO guesser.test")
                await command(reader, writer, b"STARTTLS")
                await writer.start_tls(context)
                await command(reader, writer, b"EHLO guesser.test")
                blob = base64.b64encode(f"\0user{n}@example.test\0{secrets.token_hex(6)}".encode())
                reply = await command(reader, writer, b"AUTH PLAIN " + blob)
                outcomes[f"AUTH: {reply[:9].decode() if reply[:1].isdigit() else reply.decode()}"] += 1
            except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
                outcomes[f"failed: {type(exc).__name__}"] += 1
            writer.close()

    async def guesser(ip: str) -> None:
        for n in range(per_address):
            await attempt(ip, n)

    await asyncio.gather(*(guesser(ip) for ip in ips))
    return (f"{len(ips) * per_address} AUTH PLAIN attempts with wrong passwords, {per_address} from each of "
            f"{len(ips)} addresses, 50 at once, on the submission port (STARTTLS first)",
            [", ".join(f"{n}x {what}" for what, n in sorted(outcomes.items())),
             f"took {ms(time.monotonic() - started)}"], set(ips))


# -- running them --------------------------------------------------------------------------


async def bans_for(settings, ips: set[str]) -> int:
    records = await read_topics(settings, [BANS.name], keys={ip.encode() for ip in ips})
    return len({r.event.client_ip for r in records if isinstance(r.event, ev.BanIssued)})


def raise_open_files() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def scenario(name: str, attack, settings, probe: Probe, ingest_pid: int, baseline: str) -> None:
    resources = Resources(ingest_pid)
    stop = asyncio.Event()
    watcher = asyncio.create_task(resources.watch(stop))
    started = time.monotonic()
    attempt, lines, ips = await attack
    ended = time.monotonic()
    stop.set()
    await watcher
    recovered = await asyncio.to_thread(probe.recovered_after, ended)
    print(f"\n-- {name}\n  attempted: {attempt}", flush=True)
    for line in lines:
        print(f"  gateway:   {line}")
    print(f"  bans:      {await bans_for(settings, ips)} of the {len(ips)} addresses banned by Dynamic Screening")
    print(f"  ingest:    {resources.summary()}")
    print(f"  probe:     during ({ms(ended - started)}): {probe.summary(started, ended)}")
    print(f"             baseline: {baseline}")
    print(f"             first probe served after the attack: "
          f"{'none' if recovered is None else '+' + ms(recovered)}", flush=True)
    await asyncio.sleep(5)  # let the worker catch up before the next one


async def _run(settings, ingest_pid: int) -> None:
    from bulwark.policy import load

    limit = load(settings.policy_path).max_message_bytes
    with Probe(settings.smtp_host, settings.smtp_port) as probe:
        await asyncio.sleep(5)  # warm-up: the first sessions, the producer, the first verdicts
        quiet = time.monotonic()
        await asyncio.sleep(15)
        baseline = probe.summary(quiet, time.monotonic())
        print(f"quiet baseline (15 s): {baseline}", flush=True)
        scenarios = {
            "idle": ("10,000 idle connections", lambda: idle_flood(settings)),
            "slowloris": ("slowloris", lambda: slowloris(settings)),
            "starttls-silence": ("STARTTLS then silence", lambda: starttls_stall(settings, None)),
            "starttls-plaintext": ("STARTTLS then plaintext",
                                   lambda: starttls_stall(settings, b"MAIL FROM:<a@partner.test>\r\n")),
            "oversize": ("messages over max_message_bytes", lambda: oversize(settings, limit)),
            "recipients": ("1,000 recipients", lambda: many_recipients(settings)),
            "auth": ("AUTH flood", lambda: auth_flood(settings)),
        }
        for key, (name, attack) in scenarios.items():
            if not ONLY or key in ONLY:
                await scenario(name, attack(), settings, probe, ingest_pid, baseline)


def run() -> None:
    print(f"open files limit for the attackers: {raise_open_files()}; ingest raises its own at start; "
          f"attack connections held up to {HOLD_SECONDS:.0f} s", flush=True)
    with local_stack(POLICY, components=("streams", "ingest")) as (settings, stack):
        deadline = time.monotonic() + 180
        while not worker_ready(settings):
            if time.monotonic() > deadline:
                raise RuntimeError("the Faust worker never answered:\n" + stack.log_tail("streams"))
            time.sleep(0.5)
        wait_for_port(settings.smtp_host, settings.submission_port, 30, stack.procs["ingest"])
        asyncio.run(_run(settings, stack.procs["ingest"].pid))


if __name__ == "__main__":
    run()
