"""examples/siem_consumer.py keeps up with Bulwark: its versions, upcasters, topics and headers.

The example imports nothing of Bulwark's (it is meant to be copied), so these
tests compare its copies with the real definitions; changing an event's
version fails here until the example (and so the guide) says how to read
it. tests/integration/test_consumer_example.py runs it against the stack.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from schemas import codec
from schemas import events as ev
from schemas.topics import ALL_TOPICS

from tests.export_samples import events

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "siem_consumer.py"
FIXTURES = Path(__file__).parent / "fixtures" / "events"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("siem_consumer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_imports_only_confluent_kafka_and_the_standard_library():
    imports = [line for line in EXAMPLE.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert sorted(imports) == sorted([
        "from __future__ import annotations", "import argparse", "import json", "import os", "import signal",
        "import sys", "from confluent_kafka import Consumer, KafkaError, KafkaException"])


def test_the_example_knows_the_current_version_of_every_type_it_reads(example):
    for kind, version in example.UNDERSTOOD.items():
        assert ev.EVENT_TYPES[kind].VERSION == version, f"{kind}: update examples/siem_consumer.py"


def test_the_example_upcasts_every_old_version_as_bulwark_does(example):
    assert set(example.UPCASTERS) == set(codec.UPCASTERS)
    for fixture in sorted(FIXTURES.glob("*.json")):
        old = json.loads(fixture.read_text())
        assert example.upcast(dict(old)) == codec.upcast(dict(old)), fixture.name


def test_the_example_reads_the_audit_topics_and_bulwarks_headers(example):
    assert example.AUDIT_TOPICS == [spec.name for spec in ALL_TOPICS if spec.kind == "audit"]
    assert (example.HEADER_TYPE, example.HEADER_VERSION) == (codec.HEADER_TYPE, codec.HEADER_VERSION)


def test_the_example_describes_the_types_it_reads(example):
    samples = {e.TYPE: json.loads(e.model_dump_json()) for e in events()}
    for kind in example.UNDERSTOOD:
        assert example.describe(samples[kind]), kind
    assert example.describe(samples["message.verdict"]) == "quarantine because DLP_US_SSN (policy p-2026-11-01)"


def test_the_example_reads_its_credentials_from_a_private_file_only(example, tmp_path):
    credentials = tmp_path / "siem.properties"
    credentials.write_text("username=siem\npassword=from-the-file\n")
    credentials.chmod(0o600)
    config = example.security_config("SASL_SSL", "ca.pem", str(credentials))
    assert (config["security.protocol"], config["sasl.mechanism"], config["sasl.username"], config["sasl.password"],
            config["ssl.ca.location"]) == ("SASL_SSL", "SCRAM-SHA-512", "siem", "from-the-file", "ca.pem")
    assert example.security_config("PLAINTEXT", None, None) == {}
    credentials.chmod(0o644)
    with pytest.raises(SystemExit, match="readable by others") as refused:
        example.security_config("SASL_SSL", None, str(credentials))
    assert "from-the-file" not in str(refused.value)
