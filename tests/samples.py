"""Test samples, built at test time: EICAR, archives, Office documents with macros.

Nothing here is stored in git as a file: scanners on developer machines and
mirrors would flag it, and no package ships a macro-bearing Office document.
The documents are built from the specifications instead:

- a minimal Compound File writer (MS-CFB, version 3, 512-byte sectors, with a
  mini stream for small streams) for .doc/.xls/.ppt and OOXML's vbaProject.bin;
  olefile only rewrites streams in place and cannot create a file, so it is
  hand-written here;
- a VBA project (MS-OVBA 2.3): the PROJECT stream, VBA/_VBA_PROJECT, the
  VBA/dir stream and one module stream, compressed with literal-only chunks
  (MS-OVBA 2.4.1: a valid CompressedContainer that never uses copy tokens);
- a PowerPoint 97-2003 presentation (MS-PPT): the Current User and PowerPoint
  Document streams, the VBA project storage zlib-compressed in a record of the
  latter, found through the persist object directory;
- an Excel 4 (XLM) macro sheet: a BIFF8 Workbook stream whose BOUNDSHEET
  record declares an "Excel 4.0 macro sheet";
- OOXML packages (.docm, .xlsm, .pptm): a zip with [Content_Types].xml and the
  vbaProject.bin part.

The VBA in these samples does nothing harmful: it names an auto-exec trigger
and suspicious calls (which is what a scanner reports) but is never run.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib

# The EICAR test file (eicar.org): every antivirus reports it; it is harmless.
# Kept split so this source file itself is not "infected".
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

# Matched by Bulwark.Test.Sample in infra/clamav/signatures/bulwark.ndb.
TEST_SAMPLE_MARKER = b"BULWARK-TEST-SAMPLE:" + b"not-malware:5f3c9a1e"

# -- archives ---------------------------------------------------------------------


def zipped(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def nested_zip(name: str, data: bytes, depth: int) -> bytes:
    """`data` inside `depth` zips, each inside the next."""
    for level in range(depth):
        data = zipped({name: data})
        name = f"level{depth - level}.zip"
    return data


def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def encrypted_zip(files: dict[str, bytes], password: bytes = b"infected") -> bytes:
    """A zip with traditional PKWARE encryption (APPNOTE 6.1), stored members.

    The standard library reads these but cannot write them; the cipher is a
    dozen lines, so it is written out here rather than adding a dependency.
    """

    def crc(value: int, byte: int) -> int:
        return zlib.crc32(bytes([byte]), value ^ 0xFFFFFFFF) ^ 0xFFFFFFFF

    out, central = io.BytesIO(), io.BytesIO()
    for name, data in files.items():
        k0, k1, k2 = 0x12345678, 0x23456789, 0x34567890

        def update(byte: int) -> None:
            nonlocal k0, k1, k2
            k0 = crc(k0, byte)
            k1 = ((k1 + (k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
            k2 = crc(k2, k1 >> 24)

        def encrypt(plain: bytes) -> bytes:
            result = bytearray()
            for byte in plain:
                temp = (k2 | 2) & 0xFFFF
                result.append(byte ^ (((temp * (temp ^ 1)) >> 8) & 0xFF))
                update(byte)
            return bytes(result)

        for byte in password:
            update(byte)
        checksum = zlib.crc32(data)
        # 12-byte encryption header; its last byte is the CRC's high byte.
        header = bytes(range(11)) + bytes([checksum >> 24])
        body = encrypt(header) + encrypt(data)
        fname = name.encode()
        offset = out.tell()
        flags, method, time, date = 0x0001, 0, 0, 0x21
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, method, time, date,
                              checksum, len(body), len(data), len(fname), 0) + fname + body)
        central.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, method, time, date,
                                  checksum, len(body), len(data), len(fname), 0, 0, 0, 0, 0, offset) + fname)
    directory = central.getvalue()
    start = out.tell()
    out.write(directory)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(files), len(files), len(directory), start, 0))
    return out.getvalue()


# -- MS-CFB: a minimal Compound File writer ------------------------------------------

_FREESECT, _ENDOFCHAIN, _FATSECT, _NOSTREAM = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF
_SECTOR, _MINI_SECTOR, _MINI_CUTOFF = 512, 64, 4096
_STORAGE, _STREAM, _ROOT = 1, 2, 5

WORD97_CLSID = "00020906-0000-0000-C000-000000000046"
EXCEL97_CLSID = "00020820-0000-0000-C000-000000000046"
POWERPOINT97_CLSID = "64818D10-4F9B-11CF-86EA-00AA00B929E8"


def _clsid(text: str | None) -> bytes:
    if not text:
        return bytes(16)
    import uuid

    return uuid.UUID(text).bytes_le


def compound_file(tree: dict, root_clsid: str | None = None) -> bytes:
    """A Compound File from a tree of {name: bytes (a stream) | dict (a storage)}."""
    entries: list[dict] = [{"name": "Root Entry", "type": _ROOT, "clsid": _clsid(root_clsid)}]

    def add(children: dict) -> int:
        """Add one storage's children; return the id at the root of their sibling tree."""
        ids = []
        for name, value in children.items():
            entry = {"name": name, "type": _STORAGE if isinstance(value, dict) else _STREAM,
                     "clsid": bytes(16), "value": value}
            entries.append(entry)
            ids.append(len(entries) - 1)
        for i in ids:
            if entries[i]["type"] == _STORAGE:
                entries[i]["child"] = add(entries[i].pop("value"))
        # MS-CFB 2.6.4: siblings are ordered by name length, then by the
        # upper-cased name; a balanced binary tree of them, all black.
        ids.sort(key=lambda i: (len(entries[i]["name"]), entries[i]["name"].upper()))

        def balance(lo: int, hi: int) -> int:
            if lo >= hi:
                return _NOSTREAM
            mid = (lo + hi) // 2
            entries[ids[mid]]["left"] = balance(lo, mid)
            entries[ids[mid]]["right"] = balance(mid + 1, hi)
            return ids[mid]

        return balance(0, len(ids))

    entries[0]["child"] = add(tree)

    sectors: list[bytes] = []
    fat: list[int] = []

    def allocate(data: bytes, chain_fat: list[int], size: int, chain_sectors: list[bytes]) -> int:
        count = max(1, -(-len(data) // size))
        start = len(chain_sectors)
        for n in range(count):
            chain_sectors.append(data[n * size:(n + 1) * size].ljust(size, b"\0"))
            chain_fat.append(start + n + 1 if n < count - 1 else _ENDOFCHAIN)
        return start

    mini_sectors: list[bytes] = []
    minifat: list[int] = []
    for entry in entries[1:]:
        if entry["type"] != _STREAM:
            continue
        data = entry["value"]
        entry["size"] = len(data)
        if len(data) < _MINI_CUTOFF:
            entry["start"] = allocate(data, minifat, _MINI_SECTOR, mini_sectors)
        else:
            entry["start"] = allocate(data, fat, _SECTOR, sectors)
    mini_stream = b"".join(mini_sectors)
    entries[0]["size"] = len(mini_stream)
    entries[0]["start"] = allocate(mini_stream, fat, _SECTOR, sectors) if mini_stream else _ENDOFCHAIN
    minifat_bytes = struct.pack(f"<{len(minifat)}I", *minifat)
    first_minifat = allocate(minifat_bytes, fat, _SECTOR, sectors) if minifat else _ENDOFCHAIN
    minifat_count = -(-len(minifat_bytes) // _SECTOR)

    def dir_entry(entry: dict | None) -> bytes:
        if entry is None:
            return bytes(64) + struct.pack("<HBBIII", 0, 0, 0, _NOSTREAM, _NOSTREAM, _NOSTREAM) + bytes(48)
        name = entry["name"].encode("utf-16-le")
        assert len(name) <= 62, entry["name"]
        return (name.ljust(64, b"\0")
                + struct.pack("<HBBIII", len(name) + 2, entry["type"], 1, entry.get("left", _NOSTREAM),
                              entry.get("right", _NOSTREAM), entry.get("child", _NOSTREAM))
                + entry["clsid"] + bytes(4 + 16)
                + struct.pack("<IQ", entry.get("start", 0), entry.get("size", 0)))

    padded = entries + [None] * (-len(entries) % (_SECTOR // 128))
    first_dir = allocate(b"".join(dir_entry(e) for e in padded), fat, _SECTOR, sectors)

    # The FAT describes every sector, its own included.
    fat_count = 1
    while (len(sectors) + fat_count) > fat_count * (_SECTOR // 4):
        fat_count += 1
    assert fat_count <= 109, "sample too large for a header-only DIFAT"
    fat_start = len(sectors)
    fat += [_FATSECT] * fat_count
    fat += [_FREESECT] * (fat_count * (_SECTOR // 4) - len(fat))
    fat_bytes = struct.pack(f"<{len(fat)}I", *fat)
    sectors += [fat_bytes[n * _SECTOR:(n + 1) * _SECTOR] for n in range(fat_count)]

    difat = [fat_start + n for n in range(fat_count)] + [_FREESECT] * (109 - fat_count)
    header = (b"\xD0\xCF\x11\xE0\xA1\xB1\x1A\xE1" + bytes(16)
              + struct.pack("<HHHHH6xIIIIIIIII", 0x003E, 0x0003, 0xFFFE, 9, 6, 0, fat_count, first_dir, 0,
                            _MINI_CUTOFF, first_minifat, minifat_count, _ENDOFCHAIN, 0)
              + struct.pack("<109I", *difat))
    assert len(header) == _SECTOR
    return header + b"".join(sectors)


# -- MS-OVBA: a VBA project ------------------------------------------------------------

AUTO_OPEN_MACRO = (
    'Attribute VB_Name = "Module1"\r\n'
    "Sub AutoOpen()\r\n"
    "    ' A test sample: names what scanners look for and does nothing harmful.\r\n"
    '    Dim target As String: target = "calc.exe"\r\n'
    "    If False Then Shell target, vbHide\r\n"
    "End Sub\r\n"
    "Sub Document_Open()\r\n"
    "    AutoOpen\r\n"
    "End Sub\r\n"
    "Sub Workbook_Open()\r\n"
    "    If False Then CreateObject(\"WScript.Shell\").Run \"calc.exe\"\r\n"
    "End Sub\r\n"
)


def ovba_compress(data: bytes) -> bytes:
    """A CompressedContainer (MS-OVBA 2.4.1.1.1) of one literal-only chunk.

    Each token sequence is a zero flag byte and up to eight literal bytes, so
    a chunk holds at most 3640 decompressed bytes; one chunk keeps the
    decompressed size unambiguous for every reader.
    """
    assert len(data) <= 3640, "sample too large for one literal-only chunk"
    body = bytearray()
    for i in range(0, len(data), 8):
        body.append(0)
        body += data[i:i + 8]
    # Header: size - 3 in 12 bits, signature 0b011, flag 1 = compressed.
    header = (len(body) + 2 - 3) | (0b011 << 12) | 0x8000
    return b"\x01" + struct.pack("<H", header) + bytes(body)


def _record(record_id: int, data: bytes) -> bytes:
    return struct.pack("<HI", record_id, len(data)) + data


def _dir_stream(module: str, project: str = "VBAProject") -> bytes:
    name, uname = module.encode("latin-1"), module.encode("utf-16-le")
    records = [
        _record(0x0001, struct.pack("<I", 1)),       # PROJECTSYSKIND: 32-bit Windows
        _record(0x0002, struct.pack("<I", 0x409)),   # PROJECTLCID
        _record(0x0014, struct.pack("<I", 0x409)),   # PROJECTLCIDINVOKE
        _record(0x0003, struct.pack("<H", 1252)),    # PROJECTCODEPAGE
        _record(0x0004, project.encode("latin-1")),  # PROJECTNAME
        _record(0x0005, b"") + _record(0x0040, b""),  # PROJECTDOCSTRING (+ unicode)
        _record(0x0006, b"") + _record(0x003D, b""),  # PROJECTHELPFILEPATH (+ second path)
        _record(0x0007, struct.pack("<I", 0)),       # PROJECTHELPCONTEXT
        _record(0x0008, struct.pack("<I", 0)),       # PROJECTLIBFLAGS
        struct.pack("<HIIH", 0x0009, 4, 1, 0),       # PROJECTVERSION (Reserved=4, major, minor)
        _record(0x000C, b"") + _record(0x003C, b""),  # PROJECTCONSTANTS (+ unicode)
        _record(0x000F, struct.pack("<H", 1)),       # PROJECTMODULES: one module
        _record(0x0013, struct.pack("<H", 0xFFFF)),  # PROJECTCOOKIE
        _record(0x0019, name),                       # MODULENAME
        _record(0x0047, uname),                      # MODULENAMEUNICODE
        _record(0x001A, name) + _record(0x0032, uname),  # MODULESTREAMNAME (+ unicode)
        _record(0x001C, b"") + _record(0x0048, b""),  # MODULEDOCSTRING (+ unicode)
        _record(0x0031, struct.pack("<I", 0)),       # MODULEOFFSET: source at offset 0
        _record(0x001E, struct.pack("<I", 0)),       # MODULEHELPCONTEXT
        _record(0x002C, struct.pack("<H", 0xFFFF)),  # MODULECOOKIE
        _record(0x0021, b""),                        # MODULETYPE: procedural
        _record(0x002B, b""),                        # module TERMINATOR
        _record(0x0010, b""),                        # dir TERMINATOR
    ]
    return b"".join(records)


def vba_storage(source: str = AUTO_OPEN_MACRO, module: str = "Module1") -> dict:
    """The children of a VBA project root storage (MS-OVBA 2.2.1)."""
    project = (
        'ID="{9A1D3B2C-0000-4000-8000-00000000B0B0}"\r\n'
        f"Module={module}\r\n"
        'Name="VBAProject"\r\n'
        'HelpContextID="0"\r\n'
        'VersionCompatible32="393222000"\r\n'
        "\r\n[Host Extender Info]\r\n"
        "&H00000001={3832D640-CF90-11CF-8E43-00A0C911005A};VBE;&H00000000\r\n"
    ).encode("latin-1")
    return {
        "PROJECT": project,
        "PROJECTwm": module.encode("latin-1") + b"\0" + module.encode("utf-16-le") + b"\0\0\0\0",
        "VBA": {
            # Reserved1 0x61CC, Version 0xFFFF (Office recompiles), Reserved2/3.
            "_VBA_PROJECT": b"\xCC\x61\xFF\xFF\x00\x00\x00",
            "dir": ovba_compress(_dir_stream(module)),
            module: ovba_compress(source.encode("latin-1")),
        },
    }


def vba_project_bin(source: str = AUTO_OPEN_MACRO) -> bytes:
    """OOXML's vbaProject.bin: a Compound File whose root is the VBA project."""
    return compound_file(vba_storage(source))


def word97_with_vba(source: str = AUTO_OPEN_MACRO) -> bytes:
    """A Word 97-2003 .doc carrying a VBA project in its Macros storage."""
    word_document = struct.pack("<HH", 0xA5EC, 0x00C1) + bytes(508)  # FIB magic and version
    return compound_file({"WordDocument": word_document, "1Table": bytes(512), "Macros": vba_storage(source)},
                         root_clsid=WORD97_CLSID)


def excel97_with_vba(source: str = AUTO_OPEN_MACRO) -> bytes:
    """An Excel 97-2003 .xls carrying a VBA project in _VBA_PROJECT_CUR."""
    return compound_file({"Workbook": _biff_workbook(macro_sheet=False), "_VBA_PROJECT_CUR": vba_storage(source)},
                         root_clsid=EXCEL97_CLSID)


def plain_word97() -> bytes:
    """A Word 97-2003 .doc without macros (a false-positive check)."""
    word_document = struct.pack("<HH", 0xA5EC, 0x00C1) + bytes(508)
    return compound_file({"WordDocument": word_document, "1Table": bytes(512)}, root_clsid=WORD97_CLSID)


# -- MS-PPT: a PowerPoint 97-2003 presentation --------------------------------------------


def _ppt_record(rec_type: int, data: bytes, version: int = 0, instance: int = 0) -> bytes:
    """A RecordHeader (MS-PPT 2.3.1: recVer 4 bits, recInstance 12 bits, recType, recLen) and its data."""
    return struct.pack("<HHI", version | instance << 4, rec_type, len(data)) + data


def _ppt_document_container(vba_persist_id: int | None) -> bytes:
    """A DocumentContainer (MS-PPT 2.4.1): its DocumentAtom, the VBA reference, its EndDocumentAtom.

    With `vba_persist_id`, a DocInfoListContainer (2.4.4) holds a VBAInfoContainer
    (recLen 0x14) whose VBAInfoAtom names the persist object of the VBA project
    storage (a VbaProjectStg, 2.10.40). Only what a VBA lookup reads is here:
    the text styles, drawing group and master list a presentation also needs
    are left out.
    """
    document_atom = _ppt_record(0x03E9, struct.pack(  # RT_Document atom, recVer 1
        "<iiiiiiIIHHBBBB",
        5760, 4320,  # slideSize: 10 x 7.5 inches in master units (576 per inch)
        4320, 5760,  # notesSize
        1, 2,        # serverZoom: 1/2
        0, 0,        # notesMasterPersistIdRef, handoutMasterPersistIdRef: none
        1, 0,        # firstSlideNumber, slideSizeType: SS_Screen
        0, 0, 0, 1,  # fSaveWithFonts, fOmitTitlePlace, fRightToLeft, fShowComments
    ), version=1)
    children = [document_atom]
    if vba_persist_id is not None:
        # persistIdRef, fHasMacros = 1, version = 2
        vba_info_atom = _ppt_record(0x0400, struct.pack("<III", vba_persist_id, 1, 2), version=2)
        vba_info = _ppt_record(0x03FF, vba_info_atom, version=0xF, instance=1)  # RT_VbaInfo
        children.append(_ppt_record(0x07D0, vba_info, version=0xF))  # RT_List: DocInfoListContainer
    children.append(_ppt_record(0x03EA, b""))  # RT_EndDocumentAtom
    return _ppt_record(0x03E8, b"".join(children), version=0xF)


def _powerpoint_document(objects: list[bytes]) -> tuple[bytes, int]:
    """The PowerPoint Document stream (MS-PPT 2.1.2) of one user edit, and that edit's offset.

    The persist objects get persist ids 1, 2, ... in order (1 is the
    DocumentContainer, docPersistIdRef); then a PersistDirectoryAtom (2.3.4)
    maps those ids to their stream offsets and a UserEditAtom (2.3.3) points at
    it. The Current User stream points at the UserEditAtom: that chain is how a
    reader resolves a persist id (2.1.2, "Part 1").
    """
    stream, offsets = b"", []
    for record in objects:
        offsets.append(len(stream))
        stream += record
    directory_offset = len(stream)
    # PersistDirectoryEntry (2.3.5): persistId 20 bits, cPersist 12 bits, then the offsets.
    entry = struct.pack("<I", 1 | len(offsets) << 20) + struct.pack(f"<{len(offsets)}I", *offsets)
    stream += _ppt_record(0x1772, entry)  # RT_PersistDirectoryAtom
    edit_offset = len(stream)
    stream += _ppt_record(0x0FF5, struct.pack(  # RT_UserEditAtom
        "<IHBBIIIIHH",
        0,                 # lastSlideIdRef: no slides
        0, 0, 3,           # version, minorVersion 0, majorVersion 3
        0,                 # offsetLastEdit: this is the only edit
        directory_offset,  # offsetPersistDirectory
        1,                 # docPersistIdRef: the DocumentContainer
        len(offsets) + 1,  # persistIdSeed: above every persist id in use
        1, 0,              # lastView: VT_SlideView; unused
    ))
    return stream, edit_offset


def _current_user(edit_offset: int, user: bytes = b"Bulwark") -> bytes:
    """The Current User stream (MS-PPT 2.1.1): one CurrentUserAtom (2.3.2)."""
    return _ppt_record(0x0FF6, struct.pack(  # RT_CurrentUserAtom
        "<IIIHHBBH",
        0x14,         # size
        0xE391C05F,   # headerToken: not encrypted
        edit_offset,  # offsetToCurrentEdit
        len(user),    # lenUserName
        0x03F4, 3, 0, 0,  # docFileVersion, majorVersion, minorVersion, unused
    ) + user + struct.pack("<I", 8) + user.decode("latin-1").encode("utf-16-le"))  # relVersion, unicode name


def _powerpoint97(objects: list[bytes]) -> bytes:
    document, edit_offset = _powerpoint_document(objects)
    return compound_file({"Current User": _current_user(edit_offset), "PowerPoint Document": document},
                         root_clsid=POWERPOINT97_CLSID)


def powerpoint97_with_vba(source: str = AUTO_OPEN_MACRO) -> bytes:
    """A PowerPoint 97-2003 .ppt carrying a VBA project.

    MS-PPT keeps the VBA project storage inside the PowerPoint Document
    stream: a VbaProjectStgCompressedAtom (2.10.42; record type
    RT_ExternalOleObjectStg 0x1011, shared with ExOleObjStg, recInstance 1 =
    compressed) holds decompressedSize and the zlib (RFC 1950) compressed
    storage, itself a Compound File whose root is the VBA project (MS-OVBA
    2.2.1, as in OOXML's vbaProject.bin). It is persist object 2, which the
    DocumentContainer's VBAInfoAtom references. Persist objects are top-level
    records of the stream, which is where ClamAV looks: it walks the top-level
    record headers and inflates every 0x1011 record it meets.
    """
    storage = vba_project_bin(source)
    vba_stg = _ppt_record(0x1011, struct.pack("<I", len(storage)) + zlib.compress(storage), instance=1)
    return _powerpoint97([_ppt_document_container(vba_persist_id=2), vba_stg])


def plain_powerpoint97() -> bytes:
    """A PowerPoint 97-2003 .ppt without macros (a false-positive check)."""
    return _powerpoint97([_ppt_document_container(vba_persist_id=None)])


# -- Excel 4 (XLM) macro sheet ----------------------------------------------------------


def _biff(record_type: int, data: bytes) -> bytes:
    return struct.pack("<HH", record_type, len(data)) + data


def _bof(substream: int) -> bytes:
    # BIFF8 BOF: version 0x0600, substream type, build, year, history flags, lowest version.
    return _biff(0x0809, struct.pack("<HHHHII", 0x0600, substream, 0x0DBB, 0x07CC, 0, 0x0006))


def _biff_workbook(macro_sheet: bool) -> bytes:
    """A Workbook stream: globals naming one sheet, then that sheet's substream.

    With `macro_sheet` the sheet is an Excel 4.0 macro sheet (BOUNDSHEET dt=1),
    hidden, with an Auto_Open label: the classic XLM dropper layout.
    """
    sheet_name = b"Macro1" if macro_sheet else b"Sheet1"

    def boundsheet(position: int) -> bytes:
        hidden, kind = (1, 1) if macro_sheet else (0, 0)
        return _biff(0x0085, struct.pack("<IBB", position, hidden, kind)
                     + bytes([len(sheet_name), 0]) + sheet_name)

    label = b""
    if macro_sheet:
        # LBL (NAME) record: built-in name 0x01 (Auto_Open), pointing at the sheet.
        label = _biff(0x0018, struct.pack("<HBBHHH4B", 0x0020, 0, 1, 0, 0, 0, 0, 0, 0, 0) + b"\x00\x01")
    globals_ = [_bof(0x0005), _biff(0x0042, struct.pack("<H", 1252)), None, label, _biff(0x000A, b"")]
    size = sum(len(r) for r in globals_ if r is not None) + len(boundsheet(0))
    globals_[2] = boundsheet(size)
    sheet = [_bof(0x0040 if macro_sheet else 0x0010), _biff(0x000A, b"")]
    return b"".join(globals_) + b"".join(sheet)


def excel97_with_xlm() -> bytes:
    """An Excel 97-2003 .xls whose only macros are an Excel 4.0 (XLM) macro sheet."""
    return compound_file({"Workbook": _biff_workbook(macro_sheet=True)}, root_clsid=EXCEL97_CLSID)


# -- OOXML packages -------------------------------------------------------------------------

_OOXML = {
    "docm": ("word", "document", "application/vnd.ms-word.document.macroEnabled.main+xml"),
    "xlsm": ("xl", "workbook", "application/vnd.ms-excel.sheet.macroEnabled.main+xml"),
    "pptm": ("ppt", "presentation", "application/vnd.ms-powerpoint.presentation.macroEnabled.main+xml"),
}


def ooxml_with_vba(kind: str, source: str = AUTO_OPEN_MACRO) -> bytes:
    """A macro-enabled OOXML package (docm, xlsm, pptm) carrying vbaProject.bin."""
    folder, main, content_type = _OOXML[kind]
    types = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Default Extension="bin" ContentType="application/vnd.ms-office.vbaProject"/>'
        f'<Override PartName="/{folder}/{main}.xml" ContentType="{content_type}"/>'
        "</Types>"
    )
    rels = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/'
        f'officeDocument" Target="{folder}/{main}.xml"/></Relationships>'
    )
    part_rels = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        '<Relationship Id="rId9" Type="http://schemas.microsoft.com/office/2006/relationships/vbaProject"'
        ' Target="vbaProject.bin"/></Relationships>'
    )
    return zipped({
        "[Content_Types].xml": types.encode(),
        "_rels/.rels": rels.encode(),
        f"{folder}/{main}.xml": f'<?xml version="1.0"?><{main}/>'.encode(),
        f"{folder}/_rels/{main}.xml.rels": part_rels.encode(),
        f"{folder}/vbaProject.bin": vba_project_bin(source),
    })
