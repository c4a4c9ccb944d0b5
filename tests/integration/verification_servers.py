"""Real servers for the user verification sources, started once per test session.

- OpenLDAP's slapd (Debian's package) from a private slapd.conf in a private
  directory, on 127.0.0.1: plain LDAP with StartTLS on one port, LDAPS on
  another, a service account that alone may search, and users shaped like an
  LDAP directory's and like Active Directory's (userPrincipalName,
  proxyAddresses, userAccountControl; one of them disabled).
- An aiosmtpd server playing the domain mail server the SMTP call-forward asks
  (STARTTLS offered; it counts connections and RCPTs).
- The Microsoft 365 stub (token endpoint and Graph /users, over HTTPS).
- The Minger responder (UDP).

One test CA signs every certificate; sources are pointed at it with ca_file.
Secrets live in files, as the policy requires, and are distinctive strings so
the tests can grep events and logs for them.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from bulwark.devstack import free_port

from .m365_stub import M365Stub
from .minger_responder import MingerResponder

SUFFIX = "dc=example,dc=test"
SERVICE_DN = f"cn=bulwark,ou=services,{SUFFIX}"

# Distinctive, so a grep of every event and log can prove they never leak.
SECRETS = {
    "bind_password": "BindPw-ldap-7f3c9e2a41d8",
    "client_secret": "M365Secret-0b5e8d1c7a29",
    "minger_secret": "MingerShared-4d1f9a7c2e6b",
    "alice_password": "AlicePw-93c1e7b5d2f0",
    "erin_password": "ErinPw-5a7d0c2e9b41",
}

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"


# -- certificates -------------------------------------------------------------


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bulwark test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


# -- slapd --------------------------------------------------------------------

AD_SCHEMA = """
# The few Active Directory attributes Bulwark reads, with AD's OIDs, and
# matching rules so they can be searched (Debian's msuser.schema has none).
attributetype ( 1.2.840.113556.1.4.656 NAME 'userPrincipalName'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.2.210 NAME 'proxyAddresses'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
attributetype ( 1.2.840.113556.1.4.8 NAME 'userAccountControl'
    EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName'
    EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
objectclass ( 1.2.840.113556.1.5.9 NAME 'user' SUP top AUXILIARY
    MAY ( userPrincipalName $ proxyAddresses $ userAccountControl $ sAMAccountName ) )
"""


def ssha(password: str) -> str:
    salt = os.urandom(8)
    return "{SSHA}" + base64.b64encode(hashlib.sha1(password.encode() + salt).digest() + salt).decode()


def directory_ldif() -> str:
    def person(uid: str, mail: str, password: str | None = None, aliases: tuple[str, ...] = ()) -> str:
        lines = [f"dn: uid={uid},ou=people,{SUFFIX}", "objectClass: inetOrgPerson",
                 "objectClass: inetLocalMailRecipient", f"uid: {uid}", f"cn: {uid}", f"sn: {uid}", f"mail: {mail}"]
        lines += [f"mailLocalAddress: {a}" for a in aliases]
        if password:
            lines.append(f"userPassword: {ssha(password)}")
        return "\n".join(lines)

    def ad_user(name: str, upn: str, control: int, proxies: tuple[str, ...], password: str | None = None) -> str:
        lines = [f"dn: cn={name},ou=ad,{SUFFIX}", "objectClass: inetOrgPerson", "objectClass: user",
                 f"cn: {name}", f"sn: {name}", f"sAMAccountName: {name}", f"userPrincipalName: {upn}",
                 f"userAccountControl: {control}"]
        lines += [f"proxyAddresses: {p}" for p in proxies]
        if password:
            lines.append(f"userPassword: {ssha(password)}")
        return "\n".join(lines)

    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example",
        f"dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people",
        f"dn: ou=ad,{SUFFIX}\nobjectClass: organizationalUnit\nou: ad",
        f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: bulwark\n"
        f"userPassword: {ssha(SECRETS['bind_password'])}",
        person("alice", "alice@ldap.example.test", SECRETS["alice_password"], ("alice.alias@ldap.example.test",)),
        person("burst", "burst@ldap.example.test"),
        # Known to the default source only: a domain without sources of its
        # own, and one that is not local at all (automatic domain creation).
        person("carol", "carol@fallback.example.test"),
        person("dave", "dave@newco.test"),
        ad_user("erin", "erin@ad.example.test", 512,
                ("SMTP:erin@ad.example.test", "smtp:erin.alias@ad.example.test"), SECRETS["erin_password"]),
        ad_user("frank", "frank@ad.example.test", 514, ("SMTP:frank@ad.example.test",), "FrankPw-not-used-1"),
    ]
    return "\n\n".join(entries) + "\n"


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: slapd gets SIGTERM when the test run dies, even by
    # SIGKILL or a timeout, so no private directory outlives its session.
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


@dataclass
class Slapd:
    ldap_port: int
    ldaps_port: int
    process: subprocess.Popen
    directory: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_slapd(directory: Path, ca: Path, cert: Path, key: Path, ldif: str | None = None) -> Slapd:
    """slapd serving ``ldif`` (by default the session's directory, :func:`directory_ldif`)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "data"
    data.mkdir(exist_ok=True)
    (directory / "ad.schema").write_text(AD_SCHEMA)
    conf = directory / "slapd.conf"
    conf.write_text(f"""
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/misc.schema
include {directory}/ad.schema
pidfile {directory}/slapd.pid
argsfile {directory}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
TLSCACertificateFile {ca}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
database mdb
maxsize 16777216
suffix "{SUFFIX}"
rootdn "cn=admin,{SUFFIX}"
rootpw {base64.b64encode(os.urandom(18)).decode()}
directory {data}
# Users bind with their password; only the service account may search.
access to attrs=userPassword
    by anonymous auth
    by * none
access to *
    by dn.exact="{SERVICE_DN}" read
    by self read
    by * none
""")
    ldif_file = directory / "directory.ldif"
    ldif_file.write_text(ldif if ldif is not None else directory_ldif())
    subprocess.run([SLAPADD, "-f", str(conf), "-l", str(ldif_file)], check=True, capture_output=True, text=True)
    ldap_port, ldaps_port = free_port(), free_port()
    log = open(directory / "slapd.log", "ab")
    process = subprocess.Popen(
        [SLAPD, "-d", "0", "-f", str(conf), "-h", f"ldap://127.0.0.1:{ldap_port}/ ldaps://127.0.0.1:{ldaps_port}/"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
    )
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"slapd exited with {process.returncode}: {(directory / 'slapd.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", ldap_port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("slapd did not listen within 30s")
            time.sleep(0.1)
    return Slapd(ldap_port, ldaps_port, process, directory)


# -- the domain mail server the call-forward asks --------------------------------


@dataclass
class MailHost:
    """aiosmtpd playing smtp.example.test's mail server."""

    valid: set[str]
    rcpts: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    datas: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server, session, envelope, address, options):
        with self.lock:
            self.rcpts[address.lower()] = self.rcpts.get(address.lower(), 0) + 1
        if address.lower() in self.valid:
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 Ok"
        return "550 5.1.1 <%s>: Recipient address rejected: User unknown in local recipient table" % address

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.datas += 1
        return "554 5.5.1 a call-forward never sends DATA"

    def connected(self) -> None:
        with self.lock:
            self.connections += 1


class _CountingSMTP(SMTP):
    def connection_made(self, transport):
        fresh = self._original_transport is None  # not the STARTTLS re-handshake
        super().connection_made(transport)
        if fresh:
            self.event_handler.connected()


class _MailHostController(Controller):
    def factory(self):
        return _CountingSMTP(self.handler, **self.SMTP_kwargs)


def start_mailhost(port: int, valid: set[str], tls: ssl.SSLContext) -> tuple[MailHost, Controller]:
    host = MailHost(valid={v.lower() for v in valid})

    class Handler:
        # Only the hooks the call-forward exercises.
        handle_RCPT = host.handle_RCPT
        handle_DATA = host.handle_DATA

        def connected(self):
            host.connected()

    handler = Handler()
    controller = _MailHostController(handler, hostname="127.0.0.1", port=port, decode_data=False,
                                     tls_context=tls, require_starttls=False)
    controller.start()
    return host, controller


# -- all of them ------------------------------------------------------------------


@dataclass
class VerificationServers:
    root: Path
    ca: Path
    slapd: Slapd
    mailhost: MailHost
    mailhost_controller: Controller
    m365: M365Stub
    minger: MingerResponder
    domains: list[str]
    policy_yaml: str

    def stop(self) -> None:
        self.mailhost_controller.stop()
        self.m365.stop()
        self.minger.stop()
        self.slapd.stop()


def write_secret(root: Path, name: str, value: str) -> Path:
    path = root / f"{name}.secret"
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def start_verification_servers(root: Path) -> VerificationServers:
    if shutil.which(SLAPD) is None:
        raise RuntimeError("slapd is not installed (apt-get install slapd; see .ci/run)")
    root.mkdir(parents=True, exist_ok=True)
    ca, cert, key = make_certificates(root)
    slapd = start_slapd(root / "slapd", ca, cert, key)
    mailhost_port = free_port()
    mailhost, controller = start_mailhost(
        mailhost_port, {"bob@smtp.example.test", *(f"burst{i}@smtp.example.test" for i in range(40))},
        server_context(cert, key),
    )
    m365 = M365Stub(cert, key, tenant="contoso-tenant", client_id="bulwark-app",
                    client_secret=SECRETS["client_secret"])
    m365.start()
    minger = MingerResponder(secret=SECRETS["minger_secret"], valid={"kim@minger.example.test"},
                             inactive={"lou@minger.example.test"})
    minger.start()

    bind = write_secret(root, "ldap-bind", SECRETS["bind_password"])
    client_secret = write_secret(root, "m365-client", SECRETS["client_secret"])
    minger_secret = write_secret(root, "minger", SECRETS["minger_secret"])
    closed_tcp, closed_udp = free_port(), free_port(udp=True)

    ldap_common = f"""bind_dn: "{SERVICE_DN}"
    bind_password_file: {bind}
    ca_file: {ca}
    timeout_seconds: 3"""
    policy_yaml = f"""
verification_sources:
  - name: corp-ldap
    type: ldap
    url: ldap://127.0.0.1:{slapd.ldap_port}
    tls: starttls
    base_dn: "ou=people,{SUFFIX}"
    {ldap_common}
  - name: corp-ad
    type: active_directory
    url: ldaps://127.0.0.1:{slapd.ldaps_port}
    base_dn: "ou=ad,{SUFFIX}"
    {ldap_common}
  - name: mailhost
    type: smtp
    host: 127.0.0.1
    port: {mailhost_port}
    max_connections: 2
    timeout_seconds: 5
  - name: tenant
    type: m365
    tenant_id: contoso-tenant
    client_id: bulwark-app
    client_secret_file: {client_secret}
    authority_host: https://127.0.0.1:{m365.port}
    graph_url: https://127.0.0.1:{m365.port}/v1.0
    ca_file: {ca}
    timeout_seconds: 5
  - name: mdaemon
    type: minger
    host: 127.0.0.1
    port: {minger.port}
    shared_secret_file: {minger_secret}
    timeout_seconds: 1
    retries: 1
  - name: directory-default
    type: ldap
    default: true
    url: ldap://127.0.0.1:{slapd.ldap_port}
    base_dn: "ou=people,{SUFFIX}"
    {ldap_common}
  # Sources that are down: nothing listens where they point.
  - name: ldap-down
    type: ldap
    url: ldap://127.0.0.1:{closed_tcp}
    base_dn: "{SUFFIX}"
    timeout_seconds: 1
  - name: ad-down
    type: active_directory
    url: ldaps://127.0.0.1:{closed_tcp}
    base_dn: "{SUFFIX}"
    timeout_seconds: 1
  - name: smtp-down
    type: smtp
    host: 127.0.0.1
    port: {closed_tcp}
    timeout_seconds: 1
  - name: m365-down
    type: m365
    tenant_id: contoso-tenant
    client_id: bulwark-app
    client_secret_file: {client_secret}
    authority_host: https://127.0.0.1:{closed_tcp}
    graph_url: https://127.0.0.1:{closed_tcp}/v1.0
    ca_file: {ca}
    timeout_seconds: 1
  - name: minger-down
    type: minger
    host: 127.0.0.1
    port: {closed_udp}
    timeout_seconds: 0.5
    retries: 1
user_verification:
  positive_cache_seconds: 600
  negative_cache_seconds: 600
  domains:
    # Other tests send to anyone at example.test: no verification there.
    example.test: []
    ldap.example.test: [corp-ldap]
    ad.example.test: [corp-ad]
    smtp.example.test: [mailhost]
    m365.example.test: [tenant]
    minger.example.test: [mdaemon]
    ldap-down.example.test: [ldap-down]
    ad-down.example.test: [ad-down]
    smtp-down.example.test: [smtp-down]
    m365-down.example.test: [m365-down]
    minger-down.example.test: [minger-down]
"""
    domains = [
        "ldap.example.test", "ad.example.test", "smtp.example.test", "m365.example.test", "minger.example.test",
        "ldap-down.example.test", "ad-down.example.test", "smtp-down.example.test", "m365-down.example.test",
        "minger-down.example.test",
        # No sources of its own: the default source serves it.
        "fallback.example.test",
    ]
    return VerificationServers(root, ca, slapd, mailhost, controller, m365, minger, domains, policy_yaml)
