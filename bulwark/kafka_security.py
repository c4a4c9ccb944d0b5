"""How every Kafka client of Bulwark connects: plaintext on loopback, or SASL_SSL with a principal of its own.

The settings (``BULWARK_KAFKA_SECURITY_PROTOCOL``, ``BULWARK_KAFKA_CA_FILE``,
``BULWARK_KAFKA_CREDENTIALS_FILE``, ``BULWARK_KAFKA_SASL_MECHANISM``) are
turned here into each client library's own options, so the librdkafka
producers and consumers, the aiokafka consumers and admin client, and the
Faust app all connect the same way. Nothing else in Bulwark reads them.

The password lives only in the credentials file (mode 0600) and in the
client objects built from it: it is never in the settings object, and the
errors here name the file, never what it holds.
"""

from __future__ import annotations

import os
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path

from bulwark.settings import Settings

PLAINTEXT = "PLAINTEXT"
SASL_SSL = "SASL_SSL"
PROTOCOLS = (PLAINTEXT, SASL_SSL)
MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256")


class KafkaSecurityError(ValueError):
    """The Kafka security settings cannot be used (the message names the setting or file, not a secret)."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)


def read_credentials(path: Path) -> Credentials:
    """``username=`` and ``password=`` lines from a file only its owner can read.

    A file that others can read is refused, as ssh refuses a private key:
    a password that anyone on the host can read is no principal of its own.
    """
    try:
        info = path.stat()
    except OSError as exc:
        raise KafkaSecurityError(f"BULWARK_KAFKA_CREDENTIALS_FILE {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KafkaSecurityError(f"BULWARK_KAFKA_CREDENTIALS_FILE {path} is open to others "
                                 f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or key.strip() not in ("username", "password"):
            raise KafkaSecurityError(f"{path} line {number}: expected username=... or password=...")
        values[key.strip()] = value.strip()
    for key in ("username", "password"):
        if not values.get(key):
            raise KafkaSecurityError(f"{path} has no {key}= line")
    return Credentials(values["username"], values["password"])


def write_credentials(path: Path, credentials: Credentials) -> None:
    """Create the file 0600 from the start (never readable by others, not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"username={credentials.username}\npassword={credentials.password}\n")
    os.chmod(path, 0o600)


def _check(settings: Settings) -> bool:
    """True when the secure profile is selected; raises if it is half configured."""
    protocol = settings.kafka_security_protocol
    if protocol not in PROTOCOLS:
        raise KafkaSecurityError(f"BULWARK_KAFKA_SECURITY_PROTOCOL={protocol}: expected one of {', '.join(PROTOCOLS)}")
    if protocol == PLAINTEXT:
        return False
    if settings.kafka_sasl_mechanism not in MECHANISMS:
        raise KafkaSecurityError(f"BULWARK_KAFKA_SASL_MECHANISM={settings.kafka_sasl_mechanism}: "
                                 f"expected one of {', '.join(MECHANISMS)}")
    if settings.kafka_credentials_file is None:
        raise KafkaSecurityError("BULWARK_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs BULWARK_KAFKA_CREDENTIALS_FILE")
    if settings.kafka_ca_file is not None and not settings.kafka_ca_file.is_file():
        raise KafkaSecurityError(f"BULWARK_KAFKA_CA_FILE {settings.kafka_ca_file} is not a file")
    return True


def librdkafka_config(settings: Settings) -> dict:
    """confluent-kafka (librdkafka) options: merged into every producer and consumer config."""
    if not _check(settings):
        return {}
    credentials = read_credentials(settings.kafka_credentials_file)
    config = {
        "security.protocol": SASL_SSL,
        "sasl.mechanism": settings.kafka_sasl_mechanism,
        "sasl.username": credentials.username,
        "sasl.password": credentials.password,
        # The broker's name (or address) must be in its certificate.
        "ssl.endpoint.identification.algorithm": "https",
    }
    if settings.kafka_ca_file is not None:
        config["ssl.ca.location"] = str(settings.kafka_ca_file)
    return config


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """Verifies the broker's certificate and name against the CA file (else the system's trust anchors)."""
    context = ssl.create_default_context(cafile=str(settings.kafka_ca_file) if settings.kafka_ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def aiokafka_options(settings: Settings) -> dict:
    """aiokafka keyword arguments: for every AIOKafkaConsumer and AIOKafkaAdminClient."""
    if not _check(settings):
        return {}
    credentials = read_credentials(settings.kafka_credentials_file)
    return {
        "security_protocol": SASL_SSL,
        "sasl_mechanism": settings.kafka_sasl_mechanism,
        "sasl_plain_username": credentials.username,
        "sasl_plain_password": credentials.password,
        "ssl_context": ssl_context(settings),
    }


def faust_credentials(settings: Settings):
    """The Faust app's ``broker_credentials`` (None: plaintext)."""
    if not _check(settings):
        return None
    import faust

    credentials = read_credentials(settings.kafka_credentials_file)
    return faust.SASLCredentials(username=credentials.username, password=credentials.password,
                                 ssl_context=ssl_context(settings), mechanism=settings.kafka_sasl_mechanism)
