"""Documents for the DLP tests, written at test time with the libraries that write them.

Each carries a test card number or IBAN (the networks' and banks' published
test numbers, valid checksums, no account behind them).
"""

from __future__ import annotations

import io
import zipfile

VISA = "4111 1111 1111 1111"
VISA_BAD = "4111 1111 1111 1112"
IBAN = "DE89 3704 0044 0532 0130 00"
IBAN_BAD = "DE89 3704 0044 0532 0130 01"


def docx(text: str) -> bytes:
    import docx as python_docx

    document = python_docx.Document()
    document.add_heading("Quarterly figures", level=1)
    for line in text.splitlines():
        document.add_paragraph(line)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def xlsx(rows: list[list[str]]) -> bytes:
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    for row in rows:
        sheet.append(row)
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def pdf(text: str) -> bytes:
    from fpdf import FPDF

    document = FPDF()
    document.add_page()
    document.set_font("helvetica", size=12)
    for line in text.splitlines():
        document.cell(0, 10, line, new_x="LMARGIN", new_y="NEXT")
    return bytes(document.output())


def zip_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return out.getvalue()


def zip_bomb(expanded_mib: int = 8) -> bytes:
    """One member of zeros that compresses about a thousand to one."""
    return zip_of({"zeros.txt": b"\0" * (expanded_mib * 1024 * 1024)})


def nested_zip(depth: int, inner: bytes, name: str = "card.txt") -> bytes:
    data, member = inner, name
    for level in range(depth):
        data, member = zip_of({member: data}), f"level{level}.zip"
    return data
