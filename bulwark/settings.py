"""Where things run: addresses, ports and directories, from the environment.

Settings say *where* (deployment); the policy file says *what* (behaviour).
Every variable is read here and nowhere else, so docker-compose.yml, the local
launcher and the tests set the same names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _processes(name: str) -> int:
    """A process count from the environment: a number, or ``auto`` for one per core."""
    value = _env(name, "1").strip().lower()
    return (os.cpu_count() or 1) if value == "auto" else max(1, int(value))


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


#: Where each long-running process serves its Prometheus metrics
#: (bulwark/metrics.py): component -> (variable, default port). 0 turns one
#: off; a second process of a component on the same host needs its own port.
METRICS_PORTS = {
    "ingest": ("BULWARK_INGEST_METRICS_PORT", 9461),
    "streams": ("BULWARK_STREAMS_METRICS_PORT", 9462),
    "delivery": ("BULWARK_DELIVERY_METRICS_PORT", 9463),
    "quarantine": ("BULWARK_QUARANTINE_METRICS_PORT", 9464),
    "dmarc-reports": ("BULWARK_DMARC_REPORTS_METRICS_PORT", 9465),
    "console": ("BULWARK_CONSOLE_METRICS_PORT", 9466),
    "export": ("BULWARK_EXPORT_METRICS_PORT", 9467),
    "mailbox": ("BULWARK_MAILBOX_METRICS_PORT", 9468),
    "trace-index": ("BULWARK_TRACE_INDEX_METRICS_PORT", 9469),
    "unjudged": ("BULWARK_UNJUDGED_METRICS_PORT", 9470),
}

#: The last environment's settings (Settings.from_env).
_FROM_ENV: dict[tuple, "Settings"] = {}

#: The metrics port of a component's next process: its port + 10 (Settings.metrics_port).
METRICS_INSTANCE_STEP = 10


def _bulwark_environment() -> tuple:
    """The BULWARK_* variables, as the key ``Settings.from_env`` remembers its result by.

    Read from ``os.environ``'s own bytes mapping where CPython has one:
    going through ``os.environ.items()`` decodes every variable of the
    process on every call, about 100 us, and the content checks ask several
    times per message (3.5 % of the worker's CPU in py-spy); the bytes are
    compared in about 15 us.
    """
    raw = getattr(os.environ, "_data", None)
    if isinstance(raw, dict):
        return tuple(sorted(kv for kv in raw.items() if kv[0].startswith(b"BULWARK_")))
    return tuple(sorted(kv for kv in os.environ.items() if kv[0].startswith("BULWARK_")))


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str
    data_dir: Path
    blob_dir: Path
    policy_path: Path
    smtp_host: str
    smtp_port: int
    #: Message submission (RFC 6409, port 587 on a real host): STARTTLS, then AUTH.
    submission_port: int
    #: Message submission over implicit TLS (RFC 8314, port 465 on a real host).
    submissions_port: int
    #: Certificate chain and key (PEM) for every TLS listener; when unset, a
    #: self-signed pair is generated under the data directory (local runs).
    tls_cert_path: Path | None
    tls_key_path: Path | None
    mailbox_host: str
    mailbox_port: int
    mailbox_dir: Path
    #: How long a produce may wait for the broker before it fails. Ingest
    #: answers 451 only once the record has certainly failed, so this bounds
    #: how long a client waits during a broker outage.
    kafka_request_timeout_ms: int
    #: -1 keeps audit events for ever.
    audit_retention_ms: int
    #: Where the Faust worker's HTTPS table views listen. 127.0.0.1 on a host;
    #: 0.0.0.0 in a container, so a published port reaches it.
    streams_web_host: str
    streams_web_port: int
    delivery_poll_seconds: float
    #: How long the delivery sink remembers a finished delivery (so a verdict
    #: consumed again is not delivered again); older verdicts are not acted on.
    delivery_retention_days: float
    #: Master secret of Backscatter Protection's keys (32 random bytes,
    #: created 0600 on first use); the same file on every node.
    backscatter_secret_file: Path
    #: The ClamAV daemon the antivirus and macros checks stream messages to
    #: (clamd's INSTREAM protocol over TCP), how long one scan may take, and
    #: how many scans one worker runs at once (keep it under clamd's MaxThreads).
    clamd_host: str
    clamd_port: int
    clamd_scan_timeout_seconds: float
    clamd_max_concurrent_scans: int
    #: The DNS resolver delivery asks (MX, A/AAAA, MTA-STS and TLS-RPT
    #: records) and the sender authentication checks ask (SPF, DKIM, DMARC,
    #: ARC), "address" or "address:port"; unset: the system's resolvers.
    dns_resolver: str | None = None
    #: The port of mail servers found by MX lookup: 25 (RFC 5321). Only a
    #: test network has its MX hosts elsewhere.
    mx_port: int = 25
    #: Extra trust anchors (PEM) for outbound TLS and MTA-STS policy fetches,
    #: beside the system's: a private CA of the organisation's own servers.
    outbound_ca_file: Path | None = None
    #: The HTTPS port of MTA-STS policy hosts: 443 (RFC 8461 section 3.3).
    mta_sts_https_port: int = 443
    #: Audit events a process may hold unacknowledged (a broker outage):
    #: at this many ingest answers new sessions 421 and MAIL 451, so memory
    #: stays bounded; at twice as many, events are dropped and counted.
    audit_backlog_limit: int = 20000
    #: How long the delivery sink keeps a clean connection for the next
    #: message to the same server (Postfix's smtp_connection_cache_time_limit); 0: never.
    delivery_connection_cache_seconds: float = 2.0
    #: Where ingest serves the local domains' MTA-STS policy over HTTPS
    #: (443 on a real gateway, or behind a proxy that forwards
    #: mta-sts.DOMAIN to it); 0 serves none.
    mta_sts_port: int = 0
    #: The administrator's web console (``bulwark console``, HTTPS on the
    #: gateway's certificate). 127.0.0.1 on a host; 0.0.0.0 in a container.
    console_host: str = "127.0.0.1"
    console_port: int = 8445
    #: The quarantine digests' period in seconds, instead of the policy's
    #: ``quarantine_digest.every_hours``: for tests and demonstrations, which
    #: need a period boundary to pass in seconds. None: the policy's.
    digest_period_seconds: int | None = None
    #: How many ingest processes and Faust workers ``bulwark up`` starts
    #: (``auto``: one per core). The ingest processes share the SMTP ports
    #: (SO_REUSEPORT); the workers share the partitions (one consumer
    #: group). Each process is told its number in ``instance``. One of each
    #: by default: on the 2-core machine the project is measured on, one per
    #: core relayed no more (1.02x on a quiet machine, 0.79x and 0.9x on a
    #: busy one; bench/e2e_relay.py, bulwark-per-core against bulwark;
    #: docs/performance.md) with half as much memory again, as every process
    #: repeats the fixed work of following the verdicts, the state topics
    #: and its group.
    ingest_processes: int = 1
    streams_workers: int = 1
    #: This process's number among its component's processes (0, 1, ...):
    #: it names the ingest's transactional id and a worker's table
    #: directory and web port.
    instance: int = 0

    @property
    def streams_dir(self) -> Path:
        """This Faust worker's own table directory (RocksDB) and clean-stop marker."""
        return self.data_dir / ("streams" if self.instance == 0 else f"streams-{self.instance + 1}")
    #: Where the processes serve their Prometheus metrics (plain HTTP, counts
    #: only): 127.0.0.1 on a host; 0.0.0.0 in a container.
    metrics_host: str = "127.0.0.1"
    #: (component, port) pairs, from METRICS_PORTS.
    metrics_ports: tuple[tuple[str, int], ...] = tuple((c, p) for c, (_, p) in METRICS_PORTS.items())

    def metrics_port(self, component: str, instance: int | None = None) -> int:
        """The port ``component``'s process serves /metrics on; 0: none.

        The second ingest process or worker (``bulwark up`` runs one per
        core) serves on the component's port + 10, the third + 20: every
        process of the host has its own.
        """
        base = dict(self.metrics_ports).get(component, 0)
        n = self.instance if instance is None else instance
        return base + METRICS_INSTANCE_STEP * n if base else 0

    #: How every Kafka client connects (bulwark/kafka_security.py): PLAINTEXT
    #: (the loopback default of `make run`) or SASL_SSL, the secure profile
    #: (docs/operations.md, "Securing Kafka").
    kafka_security_protocol: str = "PLAINTEXT"
    #: SCRAM-SHA-512 (or SCRAM-SHA-256), with SASL_SSL.
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"
    #: PEM trust anchors the broker's certificate must chain to; unset: the system's.
    kafka_ca_file: Path | None = None
    #: This process's principal: a file of ``username=`` and ``password=``
    #: lines that only its owner may read (0600), read when a client is built.
    kafka_credentials_file: Path | None = None
    #: What ``bulwark up`` (`make run`) starts: ``plaintext`` (loopback, no
    #: access control) or ``secure`` (TLS, SCRAM principals and ACLs, each
    #: component with its own credentials from the secure directory).
    kafka_profile: str = "plaintext"
    #: The secure profile's CA, broker certificate and credentials files (bulwark/kafka_secure.py).
    kafka_secure_dir: Path | None = None
    #: Where the console asks a Faust worker for its tables (the Screening
    #: and Accounts pages' counters). None: https://127.0.0.1:streams_web_port
    #: (same host); in compose, the streams service.
    streams_web_url: str | None = None
    #: The safety net for messages never judged (``bulwark sinks unjudged``,
    #: sinks/unjudged.py): how long a message on mail.received may wait for
    #: its verdict before it is written there again (judging takes well under
    #: a second; a worker's failover tens of seconds), and how many times it
    #: is sent again before an error says it was given up.
    unjudged_after_seconds: float = 120.0
    unjudged_max_resends: int = 5

    @classmethod
    def from_env(cls) -> "Settings":
        """The settings the environment gives (and the working directory, for relative paths).

        Remembered for the environment it was read from: the content checks
        ask for it several times per message, and reading it costs about 0.7
        ms of path resolution each time (3.7 % of the streams worker's CPU in
        a py-spy profile under bench/e2e_relay.py). A changed environment, as
        in tests, reads it afresh.
        """
        key = (os.getcwd(), _bulwark_environment())
        cached = _FROM_ENV.get(key)
        if cached is None:
            cached = cls._read_env()
            _FROM_ENV.clear()  # one environment at a time is all a process uses
            _FROM_ENV[key] = cached
        return cached

    @classmethod
    def _read_env(cls) -> "Settings":
        data_dir = Path(_env("BULWARK_DATA_DIR", str(REPO_ROOT / "var"))).resolve()
        return cls(
            kafka_bootstrap=_env("BULWARK_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
            data_dir=data_dir,
            blob_dir=Path(_env("BULWARK_BLOB_DIR", str(data_dir / "blobs"))),
            policy_path=Path(_env("BULWARK_POLICY", str(REPO_ROOT / "infra" / "policy.local.yaml"))),
            smtp_host=_env("BULWARK_SMTP_HOST", "127.0.0.1"),
            smtp_port=int(_env("BULWARK_SMTP_PORT", "2525")),
            submission_port=int(_env("BULWARK_SUBMISSION_PORT", "2587")),
            submissions_port=int(_env("BULWARK_SUBMISSIONS_PORT", "2465")),
            tls_cert_path=Path(v) if (v := os.environ.get("BULWARK_TLS_CERT")) else None,
            tls_key_path=Path(v) if (v := os.environ.get("BULWARK_TLS_KEY")) else None,
            mailbox_host=_env("BULWARK_MAILBOX_HOST", "127.0.0.1"),
            mailbox_port=int(_env("BULWARK_MAILBOX_PORT", "2526")),
            mailbox_dir=Path(_env("BULWARK_MAILBOX_DIR", str(data_dir / "mailbox"))),
            kafka_request_timeout_ms=int(_env("BULWARK_KAFKA_REQUEST_TIMEOUT_MS", "15000")),
            audit_retention_ms=int(_env("BULWARK_AUDIT_RETENTION_MS", "-1")),
            streams_web_host=_env("BULWARK_STREAMS_WEB_HOST", "127.0.0.1"),
            streams_web_port=int(_env("BULWARK_STREAMS_WEB_PORT", "6066")),
            delivery_poll_seconds=float(_env("BULWARK_DELIVERY_POLL_SECONDS", "1.0")),
            delivery_retention_days=float(_env("BULWARK_DELIVERY_RETENTION_DAYS", "7")),
            backscatter_secret_file=Path(
                _env("BULWARK_BACKSCATTER_SECRET_FILE", str(data_dir / "secrets" / "backscatter.key"))
            ),
            clamd_host=_env("BULWARK_CLAMD_HOST", "127.0.0.1"),
            clamd_port=int(_env("BULWARK_CLAMD_PORT", "3310")),
            clamd_scan_timeout_seconds=float(_env("BULWARK_CLAMD_SCAN_TIMEOUT_SECONDS", "20")),
            clamd_max_concurrent_scans=int(_env("BULWARK_CLAMD_MAX_CONCURRENT_SCANS", "4")),
            dns_resolver=_env("BULWARK_DNS_RESOLVER", "") or None,
            mx_port=int(_env("BULWARK_MX_PORT", "25")),
            outbound_ca_file=Path(ca) if (ca := _env("BULWARK_OUTBOUND_CA_FILE", "")) else None,
            mta_sts_https_port=int(_env("BULWARK_MTA_STS_HTTPS_PORT", "443")),
            mta_sts_port=int(_env("BULWARK_MTA_STS_PORT", "8443")),
            audit_backlog_limit=int(_env("BULWARK_AUDIT_BACKLOG_LIMIT", "20000")),
            delivery_connection_cache_seconds=float(_env("BULWARK_DELIVERY_CONNECTION_CACHE_SECONDS", "2")),
            console_host=_env("BULWARK_CONSOLE_HOST", "127.0.0.1"),
            console_port=int(_env("BULWARK_CONSOLE_PORT", "8445")),
            digest_period_seconds=max(int(_env("BULWARK_DIGEST_PERIOD_SECONDS", "0")), 0) or None,
            ingest_processes=_processes("BULWARK_INGEST_PROCESSES"),
            streams_workers=_processes("BULWARK_STREAMS_WORKERS"),
            instance=int(_env("BULWARK_INSTANCE", "0")),
            metrics_host=_env("BULWARK_METRICS_HOST", "127.0.0.1"),
            metrics_ports=tuple((c, int(_env(var, str(port)))) for c, (var, port) in METRICS_PORTS.items()),
            kafka_security_protocol=_env("BULWARK_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper(),
            kafka_sasl_mechanism=_env("BULWARK_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512").upper(),
            kafka_ca_file=Path(v) if (v := _env("BULWARK_KAFKA_CA_FILE", "")) else None,
            kafka_credentials_file=Path(v) if (v := _env("BULWARK_KAFKA_CREDENTIALS_FILE", "")) else None,
            kafka_profile=_env("BULWARK_KAFKA_PROFILE", "plaintext").lower(),
            kafka_secure_dir=Path(_env("BULWARK_KAFKA_SECURE_DIR", str(data_dir / "kafka-secure"))).resolve(),
            streams_web_url=_env("BULWARK_STREAMS_WEB_URL", "") or None,
            unjudged_after_seconds=float(_env("BULWARK_UNJUDGED_AFTER_SECONDS", "120")),
            unjudged_max_resends=int(_env("BULWARK_UNJUDGED_MAX_RESENDS", "5")),
        )

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)


@dataclass(frozen=True)
class ExportSettings:
    """One SIEM export (``bulwark sinks export``): what it reads and where it writes.

    Each export is its own process with its own consumer group, so these are
    per process; ``bulwark sinks export`` flags override them.
    """

    #: Names the consumer group, ``bulwark-export-NAME``: the committed
    #: offsets a restarted export resumes from. A new name exports from the start.
    name: str = "siem"
    #: ecs (JSON lines in the Elastic Common Schema), cef (ArcSight CEF) or
    #: syslog (RFC 5424 with structured data).
    format: str = "ecs"
    #: A file path (appended, fsync'd), ``tls://HOST:PORT`` (syslog over TLS,
    #: RFC 5425) or ``-`` (standard output).
    to: str = "-"
    #: Comma-separated topics; empty: every audit topic.
    topics: tuple[str, ...] = ()
    #: PEM trust anchors the collector's certificate must chain to; unset:
    #: the system's. The collector's name is always checked.
    ca_file: Path | None = None
    #: A client certificate and key (PEM) for collectors that authenticate
    #: their senders (RFC 5425 section 5.2).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: The name the collector's certificate must carry, when not the host in ``to``.
    tls_server_name: str | None = None
    #: HOSTNAME in syslog messages and ``observer.hostname``; empty: this host's name.
    hostname: str = ""
    #: The syslog facility (RFC 5424 section 6.2.1), by name: local0 to local7, or another of its names.
    facility: str = "local0"
    #: The IANA enterprise number in syslog SD-IDs (bulwark@N, kafka@N); 32473
    #: is RFC 5612's example number, for organisations without their own.
    enterprise_number: int = 32473
    #: Where a new export (a name with no committed offsets) starts:
    #: ``earliest`` exports the whole history kept, ``latest`` only what comes next.
    start: str = "earliest"

    @classmethod
    def from_env(cls) -> "ExportSettings":
        topics = _env("BULWARK_EXPORT_TOPICS", "")
        return cls(
            name=_env("BULWARK_EXPORT_NAME", "siem"),
            format=_env("BULWARK_EXPORT_FORMAT", "ecs"),
            to=_env("BULWARK_EXPORT_TO", "-"),
            topics=tuple(t.strip() for t in topics.split(",") if t.strip()),
            ca_file=Path(v) if (v := _env("BULWARK_EXPORT_CA_FILE", "")) else None,
            tls_cert=Path(v) if (v := _env("BULWARK_EXPORT_TLS_CERT", "")) else None,
            tls_key=Path(v) if (v := _env("BULWARK_EXPORT_TLS_KEY", "")) else None,
            tls_server_name=_env("BULWARK_EXPORT_TLS_SERVER_NAME", "") or None,
            hostname=_env("BULWARK_EXPORT_HOSTNAME", ""),
            facility=_env("BULWARK_EXPORT_FACILITY", "local0"),
            enterprise_number=int(_env("BULWARK_EXPORT_ENTERPRISE_NUMBER", "32473")),
            start=_env("BULWARK_EXPORT_START", "earliest"),
        )
