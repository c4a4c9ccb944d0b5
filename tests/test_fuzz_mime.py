"""Fuzzing MIME parsing and attachment extraction, as the content checks read them.

A message is whatever a client sent: broken base64 and quoted-printable,
headers of any size, multiparts nested without end, archives built to
explode, PDF and Office files cut or corrupted. The properties:

- ``Message.parts()`` and ``attachments()`` yield parts or raise
  ``UnreadableMessage`` (a named reason, which the checks turn into their
  ``<NAME>_FAIL`` result), never anything else;
- the content checks that read them (attachment type, DLP, macros, the
  outbreak fingerprints, display-name impersonation) return their results
  without raising, within a bounded time;
- an archive that expands without bound is a finding (``DLP_DECOMPRESSION_BOMB``,
  ``MACROS_UNSCANNABLE``) reached within the per-message limits.
"""

from __future__ import annotations

import asyncio
import base64
import time
from datetime import datetime, timezone
from functools import lru_cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulwark.policy import parse
from schemas.events import Envelope
from streams import outbreak
from streams.checks import CHECKS, run_checks
from streams.checks import attachment_type, dlp, impersonation, macros
from streams.message import Message, UnreadableMessage

from . import dlp_samples, samples
from .fuzz_strategies import fuzz_settings

POLICY = parse("""hostname: gw.example.com
local_domains: [example.com]
mail_servers:
  - {name: mx, host: 10.1.1.1, default: true}
checks:
  # Only what runs in this process: no clamd, no DNS.
  antivirus: {enabled: false}
  spf: {enabled: false}
  dkim: {enabled: false}
  dmarc: {enabled: false}
  arc: {enabled: false}
  local_spoofing: {enabled: false}
  macros: {use_clamav: false}
  impersonation: {people: [Cora Chief]}
""")

#: Wall-clock bound on every check of one generated message (the checks'
#: own timeout is 30 s; a message that takes longer here is a finding).
BOUND_SECONDS = 10


def message(raw: bytes, direction: str = "outbound") -> Message:
    env = Envelope(mail_from="erin@partner.test", rcpt_to=["frank@example.com"], sha256="0" * 64, size=len(raw),
                   client_ip="192.0.2.7", received_at=datetime.now(timezone.utc))
    return Message("m1", "s1", env, direction, raw, policy=POLICY)


# -- documents and archives, valid and then damaged ----------------------------------


@lru_cache(maxsize=None)
def documents() -> dict[str, bytes]:
    return {
        "report.pdf": dlp_samples.pdf(f"card {dlp_samples.VISA}"),
        "notes.docx": dlp_samples.docx(f"IBAN {dlp_samples.IBAN}"),
        "sheet.xlsx": dlp_samples.xlsx([["card", dlp_samples.VISA]]),
        "macro.doc": samples.word97_with_vba(),
        "macro.xlsm": samples.ooxml_with_vba("xlsm"),
        "plain.ppt": samples.plain_powerpoint97(),
        "archive.zip": samples.zipped({"a.txt": b"text " * 100, "b.exe": b"MZ" + b"\0" * 64}),
        "nested.zip": dlp_samples.nested_zip(3, f"card {dlp_samples.VISA}".encode()),
    }


@st.composite
def damaged_documents(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(documents())))
    data = bytearray(documents()[name])
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        how = draw(st.sampled_from(["flip", "cut", "insert", "zero", "truncate"]))
        if how == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif how == "zero":
            data[at:at + 4] = b"\xff\xff\xff\x7f"  # a huge length or offset field
        elif how == "truncate":
            del data[at:]
    return name, bytes(data)


magic_blobs = st.tuples(
    st.sampled_from([b"%PDF-1.7\n", b"PK\x03\x04", b"PK\x05\x06", macros.OLE_MAGIC, b"\xff\xfe", b"MZ", b""]),
    st.binary(max_size=300),
).map(lambda t: t[0] + t[1])

attachments = st.one_of(
    damaged_documents(),
    st.tuples(st.sampled_from(["a.bin", "b.pdf", "c.docx", "d.zip", "e.exe. .", "f.txt", "noext"]), magic_blobs),
    st.sampled_from(sorted(documents().items())),
)


# -- MIME, valid and then broken -----------------------------------------------------

header_names = st.sampled_from([b"Subject", b"From", b"To", b"Content-Type", b"Content-Disposition",
                                b"Content-Transfer-Encoding", b"X-Junk", b"Received", b"Reply-To", b"Message-ID"])
header_values = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b" ").replace(b"\n", b" ")),
    st.sampled_from([
        b"=?utf-8?b?!!!notbase64?=", b"=?x-unknown?q?caf=E9?=", b"=?utf-8?q?=ZZ=?=", b"\"Cora Chief\" <c@evil.test>",
        b"text/plain; charset=\"x-nonexistent\"", b"multipart/mixed", b"multipart/mixed; boundary=\"\"",
        b"attachment; filename*=utf-8''%ZZ%E9.exe", b"attachment; filename*0*=utf-8''a; filename*1=b.exe",
        b"attachment; filename=\"unterminated", b"base64", b"quoted-printable", b"x-uuencode", b"8bit",
        b"application/octet-stream; name==?utf-8?b?ZXZpbC5leGU=?=", b"<>,;:@\"\\", b"a" * 5000,
        b"text/plain; a*", b"attachment; filename=\"x.exe\"; b*", b"multipart/mixed; boun!*",
    ]),
)


def encode_body(data: bytes, how: str) -> tuple[bytes, bytes]:
    if how == "base64":
        return b"base64", base64.encodebytes(data)
    if how == "broken-base64":
        return b"base64", base64.b64encode(data)[:-1] + b"!*\r\n===="
    if how == "quoted-printable":
        import quopri
        return b"quoted-printable", quopri.encodestring(data)
    if how == "broken-qp":
        return b"quoted-printable", data + b"=ZZ=\r\n=" + b"=0"
    return b"8bit", data


@st.composite
def attachment_parts(draw) -> bytes:
    name, data = draw(attachments)
    cte, body = encode_body(data, draw(st.sampled_from(["base64", "base64", "broken-base64", "quoted-printable",
                                                         "broken-qp", "8bit"])))
    headers = [b"Content-Type: application/octet-stream", b"Content-Transfer-Encoding: " + cte,
               b"Content-Disposition: attachment; filename=\"" + name.encode() + b"\""]
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


@st.composite
def mime_parts(draw, depth: int = 0) -> bytes:
    kind = draw(st.sampled_from(["text", "html", "attachment", "multipart", "message", "junk"])
                if depth < 4 else st.sampled_from(["text", "attachment", "junk"]))
    headers = [b"%s: %s" % (draw(header_names), draw(header_values)) for _ in range(draw(st.integers(0, 2)))]
    if kind == "multipart":
        boundary = draw(st.sampled_from([b"b1", b"b2", b"same", b"", b"--", b"x" * 80]))
        children = draw(st.lists(mime_parts(depth + 1), max_size=3))
        body = b"".join(b"--" + boundary + b"\r\n" + c + b"\r\n" for c in children)
        if draw(st.booleans()):
            body += b"--" + boundary + b"--\r\n"
        headers.append(b"Content-Type: multipart/%s; boundary=\"%s\"" % (
            draw(st.sampled_from([b"mixed", b"alternative", b"related", b"digest", b"signed"])), boundary))
        return b"\r\n".join(headers) + b"\r\n\r\n" + body
    if kind == "message":
        inner = draw(mime_parts(depth + 1))
        return b"\r\n".join([*headers, b"Content-Type: message/rfc822"]) + b"\r\n\r\n" + inner
    if kind == "attachment":
        return b"\r\n".join([*headers, draw(attachment_parts())])
    if kind == "junk":
        return draw(st.binary(max_size=200))
    text = draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    subtype = b"html" if kind == "html" else b"plain"
    cte, body = encode_body(text, draw(st.sampled_from(["base64", "broken-base64", "quoted-printable", "8bit"])))
    headers += [b"Content-Type: text/" + subtype + b"; charset=" + draw(st.sampled_from(
        [b"utf-8", b"latin-1", b"utf-16", b"x-unknown", b"\"\""])), b"Content-Transfer-Encoding: " + cte]
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


@st.composite
def raw_messages(draw) -> bytes:
    top = [b"From: " + draw(header_values), b"To: frank@example.com", b"Subject: " + draw(header_values)]
    if draw(st.booleans()):
        body = draw(mime_parts())
    else:  # the usual shape of mail with files: a text and its attachments
        parts = [draw(mime_parts(depth=4)), *draw(st.lists(attachment_parts(), min_size=1, max_size=3))]
        body = b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n" + b"".join(
            b"--b\r\n" + p + b"\r\n" for p in parts) + b"--b--\r\n"
    raw = b"\r\n".join(top) + b"\r\nMIME-Version: 1.0\r\n" + body
    if draw(st.booleans()):  # bare CR and LF, as some clients send them
        raw = raw.replace(b"\r\n", draw(st.sampled_from([b"\n", b"\r", b"\r\r\n"])))
    return raw


def nested_multipart(depth: int, leaf: bytes = b"Content-Type: text/plain\r\n\r\nhello\r\n") -> bytes:
    body = leaf
    for level in range(depth):
        b = b"b%d" % level
        body = (b"Content-Type: multipart/mixed; boundary=" + b + b"\r\n\r\n--" + b + b"\r\n" + body
                + b"\r\n--" + b + b"--\r\n")
    return b"From: a@partner.test\r\nSubject: deep\r\nMIME-Version: 1.0\r\n" + body


# -- the properties -------------------------------------------------------------------------


def parts_or_unreadable(msg: Message) -> None:
    try:
        for part in msg.parts():
            assert isinstance(part.payload, bytes)
        list(msg.attachments())
        msg.subject
    except UnreadableMessage:
        pass


async def every_content_check(msg: Message) -> list:
    results = []
    results += await attachment_type.check(msg, CHECKS["attachment_type"].settings(POLICY))
    results += dlp.scan_message(msg, CHECKS["dlp"].settings(POLICY), msg.direction)
    results += macros.results(macros.inspect_message(msg, CHECKS["macros"].settings(POLICY)), None)
    results += await impersonation.check(msg, CHECKS["impersonation"].settings(POLICY))
    outbreak.fingerprints(msg)
    return results


def judged_in_bounded_time(raw: bytes) -> list:
    msg = message(raw)
    started = time.monotonic()
    try:
        results = asyncio.run(every_content_check(msg))
    except UnreadableMessage:
        results = []
    elapsed = time.monotonic() - started
    assert elapsed < BOUND_SECONDS, f"{elapsed:.1f}s for a {len(raw)}-byte message"
    return results


@fuzz_settings(120, deadline_ms=BOUND_SECONDS * 1000)
@given(raw_messages())
def test_generated_messages_yield_parts_or_a_named_reason(raw):
    parts_or_unreadable(message(raw))


@fuzz_settings(100, deadline_ms=BOUND_SECONDS * 1000)
@given(raw_messages())
def test_content_checks_judge_generated_messages_without_raising(raw):
    judged_in_bounded_time(raw)


@fuzz_settings(30, deadline_ms=BOUND_SECONDS * 1000)
@given(raw_messages())
def test_run_checks_never_raises_and_fails_only_by_name(raw):
    results = asyncio.run(run_checks(message(raw), POLICY))
    assert results and all(r.name for r in results)


# -- regressions: what the fuzzing found, and the bombs built on purpose -------------------


def fan_out_zip(copies: int, members: int = 4, member_bytes: int = 256 * 1024) -> bytes:
    """An archive of ``copies`` identical archives, each of ``members`` highly compressible text files.

    Every archive is within the per-archive limits (few members, each under
    the ratio floor), so only a limit over the whole message stops it: each
    level of nesting multiplies what it expands to.
    """
    inner = dlp_samples.zip_of({f"m{i}.txt": b"a" * member_bytes for i in range(members)})
    return dlp_samples.zip_of({f"copy{i}.zip": inner for i in range(copies)})


def overlapping_zip(member_bytes: int, copies: int) -> bytes:
    """One compressed member listed ``copies`` times in the central directory (a "non-recursive" zip bomb)."""
    single = dlp_samples.zip_of({"a.txt": b"a" * member_bytes})
    cd_at = single.rindex(b"PK\x01\x02")
    eocd_at = single.rindex(b"PK\x05\x06")
    entry = single[cd_at:eocd_at]
    directory = entry * copies
    eocd = bytearray(single[eocd_at:])
    eocd[8:10] = eocd[10:12] = copies.to_bytes(2, "little")
    eocd[12:16] = len(directory).to_bytes(4, "little")
    eocd[16:20] = cd_at.to_bytes(4, "little")
    return single[:cd_at] + directory + bytes(eocd)


def with_attachment(name: str, data: bytes) -> bytes:
    return (b"From: erin@partner.test\r\nTo: frank@example.com\r\nSubject: files\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
            b"--b\r\nContent-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=\"" + name.encode() + b"\"\r\n\r\n"
            + base64.encodebytes(data) + b"--b--\r\n")


def test_multiparts_nested_past_the_parsers_recursion_fail_every_check_by_name():
    # Found by fuzzing: a few kilobytes of nested multiparts made Python's
    # parser raise RecursionError from every check (re-parsing the message
    # for each), and from the outbreak agent, which it stopped.
    msg = message(nested_multipart(2000))
    started = time.monotonic()
    with pytest.raises(UnreadableMessage, match="nested too deeply"):
        list(msg.parts())
    with pytest.raises(UnreadableMessage):
        outbreak.fingerprints(msg)
    results = asyncio.run(run_checks(msg, POLICY))
    failed = {r.name: r.detail for r in results if r.outcome == "fail"}
    assert {"ATTACHMENT_TYPE_FAIL", "DLP_FAIL", "MACROS_FAIL", "OUTBREAK_FAIL"} <= set(failed)
    assert all("nested too deeply" in detail for detail in failed.values())
    assert time.monotonic() - started < BOUND_SECONDS
    # Nesting the parser can follow is read to its leaf.
    assert [p.payload for p in message(nested_multipart(100)).parts()] == [b"hello\r\n"]


def test_parts_come_in_message_order():
    raw = (b"Content-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\nContent-Type: text/plain\r\n\r\none\r\n"
           b"--o\r\nContent-Type: multipart/alternative; boundary=i\r\n\r\n--i\r\nContent-Type: text/plain\r\n\r\n"
           b"two\r\n--i\r\nContent-Type: text/html\r\n\r\nthree\r\n--i--\r\n--o\r\nContent-Type: message/rfc822\r\n\r\n"
           b"Subject: inner\r\n\r\nfour\r\n--o--\r\n")
    assert [p.payload.strip() for p in message(raw).parts()] == [b"one", b"two", b"three", b"four"]


def test_an_archive_of_archives_is_limited_per_message_in_dlp():
    # Each archive was within its own limits, and the limits were per
    # archive: 20 archives of 1 MB made DLP read 20 MB, and each level of
    # nesting multiplied it again (a 100 KB message, gigabytes of text held).
    limits = dlp.extract.Limits(max_expanded_bytes=2 * 1024 * 1024)
    out = dlp.extract.Extracted()
    dlp.extract.extract_file("fan.zip", fan_out_zip(20), out, limits)
    assert [p.kind for p in out.problems] == ["bomb"] * len(out.problems) and out.problems
    assert "the message's archives expand past" in out.problems[0].detail
    assert out.expanded_bytes <= limits.max_expanded_bytes + 1
    assert sum(len(t.text) for t in out.texts) <= limits.max_expanded_bytes


def test_an_archive_of_archives_is_limited_per_message_in_macros():
    settings = macros.Settings(max_expanded_bytes=2 * 1024 * 1024)
    found = macros.Findings()
    macros.inspect("fan.zip", fan_out_zip(20), settings, found)
    assert found.bytes_read <= settings.max_expanded_bytes + 1
    assert any("archives expand past" in u for u in found.unscannable)
    [unscannable] = [r for r in macros.results(found, None) if r.name == macros.UNSCANNABLE]
    assert unscannable.outcome == "fail"


def test_a_member_listed_many_times_is_limited_per_message():
    bomb = overlapping_zip(512 * 1024, 200)
    limits = dlp.extract.Limits(max_expanded_bytes=4 * 1024 * 1024)
    out = dlp.extract.Extracted()
    dlp.extract.extract_file("overlap.zip", bomb, out, limits)
    assert out.expanded_bytes <= limits.max_expanded_bytes + 1
    assert any(p.kind == "bomb" for p in out.problems)
    found = macros.Findings()
    macros.inspect("overlap.zip", bomb, macros.Settings(max_expanded_bytes=4 * 1024 * 1024), found)
    assert found.bytes_read <= 4 * 1024 * 1024 + 1 and found.unscannable


def corrupt_deflate_zip() -> bytes:
    """A zip whose member's deflate stream starts with a reserved block type: zlib.error on reading."""
    good = dlp_samples.zip_of({"doc.bin": b"a" * 4000})
    name_len = int.from_bytes(good[26:28], "little")
    extra_len = int.from_bytes(good[28:30], "little")
    start = 30 + name_len + extra_len
    return good[:start] + b"\xff" * 8 + good[start + 8:]


def negative_offset_zip() -> bytes:
    """A zip whose end record puts the central directory past where it is: a negative member offset."""
    good = bytearray(dlp_samples.zip_of({"doc.bin": b"a" * 4000}))
    eocd = good.rindex(b"PK\x05\x06")
    offset = int.from_bytes(good[eocd + 16:eocd + 20], "little")
    good[eocd + 16:eocd + 20] = (offset + 100).to_bytes(4, "little")
    return bytes(good)


def unsupported_version_zip() -> bytes:
    """A zip whose central directory says it needs a zip version zipfile does not implement."""
    good = bytearray(dlp_samples.zip_of({"doc.bin": b"a" * 4000}))
    directory = good.rindex(b"PK\x01\x02")
    good[directory + 6:directory + 8] = (245).to_bytes(2, "little")  # "version needed to extract": 24.5
    return bytes(good)


@pytest.mark.parametrize("archive", [corrupt_deflate_zip(), negative_offset_zip(), unsupported_version_zip()],
                         ids=["zlib-error", "negative-seek", "unsupported-version"])
def test_damaged_archive_members_are_unscannable_not_a_failed_check(archive):
    # Found by fuzzing: zlib.error, ValueError and NotImplementedError escaped
    # the macros check (MACROS_FAIL for the whole message) where a damaged
    # archive or member should be reported as what it is.
    found = macros.Findings()
    macros.inspect("files.zip", archive, macros.Settings(use_clamav=False), found)
    assert found.unscannable and "cannot be" in found.unscannable[0]
    settings = macros.Settings(use_clamav=False)
    results = asyncio.run(macros.check(message(with_attachment("files.zip", archive)), settings))
    assert [r.name for r in results] == [macros.UNSCANNABLE]


def test_dlp_test_says_why_it_cannot_read_a_deeply_nested_message(tmp_path):
    from click.testing import CliRunner

    from bulwark.cli import main

    path = tmp_path / "deep.eml"
    path.write_bytes(nested_multipart(2000))
    result = CliRunner().invoke(main, ["dlp", "test", str(path)])
    assert result.exit_code == 1 and "nested too deeply" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("header", [
    b"Content-Type: text/plain; a*",  # raised while the message was parsed
    b"Content-Disposition: inline; b*",  # raised when a part's file name was read
])
def test_a_parameter_the_default_parser_trips_over_leaves_the_message_readable(header):
    # Found by tests/fuzz_atheris.py: CPython's header parser raises
    # IndexError on a parameter such as "a*". Every check failed on it
    # (quarantine for one header line) and the outbreak agent, which
    # fingerprints outside the checks, stopped.
    raw = (b"From: erin@partner.test\r\nTo: frank@example.com\r\nSubject: files\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n" + header + b"\r\n\r\nSee attached.\r\n"
           b"--b\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Disposition: attachment; filename=\"invoice.exe\"; b*\r\n\r\nMZ\r\n--b--\r\n")
    msg = message(raw)
    assert [p.filename for p in msg.parts()] == [None, "invoice.exe"] and msg.subject == "files"
    outbreak.fingerprints(msg)
    results = asyncio.run(run_checks(msg, POLICY))
    assert not [r.name for r in results if r.outcome == "fail"]
    assert attachment_type.BLOCKED in [r.name for r in results]
