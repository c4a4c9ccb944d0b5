"""The secure Kafka profile without a broker: credentials files, client options, the ownership table, the files.

tests/integration/test_kafka_secure.py runs the profile against a real broker.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import pytest

from bulwark.devstack import LocalStack
from bulwark.kafka_secure import broker_names, prepare
from bulwark.kafka_security import (Credentials, KafkaSecurityError, aiokafka_options, librdkafka_config,
                                    read_credentials, write_credentials)
from bulwark.settings import Settings
from schemas import acl
from schemas.topics import ACCOUNTS, ALL_TOPICS, POLICY, RECEIVED

PASSWORD = "s3cret-Password-never-shown"


def settings(tmp_path: Path, **changes) -> Settings:
    return Settings(
        kafka_bootstrap="127.0.0.1:9092", data_dir=tmp_path, blob_dir=tmp_path / "blobs",
        policy_path=tmp_path / "policy.yaml", smtp_host="127.0.0.1", smtp_port=2525, submission_port=0,
        submissions_port=0, tls_cert_path=None, tls_key_path=None, mailbox_host="127.0.0.1", mailbox_port=2526,
        mailbox_dir=tmp_path / "mailbox", kafka_request_timeout_ms=5000, audit_retention_ms=-1,
        streams_web_host="127.0.0.1", streams_web_port=6066, delivery_poll_seconds=1.0, delivery_retention_days=7,
        backscatter_secret_file=tmp_path / "bs.key", clamd_host="127.0.0.1", clamd_port=3310,
        clamd_scan_timeout_seconds=20, clamd_max_concurrent_scans=4, **changes)


@pytest.fixture
def credentials_file(tmp_path) -> Path:
    path = tmp_path / "ingest.properties"
    write_credentials(path, Credentials("ingest", PASSWORD))
    return path


# -- credentials files -----------------------------------------------------------------


def test_a_credentials_file_is_created_0600_and_read_back(credentials_file):
    assert credentials_file.stat().st_mode & 0o777 == 0o600
    assert read_credentials(credentials_file) == Credentials("ingest", PASSWORD)
    assert PASSWORD not in repr(read_credentials(credentials_file))


def test_a_credentials_file_others_can_read_is_refused_without_showing_the_password(credentials_file):
    credentials_file.chmod(0o644)
    with pytest.raises(KafkaSecurityError) as refused:
        read_credentials(credentials_file)
    assert str(credentials_file) in str(refused.value) and "0644" in str(refused.value)
    assert PASSWORD not in str(refused.value)


def test_a_credentials_file_without_a_password_is_refused(tmp_path):
    path = tmp_path / "half.properties"
    write_credentials(path, Credentials("siem", "x"))
    path.write_text("username=siem\n")
    with pytest.raises(KafkaSecurityError, match="no password= line"):
        read_credentials(path)


def test_a_malformed_line_is_named_by_number_not_shown(tmp_path):
    path = tmp_path / "odd.properties"
    write_credentials(path, Credentials("siem", "x"))
    path.write_text(f"username=siem\n{PASSWORD}\n")
    with pytest.raises(KafkaSecurityError, match="line 2") as refused:
        read_credentials(path)
    assert PASSWORD not in str(refused.value)


# -- client options ----------------------------------------------------------------------


def test_plaintext_adds_nothing_to_any_client(tmp_path):
    plain = settings(tmp_path)
    assert librdkafka_config(plain) == {} and aiokafka_options(plain) == {}


def test_sasl_ssl_gives_every_client_library_the_same_principal(tmp_path, credentials_file):
    ca = prepare(tmp_path / "secure", ["127.0.0.1"]).ca
    secure = settings(tmp_path, kafka_security_protocol="SASL_SSL", kafka_ca_file=ca,
                      kafka_credentials_file=credentials_file)
    rd = librdkafka_config(secure)
    assert (rd["security.protocol"], rd["sasl.mechanism"], rd["sasl.username"], rd["sasl.password"],
            rd["ssl.ca.location"]) == ("SASL_SSL", "SCRAM-SHA-512", "ingest", PASSWORD, str(ca))
    aio = aiokafka_options(secure)
    assert (aio["security_protocol"], aio["sasl_mechanism"], aio["sasl_plain_username"],
            aio["sasl_plain_password"]) == ("SASL_SSL", "SCRAM-SHA-512", "ingest", PASSWORD)
    assert aio["ssl_context"].verify_mode == ssl.CERT_REQUIRED and aio["ssl_context"].check_hostname


def test_sasl_ssl_without_a_credentials_file_names_the_missing_setting(tmp_path):
    with pytest.raises(KafkaSecurityError, match="BULWARK_KAFKA_CREDENTIALS_FILE"):
        librdkafka_config(settings(tmp_path, kafka_security_protocol="SASL_SSL"))
    with pytest.raises(KafkaSecurityError, match="BULWARK_KAFKA_SECURITY_PROTOCOL=SSL"):
        aiokafka_options(settings(tmp_path, kafka_security_protocol="SSL"))


def test_the_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BULWARK_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BULWARK_KAFKA_SECURITY_PROTOCOL", "sasl_ssl")
    monkeypatch.setenv("BULWARK_KAFKA_CA_FILE", "/etc/bulwark/kafka-ca.pem")
    monkeypatch.setenv("BULWARK_KAFKA_CREDENTIALS_FILE", "/etc/bulwark/ingest.properties")
    monkeypatch.setenv("BULWARK_KAFKA_PROFILE", "secure")
    s = Settings.from_env()
    assert (s.kafka_security_protocol, s.kafka_ca_file, s.kafka_credentials_file, s.kafka_profile,
            s.kafka_secure_dir) == ("SASL_SSL", Path("/etc/bulwark/kafka-ca.pem"),
                                    Path("/etc/bulwark/ingest.properties"), "secure", tmp_path / "kafka-secure")


# -- the ownership table -----------------------------------------------------------------


def writers(topic) -> set[str]:
    return {p.name for p in acl.PRINCIPALS if topic in p.writes}


def test_every_declared_topic_has_a_writer():
    assert not [t.name for t in ALL_TOPICS if not writers(t)]


def test_only_the_administrator_publishes_policies():
    assert writers(POLICY) == {"admin"}


def test_readers_write_nothing_and_never_read_password_hashes():
    for principal in [p for p in acl.PRINCIPALS if p.reader] + [acl.reader("splunk")]:
        ops = {(b.operation, b.resource_type) for b in acl.bindings(principal)}
        assert ops <= {("READ", "TOPIC"), ("READ", "GROUP")}, principal.name
        assert ACCOUNTS not in principal.reads


def test_ingest_writes_in_transactions_of_its_own_and_nothing_of_the_policy():
    granted = acl.bindings(acl.BY_PRINCIPAL["ingest"])
    assert acl.Binding("User:ingest", "TOPIC", RECEIVED.name, "LITERAL", "WRITE") in granted
    assert acl.Binding("User:ingest", "TRANSACTIONAL_ID", "bulwark-ingest-", "PREFIXED", "WRITE") in granted
    assert not [b for b in granted if b.resource_name == POLICY.name and b.operation == "WRITE"]


def test_a_new_reader_gets_its_own_consumer_group_prefix_and_cannot_take_a_components_name():
    assert acl.reader("splunk").groups == ("splunk-*",)
    assert acl.Binding("User:splunk", "GROUP", "splunk-", "PREFIXED", "READ") in acl.bindings(acl.reader("splunk"))
    with pytest.raises(ValueError):
        acl.reader("ingest")


def test_every_component_the_local_stack_starts_has_a_principal_in_the_table():
    from bulwark.devstack import COMPONENTS

    for name, _ in COMPONENTS:
        principal = acl.COMPONENT_PRINCIPALS[name]
        assert principal is None or principal in acl.BY_PRINCIPAL


# -- the files -----------------------------------------------------------------------------


def test_prepare_writes_a_ca_a_broker_certificate_and_private_credentials(tmp_path):
    files = prepare(tmp_path / "secure", ["kafka.example.net"])
    assert set(broker_names(files)) == {"kafka.example.net", "localhost", "127.0.0.1"}
    for private in [files.ca_key, files.broker, *(files.credentials(p.name) for p in acl.PRINCIPALS)]:
        assert private.stat().st_mode & 0o777 == 0o600, private
    # The broker's certificate chains to the CA clients are given.
    context = ssl.create_default_context(cafile=str(files.ca))
    context.load_cert_chain(str(files.broker))  # key and chain in one PEM file, as Kafka's PEM keystore reads it


def test_prepare_again_keeps_the_passwords_and_reissues_for_a_new_name(tmp_path):
    files = prepare(tmp_path / "secure", ["127.0.0.1"])
    before = read_credentials(files.credentials("ingest"))
    ca = files.ca.read_bytes()
    prepare(tmp_path / "secure", ["127.0.0.1", "kafka.internal"])
    assert read_credentials(files.credentials("ingest")) == before
    assert files.ca.read_bytes() == ca
    assert "kafka.internal" in broker_names(files)


def test_the_secure_stack_gives_each_component_its_own_principal(tmp_path):
    stack = LocalStack.from_settings(settings(tmp_path, kafka_profile="secure", kafka_secure_dir=tmp_path / "s"))
    assert stack.env["BULWARK_KAFKA_CREDENTIALS_FILE"].endswith("admin.properties")  # the CLI
    assert stack.component_env("streams-2")["BULWARK_KAFKA_CREDENTIALS_FILE"].endswith("streams.properties")
    assert stack.component_env("export-first")["BULWARK_KAFKA_CREDENTIALS_FILE"].endswith("export.properties")
    assert stack.component_env("mailbox") == {"BULWARK_KAFKA_CREDENTIALS_FILE": ""}
    assert stack.kafka_dir != LocalStack.from_settings(settings(tmp_path)).kafka_dir
    with pytest.raises(ValueError):
        stack.component_env("something-else")


def test_the_operations_guide_shows_the_table_as_declared():
    guide = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    assert acl.table_markdown() in guide, "docs/operations.md: paste `bulwark kafka acls` under 'Who may do what'"


# -- every client honours the settings -----------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
CLIENT_CALL = re.compile(r"\b(AIOKafkaConsumer|AIOKafkaProducer|AIOKafkaAdminClient|AIOKafkaClient"
                         r"|confluent_kafka\.Producer|confluent_kafka\.Consumer|AdminClient|faust\.App)\(")
#: What a call's arguments must mention so that it connects as the settings say.
SECURED_BY = ("aiokafka_options(", "producer_config(", "consumer_config(", "assigned_reader_config(", "librdkafka_config(", "self.config",
              "broker_credentials=")


def _arguments(source: str, start: int) -> str:
    depth, i = 0, start
    while True:
        depth += {"(": 1, ")": -1}.get(source[i], 0)
        if depth == 0:
            return source[start:i + 1]
        i += 1


def test_every_kafka_client_bulwark_builds_takes_the_security_settings():
    """A client built without them would connect in plaintext and, on the secure profile, fail in production only."""
    unsecured = []
    for folder in ("bulwark", "ingest", "streams", "sinks", "console", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            source = path.read_text()
            for call in CLIENT_CALL.finditer(source):
                arguments = _arguments(source, call.end() - 1)
                if not any(marker in arguments for marker in SECURED_BY):
                    line = source.count("\n", 0, call.start()) + 1
                    unsecured.append(f"{path.relative_to(REPO)}:{line}: {call.group(1)}")
    assert not unsecured, "Kafka clients without bulwark/kafka_security.py's settings:\n" + "\n".join(unsecured)
