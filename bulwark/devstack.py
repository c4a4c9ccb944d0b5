"""Starting the whole gateway on one machine: `make run` and the test suite.

Each Bulwark component runs as its own process, as it would in production
(and in docker-compose.yml): the broker, ingest, the Faust worker, the
sinks, the trace indexer, the demo mailbox and the web console. This module starts them in order, waits for each
to be ready, and stops them all, in reverse order, on Ctrl-C.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bulwark.settings import METRICS_INSTANCE_STEP, METRICS_PORTS, REPO_ROOT, Settings

KAFKA_SCRIPT = REPO_ROOT / "infra" / "kafka" / "kafka.sh"
CLAMD_SCRIPT = REPO_ROOT / "infra" / "clamav" / "clamd.sh"

#: (name, bulwark subcommand) in start order.
COMPONENTS = [
    ("mailbox", ["demo-mailbox"]),
    ("quarantine", ["sinks", "quarantine"]),
    ("delivery", ["sinks", "delivery"]),
    ("dmarc-reports", ["sinks", "dmarc-reports"]),
    ("trace-index", ["sinks", "trace-index"]),
    ("unjudged", ["sinks", "unjudged"]),
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


def _private_ports() -> range:
    """Where private stacks take their ports: the 12,000 below the kernel's
    ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 on Linux).

    A port the kernel hands out for ``bind(0)`` is in the ephemeral range, so
    between being chosen and being listened on it can become the source port
    of any outgoing connection (the stack makes hundreds to the broker); a
    second worker's web port, chosen as the first one's + 1, was taken that
    way in CI and the worker exited at start. Below the range only another
    listener can take it.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), low)


#: Ports this process has handed out: two stacks of one test run never share one.
_HANDED_OUT: set[int] = set()


def _bindable(host: str, port: int, udp: bool) -> bool:
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port(host: str = "127.0.0.1", *, udp: bool = False, offsets: tuple[int, ...] = (0,)) -> int:
    """A loopback port nobody listens on, for a private stack's listener.

    ``udp``: free for UDP as well (NSD listens on both). ``offsets``: the
    ports at these distances from it are free too, for the ports a setting
    derives from its base (a second worker's web port is the base + 1, a
    second process's metrics port the base + 10).
    """
    ports = _private_ports()
    for _ in range(1000):
        port = random.randrange(ports.start, ports.stop - max(offsets))
        wanted = [port + offset for offset in offsets]
        if _HANDED_OUT.isdisjoint(wanted) and all(_bindable(host, p, udp) for p in wanted):
            _HANDED_OUT.update(wanted)
            return port
    raise RuntimeError(f"no free port on {host} in {ports.start}-{ports.stop - 1}")


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
        # A second and third worker serve on this port + 1, + 2 (LocalStack.instances).
        "BULWARK_STREAMS_WEB_PORT": str(free_port(offsets=(0, 1, 2, 3))),
        "BULWARK_MTA_STS_PORT": str(free_port()),
        "BULWARK_CONSOLE_PORT": str(free_port()),
        # Every process's Prometheus metrics (bulwark/metrics.py).
        # A second ingest process or worker serves its metrics on this port + 10 (Settings.metrics_port).
        **{variable: str(free_port(offsets=tuple(METRICS_INSTANCE_STEP * i for i in range(4))))
           for variable, _ in METRICS_PORTS.values()},
        # A private clamd with the project's own signature database.
        "BULWARK_CLAMD_PORT": str(free_port()),
        "BULWARK_CLAMD_DIR": str(root / "clamd"),
        "BULWARK_CLAMAV_DB": "",
        # One of each, whatever the environment says: tests kill and restart
        # "the" ingest or worker; a test of several sets these itself.
        "BULWARK_INGEST_PROCESSES": "1",
        "BULWARK_STREAMS_WORKERS": "1",
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

    @property
    def secure(self) -> bool:
        """The secure Kafka profile: TLS, a SCRAM principal per component, ACLs (bulwark/kafka_secure.py)."""
        return self.settings.kafka_profile == "secure"

    @classmethod
    def from_settings(cls, settings: Settings, extra_env: dict[str, str] | None = None) -> "LocalStack":
        if settings.kafka_profile not in ("plaintext", "secure"):
            raise ValueError(f"BULWARK_KAFKA_PROFILE={settings.kafka_profile}: plaintext or secure")
        port = int(settings.kafka_bootstrap.rpartition(":")[2])
        # The secure broker keeps its data apart: a data directory formatted
        # for the plaintext profile has no credential for the broker itself.
        kafka_dir = settings.data_dir / ("kafka" if settings.kafka_profile == "plaintext" else "kafka.secure")
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
        if settings.kafka_profile == "secure":
            secure_dir = settings.kafka_secure_dir
            env.update({
                "BULWARK_KAFKA_PROFILE": "secure",
                "BULWARK_KAFKA_SECURE_DIR": str(secure_dir),
                "BULWARK_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "BULWARK_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                "BULWARK_KAFKA_CA_FILE": str(secure_dir / "ca.pem"),
                # The command line (topics ensure, policy apply, the tests'
                # CLI calls) is the administrator's; each component gets
                # its own principal in start().
                "BULWARK_KAFKA_CREDENTIALS_FILE": str(secure_dir / "credentials" / "admin.properties"),
            })
        return cls(settings, env, port, kafka_dir, settings.data_dir / "logs")

    def component_env(self, name: str) -> dict[str, str]:
        """The principal a process connects as: its component's (a second worker "streams-2" is "streams")."""
        if not self.secure:
            return {}
        from schemas.acl import COMPONENT_PRINCIPALS

        component = name if name in COMPONENT_PRINCIPALS else name.rsplit("-", 1)[0]
        if component not in COMPONENT_PRINCIPALS:
            raise ValueError(f"{name}: no Kafka principal for this component (schemas/acl.py COMPONENT_PRINCIPALS)")
        principal = COMPONENT_PRINCIPALS[component]
        if principal is None:  # no Kafka client, so no credentials either
            return {"BULWARK_KAFKA_CREDENTIALS_FILE": ""}
        return {"BULWARK_KAFKA_CREDENTIALS_FILE": str(self.settings.kafka_secure_dir / "credentials"
                                                      / f"{principal}.properties")}

    # -- Kafka ------------------------------------------------------------------

    def kafka(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(KAFKA_SCRIPT), command], env=self.env, check=check,
                              capture_output=True, text=True)

    def start_kafka(self) -> None:
        files = None
        if self.secure:
            from bulwark.kafka_secure import prepare

            # The CA, the broker's certificate and every principal's password, made once.
            files = prepare(self.settings.kafka_secure_dir, [self.settings.kafka_bootstrap.rpartition(":")[0]])
        result = self.kafka("start", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"Kafka did not start:\n{result.stdout}\n{result.stderr}")
        if files is not None:
            from bulwark.kafka_secure import provision

            # As the broker's own principal: every component's SCRAM credential and ACLs.
            provision(self.settings, files)

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

    def instances(self) -> list[tuple[str, str, list[str], dict[str, str]]]:
        """Every process to run: (name, component, command, environment), in start order.

        Ingest and the Faust worker run as many times as the settings say
        (``ingest_processes``, ``streams_workers``); the second is named
        ``ingest-2``, and so on.
        """
        counts = {"ingest": self.settings.ingest_processes, "streams": self.settings.streams_workers}
        found = []
        for name, args in COMPONENTS:
            for i in range(counts.get(name, 1)):
                env = {"BULWARK_INSTANCE": str(i)}
                if name == "streams":
                    # Each worker serves its tables on a port of its own.
                    env["BULWARK_STREAMS_WEB_PORT"] = str(self.settings.streams_web_port + i)
                found.append((name if i == 0 else f"{name}-{i + 1}", name, args, env))
        return found

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "bulwark.cli", *args],
                                env={**self.env, **self.component_env(name), **(env or {})},
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

    def start_components(self, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (),
                         ingest_timeout: float = 90) -> None:
        """Start every process of these components (all but ``skip``) and wait for ingest's SMTP port.

        For the tests and benchmarks, which bring their own Kafka, clamd and
        often their own downstream server (``skip=("mailbox",)``).
        """
        ingests = []
        for name, component, args, env in self.instances():
            if (only is None or component in only) and component not in skip:
                self.start(name, args, env)
                if component == "ingest":
                    ingests.append(name)
        for name in ingests:
            wait_for_port(self.settings.smtp_host, self.settings.smtp_port, ingest_timeout, self.procs[name])

    def log_tails(self, lines: int = 80) -> str:
        """The last lines of every process's log, for a test that failed to start the stack."""
        return "\n".join(f"--- {name} ---\n{self.log_tail(name, lines)}" for name, *_ in self.instances())

    def start_all(self) -> None:
        self.start_kafka()
        self.start_clamd()
        self.ensure_topics()
        self.apply_policy()
        for name, _, args, env in self.instances():
            proc = self.start(name, args, env)
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
        # Extra processes first (a test's second worker, say), then the components in reverse order.
        ours = [name for name, *_ in self.instances()]
        for name in [n for n in self.procs if n not in ours]:
            self.stop(name)
        for name in reversed(ours):
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
    if stack.secure:
        print(f"Secure profile: TLS, a SCRAM principal per component, ACLs (CA and credentials in "
              f"{settings.kafka_secure_dir}; docs/operations.md, Securing Kafka)", flush=True)
    try:
        stack.start_all()
    except Exception as exc:
        print(f"could not start the gateway: {exc}", file=sys.stderr)
        for name, *_ in stack.instances():
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
  Metrics           .venv/bin/bulwark stats   (Prometheus: http://{settings.metrics_host}:PORT/metrics, ingest on {settings.metrics_port("ingest")})

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
