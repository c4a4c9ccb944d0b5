"""Macros: Office documents carrying VBA or Excel 4 (XLM) macros.

The guide's "Enable Macro Detection in Microsoft Office Documents": such
documents are flagged as infected and refused (``when_found: refuse``, the
default) or quarantined. Two independent detectors, one result:

- ClamAV's OLE2 heuristic (``Heuristics.OLE2.ContainsMacros.VBA``/``.XLM``),
  from the clamd scan the antivirus check also reads (one scan serves both);
  clamd unpacks every archive format it knows;
- oletools' olevba, which says *what* the macros are: VBA or XLM, their
  auto-exec triggers (AutoOpen, Document_Open, Auto_Open...) and suspicious
  keywords (Shell, CreateObject...). It reads OLE files (.doc, .xls, .ppt) and
  OOXML packages (.docm, .xlsm, .pptm) by their content, whatever the file is
  called, and this check opens zip archives for it, within limits.

Results: ``MACRO_FOUND`` (hit; evidence per document), ``MACROS_UNSCANNABLE``
(an archive this check could not open: encrypted or over a limit; quarantine),
``MACROS_CLEAN`` (pass), ``MACROS_SKIPPED`` (an exclusion applied; pass).
"""

from __future__ import annotations

import asyncio
import io
import logging
import lzma
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from schemas.events import CheckResult
from streams import clamav
from streams.checks._exclusions import ScanExclusions, exclusion
from streams.message import Message

log = logging.getLogger(__name__)

NAME = "macros"
DESCRIPTION = "Office documents with VBA or Excel 4 (XLM) macros, in archives too"

FOUND = "MACRO_FOUND"
UNSCANNABLE = "MACROS_UNSCANNABLE"
CLEAN = "MACROS_CLEAN"
SKIPPED = "MACROS_SKIPPED"

WHEN_FOUND = {"refuse": "reject", "quarantine": "quarantine"}

OLE_MAGIC = b"\xD0\xCF\x11\xE0\xA1\xB1\x1A\xE1"
ZIP_MAGIC = b"PK\x03\x04"
#: What reading a damaged archive member raises: a corrupt compressed stream
#: is zlib's or lzma's own error, and a corrupt offset a ValueError (found by tests/test_fuzz_mime.py).
UNREADABLE_MEMBER = (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError, ValueError,
                     zlib.error, lzma.LZMAError)
#: At most this many keywords of one kind per document in the evidence.
MAX_KEYWORDS = 10


class Settings(ScanExclusions):
    when_found: Literal["refuse", "quarantine"] = Field(
        default="refuse", description="What happens to a message with macros: refuse it or quarantine it"
    )
    use_clamav: bool = Field(default=True, description="Also count ClamAV's OLE2 macro heuristic")
    max_archive_depth: int = Field(default=5, ge=0, le=20, description="Zip archives opened inside zip archives")
    max_archive_members: int = Field(default=1000, ge=1, description="Members read from one message's archives")
    max_member_bytes: int = Field(
        default=50 * 1024 * 1024, ge=1, description="Largest archive member read, after decompression"
    )
    max_expanded_bytes: int = Field(
        default=200 * 1024 * 1024, ge=1, description="Bytes read from one message's archives, after decompression"
    )


DEFAULT_ACTIONS = {FOUND: "reject", UNSCANNABLE: "quarantine"}


def actions(settings: Settings) -> dict[str, str]:
    return {FOUND: WHEN_FOUND[settings.when_found]}


@dataclass
class Findings:
    """What the olevba pass found across a message's attachments."""

    evidence: list[str] = field(default_factory=list)
    documents: list[str] = field(default_factory=list)
    unscannable: list[str] = field(default_factory=list)
    members_read: int = 0
    #: Across the message: an archive of archives must not multiply the limits at each level.
    bytes_read: int = 0


def is_ooxml(archive: zipfile.ZipFile) -> bool:
    names = {n.lower() for n in archive.namelist()}
    return "[content_types].xml" in names or any(n.endswith("vbaproject.bin") for n in names)


def inspect_document(name: str, data: bytes) -> list[str]:
    """olevba's evidence for one OLE or OOXML document; empty when it has no macros."""
    # Imported here: olevba is slow to import and warns (pyparsing) on import.
    from oletools.olevba import VBA_Parser

    parser = VBA_Parser(name, data=data)
    try:
        if not parser.detect_macros():
            return []
        kinds = [k for k, present in (("VBA", parser.contains_vba_macros), ("XLM", parser.contains_xlm_macros))
                 if present]
        evidence = [f"{name}: {' and '.join(kinds) or 'VBA'} macros"]
        by_type: dict[str, list[str]] = {}
        for kind, keyword, _description in parser.analyze_macros():
            if kind in ("AutoExec", "Suspicious", "IOC"):
                by_type.setdefault(kind, [])
                if keyword not in by_type[kind]:
                    by_type[kind].append(keyword)
        labels = {"AutoExec": "auto-exec", "Suspicious": "suspicious", "IOC": "IOC"}
        for kind, label in labels.items():
            words = by_type.get(kind, [])
            if words:
                more = f" (+{len(words) - MAX_KEYWORDS} more)" if len(words) > MAX_KEYWORDS else ""
                evidence.append(f"{name}: {label} {', '.join(words[:MAX_KEYWORDS])}{more}")
        return evidence
    finally:
        parser.close()


def inspect(name: str, data: bytes, settings: Settings, found: Findings, depth: int = 0) -> None:
    """Look for macros in one attachment by its content, opening zip archives."""
    if data.startswith(OLE_MAGIC):
        _document(name, data, found)
        return
    if not data.startswith(ZIP_MAGIC):
        # olevba would read any other text as VBA source; only Office
        # containers are documents here.
        return
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError):
        return
    except (NotImplementedError, OSError, EOFError) as exc:
        # An archive in a form zipfile cannot read ("zip file version 24.5",
        # found by tests/fuzz_atheris.py): it may hold a document, unseen.
        found.unscannable.append(f"{name}: cannot be opened ({exc})")
        return
    with archive:
        if is_ooxml(archive):
            _document(name, data, found)
            return
        if depth >= settings.max_archive_depth:
            found.unscannable.append(f"{name}: archives nested deeper than {settings.max_archive_depth}")
            return
        for info in archive.infolist():
            if info.is_dir():
                continue
            member = f"{name}/{info.filename}"
            if found.members_read >= settings.max_archive_members:
                found.unscannable.append(f"{name}: more than {settings.max_archive_members} archive members")
                return
            found.members_read += 1
            if info.flag_bits & 0x1:
                found.unscannable.append(f"{member}: encrypted")
                continue
            if info.file_size > settings.max_member_bytes:
                found.unscannable.append(f"{member}: larger than {settings.max_member_bytes} bytes")
                continue
            if found.bytes_read > settings.max_expanded_bytes:
                return  # reported where the budget ran out
            budget = settings.max_expanded_bytes - found.bytes_read
            try:
                with archive.open(info) as stream:
                    # Read one byte past the limit: the declared size may lie.
                    content = stream.read(min(settings.max_member_bytes, budget) + 1)
            except UNREADABLE_MEMBER as exc:
                found.unscannable.append(f"{member}: cannot be read ({exc})")
                continue
            found.bytes_read += len(content)
            if len(content) > settings.max_member_bytes:
                found.unscannable.append(f"{member}: larger than {settings.max_member_bytes} bytes")
                continue
            if len(content) > budget:
                found.unscannable.append(f"{name}: archives expand past {settings.max_expanded_bytes} bytes")
                return
            inspect(member, content, settings, found, depth + 1)


def _document(name: str, data: bytes, found: Findings) -> None:
    try:
        evidence = inspect_document(name, data)
    except Exception as exc:  # a document olevba cannot parse is not proof of macros
        log.info("olevba could not parse %s: %s", name, exc)
        return
    if evidence:
        found.documents.append(name)
        found.evidence.extend(evidence)


def inspect_message(message: Message, settings: Settings) -> Findings:
    found = Findings()
    for number, part in enumerate(message.parts(), start=1):
        if part.payload:
            inspect(part.filename or f"part {number} ({part.content_type})", part.payload, settings, found)
    return found


def results(found: Findings, scan: clamav.MessageScan | None) -> list[CheckResult]:
    """The named results from olevba's findings and ClamAV's heuristic (pure)."""
    evidence = list(found.evidence)
    documents = list(found.documents)
    version = None
    if scan is not None:
        version = scan.version
        replies = scan.of_kind("macro")
        # The whole message's reply repeats what a part's reply says better.
        if any(r.target != "message" for r in replies):
            replies = [r for r in replies if r.target != "message"]
        for reply in replies:
            evidence.append(f"{reply.target}: ClamAV {reply.detail}")
            if reply.target != "message":
                documents.append(reply.target)
    out = []
    if evidence:
        where = ", ".join(dict.fromkeys(documents)) or "the message"
        out.append(CheckResult(check=NAME, name=FOUND, outcome="hit", detail=f"Office macros in {where}",
                               evidence=evidence, version=version))
    if found.unscannable:
        out.append(CheckResult(check=NAME, name=UNSCANNABLE, outcome="fail",
                               detail="archive contents could not be inspected for macros",
                               evidence=found.unscannable))
    return out or [CheckResult(check=NAME, name=CLEAN, outcome="pass", version=version)]


async def check(message: Message, settings: Settings) -> list[CheckResult]:
    reason = exclusion(message, settings)
    if reason:
        return [CheckResult(check=NAME, name=SKIPPED, outcome="pass", detail=f"not inspected: {reason}")]
    # olevba is synchronous and CPU-bound: keep it off the event loop.
    olevba = asyncio.to_thread(inspect_message, message, settings)
    if settings.use_clamav:
        found, scan = await asyncio.gather(olevba, clamav.scan(message))
    else:
        found, scan = await olevba, None
    return results(found, scan)
