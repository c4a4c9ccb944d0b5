"""The text a message carries, wherever it is: subject, bodies, documents, archives.

Data leaves in attachments as often as in the body, so DLP reads the text of
PDF (pypdf), DOCX and PPTX (their XML, read directly), XLSX (openpyxl), CSV
and plain text, and of all of those inside ZIP archives.

Archives are opened under limits, because an archive is the classic way to
hide a payload or to exhaust a scanner: nesting depth, member count, the
expanded size of each member and of the whole, and the compression ratio. An
archive that exceeds them is a *finding* (a decompression bomb, reported as
such), never a crash and never a silent skip. A document that cannot be read
(encrypted, corrupt) is reported as unscannable: DLP cannot vouch for it.
"""

from __future__ import annotations

import html
import io
import re
import zipfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streams.message import Message


@dataclass(frozen=True)
class Limits:
    max_depth: int = 3
    #: Members read, and bytes they expand to, in all of one message's archives.
    max_members: int = 1000
    max_file_bytes: int = 25 * 1024 * 1024
    max_expanded_bytes: int = 100 * 1024 * 1024
    max_ratio: int = 100
    #: Below this size a high compression ratio is normal (a page of zeros).
    ratio_floor_bytes: int = 1024 * 1024
    max_text_chars: int = 5_000_000


@dataclass(frozen=True)
class Text:
    #: Where it came from: "subject", "body", or the attachment's name (with the path inside archives).
    where: str
    text: str


@dataclass(frozen=True)
class Problem:
    kind: str  # "bomb" or "unscannable"
    where: str
    detail: str


@dataclass
class Extracted:
    texts: list[Text] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    #: Archive members read and bytes they expanded to, across the whole
    #: message: the limits hold for the message, not for each archive, or
    #: an archive of archives multiplies them at every level.
    members_read: int = 0
    expanded_bytes: int = 0

    def add(self, where: str, text: str, limits: Limits) -> None:
        if text.strip():
            self.texts.append(Text(where, text[: limits.max_text_chars]))


class _Bomb(Exception):
    pass


# -- plain text and HTML ---------------------------------------------------------


def decode_text(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", "replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # Latin-1 maps every byte to a character, so digits survive whatever the real charset was.
        return data.decode("latin-1")


def looks_like_text(data: bytes) -> bool:
    head = data[:8192]
    return b"\x00" not in head or head.startswith((b"\xff\xfe", b"\xfe\xff"))


class _HtmlText(HTMLParser):
    """Visible text of an HTML body; tags become spaces so "4111<b>1111</b>" stays two words apart."""

    _SKIP = {"script", "style", "head", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self._skipping += 1
        self.chunks.append(" ")

    def handle_endtag(self, tag):
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1
        self.chunks.append("\n" if tag in ("p", "div", "br", "tr", "li") else " ")

    def handle_data(self, data):
        if not self._skipping:
            self.chunks.append(data)


def html_to_text(markup: str) -> str:
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    # Collapse the spaces tags left behind, but keep line structure for keyword windows.
    return re.sub(r"[ \t\u00a0]+", " ", "".join(parser.chunks))


# -- Office Open XML, PDF ---------------------------------------------------------

_OOXML_TEXT = re.compile(r"<(?:w|a):t(?:\s[^>]*)?>([^<]*)</(?:w|a):t>|</(?:w|a):p>|<w:tab/>|<w:br/>")
_DOCX_PARTS = re.compile(r"word/(?:document|header\d*|footer\d*|footnotes|endnotes|comments)\.xml")
_PPTX_PARTS = re.compile(r"ppt/(?:slides/slide\d+|notesSlides/notesSlide\d+)\.xml")


def ooxml_text(xml: str) -> str:
    """Text runs of WordprocessingML or DrawingML, paragraphs as lines.

    Read with a regular expression rather than an XML parser: only text runs
    are wanted, and this cannot be made to expand entities (billion laughs).
    """
    out = []
    for match in _OOXML_TEXT.finditer(xml):
        if match.group(1) is not None:
            out.append(html.unescape(match.group(1)))
        else:
            out.append("\n" if match.group(0).endswith("p>") else " ")
    return "".join(out)


def _xlsx_text(data: bytes) -> str:
    import openpyxl

    book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    lines = []
    try:
        for sheet in book.worksheets:
            for row in sheet.iter_rows(values_only=True):
                cells = [_cell(v) for v in row if v is not None]
                if cells:
                    lines.append(" ; ".join(cells))
    finally:
        book.close()
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _pdf_text(data: bytes, where: str, out: Extracted, limits: Limits) -> None:
    import pypdf
    from pypdf.errors import PdfReadError

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            out.problems.append(Problem("unscannable", where, "encrypted PDF"))
            return
        pages = []
        for page in reader.pages:
            pages.append(page.extract_text() or "")
            if sum(map(len, pages)) > limits.max_text_chars:
                break
    except getattr(pypdf.errors, "LimitReachedError", _Bomb) as exc:
        out.problems.append(Problem("bomb", where, f"PDF stream beyond pypdf's limits: {exc}"))
        return
    except (PdfReadError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        out.problems.append(Problem("unscannable", where, f"unreadable PDF: {type(exc).__name__}"))
        return
    out.add(where, "\n".join(pages), limits)


# -- ZIP containers (archives and Office documents alike) ------------------------


def _open_zip(data: bytes, where: str, depth: int, limits: Limits) -> zipfile.ZipFile:
    if depth > limits.max_depth:
        raise _Bomb(f"archives nested deeper than {limits.max_depth}")
    archive = zipfile.ZipFile(io.BytesIO(data))
    members = archive.infolist()
    if len(members) > limits.max_members:
        raise _Bomb(f"{len(members)} members, more than {limits.max_members}")
    declared = sum(m.file_size for m in members)
    if declared > limits.max_expanded_bytes:
        raise _Bomb(f"expands to {declared} bytes, more than {limits.max_expanded_bytes}")
    for m in members:
        if m.file_size > limits.ratio_floor_bytes and m.file_size > limits.max_ratio * max(m.compress_size, 1):
            raise _Bomb(f"{m.filename} expands {m.file_size // max(m.compress_size, 1)}:1, "
                        f"more than {limits.max_ratio}:1")
    return archive


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, limits: Limits, out: Extracted) -> bytes:
    out.members_read += 1
    if out.members_read > limits.max_members:
        raise _Bomb(f"more than {limits.max_members} archive members in the message")
    budget = limits.max_expanded_bytes - out.expanded_bytes
    if budget <= 0:
        raise _Bomb(f"the message's archives expand past {limits.max_expanded_bytes} bytes")
    # The declared size is the archive's claim; read at most the limit so a
    # member that lies about its size cannot expand past it.
    with archive.open(member) as stream:
        data = stream.read(min(limits.max_file_bytes, budget) + 1)
    out.expanded_bytes += len(data)
    if len(data) > limits.max_file_bytes:
        raise _Bomb(f"{member.filename} expands past {limits.max_file_bytes} bytes")
    if len(data) > budget:
        raise _Bomb(f"the message's archives expand past {limits.max_expanded_bytes} bytes")
    return data


def _zip_contents(data: bytes, where: str, out: Extracted, limits: Limits, depth: int) -> None:
    archive = _open_zip(data, where, depth, limits)
    names = set(archive.namelist())
    encrypted = [m.filename for m in archive.infolist() if m.flag_bits & 0x1]
    if encrypted:
        out.problems.append(Problem("unscannable", where, f"encrypted archive members: {', '.join(encrypted[:5])}"))
    if "word/document.xml" in names or "ppt/presentation.xml" in names:
        parts = _DOCX_PARTS if "word/document.xml" in names else _PPTX_PARTS
        text = [ooxml_text(decode_text(_read_member(archive, archive.getinfo(n), limits, out)))
                for n in sorted(names) if parts.fullmatch(n)]
        out.add(where, "\n".join(text), limits)
        return
    if "xl/workbook.xml" in names:
        # openpyxl expands the workbook's parts itself: their declared sizes
        # (zipfile reads no more than those) count against the message's budget.
        out.expanded_bytes += sum(m.file_size for m in archive.infolist())
        if out.expanded_bytes > limits.max_expanded_bytes:
            raise _Bomb(f"the message's archives expand past {limits.max_expanded_bytes} bytes")
        out.add(where, _xlsx_text(data), limits)
        return
    for member in archive.infolist():
        if member.is_dir() or member.flag_bits & 0x1:
            continue
        extract_file(f"{where}/{member.filename}", _read_member(archive, member, limits, out), out, limits,
                     depth + 1)


def extract_file(name: str, data: bytes, out: Extracted, limits: Limits, depth: int = 0) -> None:
    """Add the text of one file (an attachment, or a member of an archive) to ``out``."""
    if len(data) > limits.max_file_bytes:
        out.problems.append(Problem("unscannable", name, f"larger than {limits.max_file_bytes} bytes"))
        return
    lower = name.lower()
    try:
        if data.startswith(b"%PDF-"):
            _pdf_text(data, name, out, limits)
        elif data.startswith(b"PK\x03\x04") or data.startswith(b"PK\x05\x06"):
            _zip_contents(data, name, out, limits, depth)
        elif lower.endswith((".html", ".htm")):
            out.add(name, html_to_text(decode_text(data)), limits)
        elif looks_like_text(data):  # .txt, .csv, .json, source code, an unnamed text part
            out.add(name, decode_text(data), limits)
        # Anything else (images, executables) carries no text DLP can read.
    except _Bomb as exc:
        out.problems.append(Problem("bomb", name, str(exc)))
    except zipfile.BadZipFile as exc:
        out.problems.append(Problem("unscannable", name, f"corrupt archive: {exc}"))
    except (zipfile.LargeZipFile, NotImplementedError, RuntimeError, OSError, EOFError) as exc:
        out.problems.append(Problem("unscannable", name, f"{type(exc).__name__}: {exc}"))
    except Exception as exc:  # openpyxl and the like raise their own errors on damaged files
        out.problems.append(Problem("unscannable", name, f"unreadable ({type(exc).__name__})"))


def extract_message(message: "Message", limits: Limits, attachments: bool = True) -> Extracted:
    out = Extracted()
    out.add("subject", message.subject, limits)
    for index, part in enumerate(message.parts()):
        if part.filename:
            if attachments:
                extract_file(part.filename, part.payload, out, limits)
        elif part.content_type == "text/html":
            out.add("body (html)", html_to_text(decode_text(part.payload)), limits)
        elif part.content_type.startswith("text/"):
            out.add("body", decode_text(part.payload), limits)
        elif attachments and part.payload:
            # An unnamed non-text part (application/octet-stream, application/pdf...) is still an attachment.
            extract_file(f"part {index + 1} ({part.content_type})", part.payload, out, limits)
    return out
