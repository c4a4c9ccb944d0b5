"""TLS for every listener: the certificate, its reloading, and the policy's protocol rules.

The guide's "Enable SSL and STARTTLS support for SMTP and HTTPS": STARTTLS on
every SMTP port, implicit TLS on the submissions port (RFC 8314), and the same
server context for any HTTP endpoint Bulwark serves.

One :class:`ServerTls` holds one ``ssl.SSLContext`` for the life of the
process. Before each new connection ``refresh()`` compares the certificate
and key files' modification times and the policy's TLS rules with what the
context was built from; when either changed it loads them into that same
context object. OpenSSL copies the certificate into each connection when the
connection starts, so sessions already running keep theirs, and every new one
(STARTTLS or implicit TLS, whose listening socket holds this very context)
gets the new certificate without a restart. A certificate that does not load
(half-written during a renewal, say) is logged and the previous one stays.

Without configured files (local runs and tests) a self-signed certificate for
the policy's hostname is generated once into the data directory.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import logging
import os
import re
import ssl
from pathlib import Path

log = logging.getLogger(__name__)

TLS_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A self-signed certificate and key for ``hostname`` in ``directory``, made once.

    For local runs only: clients cannot verify it, but the session is still
    encrypted, which is what STARTTLS between MTAs gets in practice.
    """
    cert_path, key_path = directory / "selfsigned.crt", directory / "selfsigned.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    # Several components may start at once on one data directory (ingest, an
    # HTTPS endpoint): one makes the pair, the others wait and use it.
    with open(directory / ".selfsigned.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cert_path.exists() and key_path.exists()):
            _write_self_signed(cert_path, key_path, hostname)
    return cert_path, key_path


def _write_self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName(hostname),
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    # The key is written readable by its owner only, and before the
    # certificate: a certificate on disk always has its key beside it.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("generated a self-signed certificate for %s in %s", hostname, cert_path.parent)


def _configure(context: ssl.SSLContext, tls_policy) -> None:
    context.minimum_version = TLS_VERSIONS[tls_policy.min_version]
    # Applies to TLS 1.2; TLS 1.3's suites are all AEAD with forward secrecy.
    context.set_ciphers(tls_policy.ciphers)


def new_server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # No client certificates: SMTP clients authenticate with AUTH, and MTAs
    # offering one must not be refused for it.
    context.verify_mode = ssl.CERT_NONE
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    return context


class ServerTls:
    def __init__(self, cert_path: Path | None, key_path: Path | None, data_dir: Path, policy):
        """``policy`` is a Policy or anything with ``.current`` (a PolicyHolder)."""
        self._policy = policy
        self._configured = (cert_path, key_path) if cert_path and key_path else None
        self._data_dir = data_dir
        self.context = new_server_context()
        self._loaded: tuple | None = None
        self._rules: object = None
        self.refresh()
        if self._loaded is None:
            raise RuntimeError("no usable TLS certificate; see the log for why")

    @property
    def policy(self):
        return getattr(self._policy, "current", self._policy)

    @property
    def cert_path(self) -> Path:
        """The certificate file served (what a client pins: :func:`client_context`)."""
        return self._paths()[0]

    def _paths(self) -> tuple[Path, Path]:
        if self._configured:
            return self._configured
        return self_signed(self._data_dir / "tls", self.policy.hostname)

    def refresh(self) -> ssl.SSLContext:
        """The context, reloaded first if the files or the TLS policy changed."""
        rules = self.policy.tls
        if rules != self._rules:
            _configure(self.context, rules)
            self._rules = rules
        cert, key = self._paths()
        try:
            stamp = (cert, key, cert.stat().st_mtime_ns, key.stat().st_mtime_ns)
        except OSError as exc:
            log.error("TLS certificate or key unreadable (%s); keeping the one loaded", exc.strerror)
            return self.context
        if stamp != self._loaded:
            try:
                # Proved on a scratch context first, so a bad pair never
                # leaves the live one half-loaded.
                new_server_context().load_cert_chain(cert, key)
                self.context.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                log.error("TLS certificate %s not loaded (%s); keeping the one loaded", cert,
                          getattr(exc, "reason", None) or type(exc).__name__)
                return self.context
            if self._loaded is not None:
                log.info("TLS certificate %s reloaded", cert)
            self._loaded = stamp
        return self.context


def certificate_path(settings) -> Path:
    """The certificate file this deployment serves, without generating one.

    For clients on the same host (``bulwark tables``) to pin with
    :func:`client_context`.
    """
    return settings.tls_cert_path or settings.data_dir / "tls" / "selfsigned.crt"


def client_context(cafile: Path) -> ssl.SSLContext:
    """A client context that trusts exactly the certificate in ``cafile``.

    For Bulwark's own HTTPS endpoints, reached at 127.0.0.1: the first
    certificate of the file (the server's own, whether self-signed or issued
    by a CA for the gateway's hostname) is the only trust anchor, so nothing
    else verifies. As the certificate is pinned, its names are not checked
    against 127.0.0.1 (a real certificate does not name it). Raises OSError
    or ValueError when the file holds no certificate.
    """
    pem = Path(cafile).read_text()
    match = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
    if match is None:
        raise ValueError(f"{cafile} holds no PEM certificate")
    context = ssl.create_default_context(cadata=match.group(0))
    # The leaf itself is the anchor, even when it is not self-signed.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_tls(settings, policy) -> ServerTls:
    """The TLS of this deployment: ``BULWARK_TLS_CERT``/``BULWARK_TLS_KEY``, else self-signed.

    Also what any HTTPS endpoint should serve with (``.context``), so SMTP
    and HTTPS present one certificate under one TLS policy.
    """
    return ServerTls(settings.tls_cert_path, settings.tls_key_path, settings.data_dir, policy)
