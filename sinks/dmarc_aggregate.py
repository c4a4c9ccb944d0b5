"""Reading DMARC aggregate reports (RFC 7489 section 7.2 and appendix C) out of a mail message.

Pure functions, no I/O: sinks/dmarc_reports.py hands in the raw message and
publishes what comes out. Everything in a report is written by a stranger,
so it is read defensively:

- the report is a MIME part: ``application/gzip`` (``.xml.gz``),
  ``application/zip`` (``.zip``) or ``text/xml`` (section 7.2.1.1), told
  apart by its first bytes rather than by its label, since reporters label
  them loosely (``application/x-gzip``, ``application/octet-stream``...);
- decompression stops at the policy's ``max_report_bytes``: a gzip or zip
  that inflates past it (a decompression bomb) is an unreadable report, and
  nothing beyond the limit is ever inflated;
- the XML is parsed with defusedxml, which refuses DTDs and so every entity
  (no "billion laughs", no external entities);
- every value is checked (an address is an address, a count a number) and
  kept short, so an event never outgrows a Kafka record; a report too big
  for one record is published in parts.

Whatever goes wrong is a :class:`Unreadable` with the reason, never an
exception out of :func:`read_reports`.
"""

from __future__ import annotations

import gzip
import io
import ipaddress
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from email import message_from_bytes
from email.message import Message
from email.policy import compat32
from email.utils import parseaddr
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as safe_xml
from defusedxml import DefusedXmlException

from schemas import events as ev

#: Labels a report part may carry (section 7.2.1.1, and what reporters use).
REPORT_TYPES = {
    "application/gzip", "application/x-gzip", "application/zip", "application/x-zip-compressed",
    "application/x-zip", "text/xml", "application/xml", "application/octet-stream",
}
REPORT_SUFFIXES = (".xml", ".xml.gz", ".gz", ".zip")
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
#: A zip holds one report; a few members allow for a stray readme.
MAX_ZIP_MEMBERS = 8
#: Longest value kept from a report: a domain name is at most 253
#: characters; an identifier or comment longer than this is not a report's.
MAX_VALUE = 512
MAX_AUTH_RESULTS = 32
#: Serialised rows per event, well inside Kafka's 1 MB default record limit.
PART_BYTES = 512 * 1024


class ReportError(ValueError):
    """Why a report could not be read."""


@dataclass(frozen=True)
class Unreadable:
    part: int
    error: str
    size: int | None
    attachment: str | None
    content_type: str | None


@dataclass(frozen=True)
class Report:
    """One parsed report: the event's fields, before it is split into parts."""

    fields: dict
    rows: list[ev.DmarcReportRow]
    attachment: str | None
    content_type: str | None


# -- finding and inflating the report -------------------------------------------------


def _candidates(message: Message) -> list[Message]:
    """The message's leaf parts that may hold a report (never the text of the mail itself)."""
    found = []
    for part in message.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        name = (part.get_filename() or "").lower()
        if ctype in REPORT_TYPES or name.endswith(REPORT_SUFFIXES):
            found.append(part)
    return found


def _read_limited(stream, limit: int, what: str) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ReportError(f"{what} inflates past {limit} bytes (max_report_bytes): not read")
    return data


def inflate(data: bytes, limit: int) -> list[tuple[str | None, bytes]]:
    """(member name, XML bytes) of a gzip, a zip or plain XML, never more than ``limit`` bytes in all."""
    if data.startswith(GZIP_MAGIC):
        try:
            return [(None, _read_limited(gzip.GzipFile(fileobj=io.BytesIO(data)), limit, "the gzip"))]
        except (OSError, EOFError, zlib.error) as exc:
            raise ReportError(f"not a readable gzip: {exc}") from None
    if data.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                members = [m for m in archive.infolist() if not m.is_dir()]
                if not members:
                    raise ReportError("the zip is empty")
                if len(members) > MAX_ZIP_MEMBERS:
                    raise ReportError(f"the zip holds {len(members)} files; a report is one")
                out, left = [], limit
                for member in members:
                    # Read, not trusted: the sizes in a zip's directory are the sender's word.
                    with archive.open(member) as stream:
                        content = _read_limited(stream, left, "the zip")
                    left -= len(content)
                    out.append((member.filename, content))
                return out
        except ReportError:
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, OSError, EOFError,
                zlib.error) as exc:  # RuntimeError: an encrypted member
            raise ReportError(f"not a readable zip: {exc}") from None
    if len(data) > limit:
        raise ReportError(f"the report is {len(data)} bytes, over max_report_bytes ({limit})")
    return [(None, data)]


# -- the XML -----------------------------------------------------------------------


def _strip_namespaces(root: Element) -> None:
    # RFC 7489's reports have no namespace; DMARCbis's have one. Either reads the same.
    for element in root.iter():
        if isinstance(element.tag, str) and "}" in element.tag:
            element.tag = element.tag.rpartition("}")[2]


def _text(parent: Element, path: str, required: bool = True) -> str | None:
    element = parent.find(path)
    value = (element.text or "").strip() if element is not None else ""
    if not value:
        if required:
            raise ReportError(f"{parent.tag}/{path} is missing")
        return None
    if len(value) > MAX_VALUE:
        raise ReportError(f"{parent.tag}/{path} is {len(value)} characters long")
    return value


def _int(parent: Element, path: str, required: bool = True, low: int = 0, high: int = 2**63 - 1) -> int | None:
    value = _text(parent, path, required)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ReportError(f"{parent.tag}/{path} is not a number: {value[:40]!r}") from None
    if not low <= number <= high:
        raise ReportError(f"{parent.tag}/{path} is out of range: {number}")
    return number


def _time(parent: Element, path: str) -> datetime:
    # Seconds since the epoch, UTC (appendix C: DateRangeType); year 9999 at most.
    return datetime.fromtimestamp(_int(parent, path, high=253402300799), timezone.utc)


def _lower(value: str | None) -> str | None:
    return value.lower() if value is not None else None


def _row(record: Element) -> ev.DmarcReportRow:
    row = record.find("row")
    if row is None:
        raise ReportError("a record has no row")
    source = _text(row, "source_ip")
    try:
        source_ip = str(ipaddress.ip_address(source))
    except ValueError:
        raise ReportError(f"row/source_ip is not an IP address: {source[:60]!r}") from None
    evaluated = row.find("policy_evaluated")
    if evaluated is None:
        raise ReportError("row/policy_evaluated is missing")
    identifiers = record.find("identifiers")
    if identifiers is None:
        raise ReportError("record/identifiers is missing")
    reasons = []
    for reason in evaluated.findall("reason")[:MAX_AUTH_RESULTS]:
        kind = _text(reason, "type")
        comment = _text(reason, "comment", required=False)
        reasons.append(f"{kind}: {comment}" if comment else kind)
    auth = record.find("auth_results")
    dkim, spf = [], []
    if auth is not None:
        for item in auth.findall("dkim")[:MAX_AUTH_RESULTS]:
            dkim.append(ev.DmarcDkimResult(
                domain=_lower(_text(item, "domain")), selector=_text(item, "selector", False),
                result=_lower(_text(item, "result")), human_result=_text(item, "human_result", False)))
        for item in auth.findall("spf")[:MAX_AUTH_RESULTS]:
            spf.append(ev.DmarcSpfResult(
                domain=_lower(_text(item, "domain")), scope=_lower(_text(item, "scope", False)),
                result=_lower(_text(item, "result"))))
    return ev.DmarcReportRow(
        source_ip=source_ip,
        count=_int(row, "count"),
        disposition=_lower(_text(evaluated, "disposition")),
        dkim=_lower(_text(evaluated, "dkim")),
        spf=_lower(_text(evaluated, "spf")),
        reasons=reasons,
        header_from=_lower(_text(identifiers, "header_from")),
        envelope_from=_lower(_text(identifiers, "envelope_from", False)),
        envelope_to=_lower(_text(identifiers, "envelope_to", False)),
        dkim_results=dkim,
        spf_results=spf,
    )


def parse_report(xml: bytes) -> tuple[dict, list[ev.DmarcReportRow]]:
    """The report's fields and rows; :class:`ReportError` when it is not an aggregate report."""
    try:
        root = safe_xml.fromstring(xml, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise ReportError(f"XML refused: {type(exc).__name__} (DTDs and entities are not read)") from None
    except safe_xml.ParseError as exc:
        raise ReportError(f"not well-formed XML: {exc}") from None
    _strip_namespaces(root)
    if root.tag != "feedback":
        raise ReportError(f"not a DMARC aggregate report: the root element is <{str(root.tag)[:40]}>, not <feedback>")
    metadata = root.find("report_metadata")
    published = root.find("policy_published")
    if metadata is None:
        raise ReportError("feedback/report_metadata is missing")
    if published is None:
        raise ReportError("feedback/policy_published is missing")
    dates = metadata.find("date_range")
    if dates is None:
        raise ReportError("report_metadata/date_range is missing")
    org_name, report_id = _text(metadata, "org_name"), _text(metadata, "report_id")
    begin, end = _time(dates, "begin"), _time(dates, "end")
    if end < begin:
        raise ReportError(f"date_range ends ({end:%Y-%m-%d %H:%M}) before it begins ({begin:%Y-%m-%d %H:%M})")
    fields = dict(
        report_key=f"{org_name}!{report_id}",
        org_name=org_name,
        email=_text(metadata, "email"),
        extra_contact_info=_text(metadata, "extra_contact_info", required=False),
        report_id=report_id,
        date_begin=begin,
        date_end=end,
        report_errors=[e.text.strip()[:MAX_VALUE] for e in metadata.findall("error")[:MAX_AUTH_RESULTS]
                       if e.text and e.text.strip()],
        policy_published=ev.DmarcPolicyPublished(
            domain=_lower(_text(published, "domain")).rstrip("."),
            adkim=_lower(_text(published, "adkim", False)),
            aspf=_lower(_text(published, "aspf", False)),
            p=_lower(_text(published, "p")),
            sp=_lower(_text(published, "sp", False)),
            pct=_int(published, "pct", required=False, high=100),
            fo=_text(published, "fo", False),
        ),
    )
    return fields, [_row(record) for record in root.findall("record")]


# -- the message ---------------------------------------------------------------------


def read_reports(raw: bytes, limit: int) -> list[Report | Unreadable]:
    """Every report in a message, each parsed or the reason it could not be (part 0: none found)."""
    try:
        message = message_from_bytes(raw, policy=compat32)
        candidates = _candidates(message)
    except Exception as exc:  # a stranger's MIME: whatever the parser trips on is a reason, not a crash
        return [Unreadable(0, f"unreadable MIME: {type(exc).__name__}: {exc}", len(raw), None, None)]
    if not candidates:
        return [Unreadable(0, "no aggregate report attached (no gzip, zip or XML part)", len(raw), None, None)]
    out: list[Report | Unreadable] = []
    for number, part in enumerate(candidates, 1):
        name, ctype = part.get_filename(), part.get_content_type()
        payload = None
        try:
            payload = part.get_payload(decode=True) or b""
            for member, xml in inflate(payload, limit):
                fields, rows = parse_report(xml)
                out.append(Report(fields, rows, member or name, ctype))
        except ReportError as exc:
            out.append(Unreadable(number, str(exc), len(payload) if payload is not None else None, name, ctype))
        except Exception as exc:  # noqa: BLE001 - never let one report stop the others
            out.append(Unreadable(number, f"{type(exc).__name__}: {exc}"[:MAX_VALUE],
                                  len(payload) if payload is not None else None, name, ctype))
    return out


def from_address(raw: bytes) -> str | None:
    """The address in the message's From: field, if one can be read."""
    try:
        value = message_from_bytes(raw, policy=compat32).get("From")
    except Exception:  # noqa: BLE001
        return None
    address = parseaddr(str(value))[1] if value else ""
    return address[:MAX_VALUE] or None


def split_rows(rows: list[ev.DmarcReportRow], budget: int = PART_BYTES) -> list[list[ev.DmarcReportRow]]:
    """Rows in groups whose JSON stays within ``budget`` bytes (at least one group, maybe empty)."""
    groups: list[list[ev.DmarcReportRow]] = [[]]
    used = 0
    for row in rows:
        size = len(row.model_dump_json())
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(row)
        used += size
    return groups
