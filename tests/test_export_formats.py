"""SIEM formats: ECS documents, CEF lines and RFC 5424 messages for every event type.

The golden files in tests/fixtures/export/ hold one line per sample event
(tests/export_samples.py), in each format; regenerate them after a
deliberate change with ``PYTHONPATH=. python -m tests.test_export_formats``
and read the diff.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from schemas import codec
from schemas import events as ev
from schemas.topics import ALL_TOPICS, topic_for
from sinks.siem import cef, ecs, syslog
from sinks.siem.facts import PRODUCT_VERSION, REDACTION, read_record

from tests.export_samples import IP6, records

GOLDEN = Path(__file__).parent / "fixtures" / "export"
HOST = "gateway.example.test"
FORMATS = {
    "ecs.jsonl": lambda r: ecs.line(r, HOST),
    "cef.txt": lambda r: cef.line(r, HOST),
    "syslog.txt": lambda r: syslog.message(r, HOST),
}
AUDIT = {spec.name for spec in ALL_TOPICS if spec.kind == "audit"}


def _render(fmt: str) -> list[str]:
    # The product version is the one thing that changes without the format changing.
    return [FORMATS[fmt](r).replace(PRODUCT_VERSION, "@VERSION@") for r in records()]


def _by_type(fmt: str) -> dict[str, str]:
    return {r.event_type: line for r, line in zip(records(), _render(fmt))}


# -- golden examples ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_event_type_renders_as_its_golden_example(fmt):
    golden = (GOLDEN / fmt).read_text(encoding="utf-8").splitlines()
    rendered = _render(fmt)
    assert len(golden) == len(rendered) == len(ev.EVENT_TYPES)
    for record, want, got in zip(records(), golden, rendered):
        assert got == want, f"{record.event_type} differs from tests/fixtures/export/{fmt}"


def test_no_format_ever_writes_a_line_break_inside_a_record():
    for fmt in FORMATS:
        for line in _render(fmt):
            assert "\n" not in line and "\r" not in line


# -- ECS --------------------------------------------------------------------------------

#: The ECS fields the export writes (ECS 8.17), besides bulwark.*.
ECS_FIELDS = {
    "@timestamp", "ecs.version", "message", "error.message",
    "event.kind", "event.category", "event.type", "event.action", "event.outcome", "event.severity",
    "event.module", "event.dataset", "event.id", "event.reason",
    "observer.vendor", "observer.product", "observer.version", "observer.type", "observer.hostname",
    "email.from.address", "email.to.address", "email.local_id", "email.message_id", "email.direction",
    "email.delivery_timestamp",
    "source.ip", "source.port", "destination.address", "destination.domain", "destination.port",
    "user.name", "related.ip", "related.user", "tls.version", "tls.version_protocol", "tls.cipher",
}
#: ECS's allowed values of the categorisation fields.
ECS_ALLOWED = {
    "kind": {"alert", "asset", "enrichment", "event", "metric", "state", "pipeline_error", "signal"},
    "category": {"api", "authentication", "configuration", "database", "driver", "email", "file", "host", "iam",
                 "intrusion_detection", "library", "malware", "network", "package", "process", "registry",
                 "session", "threat", "vulnerability", "web"},
    "type": {"access", "admin", "allowed", "change", "connection", "creation", "deletion", "denied", "device",
             "end", "error", "group", "indicator", "info", "installation", "protocol", "start", "user"},
    "outcome": {"failure", "success", "unknown"},
}


def _dotted(doc: dict, prefix: str = "") -> set[str]:
    names = set()
    for key, value in doc.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and name != "bulwark":
            names |= _dotted(value, name)
        else:
            names.add(name)
    return names


def test_ecs_documents_use_only_ecs_field_names_and_allowed_values():
    for record in records():
        doc = ecs.document(record, HOST)
        assert _dotted(doc) - {"bulwark"} <= ECS_FIELDS, record.event_type
        event = doc["event"]
        assert event["kind"] in ECS_ALLOWED["kind"]
        assert set(event.get("category", [])) <= ECS_ALLOWED["category"]
        assert set(event["type"]) <= ECS_ALLOWED["type"]
        assert event["outcome"] in ECS_ALLOWED["outcome"]
        assert 0 <= event["severity"] <= 10


def test_ecs_carries_the_message_addresses_ids_and_the_whole_event():
    docs = {r.event_type: ecs.document(r, HOST) for r in records()}
    verdict = docs["message.verdict"]
    assert verdict["email"]["from"]["address"] == ["alice@partner.test"]
    assert verdict["email"]["to"]["address"] == ["bob@example.test", "carol@example.test"]
    assert verdict["email"]["local_id"] == verdict["bulwark"]["message_id"]
    assert verdict["source"]["ip"] == "198.51.100.7"
    assert {k: verdict["event"][k] for k in ("action", "outcome", "type", "reason")} == {
        "action": "message.verdict", "outcome": "failure", "type": ["denied"], "reason": "DLP_US_SSN"}
    assert verdict["@timestamp"] == "2026-11-30T09:15:12.123456Z"
    # DLP evidence leaves masked, as the check wrote it.
    assert verdict["bulwark"]["results"][1]["evidence"] == ["***-**-*399", "***-**-*112"]
    assert verdict["bulwark"]["kafka"] == {"topic": "mail.verdicts", "partition": 0, "offset": 112,
                                           "key": verdict["bulwark"]["message_id"]}

    received = docs["message.received"]
    assert received["email"]["message_id"] == "<20261130091500.1@partner.test>"
    assert received["email"]["direction"] == "inbound"
    assert received["tls"] == {"version_protocol": "tls", "version": "1.3"}

    auth = docs["session.auth"]
    assert auth["event"]["category"] == ["authentication"] and auth["event"]["outcome"] == "failure"
    assert auth["user"]["name"] == "bob@example.test" and auth["source"]["ip"] == IP6

    attempt = docs["delivery.attempted"]
    assert attempt["destination"] == {"address": "192.0.2.25", "domain": "mx1.example.test", "port": 25}
    assert attempt["event"]["outcome"] == "failure"  # one recipient deferred


def test_ecs_event_id_and_timestamp_are_the_events_own():
    for record in records():
        doc = ecs.document(record, HOST)
        assert doc["event"]["id"] == record.event.event_id
        assert doc["@timestamp"] == record.event.occurred_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert doc["bulwark"]["type"] == record.event.TYPE and doc["bulwark"]["version"] == record.event.VERSION


# -- secrets -------------------------------------------------------------------------------


def test_a_password_verifier_is_never_exported():
    [record] = [r for r in records() if r.event_type == "account.recorded"]
    secret = record.event.password_hash
    for render in FORMATS.values():
        assert secret not in render(record)
    assert ecs.document(record, HOST)["bulwark"]["password_hash"] == REDACTION


def test_a_record_that_cannot_be_read_is_exported_as_an_error_without_its_content():
    value = b'{"type": "message.verdict", "version": 9, "secret": "hunter2"}'
    record = read_record("mail.verdicts", 2, 41, b"m1", value,
                         [(codec.HEADER_TYPE, b"message.verdict"), (codec.HEADER_VERSION, b"9")], 1796030100123)
    doc = ecs.document(record, HOST)
    assert doc["event"]["kind"] == "pipeline_error"
    assert doc["bulwark"] == {"type": "message.verdict", "version": "9",
                              "kafka": {"topic": "mail.verdicts", "partition": 2, "offset": 41, "key": "m1"}}
    assert "no upcaster" in doc["error"]["message"]
    for render in FORMATS.values():
        line = render(record)
        assert "hunter2" not in line and "41" in line


# -- CEF ----------------------------------------------------------------------------------


def test_cef_header_escapes_pipes_and_backslashes_and_flattens_line_breaks():
    assert cef.escape_header("a|b\\c\nd\r\ne") == "a\\|b\\\\c d e"


def test_cef_extension_escapes_backslashes_equals_and_line_breaks_not_pipes():
    assert cef.escape_extension("a=b\\c|d\ne\rf\r\ng") == "a\\=b\\\\c|d\\ne\\rf\\ng"


def _parse_cef(line: str) -> tuple[list[str], dict[str, str]]:
    """A reader written from the CEF specification, independent of the writer."""
    assert line.startswith("CEF:0|")
    header, rest, i, field = [], line[len("CEF:0|"):], 0, ""
    while len(header) < 6:
        c = rest[i]
        if c == "\\":
            field += rest[i + 1]
            i += 2
            continue
        if c == "|":
            header.append(field)
            field = ""
        else:
            field += c
        i += 1
    extension = rest[i:]
    # A key is a word followed by an unescaped '='; its value runs to the space before the next key.
    keys = list(re.finditer(r"(?:^| )(\w+)=", extension))
    keys = [k for k in keys if k.start(1) == 0 or extension[k.start(1) - 1] == " "]
    values = {}
    for n, match in enumerate(keys):
        end = keys[n + 1].start() if n + 1 < len(keys) else len(extension)
        raw = extension[match.end():end]
        values[match.group(1)] = re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), raw)
    return header, values


def test_cef_lines_read_back_to_the_values_written():
    for record in records():
        header, values = _parse_cef(cef.line(record, HOST))
        assert header[:3] == ["Bulwark", "Bulwark Email Security Gateway", PRODUCT_VERSION]
        assert header[3] == record.event_type
        assert 0 <= int(header[5]) <= 10
        assert values["externalId"] == record.event.event_id
        assert values["rt"] == str(int(record.event.occurred_at.timestamp() * 1000))
    [refused] = [r for r in records() if r.event_type == "session.refused"]
    _, values = _parse_cef(cef.line(refused, HOST))
    assert values["reason"] == refused.event.reason  # '|', '=', '\\' and a line break, intact
    assert values["src"] == "198.51.100.7" and values["cs2Label"] == "sessionId"


def test_cef_puts_an_ipv6_client_in_c6a2():
    [auth] = [r for r in records() if r.event_type == "session.auth"]
    _, values = _parse_cef(cef.line(auth, HOST))
    assert values["c6a2"] == IP6 and values["c6a2Label"] == "Source IPv6 Address" and "src" not in values


def test_cef_verdicts_name_the_action_sender_and_recipients():
    [verdict] = [r for r in records() if r.event_type == "message.verdict"]
    header, values = _parse_cef(cef.line(verdict, HOST))
    assert header[4:] == ["Message verdict: quarantine", "6"]
    assert values["act"] == "quarantine" and values["suser"] == "alice@partner.test"
    assert values["duser"] == "bob@example.test,carol@example.test" and values["deviceDirection"] == "0"


# -- RFC 5424 --------------------------------------------------------------------------------

HEADER = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{1,6}Z) (?P<host>[!-~]{1,255}) "
    r"(?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) (?P<rest>.*)$", re.S)


def _parse_sd(text: str) -> tuple[list[tuple[str, list[tuple[str, str]]]], str]:
    """RFC 5424 STRUCTURED-DATA and MSG, read with the RFC's grammar."""
    elements, i = [], 0
    while i < len(text) and text[i] == "[":
        j = i + 1
        while text[j] not in " ]":
            j += 1
        sd_id, params, i = text[i + 1:j], [], j
        while text[i] == " ":
            eq = text.index("=", i)
            name = text[i + 1:eq]
            assert text[eq + 1] == '"'
            k, value = eq + 2, ""
            while text[k] != '"':
                if text[k] == "\\" and text[k + 1] in '"\\]':
                    value += text[k + 1]
                    k += 2
                else:
                    assert text[k] not in '"]', "unescaped in a PARAM-VALUE"
                    value += text[k]
                    k += 1
            params.append((name, value))
            i = k + 1
        assert text[i] == "]"
        elements.append((sd_id, params))
        i += 1
    assert text[i] == " "
    return elements, text[i + 1:]


def test_syslog_messages_follow_rfc5424():
    for record in records():
        message = syslog.message(record, HOST)
        match = HEADER.match(message)
        assert match, message
        pri = int(match["pri"])
        assert pri // 8 == syslog.FACILITIES["local0"] and 0 <= pri % 8 <= 7
        assert (match["host"], match["app"], match["procid"], match["msgid"]) == (
            HOST, "bulwark", "-", record.event_type)
        elements, msg = _parse_sd(match["rest"])
        ids = [sd_id for sd_id, _ in elements]
        assert ids == ["origin", "bulwark@32473", "kafka@32473"]
        params = dict(elements[1][1])
        assert params["event_id"] == record.event.event_id and params["type"] == record.event_type
        assert dict(elements[2][1]) == {"topic": record.topic, "partition": str(record.partition),
                                        "offset": str(record.offset), "key": record.key}
        assert msg.isascii() or msg.startswith(syslog.BOM)


def test_syslog_sd_values_escape_quote_backslash_and_bracket():
    assert syslog.escape_param('a"b\\c]d\ne') == 'a\\"b\\\\c\\]d\\ne'
    [refused] = [r for r in records() if r.event_type == "session.refused"]
    elements, _ = _parse_sd(HEADER.match(syslog.message(refused, HOST))["rest"])
    reason = dict(elements[1][1])["reason"]
    assert reason == refused.event.reason.replace("\n", "\\n")  # the line break written out, the rest intact


def test_syslog_msg_that_is_not_ascii_starts_with_a_bom():
    [ehlo] = [r for r in records() if r.event_type == "session.ehlo"]
    _, msg = _parse_sd(HEADER.match(syslog.message(ehlo, HOST))["rest"])
    assert msg == syslog.BOM + "EHLO mäil.partner.test"
    [rset] = [r for r in records() if r.event_type == "session.rset"]
    assert syslog.message(rset, HOST).endswith("] RSET")


def test_syslog_header_fields_are_printable_ascii():
    assert syslog.header_field("gâteway.example.test", 255) == "xn--gteway-wta.example.test"  # IDNA
    assert syslog.header_field("a b", 255) == "ab"
    assert syslog.header_field("", 255) == "-"
    assert syslog.header_field("x" * 40, 32) == "x" * 32


def test_sd_names_are_printable_ascii_without_equals_space_bracket_or_quote():
    assert all(syslog._SD_NAME.match(n) for n in ("envelope.mail_from", "results.0.name", "x" * 32))
    assert not any(syslog._SD_NAME.match(n) for n in ("a=b", "a b", "a]b", 'a"b', "x" * 33, "é", ""))
    assert syslog.element("x@1", [("a=b", "dropped"), ("ok", "kept")]) == '[x@1 ok="kept"]'


def test_every_field_of_every_event_reaches_the_structured_data():
    for record in records():
        pairs = syslog.flatten(record.event.model_dump(mode="json"))
        assert all(syslog._SD_NAME.match(name) for name, _ in pairs), record.event_type


def test_parts_too_deep_for_sd_names_travel_as_json_under_their_own_name():
    [report] = [r for r in records() if r.event_type == "dmarc.report_received"]
    params = syslog.flatten(report.event.model_dump(mode="json"))
    names = [name for name, _ in params]
    assert "records.0.source_ip" in names  # what fits stays a parameter of its own
    # records.0.dkim_results.0.human_result would be 37 characters: the object goes whole.
    assert json.loads(dict(params)["records.0.dkim_results.0"]) == {
        "domain": "example.test", "selector": "s2026a", "result": "pass", "human_result": "ok"}
    assert syslog.flatten({"counters": {"failed rcpt": 3}}) == [("counters", '{"failed rcpt":3}')]


def test_severity_follows_the_event():
    pri = {r.event_type: int(HEADER.match(syslog.message(r, HOST))["pri"]) % 8 for r in records()}
    assert pri["session.rset"] == 6 and pri["message.verdict"] == 4 and pri["outbreak.detected"] == 3


def test_other_formats_travel_to_a_collector_inside_rfc5424():
    [verdict] = [r for r in records() if r.event_type == "message.verdict"]
    line = ecs.line(verdict, HOST)
    message = syslog.message(verdict, HOST, msg=line)
    elements, msg = _parse_sd(HEADER.match(message)["rest"])
    assert json.loads(msg) == json.loads(line)
    assert dict(elements[1][1]) == {"event_id": verdict.event.event_id, "type": "message.verdict", "version": "2"}


def test_octet_counting_counts_octets():
    assert syslog.octet_counted("<134>1 - - - - - - é".encode()) == b"21 <134>1 - - - - - - \xc3\xa9"


def test_every_sample_is_on_its_declared_topic():
    assert {r.event_type for r in records()} == set(ev.EVENT_TYPES)
    for r in records():
        assert r.topic == topic_for(type(r.event)).name


def regenerate() -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for fmt in FORMATS:
        (GOLDEN / fmt).write_text("".join(line + "\n" for line in _render(fmt)), encoding="utf-8")
        print(f"wrote {GOLDEN / fmt}")


if __name__ == "__main__":
    regenerate()
