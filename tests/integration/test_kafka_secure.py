"""The secure Kafka profile, on a stack of its own: TLS, a SCRAM principal per component, ACLs.

Not the shared plaintext ``gateway``: this module starts its own broker with
``BULWARK_KAFKA_PROFILE=secure`` (infra/kafka/kafka.sh: SASL_SSL listener,
StandardAuthorizer) and every component as `make run` would on that profile,
each with its own credentials (bulwark/devstack.py), provisioned from the
ownership table (schemas/acl.py). What a user of the profile relies on:

- mail still goes through ingest -> streams -> delivery, so every
  component's grants are enough for its work; the SIEM export runs too;
- an outside SIEM principal reads ``mail.verdicts`` (with the example
  consumer of the consumer guide) and is refused when it writes a policy
  or an account;
- a client without credentials, or with a wrong password, gets nothing;
- the ingest principal cannot publish a policy;
- ``bulwark replay --publish`` writes its findings as the administrator,
  and a SIEM principal, which reads them, cannot forge one;
- a reader added with ``bulwark kafka add-reader`` reads, in its own
  consumer groups only; ``bulwark kafka provision`` takes back a grant made
  by hand;
- no password appears in any component's log.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import confluent_kafka
import pytest
from confluent_kafka.admin import AdminClient

from bulwark.devstack import LocalStack, environment, free_port, private_environment
from bulwark.kafka import publish_once, read_topics
from bulwark.kafka_secure import SecureFiles
from bulwark.kafka_security import read_credentials
from bulwark.settings import Settings
from schemas import codec
from schemas import events as ev
from schemas.acl import PRINCIPALS
from schemas.topics import ACCOUNTS, FORENSICS, POLICY, RECEIVED, VERDICTS

from tests.outbound_servers import Nsd

from .conftest import LOCAL_DOMAIN, remote_zone, write_policy
from .downstream import Downstream, start_downstream

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "siem_consumer.py"


@dataclass
class SecureGateway:
    settings: Settings  # the administrator's (the CLI's) connection
    stack: LocalStack
    files: SecureFiles
    downstream: Downstream

    def as_principal(self, name: str) -> Settings:
        return self.settings.with_(kafka_credentials_file=self.files.credentials(name))

    def librdkafka(self, name: str | None) -> dict:
        """What an outside client configures: nothing of Bulwark's code, only the files."""
        config = {"bootstrap.servers": self.settings.kafka_bootstrap}
        if name is not None:
            credentials = read_credentials(self.files.credentials(name))
            config.update({"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                           "sasl.username": credentials.username, "sasl.password": credentials.password,
                           "ssl.ca.location": str(self.files.ca)})
        return config


@pytest.fixture(scope="module")
def secure(tmp_path_factory) -> SecureGateway:
    root = tmp_path_factory.mktemp("bulwark-secure")
    downstream_port = free_port()
    downstream, controller = start_downstream(downstream_port)
    nsd = Nsd(root / "nsd", remote_zone()).start()
    policy = root / "policy.yaml"
    write_policy(policy, downstream_port)
    env = {
        **private_environment(root, policy),
        "BULWARK_KAFKA_PROFILE": "secure",
        "BULWARK_DNS_RESOLVER": nsd.address,
        "BULWARK_DELIVERY_POLL_SECONDS": "0.2",
    }
    with environment(env):
        stack = LocalStack.from_settings(Settings.from_env())
    # This process reads and writes as the administrator, as the CLI does.
    with environment({k: v for k, v in stack.env.items() if k.startswith("BULWARK_")}):
        settings = Settings.from_env()
    try:
        stack.start_kafka()  # writes the CA, certificate and credentials; provisions principals and ACLs
        stack.start_clamd()
        stack.ensure_topics()
        stack.apply_policy()  # the admin principal publishes the policy
        stack.start_components(skip=("mailbox",))  # the test's downstream server plays that part
        yield SecureGateway(settings, stack, SecureFiles(settings.kafka_secure_dir), downstream)
    except BaseException:
        print(stack.log_tails(), file=sys.stderr)
        raise
    finally:
        try:
            stack.stop_all()
            controller.stop()
        finally:
            nsd.stop()


def _send(gw: SecureGateway, subject: str, source_ip: str = "127.0.0.1") -> str:
    import smtplib
    from email.message import EmailMessage
    from email.utils import make_msgid

    msg = EmailMessage()
    msg["From"] = "secure-sender@partner.test"
    msg["To"] = f"secure-reader@{LOCAL_DOMAIN}"
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="client.test")
    msg.set_content("Over TLS to Kafka, every component as itself.\n")
    with smtplib.SMTP(gw.settings.smtp_host, gw.settings.smtp_port, timeout=60,
                      source_address=(source_ip, 0)) as client:
        client.ehlo("client.test")
        client.mail(msg["From"])
        assert client.rcpt(msg["To"])[0] == 250
        code, reply = client.data(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
        assert code == 250, (code, reply)
    return reply.decode().rsplit(" ", 1)[1]


def _produce(config: dict, topic: str, event: ev.Event, key: bytes) -> confluent_kafka.KafkaError | None:
    """One record from a plain librdkafka producer; the broker's answer (None: written)."""
    answers = []
    producer = confluent_kafka.Producer({**config, "message.timeout.ms": 20000})
    value, headers = codec.encode(event)
    producer.produce(topic, value=value, key=key, headers=headers, on_delivery=lambda err, _m: answers.append(err))
    producer.flush(30)
    assert answers, "no delivery report within 30 s"
    return answers[0]


def test_a_message_goes_through_ingest_streams_and_delivery_on_the_secure_profile(secure):
    queue_id = _send(secure, "secure profile end to end")
    delivered = secure.downstream.wait_for(lambda d: "secure profile end to end" in d.text, timeout=180,
                                           what="delivery over the secure profile")
    assert len(delivered) == 1
    # The verdict and the delivery were published by their own principals.
    records = asyncio.run(read_topics(secure.settings, [VERDICTS.name, "mail.deliveries"], keys={queue_id.encode()}))
    kinds = {r.event.TYPE for r in records}
    assert {"message.verdict", "delivery.attempted"} <= kinds, kinds


def test_a_siem_principal_reads_the_verdicts_with_the_example_consumer(secure):
    queue_id = _send(secure, "secure profile siem")
    secure.downstream.wait_for(lambda d: "secure profile siem" in d.text, timeout=180, what="the siem message")
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--bootstrap", secure.settings.kafka_bootstrap,
         "--group", f"siem-it-{uuid.uuid4().hex[:8]}", "--topic", VERDICTS.name,
         "--security-protocol", "SASL_SSL", "--ca-file", str(secure.files.ca),
         "--credentials-file", str(secure.files.credentials("siem"))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[dict] = []
    reader = threading.Thread(target=lambda: lines.extend(json.loads(line) for line in proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(
                line["message_id"] == queue_id and line["type"] == "message.verdict" for line in lines):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(30)
    assert any(line["message_id"] == queue_id and line["type"] == "message.verdict" for line in lines), \
        proc.stderr.read()


def test_the_siem_export_runs_as_its_own_principal(secure, tmp_path):
    """`bulwark sinks export` (the export principal): reads the audit topics in its bulwark-export-* group."""
    queue_id = _send(secure, "secure profile export")
    out = tmp_path / "verdicts.jsonl"
    proc = secure.stack.start("export-secure", ["sinks", "export", "--name", "secure", "--topic", VERDICTS.name,
                                                "--to", str(out)])
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and queue_id in out.read_text()):
            assert proc.poll() is None, secure.stack.log_tail("export-secure", 40)
            assert time.monotonic() < deadline, secure.stack.log_tail("export-secure", 40)
            time.sleep(0.3)
    finally:
        secure.stack.stop("export-secure")
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert any(queue_id in json.dumps(doc) and doc["event"]["action"] == "message.verdict" for doc in exported)


def test_a_siem_principal_cannot_publish_a_policy_or_an_account(secure):
    siem = secure.librdkafka("siem")
    forged_policy = ev.PolicyPublished(policy_version="forged-by-siem", document={}, source="siem", applied_by="siem")
    error = _produce(siem, POLICY.name, forged_policy, b"forged-by-siem")
    assert error is not None and error.code() == confluent_kafka.KafkaError.TOPIC_AUTHORIZATION_FAILED, error

    account = ev.AccountRecorded(address=f"forged@{LOCAL_DOMAIN}", domain=LOCAL_DOMAIN, source="local",
                                 password_hash="$argon2id$forged", by="siem")
    error = _produce(siem, ACCOUNTS.name, account, account.address.encode())
    assert error is not None and error.code() == confluent_kafka.KafkaError.TOPIC_AUTHORIZATION_FAILED, error

    # Nothing of either reached the topics the gateway follows.
    records = asyncio.run(read_topics(secure.settings, [POLICY.name, ACCOUNTS.name]))
    assert not [r for r in records if getattr(r.event, "policy_version", None) == "forged-by-siem"]
    assert not [r for r in records if getattr(r.event, "address", None) == account.address]


def test_the_ingest_principal_cannot_publish_a_policy(secure):
    forged = ev.PolicyPublished(policy_version="forged-by-ingest", document={}, source="ingest", applied_by="ingest")
    with pytest.raises(confluent_kafka.KafkaException) as refused:
        asyncio.run(publish_once(secure.as_principal("ingest"), forged, "bulwark-ingest"))
    assert refused.value.args[0].code() == confluent_kafka.KafkaError.TOPIC_AUTHORIZATION_FAILED
    # While the administrator may: the same path, another principal.
    assert not [r for r in asyncio.run(read_topics(secure.settings, [POLICY.name]))
                if r.event.policy_version == "forged-by-ingest"]


def test_a_replay_publishes_as_the_administrator_and_a_siem_principal_cannot_forge_one(secure):
    queue_id = _send(secure, "secure profile replay")
    secure.downstream.wait_for(lambda d: "secure profile replay" in d.text, timeout=180, what="the replayed message")
    replayed = secure.stack.run_cli(["replay", "--sender", "secure-sender@partner.test", "--all", "--publish"],
                                    check=False)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    replay_id = replayed.stderr.strip().rsplit(" ", 1)[1]
    found = [r.event for r in asyncio.run(read_topics(secure.settings, [FORENSICS.name], keys={replay_id.encode()}))]
    assert queue_id in {e.message_id for e in found if isinstance(e, ev.ReplayFinding)}
    assert isinstance(found[-1], ev.ReplayCompleted)

    forged = ev.ReplayCompleted(replay_id="forged-by-siem", replay="verdicts", mode="recorded", read=0, selected=0,
                                findings=0, by="siem")
    error = _produce(secure.librdkafka("siem"), FORENSICS.name, forged, b"forged-by-siem")
    assert error is not None and error.code() == confluent_kafka.KafkaError.TOPIC_AUTHORIZATION_FAILED, error


def _connect(config: dict) -> tuple[bool, list[confluent_kafka.KafkaError]]:
    """Whether a client with this configuration gets the cluster's metadata, and the errors it saw."""
    errors: list[confluent_kafka.KafkaError] = []
    admin = AdminClient({**config, "error_cb": errors.append, "socket.timeout.ms": 5000})
    try:
        admin.list_topics(timeout=15)
        return True, errors
    except confluent_kafka.KafkaException:
        admin.poll(1)  # serves the error callbacks
        return False, errors


def test_a_client_without_credentials_cannot_connect(secure):
    connected, _ = _connect(secure.librdkafka(None))  # plaintext, as on the default profile
    assert not connected

    wrong = {**secure.librdkafka("siem"), "sasl.password": "not-the-password"}
    connected, errors = _connect(wrong)
    assert not connected
    assert any(e.code() == confluent_kafka.KafkaError._AUTHENTICATION for e in errors), errors

    # The same client with the right password does connect (so the refusals above are the credentials').
    connected, errors = _connect(secure.librdkafka("siem"))
    assert connected, errors


def test_no_password_appears_in_any_log(secure):
    _send(secure, "secure profile logs")
    secure.downstream.wait_for(lambda d: "secure profile logs" in d.text, timeout=180, what="the logs message")
    passwords = [read_credentials(secure.files.credentials(p.name)).password for p in PRINCIPALS]
    logs = list(secure.stack.log_dir.glob("*.log"))
    assert {path.stem for path in logs} >= {"ingest", "streams", "delivery", "quarantine"}
    for path in logs:
        text = path.read_text(errors="replace")
        assert not [p for p in passwords if p in text], f"a password is in {path}"


def _poll(config: dict, group: str, topic: str, until, seconds: float) -> list:
    """Consume ``topic`` in ``group`` until ``until(messages, errors)`` or the time is up."""
    messages, errors = [], []
    consumer = confluent_kafka.Consumer({**config, "group.id": group, "auto.offset.reset": "earliest",
                                         "isolation.level": "read_committed", "error_cb": errors.append})
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not until(messages, errors):
            for message in consumer.consume(num_messages=100, timeout=1.0):
                (errors if message.error() else messages).append(message.error() or message)
    finally:
        consumer.close()
    return messages, errors


def test_an_added_reader_reads_the_verdicts_in_its_own_consumer_groups_only(secure):
    added = secure.stack.run_cli(["kafka", "add-reader", "splunk"], check=False)
    assert added.returncode == 0, added.stderr
    assert secure.files.credentials("splunk").stat().st_mode & 0o777 == 0o600
    queue_id = _send(secure, "secure profile added reader")
    splunk = secure.librdkafka("splunk")

    def has_verdict(messages, _errors):
        return any(m.key() == queue_id.encode() for m in messages)

    messages, errors = _poll(splunk, "splunk-archive", VERDICTS.name, has_verdict, 120)
    assert has_verdict(messages, errors), errors

    # Another principal's groups are not its to join (or to reset).
    def refused(_messages, errors):
        return any(e.code() == confluent_kafka.KafkaError.GROUP_AUTHORIZATION_FAILED for e in errors)

    messages, errors = _poll(splunk, "siem-archive", VERDICTS.name, refused, 30)
    assert refused(messages, errors) and not messages, errors


def test_the_safety_net_sends_a_message_again_as_its_own_principal(secure):
    """`bulwark sinks unjudged` (principal unjudged): reads both topics, commits in its group, writes mail.received."""
    stack = secure.stack
    stack.stop("unjudged")
    stack.stop("streams")
    try:
        stack.start("unjudged", ["sinks", "unjudged"], {"BULWARK_UNJUDGED_AFTER_SECONDS": "2"})
        queue_id = _send(secure, "secure profile unjudged", source_ip="127.0.17.2")  # no worker: 250 at the deadline
        deadline = time.monotonic() + 60
        while f"message {queue_id} " not in stack.log_tail("unjudged", 100):
            assert stack.procs["unjudged"].poll() is None, stack.log_tail("unjudged", 40)
            assert time.monotonic() < deadline, stack.log_tail("unjudged", 40)
            time.sleep(0.5)
        assert "sent again (1)" in stack.log_tail("unjudged", 100)
        records = asyncio.run(read_topics(secure.settings, [RECEIVED.name], keys={queue_id.encode()}))
        assert len(records) >= 2  # the original and the net's copy
    finally:
        stack.restart("streams")
        stack.stop("unjudged")
        stack.start("unjudged", ["sinks", "unjudged"])
    # The worker judges the original and skips the copies: one delivery.
    secure.downstream.wait_for(lambda d: "secure profile unjudged" in d.text, timeout=180, what="the delivery")
    time.sleep(10)
    assert len(secure.downstream.matching(lambda d: "secure profile unjudged" in d.text)) == 1


def test_provision_takes_back_a_grant_the_table_does_not_have(secure):
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    # Someone granted siem a write by hand, with the broker's own principal ...
    broker = AdminClient(secure.librdkafka("broker"))
    stray = AclBinding(ResourceType.TOPIC, POLICY.name, ResourcePatternType.LITERAL, "User:siem", "*",
                       AclOperation.WRITE, AclPermissionType.ALLOW)
    for future in broker.create_acls([stray]).values():
        future.result(30)
    forged = ev.PolicyPublished(policy_version="forged-while-granted", document={}, source="siem", applied_by="siem")
    assert _produce(secure.librdkafka("siem"), POLICY.name, forged, b"forged-while-granted") is None
    # ... the next provisioning makes the ACLs the table's again.
    provisioned = secure.stack.run_cli(["kafka", "provision"], check=False)
    assert provisioned.returncode == 0, provisioned.stderr
    error = _produce(secure.librdkafka("siem"), POLICY.name, forged, b"forged-again")
    assert error is not None and error.code() == confluent_kafka.KafkaError.TOPIC_AUTHORIZATION_FAILED, error
