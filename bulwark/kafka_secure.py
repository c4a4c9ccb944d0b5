"""The secure Kafka profile's files and grants: a CA, the broker's certificate, principals and ACLs.

``prepare`` writes what the broker and the clients need into one directory
(``BULWARK_KAFKA_SECURE_DIR``), keeping whatever is already there, so it can
run before every start::

    ca.pem                      the CA certificate: clients trust it (BULWARK_KAFKA_CA_FILE)
    ca.key                      its private key (0600), to issue a new broker certificate
    broker.pem                  the broker's key and certificate chain (0600, a PEM keystore)
    credentials/NAME.properties one principal's username and password (0600)

``infra/kafka/kafka.sh`` (with ``BULWARK_KAFKA_PROFILE=secure``) starts the
broker from them: SASL_SSL for clients, mutual TLS between the broker and its
controller, the StandardAuthorizer, and ``broker`` as the only super user,
whose SCRAM credential ``kafka-storage format --add-scram`` bootstraps.
``provision`` then connects as ``broker`` and creates every other principal's
SCRAM credential and the ACLs that schemas/acl.py declares (the Admin API:
AlterUserScramCredentials, CreateAcls), removing grants the table no longer has.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bulwark.kafka_security import Credentials, read_credentials, write_credentials
from bulwark.settings import Settings
from schemas.acl import BROKER, PRINCIPALS, Binding, Principal, bindings

log = logging.getLogger(__name__)

#: The broker certificate's validity; the CA's is ten times as long.
CERT_DAYS = 825
SCRAM_ITERATIONS = 8192
SCRAM_MECHANISM = "SCRAM-SHA-512"


@dataclass(frozen=True)
class SecureFiles:
    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def broker(self) -> Path:
        return self.root / "broker.pem"

    def credentials(self, principal: str) -> Path:
        return self.root / "credentials" / f"{principal}.properties"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)


def _names(hosts: list[str]):
    from cryptography import x509

    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _issue_ca(files: SecureFiles) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bulwark Kafka CA")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=10 * CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(files.ca_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    files.ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue_broker(files: SecureFiles, hosts: list[str]) -> None:
    """The broker's certificate: server (clients check its name) and client (it authenticates to its controller)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(files.ca.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder()
            # CN=broker: the controller listener maps it to the principal User:broker.
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, BROKER)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    # Kafka's PEM keystore: the (unencrypted PKCS#8) key, then the chain.
    _write_private(files.broker, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption())
                   + cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM))


def broker_names(files: SecureFiles) -> list[str]:
    """The names and addresses the broker's certificate is valid for."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(files.broker.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in san]


def new_credentials(files: SecureFiles, name: str) -> Credentials:
    """A principal's credentials file with a fresh random password (kept if it exists)."""
    path = files.credentials(name)
    if not path.exists():
        write_credentials(path, Credentials(name, secrets.token_urlsafe(32)))
    return read_credentials(path)


def prepare(root: Path, hosts: list[str], principals: tuple[Principal, ...] = PRINCIPALS) -> SecureFiles:
    """The CA, the broker's certificate for ``hosts`` and every principal's credentials; existing files kept.

    A broker certificate that lacks one of ``hosts`` is issued again (by
    the same CA, so clients need nothing new).
    """
    files = SecureFiles(root)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    if not files.ca.exists() or not files.ca_key.exists():
        _issue_ca(files)
        files.broker.unlink(missing_ok=True)
    wanted = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    if not files.broker.exists() or not set(wanted) <= set(broker_names(files)):
        _issue_broker(files, wanted)
    for name in [BROKER, *(p.name for p in principals)]:
        new_credentials(files, name)
    return files


# -- provisioning, as the broker's own principal ------------------------------------------


def super_user_settings(settings: Settings, files: SecureFiles) -> Settings:
    return settings.with_(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism=SCRAM_MECHANISM,
                          kafka_ca_file=files.ca, kafka_credentials_file=files.credentials(BROKER))


def _admin(settings: Settings, files: SecureFiles):
    from confluent_kafka.admin import AdminClient

    from bulwark.kafka_security import librdkafka_config

    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "client.id": "bulwark-provision",
                        **librdkafka_config(super_user_settings(settings, files))})


def _acl(binding: Binding):
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    return AclBinding(ResourceType[binding.resource_type], binding.resource_name,
                      ResourcePatternType[binding.pattern], binding.principal, "*",
                      AclOperation[binding.operation], AclPermissionType.ALLOW)


def _wait(futures: dict, timeout: float = 30) -> None:
    for future in futures.values():
        future.result(timeout)


def provision(settings: Settings, files: SecureFiles, principals: tuple[Principal, ...] = PRINCIPALS,
              prune: bool = True) -> dict[str, int]:
    """Create (or update) each principal's SCRAM credential and make its ACLs exactly the table's.

    Returns the number of ACLs per principal. Idempotent: run it after
    every change of the table or of a password file.
    """
    from confluent_kafka.admin import (AclBindingFilter, AclOperation, AclPermissionType, ResourcePatternType,
                                       ResourceType, ScramCredentialInfo, ScramMechanism,
                                       UserScramCredentialUpsertion)

    admin = _admin(settings, files)
    upserts = []
    for principal in principals:
        credentials = new_credentials(files, principal.name)
        upserts.append(UserScramCredentialUpsertion(
            credentials.username, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS),
            credentials.password.encode()))
    _wait(admin.alter_user_scram_credentials(upserts))
    counts = {}
    for principal in principals:
        wanted = bindings(principal)
        if prune:
            existing_filter = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY,
                                               f"User:{principal.name}", None, AclOperation.ANY,
                                               AclPermissionType.ANY)
            existing = admin.describe_acls(existing_filter).result(30)
            keep = {_acl(b) for b in wanted}
            stale = [b for b in existing if b not in keep]
            if stale:
                _wait(admin.delete_acls([AclBindingFilter(b.restype, b.name, b.resource_pattern_type, b.principal,
                                                          b.host, b.operation, b.permission_type) for b in stale]))
                log.info("removed %d ACLs of User:%s that the table no longer has", len(stale), principal.name)
        _wait(admin.create_acls([_acl(b) for b in wanted]))
        counts[principal.name] = len(wanted)
    return counts
