"""Attachment type: attachments whose names mark them as programs or scripts.

The extension is taken from the last dot, so ``invoice.pdf.exe`` is an
``exe``; a name with trailing dots or spaces (a Windows trick that hides the
real extension) is read as Windows would read it.
"""

from __future__ import annotations

from pydantic import Field

from schemas.events import CheckResult
from streams.checks import CheckSettings
from streams.message import Message

NAME = "attachment_type"
DESCRIPTION = "Attachments with executable or script file types"

# Programs, scripts and shortcuts Windows runs on a double click: the list
# mail administrators commonly block outright.
_EXECUTABLE = [
    "ade", "adp", "app", "bat", "chm", "cmd", "com", "cpl", "exe", "hta", "inf", "ins", "isp",
    "jar", "js", "jse", "lib", "lnk", "mde", "msc", "msi", "msp", "mst", "pif", "ps1", "reg",
    "scr", "sct", "shb", "sys", "vb", "vbe", "vbs", "vxd", "wsc", "wsf", "wsh",
]

BLOCKED = "ATTACHMENT_TYPE_BLOCKED"
CLEAN = "ATTACHMENT_TYPE_OK"


class Settings(CheckSettings):
    blocked_extensions: list[str] = Field(default_factory=lambda: list(_EXECUTABLE))


DEFAULT_ACTIONS = {BLOCKED: "quarantine"}


def extension(filename: str) -> str:
    name = filename.rstrip(". ").lower()
    return name.rsplit(".", 1)[1] if "." in name else ""


async def check(message: Message, settings: Settings) -> list[CheckResult]:
    blocked = {e.lower().lstrip(".") for e in settings.blocked_extensions}
    found = sorted({p.filename for p in message.attachments() if extension(p.filename) in blocked})
    if found:
        return [CheckResult(check=NAME, name=BLOCKED, outcome="hit", detail="blocked file type", evidence=found)]
    return [CheckResult(check=NAME, name=CLEAN, outcome="pass")]
