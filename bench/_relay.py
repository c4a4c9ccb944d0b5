"""What the end-to-end relay benchmark runs beside the gateway under test.

Postfix's own load generator and sink (``smtp-source``, ``smtp-sink``), a
private Postfix instance (its own configuration, queue and port; never the
system's), Debian's clamav-milter against the project's clamd, a probe client
that times end-of-DATA -> reply while the load runs, and a sampler of the
resident memory of a set of processes. See shared PITFALLS "Benchmarking
against Postfix" for the traps each of these avoids.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bulwark.devstack import free_port, wait_for_port

#: The recipient domain every set-up relays for (a local domain of the gateway).
DOMAIN = "example.com"
SENDER = "sender@partner.test"


def require(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None and not Path(f"/usr/sbin/{p}").exists()]
    if missing:
        raise SystemExit(f"the relay benchmark needs {', '.join(missing)} (Debian: postfix, clamav-milter)")


# -- smtp-sink: the organisation's mail server -----------------------------------


@dataclass
class Sink:
    port: int
    dump: Path
    proc: subprocess.Popen
    out: Path

    def transactions(self) -> int:
        """Transactions completed so far (smtp-sink -c prints its counters with carriage returns)."""
        text = self.out.read_bytes().decode(errors="replace") if self.out.exists() else ""
        found = re.findall(r"mesg=(\d+)", text)
        return int(found[-1]) if found else 0

    def deliveries(self) -> Counter:
        """(Message-Id, recipient) -> how many times it arrived, from the dump (-D)."""
        seen: Counter = Counter()
        if not self.dump.exists():
            return seen
        rcpts: list[str] = []
        in_headers = False
        with self.dump.open("rb") as dump:
            for line in dump:
                if line.startswith(b"X-Client-Addr: "):
                    rcpts, in_headers = [], True
                elif in_headers and line.startswith(b"X-Rcpt-Args: "):
                    rcpts.append(line.split()[1].strip(b"<>").decode().lower())
                elif in_headers and line[:11].lower() == b"message-id:":
                    message_id = line[11:].strip().decode()
                    for rcpt in rcpts:
                        seen[(message_id, rcpt)] += 1
                    in_headers = False
                elif in_headers and line in (b"\n", b"\r\n"):
                    in_headers = False
        return seen


@contextmanager
def smtp_sink(root: Path):
    """smtp-sink on a free port, appending every message to one dump file."""
    dumps = root / "sink"
    dumps.mkdir(parents=True, exist_ok=True)
    shutil.chown(dumps, "postfix")  # smtp-sink writes as -u postfix
    port = free_port()
    out = root / "sink.out"
    with out.open("wb") as stdout:
        proc = subprocess.Popen(["smtp-sink", "-u", "postfix", "-c", "-D", str(dumps / "all"),
                                 f"127.0.0.1:{port}", "1024"], stdout=stdout, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, 10, proc)
        yield Sink(port, dumps / "all", proc, out)
    finally:
        proc.terminate()
        proc.wait(10)


# -- smtp-source: the load -----------------------------------------------------


@dataclass
class Load:
    messages: int
    seconds: float
    output: str

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def smtp_source(port: int, messages: int, sessions: int, size: int, timeout: float) -> Load:
    """Send ``messages`` from 127.0.0.1 over ``sessions`` concurrent sessions; -N: unique recipients."""
    started = time.perf_counter()
    result = subprocess.run(
        ["smtp-source", "-N", "-s", str(sessions), "-l", str(size), "-m", str(messages),
         "-f", SENDER, "-t", f"bob@{DOMAIN}", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=timeout,
    )
    return Load(messages, time.perf_counter() - started, (result.stdout + result.stderr).strip())


def wait_delivered(sink: Sink, expected: int, started: float, quiet: float = 20, limit: float = 1800) -> tuple[int, float]:
    """(transactions at the sink, seconds from ``started`` to the last of them).

    Waits for ``expected`` transactions, or until none arrived for ``quiet``
    seconds (then the rest are quarantined, refused or lost: the caller reconciles).
    """
    count, last_change = sink.transactions(), time.perf_counter()
    deadline = time.perf_counter() + limit
    while count < expected and time.perf_counter() - last_change < quiet and time.perf_counter() < deadline:
        time.sleep(0.2)
        now = sink.transactions()
        if now != count:
            count, last_change = now, time.perf_counter()
    return count, last_change - started


# -- the probe: end-of-DATA -> reply while the load runs ---------------------------


@dataclass
class Probe:
    """One SMTP session of its own from 127.0.0.2, sending a message every ``pause`` seconds."""

    port: int
    pause: float = 0.05
    latencies: list[float] = field(default_factory=list)
    replies: Counter = field(default_factory=Counter)
    message_ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(60)

    def _run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=60, source_address=("127.0.0.2", 0)) as s:
                reader = s.makefile("rb")

                def reply() -> bytes:
                    while True:
                        line = reader.readline()
                        if not line or line[3:4] != b"-":
                            return line

                def command(line: str) -> bytes:
                    s.sendall(line.encode() + b"\r\n")
                    return reply()

                reply()
                command("EHLO probe.partner.test")
                n = 0
                while not self._stop.is_set():
                    n += 1
                    message_id = f"<probe-{n}-{os.getpid()}@partner.test>"
                    command("MAIL FROM:<probe@partner.test>")
                    command(f"RCPT TO:<probe{n}@{DOMAIN}>")
                    command("DATA")
                    s.sendall(f"From: probe@partner.test\r\nTo: probe{n}@{DOMAIN}\r\nMessage-Id: {message_id}\r\n"
                              f"Subject: probe {n}\r\n\r\n".encode() + b"probe\r\n" * 40)
                    sent = time.perf_counter()
                    s.sendall(b".\r\n")
                    answer = reply()
                    self.latencies.append(time.perf_counter() - sent)
                    self.replies[answer[:3].decode(errors="replace")] += 1
                    if answer.startswith(b"250"):
                        self.message_ids.append(message_id)
                    self._stop.wait(self.pause)
                command("QUIT")
        except OSError as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def percentile(self, p: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


# -- peak resident memory of a set of processes --------------------------------------


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pids: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(pids), list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class PeakRss:
    """Samples the summed RSS of some processes (and their children) until stopped."""

    def __init__(self, pids, interval: float = 0.5):
        self.pids, self.interval = pids, interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = sum(_rss_kib(pid) for pid in _descendants(set(self.pids())))
            self.peak_kib = max(self.peak_kib, total)
            self._stop.wait(self.interval)


# -- a private Postfix, optionally with clamav-milter ----------------------------------


@contextmanager
def clamav_milter(root: Path, clamd_port: int):
    """Debian's clamav-milter in the foreground, refusing infected mail, deferring on failure."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = root / "clamav-milter.conf"
    conf.write_text(
        f"MilterSocket inet:{port}@127.0.0.1\n"
        f"ClamdSocket tcp:127.0.0.1:{clamd_port}\n"
        "OnInfected Reject\nOnFail Defer\nForeground yes\n"
        "AddHeader No\nLogInfected Basic\n"
        f"LogFile {root / 'clamav-milter.log'}\nPidFile {root / 'clamav-milter.pid'}\n"
        "User root\n"
    )
    proc = subprocess.Popen(["clamav-milter", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, 30, proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def postfix(root: Path, relay_port: int, milter_port: int | None = None):
    """A private Postfix relaying DOMAIN to 127.0.0.1:relay_port; yields its SMTP port.

    Its own configuration directory, queue and data directory; every service
    unchrooted (the queue is not under /var/spool). The log must be under
    /var (maillog_file_prefixes), or Postfix refuses to start, silently.
    """
    port = free_port()
    etc, spool, data = root / "etc", root / "spool", root / "data"
    for d in (etc, spool, data):
        d.mkdir(parents=True, exist_ok=True)
    shutil.chown(data, "postfix")
    log = Path("/var/log") / f"bulwark-bench-postfix-{port}.log"
    milter = (f"smtpd_milters = inet:127.0.0.1:{milter_port}\nmilter_default_action = tempfail\n"
              if milter_port else "")
    (etc / "main.cf").write_text(
        "compatibility_level = 3.6\n"
        f"queue_directory = {spool}\ndata_directory = {data}\nmail_owner = postfix\n"
        "myhostname = postfix.bench.test\nmydestination =\ninet_interfaces = 127.0.0.1\n"
        f"relay_domains = {DOMAIN}\n"
        f"transport_maps = inline:{{ {DOMAIN}=smtp:[127.0.0.1]:{relay_port} }}\n"
        "smtp_tls_security_level = none\nsmtpd_tls_security_level = none\n"
        f"maillog_file = {log}\n" + milter
    )
    master = Path("/usr/share/postfix/master.cf.dist").read_text()
    master = re.sub(r"^smtp\s+inet\s.*$", f"127.0.0.1:{port} inet n - n - - smtpd", master, flags=re.M)
    # Column 5 (chroot) to "n" everywhere; and the postlog service for maillog_file.
    master = re.sub(r"^(\S+\s+(?:unix|unix-dgram|fifo|pass|inet)\s+\S+\s+\S+\s+)y\b", r"\1n", master, flags=re.M)
    if not re.search(r"^postlog\s", master, flags=re.M):
        master += "postlog   unix-dgram n  -       n       -       1       postlogd\n"
    (etc / "master.cf").write_text(master)
    env = {**os.environ, "MAIL_CONFIG": str(etc)}
    subprocess.run(["postfix", "-c", str(etc), "check"], env=env, check=False, capture_output=True)
    started = subprocess.run(["postfix", "-c", str(etc), "start"], env=env, capture_output=True, text=True)
    try:
        if started.returncode != 0:
            raise RuntimeError(f"Postfix did not start: {started.stderr}\n{log.read_text() if log.exists() else ''}")
        wait_for_port("127.0.0.1", port, 30)
        yield port
    finally:
        subprocess.run(["postfix", "-c", str(etc), "stop"], env=env, check=False, capture_output=True)
        # master exits asynchronously; wait until the port is free again.
        for _ in range(50):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                break
            time.sleep(0.1)


#: Process kinds whose CPU time the benchmark reports, by what their command line holds.
CPU_KINDS = (
    ("ingest", "bulwark.cli ingest"), ("streams", "bulwark.cli streams"), ("delivery", "bulwark.cli sinks delivery"),
    ("quarantine", "bulwark.cli sinks quarantine"), ("dmarc-reports", "bulwark.cli sinks dmarc-reports"),
    ("trace-index", "bulwark.cli sinks trace-index"), ("unjudged", "bulwark.cli sinks unjudged"),
    ("kafka", "kafka.Kafka"), ("clamav-milter", "clamav-milter"),
    ("clamd", "clamd"), ("smtp-sink", "smtp-sink"),
)


def cpu_seconds(scopes: tuple[str, ...] = ()) -> dict[str, float]:
    """User+system CPU seconds so far of the processes of each kind, with what
    their exited children used (Postfix's master recycles its smtpd processes).

    ``scopes``: count only processes whose command line or environment holds
    one of these paths (the set-up's own directories), so that other work on
    the machine does not add to a set-up's figures; none: every process of a
    kind.
    """
    tick = os.sysconf("SC_CLK_TCK")
    marks = [scope.encode() for scope in scopes]
    totals: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw_cmdline = (entry / "cmdline").read_bytes()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cmdline = raw_cmdline.replace(b"\0", b" ").decode(errors="replace")
        try:
            postfix_daemon = os.readlink(entry / "exe").startswith("/usr/lib/postfix/")
        except OSError:
            postfix_daemon = False
        kind = "postfix" if postfix_daemon else next((k for k, marker in CPU_KINDS if marker in cmdline), None)
        if kind is None or (marks and not _in_scope(entry, raw_cmdline, marks)):
            continue
        # utime, stime, cutime, cstime (proc(5): fields 14-17)
        totals[kind] = totals.get(kind, 0.0) + sum(int(f) for f in fields[11:15]) / tick
    return totals


def _in_scope(entry: Path, cmdline: bytes, marks: list[bytes]) -> bool:
    try:
        environ = (entry / "environ").read_bytes()
    except OSError:
        environ = b""
    return any(mark in cmdline or mark in environ for mark in marks)


def topic_offsets(bootstrap: str) -> dict[str, int]:
    """The end offset of every topic on the broker, summed over its partitions.

    The difference over a load is the records (and transaction markers,
    which take an offset each) the broker stored for it: with the CPU
    figures, it shows which stage makes the broker work.
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-offsets", "enable.auto.commit": False})
    try:
        topics = consumer.list_topics(timeout=10).topics
        ends: dict[str, int] = {}
        for name, meta in topics.items():
            if name.startswith("__"):
                continue
            ends[name] = sum(consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1]
                             for p in meta.partitions)
        return ends
    finally:
        consumer.close()
