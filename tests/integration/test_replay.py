"""bulwark replay against the running gateway: its verdicts reproduced, a candidate policy's changes shown."""

from __future__ import annotations

import json

import confluent_kafka
import pytest

from schemas import events as ev
from schemas.topics import ALL_TOPICS, DELIVERIES, QUARANTINE, VERDICTS

from .conftest import LOCAL_DOMAIN

pytestmark = pytest.mark.integration

CLIENT = "127.0.11.10"


def _ends(gateway) -> dict:
    consumer = confluent_kafka.Consumer({"bootstrap.servers": gateway.settings.kafka_bootstrap, "group.id": "t"})
    try:
        return {(spec.name, p): consumer.get_watermark_offsets(confluent_kafka.TopicPartition(spec.name, p),
                                                               timeout=10)[1]
                for spec in ALL_TOPICS for p in range(spec.partitions) if spec.name != "trace.index"}
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def judged(gateway):
    """Two messages from one client, one with an executable attachment; their verdicts recorded."""
    clean = gateway.message("replay-clean@partner.test", [f"replay@{LOCAL_DOMAIN}"], "replay clean")
    risky = gateway.message("replay-risky@partner.test", [f"replay@{LOCAL_DOMAIN}"], "replay risky")
    risky.add_attachment(b"MZ\x90\x00" * 256, maintype="application", subtype="octet-stream", filename="invoice.exe")
    ids = {"clean": gateway.send(clean, source_ip=CLIENT), "risky": gateway.send(risky, source_ip=CLIENT)}
    for queue_id in ids.values():
        gateway.wait_records(lambda r: isinstance(r.event, ev.Verdict), [VERDICTS.name], keys={queue_id},
                             timeout=60, what=f"verdict of {queue_id}")
    [verdict] = gateway.records([VERDICTS.name], keys={ids["risky"]})
    assert verdict.event.action == "quarantine" and "ATTACHMENT_TYPE_BLOCKED" in verdict.event.reasons
    # And what the sinks write about them, before a test counts the records:
    # the quarantine sink reads verdicts in batches, up to half a second
    # late (bulwark/kafka.py, BATCH_FETCH_WAIT_MS).
    gateway.wait_records(lambda r: isinstance(r.event, ev.QuarantineAdded), [QUARANTINE.name],
                         keys={ids["risky"]}, timeout=60, what="the risky message held")
    gateway.wait_records(lambda r: isinstance(r.event, ev.DeliveryAttempted), [DELIVERIES.name],
                         keys={ids["clean"]}, timeout=60, what="the clean message delivered")
    return ids


def test_replay_reproduces_every_recorded_verdict_and_writes_nothing(gateway, judged):
    before = _ends(gateway)
    result = gateway.cli("replay", "--client-ip", CLIENT, "--json", "--all")
    report = json.loads(result.stdout)
    assert report["mode"] == "recorded" and report["selected"] == 2
    assert report["changed"] == 0 and report["not_replayed"] == 0
    by_id = {m["message_id"]: m for m in report["messages"]}
    assert by_id[judged["risky"]]["replayed_action"] == "quarantine"
    assert by_id[judged["clean"]]["replayed_action"] == "deliver"
    assert by_id[judged["risky"]]["recorded_policy"] == by_id[judged["risky"]]["replayed_policy"]
    # The clamd scans and DNS lookups ran again; no record was written anywhere.
    assert _ends(gateway) == before

    text = gateway.cli("replay", "--client-ip", CLIENT).stdout
    assert "2 selected and judged again: 0 differ from the recorded verdict, 0 could not be replayed" in text


def test_replay_selects_by_sender_action_and_domain(gateway, judged):
    def selected(*args: str) -> set[str]:
        report = json.loads(gateway.cli("replay", "--json", "--all", *args).stdout)
        return {m["message_id"] for m in report["messages"]}

    assert selected("--client-ip", CLIENT, "--action", "quarantine") == {judged["risky"]}
    assert selected("--sender", "REPLAY-CLEAN@partner.test") == {judged["clean"]}
    assert selected("--client-ip", CLIENT, "--result", "ATTACHMENT_TYPE_BLOCKED") == {judged["risky"]}
    assert selected("--client-ip", CLIENT, "--domain", "elsewhere.test") == set()
    assert selected("--client-ip", CLIENT, "--since", "1h") == set(judged.values())
    assert selected("--client-ip", CLIENT, "--until", "2001-01-01") == set()


def test_a_candidate_policy_shows_the_messages_that_would_change_action(gateway, judged, tmp_path):
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(gateway.settings.policy_path.read_text()
                         + "actions:\n  ATTACHMENT_TYPE_BLOCKED: deliver\n")
    report = json.loads(gateway.cli("replay", "--client-ip", CLIENT, "--policy", str(candidate), "--json").stdout)
    assert report["mode"] == "candidate" and report["selected"] == 2 and report["changed"] == 1
    [changed] = report["messages"]
    assert changed["message_id"] == judged["risky"]
    assert (changed["recorded_action"], changed["replayed_action"]) == ("quarantine", "deliver")
    assert changed["causes"] == ["ATTACHMENT_TYPE_BLOCKED no longer decides: the candidate says deliver for it "
                                 "(its actions)"]

    table = gateway.cli("replay", "--client-ip", CLIENT, "--policy", str(candidate)).stdout
    assert "1 would change action under policy" in table
    [row] = [line for line in table.splitlines() if judged["risky"][:16] in line]
    assert "replay-risky@partner.test" in row and "quarantine" in row and "deliver" in row
    assert judged["clean"][:16] not in table


def test_a_message_whose_raw_copy_is_gone_is_reported_and_fails_the_replay(gateway):
    from bulwark.blobstore import BlobStore

    queue_id = gateway.send(gateway.message("replay-gone@partner.test", [f"replay@{LOCAL_DOMAIN}"], "replay gone"),
                            source_ip="127.0.11.11")
    [verdict] = gateway.wait_records(lambda r: isinstance(r.event, ev.Verdict), [VERDICTS.name], keys={queue_id},
                                     timeout=60, what="its verdict")
    gateway.downstream.wait_for(lambda d: "replay gone" in d.text)
    BlobStore(gateway.settings.blob_dir).path(verdict.event.envelope.sha256).write_bytes(b"not the message")

    result = gateway.cli("replay", "--client-ip", "127.0.11.11", check=False)
    assert result.returncode == 1
    assert "1 selected and judged again: 0 differ from the recorded verdict, 1 could not be replayed" in result.stdout
    [row] = [line for line in result.stdout.splitlines() if queue_id[:16] in line]
    assert "raw message not readable from the blob store" in row and "is corrupt" in row
