"""Starting the whole gateway on one machine: `make run` and the test suite.

Each Bulwark component runs as its own process, as it would in production
(and in docker-compose.yml): the broker, ingest, the Faust worker, the
sinks, the demo mailbox and the web console. This module starts them in order, waits for each
to be ready, and stops them all, in reverse order, on Ctrl-C.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bulwark.settings import REPO_ROOT, Settings

KAFKA_SCRIPT = REPO_ROOT / "infra" / "kafka" / "kafka.sh"
CLAMD_SCRIPT = REPO_ROOT / "infra" / "clamav" / "clamd.sh"

#: (name, bulwark subcommand) in start order.
COMPONENTS = [
    ("mailbox", ["demo-mailbox"]),
    ("quarantine", ["sinks", "quarantine"]),
    ("delivery", ["sinks", "delivery"]),
    ("dmarc-reports", ["sinks", "dmarc-reports"]),
    ("streams", ["streams", "worker"]),
    ("ingest", ["ingest"]),
    ("console", ["console"]),
]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state == "Z":  # dead, not yet reaped by its parent
            return
        time.sleep(0.05)
    raise TimeoutError(f"pid {pid} still alive {timeout:.0f}s after SIGKILL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_environment(root: Path, policy: Path) -> dict[str, str]:
    """Variables for a stack of its own (tests, benchmarks): its own
    directory and a free loopback port for every listener, so it runs beside
    `make run` and beside another such stack."""
    return {
        "BULWARK_DATA_DIR": str(root),
        "BULWARK_POLICY": str(policy),
        "BULWARK_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "BULWARK_KAFKA_CONTROLLER_PORT": str(free_port()),
        "BULWARK_SMTP_PORT": str(free_port()),
        "BULWARK_SUBMISSION_PORT": str(free_port()),
        "BULWARK_SUBMISSIONS_PORT": str(free_port()),
        "BULWARK_MAILBOX_PORT": str(free_port()),
        "BULWARK_STREAMS_WEB_PORT": str(free_port()),
        "BULWARK_MTA_STS_PORT": str(free_port()),
        "BULWARK_CONSOLE_PORT": str(free_port()),
        # A private clamd with the project's own signature database.
        "BULWARK_CLAMD_PORT": str(free_port()),
        "BULWARK_CLAMD_DIR": str(root / "clamd"),
        "BULWARK_CLAMAV_DB": "",
    }


@contextmanager
def environment(variables: dict[str, str]):
    """Set these environment variables for the block, then put back what was there."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class LocalStack:
    settings: Settings
    env: dict[str, str]
    kafka_port: int
    kafka_dir: Path
    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    restarts: dict[str, list[float]] = field(default_factory=dict)
    #: name -> (subcommand, extra environment) of every process started, so it can be started again.
    specs: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings, extra_env: dict[str, str] | None = None) -> "LocalStack":
        port = int(settings.kafka_bootstrap.rpartition(":")[2])
        kafka_dir = settings.data_dir / "kafka"
        env = {
            **os.environ,
            **(extra_env or {}),
            "BULWARK_KAFKA_PORT": str(port),
            "BULWARK_KAFKA_CONTROLLER_PORT": os.environ.get("BULWARK_KAFKA_CONTROLLER_PORT", str(port + 1)),
            "BULWARK_KAFKA_DIR": str(kafka_dir),
            # A private clamd (infra/clamav/clamd.sh) next to the other state.
            "BULWARK_CLAMD_HOST": settings.clamd_host,
            "BULWARK_CLAMD_PORT": str(settings.clamd_port),
            "BULWARK_CLAMD_DIR": os.environ.get("BULWARK_CLAMD_DIR", str(settings.data_dir / "clamd")),
        }
        return cls(settings, env, port, kafka_dir, settings.data_dir / "logs")

    # -- Kafka ------------------------------------------------------------------

    def kafka(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(KAFKA_SCRIPT), command], env=self.env, check=check,
                              capture_output=True, text=True)

    def start_kafka(self) -> None:
        result = self.kafka("start", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"Kafka did not start:\n{result.stdout}\n{result.stderr}")

    def stop_kafka(self) -> None:
        self.kafka("stop", check=False)

    def kafka_pid(self) -> int | None:
        try:
            return int((self.kafka_dir / "kafka.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill_kafka(self) -> int:
        """SIGKILL the broker, as a crash or the OOM killer would: no clean shutdown,
        no flush; ``start_kafka`` then recovers its logs. Returns the pid killed."""
        pid = self.kafka_pid()
        if pid is None:
            raise RuntimeError(f"no broker pid in {self.kafka_dir}")
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
        return pid

    # -- clamd (the antivirus and macros checks scan through it) -------------------

    def clamd(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(CLAMD_SCRIPT), command], env=self.env, check=False,
                              capture_output=True, text=True)

    def start_clamd(self) -> None:
        result = self.clamd("start")
        if result.returncode != 0:
            raise RuntimeError(f"clamd did not start:\n{result.stdout}\n{result.stderr}")

    def stop_clamd(self) -> None:
        self.clamd("stop")

    def ensure_topics(self) -> None:
        self.run_cli(["topics", "ensure"])

    def apply_policy(self) -> None:
        """Publish the local policy file unless that very version is already active."""
        result = self.run_cli(["policy", "apply", str(self.settings.policy_path), "--if-changed",
                               "--by", "bulwark up"], check=False)
        if result.returncode != 0:
            raise RuntimeError(f"the policy was not applied:\n{result.stderr}")
        print(result.stdout.strip(), flush=True)

    # -- Bulwark processes ----------------------------------------------------------

    def run_cli(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bulwark.cli", *args], env=self.env, check=check,
                              capture_output=True, text=True)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "bulwark.cli", *args], env={**self.env, **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        self.specs[name] = (list(args), dict(env or {}))
        return proc

    def kill(self, name: str) -> int:
        """SIGKILL a component's whole process group (it runs in a session of its own),
        as a crash would: no handler runs. It is no longer supervised
        (``restart_exited`` leaves it alone) until ``restart``. Returns the pid killed."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return proc.pid

    def restart(self, name: str) -> subprocess.Popen:
        """Start a component again the way it was last started."""
        args, env = self.specs[name]
        return self.start(name, args, env)

    def stop(self, name: str, timeout: float = 20) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart_exited(self, report=lambda line: None) -> list[str]:
        """Start again every component that exited, as a service manager would.

        Every component recovers its state from Kafka and its own stores, so
        a restart is always safe (a Faust worker rebuilds its tables from
        their changelogs after anything but a clean stop).
        """
        restarted = []
        now = time.monotonic()
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            recent = [t for t in self.restarts.get(name, []) if now - t < 60]
            if len(recent) >= 5:  # crash-looping: a restart will not help
                raise RuntimeError(f"{name} exited 5 times in a minute; see {self.log_dir / (name + '.log')}")
            report(f"{name} exited with {proc.returncode}; restarting (log: {self.log_dir / (name + '.log')})")
            self.restarts[name] = [*recent, now]
            self.restart(name)
            restarted.append(name)
        return restarted

    def start_all(self) -> None:
        self.start_kafka()
        self.start_clamd()
        self.ensure_topics()
        self.apply_policy()
        for name, args in COMPONENTS:
            proc = self.start(name, args)
            if name == "mailbox":
                wait_for_port(self.settings.mailbox_host, self.settings.mailbox_port, 30, proc)
            if name == "ingest":
                wait_for_port(self.settings.smtp_host, self.settings.smtp_port, 60, proc)
                for port in (self.settings.submission_port, self.settings.submissions_port):
                    if port:
                        wait_for_port(self.settings.smtp_host, port, 10, proc)
            if name == "console":
                wait_for_port(self.settings.console_host, self.settings.console_port, 60, proc)

    def stop_all(self, kafka: bool = True) -> None:
        # Extra processes first (a second worker, say), then the components in reverse order.
        for name in [n for n in self.procs if n not in dict(COMPONENTS)]:
            self.stop(name)
        for name, _ in reversed(COMPONENTS):
            self.stop(name)
        if kafka:  # the infrastructure: clamd and the broker
            self.stop_clamd()
            self.stop_kafka()

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def run_local(settings: Settings) -> int:
    stack = LocalStack.from_settings(settings)
    print(f"Starting Kafka on {settings.kafka_bootstrap} (data in {stack.kafka_dir}) ...", flush=True)
    try:
        stack.start_all()
    except Exception as exc:
        print(f"could not start the gateway: {exc}", file=sys.stderr)
        for name, _ in COMPONENTS:
            tail = stack.log_tail(name)
            if tail:
                print(f"--- {name} log ---\n{tail}", file=sys.stderr)
        stack.stop_all()
        return 1
    print(
        f"""
Bulwark is running.

  Send mail to      smtp://{settings.smtp_host}:{settings.smtp_port}   (e.g. to someone@example.com)
  Submit mail       smtp://{settings.smtp_host}:{settings.submission_port} (STARTTLS, then AUTH)
                    smtps://{settings.smtp_host}:{settings.submissions_port} (implicit TLS, then AUTH)
  Add an account    .venv/bin/bulwark accounts add you@example.com
  Delivered mail    {settings.mailbox_dir}/new   (demo mailbox on port {settings.mailbox_port})
  Raw messages      {settings.blob_dir}
  Logs              {stack.log_dir}
  Antivirus         clamd on {settings.clamd_host}:{settings.clamd_port}   (infra/clamav/clamd.sh status)
  Policy            {settings.policy_path}

  Trace a message   .venv/bin/bulwark trace <queue id from the 250 reply>
  Quarantine        .venv/bin/bulwark quarantine list
  DMARC reports     .venv/bin/bulwark dmarc report   (mailed to dmarc_reports.addresses)
  Web console       https://{settings.console_host}:{settings.console_port}/   (first: .venv/bin/bulwark console add-admin NAME --role admin)

Ctrl-C stops everything.""",
        flush=True,
    )
    stopping = False

    def _stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopping:
            try:
                stack.restart_exited(report=lambda line: print(line, file=sys.stderr, flush=True))
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
                stopping = True
            time.sleep(0.5)
    finally:
        print("stopping ...", flush=True)
        stack.stop_all()
    return 0
