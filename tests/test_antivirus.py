"""The pure parts of the antivirus and macros checks: reading clamd's replies,
naming results, actions, exclusions, and olevba's evidence on generated samples.

No clamd here (the integration tests use a real one); the protocol client is
exercised against a few lines of asyncio server speaking INSTREAM.
"""

from __future__ import annotations

import asyncio
import struct
from datetime import datetime, timezone
from email.message import EmailMessage

import pytest

from bulwark.policy import PolicyError, parse
from schemas.events import Envelope
from streams import clamav
from streams.checks import antivirus, macros
from streams.checks._exclusions import exclusion
from streams.clamav import Clamd, MessageScan, Reply, classify
from streams.message import Message
from streams.verdict import decide
from tests import samples

POLICY = """
hostname: gw
local_domains: [example.test]
mail_servers:
  - {name: exchange, host: 192.0.2.25, default: true, trusted_addresses: [192.0.2.25/32]}
allow_list:
  addresses: [198.51.100.0/24]
"""


def _message(files: dict[str, bytes] | None = None, policy_text: str = POLICY, client_ip: str = "203.0.113.9",
             sender: str = "someone@partner.test") -> Message:
    msg = EmailMessage()
    msg["Subject"] = "hi"
    msg.set_content("hello")
    for name, data in (files or {}).items():
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    env = Envelope(mail_from=sender, rcpt_to=["b@example.test"], sha256="0" * 64, size=1,
                   client_ip=client_ip, received_at=datetime.now(timezone.utc))
    return Message("m1", "s1", env, "inbound", msg.as_bytes(), parse(policy_text))


VERSION = "ClamAV 1.4.6/1/Sat Nov 28 04:43:59 2026"

# -- clamd's replies ---------------------------------------------------------------------


@pytest.mark.parametrize("line, kind, detail", [
    ("stream: OK", "clean", None),
    ("stream: Win.Test.EICAR_HDB-1 FOUND", "virus", "Win.Test.EICAR_HDB-1"),
    ("stream: Heuristics.OLE2.ContainsMacros.VBA FOUND", "macro", "Heuristics.OLE2.ContainsMacros.VBA"),
    ("stream: Heuristics.OLE2.ContainsMacros.XLM FOUND", "macro", "Heuristics.OLE2.ContainsMacros.XLM"),
    ("stream: Heuristics.Encrypted.Zip FOUND", "unscannable", "Heuristics.Encrypted.Zip"),
    ("stream: Heuristics.Limits.Exceeded.MaxRecursion FOUND", "unscannable",
     "Heuristics.Limits.Exceeded.MaxRecursion"),
    ("INSTREAM size limit exceeded. ERROR", "unscannable",
     "larger than clamd's StreamMaxLength (INSTREAM size limit exceeded.)"),
    ("stream: Can't allocate memory ERROR", "failed", "clamd: Can't allocate memory"),
    ("PONG", "failed", "unexpected reply from clamd: 'PONG'"),
])
def test_clamd_replies_are_classified(line, kind, detail):
    assert classify("invoice.zip", line) == Reply("invoice.zip", kind, detail)


def test_the_message_and_each_decoded_part_are_scan_targets_once():
    message = _message({"a.zip": b"PK same", "copy.zip": b"PK same", "b.bin": b"other"})
    found = clamav.targets(message)
    assert [t for t, _ in found][0] == "message" and found[0][1] == message.raw
    names = [t for t, _ in found[1:]]
    assert names == ["part 1 (text/plain)", "a.zip", "b.bin"]  # the identical copy.zip once
    assert dict(found)["a.zip"] == b"PK same"  # decoded, not base64


# -- the client, against a stand-in speaking clamd's framing -----------------------------------


async def _stand_in(answer: bytes, close_after_each: bool = False):
    """A clamd in session mode (zIDSESSION, numbered replies) answering every command alike.

    ``close_after_each``: after one reply, it closes the connection as the
    next command arrives, as when clamd ends a session at its IdleTimeout
    just as the client sends on it."""
    received: list[bytes] = []
    connections: list[int] = []

    async def handle(reader, writer):
        connections.append(1)
        assert await reader.readuntil(b"\0") == b"zIDSESSION\0"
        number = 0
        while True:
            try:
                command = await reader.readuntil(b"\0")
            except asyncio.IncompleteReadError:
                break
            if close_after_each and number:
                break
            number += 1
            body = b""
            if command == b"zINSTREAM\0":
                while True:
                    (size,) = struct.unpack("!L", await reader.readexactly(4))
                    if size == 0:
                        break
                    body += await reader.readexactly(size)
            received.append(command + body)
            writer.write(f"{number}: ".encode() + answer + b"\0")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], received, connections


async def test_instream_frames_the_bytes_in_chunks_and_reads_the_reply():
    server, port, received, _ = await _stand_in(b"stream: Bulwark.Test.EICAR.UNOFFICIAL FOUND")
    async with server:
        data = bytes(range(256)) * 1000  # several 64 KiB chunks
        reply = await Clamd("127.0.0.1", port, timeout=5).instream("big.bin", data)
    assert reply == Reply("big.bin", "virus", "Bulwark.Test.EICAR.UNOFFICIAL")
    assert received == [b"zINSTREAM\0" + data]


async def test_clamds_size_limit_reply_is_read_even_while_the_stream_is_still_being_sent():
    async def refuse_early(reader, writer):
        await reader.readuntil(b"\0")  # zIDSESSION
        await reader.readuntil(b"\0")
        await reader.readexactly(4)
        writer.write(b"1: INSTREAM size limit exceeded. ERROR\0")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse_early, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reply = await Clamd("127.0.0.1", port, timeout=5).instream("big.iso", b"x" * 300_000)
    assert reply.kind in ("unscannable", "failed")  # a reset may swallow clamd's reply
    assert "StreamMaxLength" in reply.detail


async def test_version_is_clamds_answer():
    server, port, received, _ = await _stand_in(VERSION.encode())
    async with server:
        assert await Clamd("127.0.0.1", port, timeout=5).version() == VERSION
    assert received == [b"zVERSION\0"]


async def test_scans_share_one_connection_to_clamd():
    server, port, received, connections = await _stand_in(b"stream: OK")
    async with server:
        clamd = Clamd("127.0.0.1", port, timeout=5)
        replies = [await clamd.instream(f"part {i}", b"hello %d" % i) for i in range(3)]
        assert await clamd.version() == "stream: OK"
    assert [r.kind for r in replies] == ["clean"] * 3
    assert len(received) == 4 and len(connections) == 1


async def test_a_session_clamd_closed_while_kept_is_replaced_without_a_failed_scan():
    server, port, received, connections = await _stand_in(b"stream: OK", close_after_each=True)
    async with server:
        clamd = Clamd("127.0.0.1", port, timeout=5)
        first = await clamd.instream("message", b"one")
        second = await clamd.instream("message", b"two")
    assert (first.kind, second.kind) == ("clean", "clean")
    assert received == [b"zINSTREAM\0one", b"zINSTREAM\0two"] and len(connections) == 2


async def test_a_reply_to_another_command_is_a_failure_not_a_result():
    async def confused(reader, writer):
        await reader.readuntil(b"\0")
        await reader.readuntil(b"\0")
        writer.write(b"7: stream: OK\0")
        await writer.drain()

    server = await asyncio.start_server(confused, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reply = await Clamd("127.0.0.1", port, timeout=5).instream("message", b"x")
    assert reply.kind == "failed" and "answered out of turn: '7: stream: OK'" in reply.detail


async def test_clamd_down_is_a_failed_reply_not_an_exception():
    server, port, _, _ = await _stand_in(b"")
    server.close()
    await server.wait_closed()
    reply = await Clamd("127.0.0.1", port, timeout=5).instream("message", b"x")
    assert reply.kind == "failed" and reply.detail.startswith(f"cannot connect to clamd at 127.0.0.1:{port}")


async def test_a_clamd_that_never_answers_times_out_as_failed():
    async def silent(reader, writer):
        await asyncio.sleep(10)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reply = await Clamd("127.0.0.1", port, timeout=0.2).instream("message", b"x")
    assert reply.kind == "failed" and "did not finish within 0.2s" in reply.detail


# -- antivirus results and actions ----------------------------------------------------------


def test_infected_message_names_the_virus_and_the_database_version():
    scan = MessageScan([Reply("message", "virus", "Eicar-Signature"), Reply("eicar.zip", "virus", "Eicar-Signature"),
                        Reply("notes.txt", "clean")], VERSION)
    [result] = antivirus.results(scan)
    assert (result.name, result.outcome, result.evidence, result.version) == (
        "VIRUS_FOUND", "hit", ["Eicar-Signature"], VERSION)
    assert result.detail == "infected: message, eicar.zip"


def test_unscannable_and_failed_scans_are_results_of_their_own():
    scan = MessageScan([Reply("secret.zip", "unscannable", "Heuristics.Encrypted.Zip"),
                        Reply("message", "failed", "clamd at 127.0.0.1:3310 did not finish within 20s")], None)
    names = {r.name: r for r in antivirus.results(scan)}
    assert set(names) == {"ANTIVIRUS_UNSCANNABLE", "ANTIVIRUS_FAIL"}
    assert names["ANTIVIRUS_UNSCANNABLE"].outcome == "fail"
    assert names["ANTIVIRUS_UNSCANNABLE"].evidence == ["Heuristics.Encrypted.Zip"]


def test_macro_heuristic_alone_is_not_a_virus():
    scan = MessageScan([Reply("a.doc", "macro", "Heuristics.OLE2.ContainsMacros.VBA")], VERSION)
    assert [r.name for r in antivirus.results(scan)] == ["ANTIVIRUS_CLEAN"]


def _verdict_for(results, policy_text: str):
    return decide(_message(policy_text=policy_text), results, parse(policy_text))


def test_infected_is_refused_by_default_and_quarantined_when_the_policy_says_so():
    results = antivirus.results(MessageScan([Reply("message", "virus", "Eicar-Signature")], VERSION))
    assert _verdict_for(results, POLICY).action == "reject"
    quarantine = POLICY + "checks:\n  antivirus: {when_infected: quarantine}\n"
    verdict = _verdict_for(results, quarantine)
    assert (verdict.action, verdict.reasons) == ("quarantine", ["VIRUS_FOUND"])
    # An explicit per-result action in the policy still wins.
    explicit = quarantine + "actions: {VIRUS_FOUND: reject}\n"
    assert _verdict_for(results, explicit).action == "reject"


def test_what_cannot_be_scanned_is_quarantined():
    for reply in (Reply("a.zip", "unscannable", "Heuristics.Encrypted.Zip"), Reply("message", "failed", "down")):
        verdict = _verdict_for(antivirus.results(MessageScan([reply], None)), POLICY)
        assert verdict.action == "quarantine"


def test_macros_are_refused_by_default_and_quarantined_when_the_policy_says_so():
    found = macros.Findings(evidence=["a.doc: VBA macros"], documents=["a.doc"])
    results = macros.results(found, None)
    assert _verdict_for(results, POLICY).action == "reject"
    quarantine = POLICY + "checks:\n  macros: {when_found: quarantine}\n"
    assert _verdict_for(results, quarantine).action == "quarantine"


def test_bad_settings_are_policy_errors_with_their_line():
    text = POLICY + "checks:\n  antivirus:\n    when_infected: bounce\n    exclude_senders: [nobody]\n"
    with pytest.raises(PolicyError) as err:
        parse(text, "policy.yaml")
    message = str(err.value)
    assert "policy.yaml:10: checks.antivirus.when_infected" in message
    assert "policy.yaml:11: checks.antivirus.exclude_senders" in message and "not an email address" in message


# -- exclusions --------------------------------------------------------------------------


def test_exclusions_are_off_by_default():
    settings = antivirus.Settings()
    for ip in ("192.0.2.25", "198.51.100.7", "203.0.113.9"):
        assert exclusion(_message(client_ip=ip), settings) is None


def test_each_exclusion_skips_the_scan_when_on():
    allow = antivirus.Settings(exclude_allow_listed_ips=True)
    assert exclusion(_message(client_ip="198.51.100.7"), allow) == "client 198.51.100.7 is allow-listed"
    assert exclusion(_message(client_ip="203.0.113.9"), allow) is None
    servers = antivirus.Settings(exclude_domain_mail_servers=True)
    assert "domain mail server" in exclusion(_message(client_ip="192.0.2.25"), servers)
    senders = antivirus.Settings(exclude_senders=["Scanner@Partner.test"])
    assert exclusion(_message(sender="scanner@partner.test"), senders) == "sender scanner@partner.test is excluded"
    assert exclusion(_message(sender="other@partner.test"), senders) is None


async def test_an_excluded_message_is_skipped_without_contacting_clamd():
    settings = antivirus.Settings(exclude_senders=["scanner@partner.test"])
    [result] = await antivirus.check(_message({"e.com": samples.EICAR}, sender="scanner@partner.test"), settings)
    assert (result.name, result.outcome) == ("ANTIVIRUS_SKIPPED", "pass")
    assert "clamav" not in _message().shared


# -- olevba on generated documents ----------------------------------------------------------


def _evidence(files: dict[str, bytes], **settings) -> macros.Findings:
    return macros.inspect_message(_message(files), macros.Settings(**settings))


@pytest.mark.parametrize("name, data, kind, trigger", [
    ("invoice.doc", samples.word97_with_vba(), "VBA", "AutoOpen"),
    ("prices.xls", samples.excel97_with_vba(), "VBA", "Workbook_Open"),
    ("prices.xls", samples.excel97_with_xlm(), "XLM", "Auto_Open"),
    ("invoice.docm", samples.ooxml_with_vba("docm"), "VBA", "AutoOpen"),
    ("prices.xlsm", samples.ooxml_with_vba("xlsm"), "VBA", "AutoOpen"),
    ("deck.pptm", samples.ooxml_with_vba("pptm"), "VBA", "AutoOpen"),
    ("deck.ppt", samples.powerpoint97_with_vba(), "VBA", "AutoOpen"),
    ("holiday.jpg", samples.ooxml_with_vba("docm"), "VBA", "AutoOpen"),  # renamed: found by content
], ids=["doc", "xls-vba", "xls-xlm", "docm", "xlsm", "pptm", "ppt", "renamed-docm"])
def test_olevba_names_macro_type_triggers_and_keywords(name, data, kind, trigger):
    found = _evidence({name: data})
    assert found.documents == [name]
    assert f"{name}: {kind} macros" in found.evidence
    assert any(e.startswith(f"{name}: auto-exec") and trigger in e for e in found.evidence), found.evidence
    if kind == "VBA":
        assert any(e.startswith(f"{name}: suspicious") and "Shell" in e for e in found.evidence), found.evidence


def test_macros_inside_nested_zips_are_found_with_their_path():
    inner = samples.zipped({"q3/invoice.doc": samples.word97_with_vba()})
    found = _evidence({"docs.zip": samples.zipped({"inner.zip": inner})})
    assert found.documents == ["docs.zip/inner.zip/q3/invoice.doc"]


def test_archives_past_the_limits_or_encrypted_are_unscannable():
    deep = samples.nested_zip("a.doc", samples.word97_with_vba(), depth=4)
    found = _evidence({"deep.zip": deep}, max_archive_depth=2)
    assert found.documents == [] and "archives nested deeper than 2" in found.unscannable[0]
    found = _evidence({"secret.zip": samples.encrypted_zip({"a.doc": samples.word97_with_vba()})})
    assert found.unscannable == ["secret.zip/a.doc: encrypted"]
    found = _evidence({"big.zip": samples.zipped({"a.doc": samples.word97_with_vba()})}, max_member_bytes=100)
    assert "larger than 100 bytes" in found.unscannable[0]
    [result] = macros.results(found, None)
    assert (result.name, result.outcome) == ("MACROS_UNSCANNABLE", "fail")


def test_documents_without_macros_and_plain_text_are_clean():
    # olevba reads any text as VBA source; only Office containers are documents.
    found = _evidence({"report.doc": samples.plain_word97(), "slides.ppt": samples.plain_powerpoint97(),
                       "notes.txt": b"Sub AutoOpen()\nShell x\nEnd Sub\n", "eicar.com": samples.EICAR})
    assert found == macros.Findings(members_read=0)
    assert [r.name for r in macros.results(found, MessageScan([], VERSION))] == ["MACROS_CLEAN"]


def test_clamavs_heuristic_joins_olevbas_evidence_per_document():
    found = _evidence({"invoice.doc": samples.word97_with_vba()})
    scan = MessageScan([Reply("message", "macro", "Heuristics.OLE2.ContainsMacros.VBA"),
                        Reply("invoice.doc", "macro", "Heuristics.OLE2.ContainsMacros.VBA")], VERSION)
    [result] = macros.results(found, scan)
    assert result.name == "MACRO_FOUND" and result.version == VERSION
    assert result.evidence[-1] == "invoice.doc: ClamAV Heuristics.OLE2.ContainsMacros.VBA"
    assert not any(e.startswith("message:") for e in result.evidence)
    # ClamAV alone is enough (e.g. a document in an archive format this check does not open).
    [result] = macros.results(macros.Findings(), MessageScan([Reply("a.7z", "macro", "Heuristics.OLE2.ContainsMacros.VBA")]))
    assert result.name == "MACRO_FOUND" and result.detail == "Office macros in a.7z"
