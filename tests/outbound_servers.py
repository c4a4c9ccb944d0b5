"""Real servers for the outbound delivery tests: NSD, SMTP receivers, an MTA-STS host.

- ``Nsd``: Debian's NSD serving test zones from a private nsd.conf on a
  loopback port (the delivery's resolver is a setting).
- ``Receiver``: an aiosmtpd server on 127.0.0.x, with or without STARTTLS,
  optionally advertising REQUIRETLS or requiring AUTH, that records what it
  received and how (TLS or not, MAIL parameters, AUTH).
- ``PolicyHost``: an HTTPS server (aiohttp) serving
  ``/.well-known/mta-sts.txt`` with a certificate of the test CA.
- ``Authority``: a private CA issuing certificates for any names.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import signal
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from bulwark import devstack

NSD = shutil.which("nsd") or "/usr/sbin/nsd"


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on ``host`` (NSD listens on both)."""
    return devstack.free_port(host, udp=True)


# -- certificates ------------------------------------------------------------------


class Authority:
    """A private CA; ``issue(names)`` writes a certificate and key for those names."""

    def __init__(self, directory: Path, name: str = "Bulwark outbound test CA"):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._serial = 0

    def issue(self, *names: str, expired: bool = False) -> tuple[Path, Path]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (now - datetime.timedelta(days=3), now - datetime.timedelta(days=1)) if expired else \
            (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2))
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in names]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self._serial += 1
        cert_path = self.directory / f"server{self._serial}.pem"
        key_path = self.directory / f"server{self._serial}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    def context(self, *names: str, expired: bool = False) -> ssl.SSLContext:
        cert, key = self.issue(*names, expired=expired)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        return context


def der_sha256(context_cert: Path) -> str:
    import hashlib

    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(context_cert.read_text())).hexdigest()


# -- NSD -----------------------------------------------------------------------------


def zone_text(origin: str, records: list[str]) -> str:
    head = [
        f"$ORIGIN {origin}.",
        "$TTL 30",
        f"@ IN SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 30",
        f"@ IN NS ns.{origin}.",
        "ns IN A 127.0.0.1",
    ]
    return "\n".join(head + records) + "\n"


class Nsd:
    """NSD serving ``zones`` (origin -> record lines) on 127.0.0.1:port."""

    def __init__(self, directory: Path, zones: dict[str, list[str]]):
        self.directory = directory
        self.zones = zones
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = [
            "server:",
            f"    ip-address: 127.0.0.1@{self.port}",
            f"    port: {self.port}",
            '    username: ""',
            '    chroot: ""',
            '    database: ""',
            f"    zonesdir: {self.directory}",
            f"    pidfile: {self.directory}/nsd.pid",
            f"    xfrdfile: {self.directory}/xfrd.state",
            f"    zonelistfile: {self.directory}/zone.list",
            f"    logfile: {self.directory}/nsd.log",
            "    server-count: 1",
            "    verbosity: 1",
            "remote-control:",
            "    control-enable: no",
        ]
        for origin, records in self.zones.items():
            (self.directory / f"{origin}.zone").write_text(zone_text(origin, records))
            conf += ["zone:", f"    name: {origin}", f"    zonefile: {origin}.zone"]
        path = self.directory / "nsd.conf"
        path.write_text("\n".join(conf) + "\n")
        return path

    def start(self) -> "Nsd":
        conf = self._write()
        self.process = subprocess.Popen([NSD, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        origin = next(iter(self.zones))
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                log = (self.directory / "nsd.log").read_text() if (self.directory / "nsd.log").exists() else ""
                raise RuntimeError(f"nsd exited with {self.process.returncode}: {log}")
            try:
                dns.query.udp(dns.message.make_query(origin, "SOA"), "127.0.0.1", port=self.port, timeout=0.5)
                return self
            except (dns.exception.Timeout, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("nsd did not answer within 20 s") from None

    def restart(self, zones: dict[str, list[str]] | None = None) -> None:
        """Serve changed zones (a new TXT id, say): NSD reads zone files at start."""
        if zones is not None:
            self.zones = zones
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- SMTP receivers ------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_to: list[str]
    content: bytes
    tls: str | None
    mail_options: list[str]
    auth_login: str | None


class _ReceiverSMTP(SMTP):
    """aiosmtpd with REQUIRETLS (RFC 8689) let through as a MAIL parameter when advertised."""

    def _getparams(self, params):
        result = super()._getparams(params)
        if result is not None and self.event_handler.requiretls and result.get("REQUIRETLS") is True:
            del result["REQUIRETLS"]
        return result

    def connection_made(self, transport):
        # Called again with the TLS transport after STARTTLS: one connection, counted once.
        if transport.get_extra_info("ssl_object") is None:
            with self.event_handler.lock:
                self.event_handler.connections += 1
        super().connection_made(transport)

    async def smtp_STARTTLS(self, arg):
        if self.event_handler.broken_tls:
            await self.push("220 Ready to start TLS")
            self.transport.write(b"this is not a TLS handshake\r\n")
            self.transport.close()
            return
        await super().smtp_STARTTLS(arg)


@dataclass
class Receiver:
    """A mail server at ``host``:``port`` that records each message."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    requiretls: bool = False
    #: (username, password) to require AUTH with (after STARTTLS).
    auth: tuple[str, str] | None = None
    #: Answer STARTTLS with 220, then garbage instead of a handshake (a broken TLS set-up).
    broken_tls: bool = False
    received: list[Received] = field(default_factory=list)
    auth_attempts: list[str] = field(default_factory=list)
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    controller: Controller | None = None

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.requiretls and session.ssl is not None:
            responses.insert(-1, "250-REQUIRETLS")
        return responses

    async def handle_DATA(self, server, session, envelope):
        tls = None
        if server.transport is not None and server.transport.get_extra_info("ssl_object") is not None:
            tls = server.transport.get_extra_info("ssl_object").version()
        with self.lock:
            self.received.append(Received(
                "" if envelope.mail_from == "<>" else envelope.mail_from, list(envelope.rcpt_tos),
                envelope.original_content, tls, list(envelope.mail_options),
                session.authenticated and getattr(session.auth_data, "login", b"").decode() or None,
            ))
        return "250 2.0.0 Ok: stored"

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        if isinstance(auth_data, LoginPassword):
            with self.lock:
                self.auth_attempts.append(auth_data.login.decode())
            if self.auth and (auth_data.login.decode(), auth_data.password.decode()) == self.auth:
                return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    def start(self) -> "Receiver":
        receiver = self

        class _Controller(Controller):
            def factory(self):
                return _ReceiverSMTP(
                    self.handler, decode_data=False, hostname=f"mx.{receiver.host}",
                    tls_context=receiver.tls, require_starttls=bool(receiver.auth),
                    auth_required=bool(receiver.auth), auth_require_tls=True,
                    authenticator=receiver._authenticate if receiver.auth else None,
                )

        self.controller = _Controller(self, hostname=self.host, port=self.port)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def messages(self) -> list[Received]:
        with self.lock:
            return list(self.received)


# -- the MTA-STS policy host ---------------------------------------------------------


class PolicyHost:
    """HTTPS at ``host``:``port`` serving /.well-known/mta-sts.txt (per Host header)."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext):
        self.host, self.port, self.tls = host, port, tls
        #: Host name -> (body, content type, status)
        self.policies: dict[str, tuple[bytes, str, int]] = {}
        self.requests: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None

    def serve(self, name: str, text: str | bytes, content_type: str = "text/plain", status: int = 200) -> None:
        body = text.encode() if isinstance(text, str) else text
        self.policies[name] = (body, content_type, status)

    def start(self) -> "PolicyHost":
        from aiohttp import web

        async def handler(request: web.Request) -> web.Response:
            name = request.host.partition(":")[0]
            self.requests.append(name)
            body, content_type, status = self.policies.get(name, (b"not found", "text/plain", 404))
            return web.Response(body=body, content_type=content_type, status=status)

        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_get("/.well-known/mta-sts.txt", handler)
            self._runner = web.AppRunner(app)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.tls)
            self._loop.run_until_complete(site.start())
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the MTA-STS policy host did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


async def deliver_and_publish(sink, entry: dict) -> None:
    """One delivery attempt, then its events published, as the sink's scheduler does."""
    await sink.deliver(entry)
    await sink._republish()


class Recorder:
    """Stands in for the delivery sink's publisher: keeps every event it is given."""

    def __init__(self):
        self.events: list = []

    async def publish(self, event):
        self.events.append(event)

    def of(self, cls, message_id=None):
        return [e for e in self.events if isinstance(e, cls) and (message_id is None or e.message_id == message_id)]
