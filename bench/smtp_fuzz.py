"""SMTP fuzz: hostile SMTP lines against a running ingest; crashes, hung sessions, memory.

Starts a private stack (Kafka, the topics, ingest) and sends generated
hostile sessions over many concurrent connections from several loopback
addresses (127.0.3.1-16): mail transactions bent out of shape and random
commands, with random parameters, 8-bit and NUL bytes, bare CR and LF,
over-long lines, DATA with random content, STARTTLS (some sessions go on
over TLS, with AUTH; others send plaintext after it), all pipelined in
random pieces. It prints:

- lines sent, sessions, and the replies by code class (421 and 451 apart);
- crashes: ingest exiting, and "unexpected error" (or any other traceback)
  in the ingest log;
- hung sessions: no end of session within a timeout of the client's QUIT;
- ingest's resident memory, sampled through the run (after warm-up, at the
  end, and its peak), to show whether it stays flat.

Only ingest runs: the fuzz is aimed at the dialogue. Dynamic Screening's
counting is the stream worker's; with it running, the 16 fuzz addresses
would be banned within seconds and every later session would end at connect
with a 421, never reaching the dialogue. Allow-listing them instead would
exempt them from the guards under test. 421s (session limits, refusals that
close) are counted apart.

    .venv/bin/python -m bench.smtp_fuzz --lines 1000000     # the full run, several minutes
    .venv/bin/python -m bench smtp_fuzz                     # `make bench`: 100,000 lines
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench._stack import local_stack

POLICY = """
hostname: bench.example.test
local_domains: [example.test]
mail_servers:
  - {name: sink, host: 127.0.0.1, port: 9, default: true}
inline_refusal: {enabled: false}
"""

SOURCES = [f"127.0.3.{i}" for i in range(1, 17)]
STARTTLS_READY = b"220 Ready to start TLS"
REPLY = re.compile(rb"^([2-5])([0-9][0-9])([ -]|$)")
CRLF = b"\r\n"

# -- what hostile clients send --------------------------------------------------------


class Hostile(random.Random):
    """Generates sessions: lists of (line, terminator)."""

    VERBS = [b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"VRFY", b"EXPN", b"HELP",
             b"STARTTLS", b"AUTH", b"BDAT", b"ETRN", b"XCLIENT", b"QUIT", b"ehlo", b"MaIl", b"", b"\x00",
             b"\xc3\xa9HLO", b"TURN", b"SEND", b"SOML", b"SAML", b"ATRN", b"GET / HTTP/1.0"]
    PARAMS = [b"SIZE=100", b"SIZE=99999999999999999999", b"SIZE=-1", b"SIZE=", b"BODY=8BITMIME",
              b"BODY=BINARYMIME", b"SMTPUTF8", b"REQUIRETLS", b"RET=HDRS", b"ENVID=x+2B", b"NOTIFY=NEVER,SUCCESS",
              b"ORCPT=rfc822;a@b", b"AUTH=<>", b"X-UNKNOWN=1", b"=", b"SIZE=1 SIZE=2", b"\xff=\xfe", b"BODY="]
    DOMAINS = [b"example.test", b"elsewhere.test", b"[192.0.2.1]", b"[IPv6:::1]", b"", b"a" * 260,
               b"EXAMPLE.TEST.", b"xn--caf-dma.example", b"[999.1.1.1]", b"localhost", b"sub.example.test"]
    LOCALS = [b"a", b"user", b"victim", b"postmaster", b"x" * 300, b'"quoted@local"', b"a%b", b"b!c", b"",
              b"abuse", b"root", b"MAILER-DAEMON", b"bounce+tag"]
    TERMINATORS = [CRLF] * 12 + [b"\n", b"\r", b"\r\r\n", b"\n\r", b"\r\n\r\n"]
    LONG = [513, 1001, 1002, 2048, 4096, 65_536, 70_000]

    def junk(self, size: int) -> bytes:
        return self.randbytes(size)

    def eight_bit(self) -> bytes:
        return bytes(self.randrange(0x80, 0x100) for _ in range(self.randint(1, 6)))

    def atom(self) -> bytes:
        pick = self.random()
        if pick < 0.6:
            return self.choice(self.LOCALS)
        if pick < 0.8:
            return self.eight_bit()
        return self.junk(self.randint(0, 12)).replace(b"\r", b"").replace(b"\n", b"")

    def address(self) -> bytes:
        local, domain = self.atom(), self.choice(self.DOMAINS)
        return self.choice([
            b"<>", b"<" + local + b"@" + domain + b">", b"<@relay.test,@b.test:" + local + b"@" + domain + b">",
            local + b"@" + domain, b"<" + local + b"@a@" + domain + b">", b"<" + local + b"@" + domain,
            b"<" + local + b"@" + domain + b"> " + self.eight_bit(),
        ])

    def params(self) -> bytes:
        return b"".join(b" " + self.choice(self.PARAMS) for _ in range(self.choice([0, 0, 0, 1, 2, 3])))

    def command(self) -> list[bytes]:
        verb = self.choice(self.VERBS)
        if verb in (b"EHLO", b"HELO", b"ehlo"):
            return [verb + b" " + self.choice([self.choice(self.DOMAINS), self.atom()])]
        if verb in (b"MAIL", b"MaIl"):
            return [verb + self.choice([b" FROM:", b" FROM: ", b" from:", b" FROM", b":"]) + self.address()
                    + self.params()]
        if verb == b"RCPT":
            return [verb + self.choice([b" TO:", b" to: ", b" TO"]) + self.address() + self.params()]
        if verb == b"AUTH":
            return [verb + b" " + self.choice([b"PLAIN", b"LOGIN", b"CRAM-MD5", b"", b"PLAIN ="])
                    + self.choice([b"", b" AGFsaWNlAHNlY3JldA==", b" !!!", b" " + b"A" * 2000, b" \xff\xfe"])]
        if verb == b"DATA":
            return [b"DATA", *self.body(), self.choice([b".", b"", b". "])]
        if verb == b"BDAT":
            return [b"BDAT " + self.choice([b"10", b"10 LAST", b"-1", b"99999999999", b"x"]), self.junk(10)]
        return [verb + (b" " + self.atom() if self.random() < 0.5 else b"")]

    def body(self) -> list[bytes]:
        lines = [b"From: <a@partner.test>", b"To: <user@example.test>", b"Subject: fuzz"] if self.random() < 0.7 else []
        for _ in range(self.randint(0, 40)):
            pick = self.random()
            if pick < 0.5:
                lines.append(b"x" * self.randint(0, 120))
            elif pick < 0.7:
                lines.append(self.junk(self.randint(0, 120)).replace(b"\n", b" ").replace(b"\r", b" "))
            elif pick < 0.8:
                lines.append(self.choice([b".", b"..", b". ", b".\r", b"\x00", b"--boundary", b"\x1b[0m"]))
            elif pick < 0.9:
                lines.append(self.eight_bit() * self.randint(1, 20))
            else:
                lines.append(b"y" * self.choice(self.LONG))
        return lines

    def transaction(self) -> list[bytes]:
        lines = [b"MAIL FROM:" + (self.choice([b"<alice@partner.test>", b"<>"]) if self.random() < 0.6
                                  else self.address()) + self.params()]
        for _ in range(self.randint(1, 4)):
            lines.append(b"RCPT TO:" + (self.choice([b"<user@example.test>", b"<postmaster@example.test>",
                                                      b"<victim@elsewhere.test>"])
                                        if self.random() < 0.6 else self.address()) + self.params())
        lines += [b"DATA", *self.body(), b"."]
        return lines

    def mutate(self, line: bytes) -> bytes:
        pick = self.random()
        if pick < 0.03:
            at = self.randint(0, len(line))
            return line[:at] + self.eight_bit() + line[at:]
        if pick < 0.05:
            return line + b" " + b"z" * self.choice(self.LONG)
        if pick < 0.06:
            at = self.randint(0, len(line))
            return line[:at] + b"\x00" + line[at:]
        if pick < 0.07:
            return line.swapcase()
        return line

    def session(self) -> tuple[str, list[bytes], bytes]:
        """(mode, lines, usual terminator). Modes: "transactions", "chaos", "tls"."""
        mode = self.choices(["transactions", "chaos", "tls"], weights=[60, 35, 5])[0]
        lines = [b"EHLO " + (b"client.partner.test" if self.random() < 0.8 else self.choice(self.DOMAINS))]
        if mode == "chaos":
            for _ in range(self.randint(3, 40)):
                lines += self.command()
        else:
            for _ in range(self.randint(1, 3)):
                lines += self.transaction()
                for _ in range(self.choice([0, 0, 1, 2])):
                    at = self.randint(1, len(lines))
                    lines[at:at] = self.command()
        eol = CRLF if self.random() < 0.85 else self.choice(self.TERMINATORS)
        return mode, [self.mutate(line) for line in lines], eol

    def stream(self, lines: list[bytes], eol: bytes) -> tuple[bytes, list[int]]:
        """The session's bytes, and the offset where each line ends."""
        data, ends = bytearray(), []
        for line in lines:
            data += line + (eol if self.random() < 0.95 else self.choice(self.TERMINATORS))
            ends.append(len(data))
        return bytes(data), ends

    def cuts(self, data: bytes) -> list[int]:
        """Where the stream is cut: nowhere (all pipelined at once), or anywhere."""
        if self.random() < 0.4:
            return [len(data)]
        return sorted({*(self.randrange(1, len(data) + 1) for _ in range(self.randint(1, 12))), len(data)})


# -- driving sessions -------------------------------------------------------------------


@dataclass
class Tally:
    lines: int = 0
    sessions: int = 0
    replies: collections.Counter = field(default_factory=collections.Counter)
    malformed: int = 0
    hung: list[str] = field(default_factory=list)
    connect_failures: int = 0
    tls_sessions: int = 0
    starttls_abandoned: int = 0

    def read_replies(self, received: bytes) -> None:
        for line in received.split(CRLF):
            if not line:
                continue
            match = REPLY.match(line)
            if match is None:
                self.malformed += 1
            elif match.group(3) != b"-":  # the last line of a (multi-line) reply
                code = int(match.group(1) + match.group(2))
                self.replies[code if code in (421, 451) else f"{match.group(1).decode()}xx"] += 1


class Fuzzer:
    def __init__(self, port: int, lines: int, concurrency: int, seed: int, hang_seconds: float):
        self.port, self.target, self.concurrency = port, lines, concurrency
        self.hang_seconds = hang_seconds
        self.seed = seed
        self.tally = Tally()
        self.tls = ssl.create_default_context()
        self.tls.check_hostname, self.tls.verify_mode = False, ssl.CERT_NONE

    async def run(self) -> Tally:
        await asyncio.gather(*(self.worker(i) for i in range(self.concurrency)))
        return self.tally

    async def worker(self, number: int) -> None:
        rng = Hostile(self.seed * 1_000_003 + number)
        while self.tally.lines < self.target:
            mode, lines, eol = rng.session()
            self.tally.sessions += 1
            source = SOURCES[self.tally.sessions % len(SOURCES)]
            try:
                await self.session(rng, source, mode, lines, eol)
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                pass

    async def session(self, rng: Hostile, source: str, mode: str, lines: list[bytes], eol: bytes) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port, local_addr=(source, 0)), self.hang_seconds)
        except (asyncio.TimeoutError, OSError):
            self.tally.connect_failures += 1
            return
        received = bytearray()
        if mode == "tls":
            # EHLO and STARTTLS, a real handshake, and the rest (AUTH included) over TLS.
            self.tally.lines += 2
            writer.write(lines[0] + CRLF + b"STARTTLS" + CRLF)
            try:
                while STARTTLS_READY not in received:
                    chunk = await asyncio.wait_for(reader.read(65536), self.hang_seconds)
                    if not chunk:
                        break
                    received.extend(chunk)
                if STARTTLS_READY in received:
                    await asyncio.wait_for(writer.start_tls(self.tls), self.hang_seconds)
                    self.tally.tls_sessions += 1
                    auth = rng.choice([[b"AUTH PLAIN AGFsaWNlAHdyb25n"], [b"AUTH LOGIN", b"YWxpY2U=", b"d3Jvbmc="],
                                       [b"AUTH LOGIN", b"\xff\xfe"], [b"AUTH PLAIN", b"!!!"], [b"AUTH PLAIN *"]])
                    lines = [lines[0], *auth, *lines[1:]]
            except asyncio.TimeoutError:
                self.hung(source, "no reply to EHLO/STARTTLS", received)
                writer.close()
                return
        data, ends = rng.stream(lines, eol)
        # Always said plainly, so that the session can end: the end of any DATA, and QUIT.
        data += b"\r\n.\r\nQUIT\r\n"
        ends += [len(data) - 9, len(data) - 6, len(data)]
        cuts = rng.cuts(data)

        async def read_all():
            while chunk := await reader.read(65536):
                received.extend(chunk)

        reading = asyncio.ensure_future(read_all())
        sent = counted = 0
        try:
            for cut in cuts:
                if reading.done():
                    break  # the server ended the session (a 421, a closing refusal)
                writer.write(data[sent:cut])
                sent = cut
                while counted < len(ends) and ends[counted] <= sent:
                    counted += 1
                    self.tally.lines += 1
                await asyncio.wait_for(writer.drain(), self.hang_seconds)
                if len(cuts) > 1:
                    await asyncio.sleep(0)
        except asyncio.TimeoutError:
            self.hung(source, "not reading what the client sent", received)
        except (ConnectionError, OSError):
            pass
        deadline = time.monotonic() + self.hang_seconds
        abandoned = False
        try:
            while not reading.done():
                if time.monotonic() > deadline:
                    self.hung(source, "no end of session after QUIT", received)
                    break
                if STARTTLS_READY in received and not abandoned and mode != "tls":
                    # The server waits for a handshake this client never starts:
                    # it hangs up (once the server has switched to TLS).
                    await asyncio.sleep(0.2)
                    writer.write_eof()
                    abandoned = True
                    self.tally.starttls_abandoned += 1
                await asyncio.wait([reading], timeout=0.1)
        except (ConnectionError, OSError):
            pass
        finally:
            reading.cancel()
            writer.close()
        self.tally.read_replies(bytes(received))

    def hung(self, source: str, what: str, received: bytearray) -> None:
        self.tally.hung.append(f"{source}: {what}; last received {bytes(received[-120:])!r}")


# -- watching ingest ----------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssSampler(threading.Thread):
    def __init__(self, pid: int, progress, interval: float = 1.0):
        super().__init__(name="rss", daemon=True)
        self.pid, self.progress, self.interval = pid, progress, interval
        self.samples: list[tuple[float, int, float]] = []  # (seconds, lines sent, MiB)
        self._done = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append((time.monotonic() - self._t0, self.progress(), rss_mib(self.pid)))
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


RECORD = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ \S+ (?P<level>[A-Z]+) (?P<logger>\S+): (?P<message>.*)$")
#: Errors that mean an event or a task was lost: crashes, even though ingest stays up.
LOST = ("could not publish", "Task exception was never retrieved", "Exception in callback", "audit event lost")


def log_findings(log: Path) -> tuple[collections.Counter, collections.Counter]:
    """(the exception behind each "unexpected error in the SMTP dialogue", every other ERROR record)."""
    causes, errors = collections.Counter(), collections.Counter()
    if not log.exists():
        return causes, errors
    pending = False  # inside an "unexpected error" traceback
    last_exception = None
    for line in log.read_text(errors="replace").splitlines():
        record = RECORD.match(line)
        if record is None:
            if pending and re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b", line):
                last_exception = line.split(":")[0]
            continue
        if pending:
            causes[last_exception or "?"] += 1
            pending, last_exception = False, None
        if "unexpected error in the SMTP dialogue" in record["message"]:
            pending = True
        elif record["level"] in ("ERROR", "CRITICAL") or any(m in record["message"] for m in LOST):
            errors[f"{record['logger']}: {record['message'][:80]}"] += 1
    if pending:
        causes[last_exception or "?"] += 1
    return causes, errors


# -- the run ---------------------------------------------------------------------------------------


def fuzz(lines: int, concurrency: int, seed: int, hang_seconds: float) -> dict:
    started = time.monotonic()
    with local_stack(POLICY, components=("ingest",)) as (settings, stack):
        ingest = stack.procs["ingest"]
        fuzzer = Fuzzer(settings.smtp_port, lines, concurrency, seed, hang_seconds)
        sampler = RssSampler(ingest.pid, lambda: fuzzer.tally.lines)
        sampler.start()
        run_started = time.monotonic()
        try:
            tally = asyncio.run(fuzzer.run())
        finally:
            sampler.stop()
        elapsed = time.monotonic() - run_started
        exited = ingest.poll()
        still_serving = False
        if exited is None:
            import smtplib
            try:
                with smtplib.SMTP("127.0.0.1", settings.smtp_port, timeout=10) as probe:
                    still_serving = probe.ehlo("probe.test")[0] == 250
            except (OSError, smtplib.SMTPException):
                pass
        time.sleep(1)  # let the log catch up
        causes, errors = log_findings(stack.log_dir / "ingest.log")
    return dict(tally=tally, samples=sampler.samples, exited=exited, still_serving=still_serving,
                causes=causes, errors=errors, elapsed=elapsed, total=time.monotonic() - started,
                lines_target=lines, concurrency=concurrency, seed=seed, hang_seconds=hang_seconds)


def report(r: dict) -> None:
    t: Tally = r["tally"]
    samples = [s for s in r["samples"] if s[2] > 0]
    print(f"lines sent       {t.lines:,} in {r['elapsed']:.0f} s ({t.lines / max(r['elapsed'], 1e-9):,.0f} lines/s; "
          f"seed {r['seed']})")
    last_octet = SOURCES[-1].rsplit(".", 1)[1]
    print(f"sessions         {t.sessions:,} from {len(SOURCES)} addresses ({SOURCES[0]}-{last_octet}), "
          f"{r['concurrency']} at once; {t.tls_sessions:,} went on over TLS; "
          f"{t.starttls_abandoned:,} left after STARTTLS without a handshake; {t.connect_failures} connects failed")
    classes = ", ".join(f"{k} {v:,}" for k, v in sorted(t.replies.items(), key=lambda kv: str(kv[0])))
    print(f"replies          {classes}; malformed reply lines: {t.malformed}")
    unexpected = sum(r["causes"].values())
    tls_failures = r["causes"].get("aiosmtpd.smtp.TLSSetupException", 0)
    lost = sum(n for what, n in r["errors"].items() if any(m in what for m in LOST))
    crashes = (1 if r["exited"] is not None else 0) + unexpected - tls_failures + lost
    state = f"exited with {r['exited']}" if r["exited"] is not None else "still running"
    print(f"crashes          {crashes} (ingest {state}{', still serving' if r['still_serving'] else ', NOT serving'}; "
          f"'unexpected error' logged {unexpected}, of which {tls_failures} a client's failed STARTTLS handshake; "
          f"events or tasks lost {lost})")
    if r["causes"]:
        print(f"                 unexpected errors by exception: {dict(r['causes'])}")
    for what, n in r["errors"].most_common(10):
        print(f"                 logged {n} x {what}")
    print(f"hung sessions    {len(t.hung)} (no end within {r['hang_seconds']:g} s of the client's QUIT, "
          f"or the server not reading)")
    for line in t.hung[:10]:
        print(f"                 {line}")
    if samples:
        warm = next((s for s in samples if s[1] >= 0.05 * r["lines_target"]), samples[0])
        last, peak = samples[-1], max(samples, key=lambda s: s[2])
        growth = last[2] - warm[2]
        per_100k = growth / max((last[1] - warm[1]) / 100_000, 1e-9)
        print(f"ingest RSS MiB   first {samples[0][2]:.1f}, after warm-up {warm[2]:.1f} (at {warm[1]:,} lines), "
              f"last {last[2]:.1f} "
              f"(at {last[1]:,}), peak {peak[2]:.1f}: {growth:+.1f} MiB ({per_100k:+.2f} MiB per 100,000 lines)")
        tenths = [next((s for s in samples if s[1] >= r["lines_target"] * k / 10), samples[-1]) for k in range(1, 11)]
        print("                 by tenth of the run: " + " ".join(f"{s[2]:.0f}" for s in tenths))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000, help="SMTP lines to send in all")
    parser.add_argument("--concurrency", type=int, default=64, help="sessions open at once")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--hang-seconds", type=float, default=20,
                        help="a session not ended this long after the client's QUIT is hung")
    args = parser.parse_args(argv)
    result = fuzz(args.lines, args.concurrency, args.seed, args.hang_seconds)
    report(result)
    return result


def run() -> None:
    # `make bench`: a tenth of the full run (1,000,000 lines take several minutes).
    main([])


if __name__ == "__main__":
    main()
