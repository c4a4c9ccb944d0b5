"""ClamAV: a small asyncio client for clamd, and the one scan of a message that
the antivirus and macros checks share.

The client speaks clamd's INSTREAM protocol over TCP (``man clamd``): the
command ``zINSTREAM\\0``, then chunks of <4-byte big-endian length><bytes>, a
zero-length chunk, and one reply line ``stream: OK`` / ``stream: <name>
FOUND`` / ``<reason> ERROR``. Connections are kept in clamd's session mode
(``zIDSESSION\\0``: each reply prefixed with the command's number), one
command at a time on each, so a message does not cost clamd two connections
and two threads' hand-offs (see ``Session``).

It is written here rather than taken from aioclamd (1.1.0, the asyncio client
on PyPI) because aioclamd sends 1 KiB chunks and hops to a thread for each:
measured on this project's clamd, a 10 MB message took 1.8 s through aioclamd
and 0.33 s with 64 KiB chunks. The protocol is three lines of framing.

A message is scanned whole (clamd parses the MIME structure itself) and each
decoded part on its own (so a part clamd's mail parser misreads is still
scanned); clamd unpacks archives in both. Scans run concurrently, at most
``BULWARK_CLAMD_MAX_CONCURRENT_SCANS`` at a time per worker, each bounded by
``BULWARK_CLAMD_SCAN_TIMEOUT_SECONDS``.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
import weakref
from dataclasses import dataclass, field
from typing import Literal

from bulwark.settings import Settings
from streams.message import Message

#: Bytes per INSTREAM chunk; clamd's StreamMaxLength bounds the total, not this.
CHUNK = 64 * 1024

# What ClamAV's heuristic names mean to the gateway. Office macros are
# reported as Heuristics.OLE2.ContainsMacros.VBA / .XLM (AlertOLE2Macros);
# an encrypted archive or document as Heuristics.Encrypted.* (AlertEncrypted);
# a file past MaxFileSize, MaxRecursion... as Heuristics.Limits.Exceeded.*
# (AlertExceedsMax).
MACRO_PREFIX = "Heuristics.OLE2.ContainsMacros"
UNSCANNABLE_PREFIXES = ("Heuristics.Encrypted.", "Heuristics.Limits.Exceeded")
#: clamd's reply when a stream is longer than its StreamMaxLength.
SIZE_LIMIT_REPLY = "INSTREAM size limit exceeded"

Kind = Literal["clean", "virus", "macro", "unscannable", "failed"]


class ClamdError(Exception):
    """clamd could not be reached or did not answer as its protocol says."""


@dataclass(frozen=True)
class Reply:
    """clamd's answer about one scanned target (the message or one part)."""

    target: str
    kind: Kind
    #: The signature (virus or heuristic name) when something was found,
    #: else clamd's error or ours.
    detail: str | None = None


def classify(target: str, line: str) -> Reply:
    """A Reply from one INSTREAM reply line (NUL and whitespace stripped)."""
    body = line.split(": ", 1)[1] if line.startswith("stream: ") else line
    if body == "OK":
        return Reply(target, "clean")
    if body.endswith(" FOUND"):
        name = body.removesuffix(" FOUND").strip()
        if name.startswith(MACRO_PREFIX):
            return Reply(target, "macro", name)
        if name.startswith(UNSCANNABLE_PREFIXES):
            return Reply(target, "unscannable", name)
        return Reply(target, "virus", name)
    if body.endswith(" ERROR"):
        reason = body.removesuffix(" ERROR").strip()
        if reason.startswith(SIZE_LIMIT_REPLY):
            return Reply(target, "unscannable", f"larger than clamd's StreamMaxLength ({reason})")
        return Reply(target, "failed", f"clamd: {reason}")
    return Reply(target, "failed", f"unexpected reply from clamd: {line[:200]!r}")


class _Stale(Exception):
    """A kept session that clamd had closed (its IdleTimeout, a restart) before this command."""


@dataclass(eq=False)
class Session:
    """One connection to clamd in session mode (``zIDSESSION``), one command at a time.

    A connection per scan cost the worker 4 % of its CPU (connect, close, and
    the hand-offs around them; py-spy --gil under bench/e2e_relay.py) and
    clamd a thread start per scan, two per message. clamd numbers the
    replies of a session (``3: stream: OK``); with one command outstanding
    the number only confirms which command is answered. clamd closes an
    idle session after its IdleTimeout (30 s by default) and a session
    after an ERROR reply; a session is reused only if it is idle for less
    than ``SESSION_IDLE_SECONDS`` and its last reply was not an error.
    """

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    commands: int = 0
    idle_since: float = 0.0

    def close(self) -> None:
        self.writer.close()


#: A kept session idle longer than this is closed instead of reused (clamd's
#: IdleTimeout is 30 s by default; the template sets none).
SESSION_IDLE_SECONDS = 10.0
#: Sessions kept open per clamd and event loop, at most (more are closed when done).
MAX_IDLE_SESSIONS = 16

_sessions: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, list[Session]]]" = (
    weakref.WeakKeyDictionary()
)


class Clamd:
    """One clamd over TCP, its connections kept open in session mode between commands."""

    def __init__(self, host: str, port: int, timeout: float):
        self.host, self.port, self.timeout = host, port, timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> "Clamd":
        return cls(settings.clamd_host, settings.clamd_port, settings.clamd_scan_timeout_seconds)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _kept(self) -> list[Session]:
        return _sessions.setdefault(asyncio.get_running_loop(), {}).setdefault(self.address, [])

    async def _open(self) -> Session:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            raise ClamdError(f"cannot connect to clamd at {self.address}: {exc.strerror or exc}") from None
        writer.write(b"zIDSESSION\0")
        return Session(reader, writer)

    def _take(self) -> Session | None:
        kept, now = self._kept(), time.monotonic()
        while kept:
            session = kept.pop()
            if now - session.idle_since < SESSION_IDLE_SECONDS and not session.reader.at_eof():
                return session
            session.close()
        return None

    def _keep(self, session: Session) -> None:
        kept = self._kept()
        if len(kept) >= MAX_IDLE_SESSIONS:
            session.close()
            return
        session.idle_since = time.monotonic()
        kept.append(session)

    async def _exchange(self, command: bytes, payload: bytes | None = None) -> str:
        session = self._take()
        if session is not None:
            try:
                return await self._on(session, command, payload)
            except _Stale:
                pass  # closed by clamd while kept: once more, on a new connection
        return await self._on(await self._open(), command, payload)

    async def _on(self, session: Session, command: bytes, payload: bytes | None) -> str:
        """Send one command on the session and read its reply; keep the session if it is still good."""
        session.commands += 1
        reused = session.commands > 1
        kept = False
        try:
            line = await self._command_on(session, command, payload, reused)
            number, sep, reply = line.partition(": ")
            if not sep or number != str(session.commands):
                raise ClamdError(f"clamd at {self.address} answered out of turn: {line[:200]!r}")
            if not reply.endswith("ERROR"):  # clamd ends a session after an error
                self._keep(session)
                kept = True
            return reply
        finally:
            if not kept:
                session.close()

    async def _command_on(self, session: Session, command: bytes, payload: bytes | None, reused: bool) -> str:
        reader, writer = session.reader, session.writer

        async def read_reply() -> bytes:
            reply = b""
            # One NUL-terminated line; bounded in case clamd sends no NUL.
            while b"\0" not in reply and len(reply) < 64 * 1024:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                reply += chunk
            return reply

        # Read while writing: clamd answers "INSTREAM size limit exceeded" and
        # closes as soon as a stream passes its StreamMaxLength; the next write
        # then fails, and a reader that starts only afterwards would see the
        # write's error instead of clamd's reply.
        reading = asyncio.ensure_future(read_reply())
        cut_short = False
        try:
            try:
                writer.write(b"z" + command + b"\0")
                if payload is not None:
                    for start in range(0, len(payload), CHUNK):
                        if reading.done():
                            break
                        chunk = payload[start:start + CHUNK]
                        writer.write(struct.pack("!L", len(chunk)) + chunk)
                        await writer.drain()
                    else:
                        writer.write(struct.pack("!L", 0))
                await writer.drain()
            except (BrokenPipeError, ConnectionResetError):
                cut_short = True  # clamd stopped reading; its reply, if it arrived, says why
            reply = await reading
        except OSError as exc:
            if reused:  # no reply on a kept session: closed while idle (a scan is safe to send again)
                raise _Stale() from None
            if cut_short:
                # A reset can discard clamd's reply: say what is most likely.
                raise ClamdError(f"clamd at {self.address} closed the connection while the data was sent "
                                 f"(longer than its StreamMaxLength, or clamd stopped)") from None
            raise ClamdError(f"clamd at {self.address} dropped the connection: {exc}") from None
        finally:
            reading.cancel()
        if not reply:
            if reused:
                raise _Stale()
            raise ClamdError(f"clamd at {self.address} closed the connection without a reply")
        return reply.split(b"\0", 1)[0].rstrip(b"\n").decode("utf-8", "replace")

    async def command(self, command: str) -> str:
        try:
            return await asyncio.wait_for(self._exchange(command.encode()), self.timeout)
        except asyncio.TimeoutError:
            raise ClamdError(f"clamd at {self.address} did not answer {command} within {self.timeout:g}s") from None

    async def version(self) -> str:
        """Engine, signature database version and date: ``ClamAV 1.4.6/27500/Tue ...``."""
        return await self.command("VERSION")

    async def instream(self, target: str, data: bytes) -> Reply:
        """Scan bytes; every outcome, including clamd's failure, is a Reply."""
        try:
            line = await asyncio.wait_for(self._exchange(b"INSTREAM", data), self.timeout)
        except asyncio.TimeoutError:
            return Reply(target, "failed", f"clamd at {self.address} did not finish within {self.timeout:g}s")
        except ClamdError as exc:
            return Reply(target, "failed", str(exc))
        return classify(target, line)


# -- the shared scan of one message --------------------------------------------------


@dataclass
class MessageScan:
    """Every target's reply, and the signature database they were judged with."""

    replies: list[Reply] = field(default_factory=list)
    version: str | None = None

    def of_kind(self, kind: Kind) -> list[Reply]:
        return [r for r in self.replies if r.kind == kind]


_limits: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, asyncio.Semaphore]]" = (
    weakref.WeakKeyDictionary()
)


def _semaphore(limit: int) -> asyncio.Semaphore:
    # Module level: the bound is per worker process, across all messages
    # judged at once (the content agent runs several). A semaphore belongs to
    # one event loop, hence one per loop (tests run several).
    per_loop = _limits.setdefault(asyncio.get_running_loop(), {})
    if limit not in per_loop:
        per_loop[limit] = asyncio.Semaphore(limit)
    return per_loop[limit]


#: How long a VERSION reply stands for the database the scans use.
VERSION_SECONDS = 1.0
_versions: dict[str, tuple[float, str]] = {}


async def _recent_version(clamd: Clamd) -> str:
    """clamd's VERSION, asked at most once a second per clamd.

    Asking it with every message cost a second connection to clamd (and a
    clamd thread) per message, when each command had a connection of its
    own: about 7 % of the worker's CPU at 20 msg/s in py-spy. A database
    that clamd reloads is stamped at most a second late; the stamp was never
    exact to the message (VERSION and the scans are separate commands).
    """
    cached = _versions.get(clamd.address)
    now = time.monotonic()
    if cached is not None and now - cached[0] < VERSION_SECONDS:
        return cached[1]
    version = await clamd.version()
    _versions[clamd.address] = (now, version)
    return version


def targets(message: Message) -> list[tuple[str, bytes]]:
    """The whole message, then each decoded part (identical payloads once)."""
    found = [("message", message.raw)]
    seen = {hashlib.sha256(message.raw).digest()}
    for number, part in enumerate(message.parts(), start=1):
        digest = hashlib.sha256(part.payload).digest()
        if not part.payload or digest in seen:
            continue
        seen.add(digest)
        found.append((part.filename or f"part {number} ({part.content_type})", part.payload))
    return found


async def _scan(message: Message, clamd: Clamd, limit: int) -> MessageScan:
    semaphore = _semaphore(limit)

    async def one(target: str, data: bytes) -> Reply:
        async with semaphore:
            return await clamd.instream(target, data)

    async def version() -> str | None:
        try:
            return await _recent_version(clamd)
        except ClamdError:
            return None

    replies, db_version = await asyncio.gather(
        asyncio.gather(*(one(t, d) for t, d in targets(message))), version()
    )
    return MessageScan(list(replies), db_version)


async def scan(message: Message) -> MessageScan:
    """The clamd scan of this message, run once however many checks ask for it."""
    task = message.shared.get("clamav")
    if task is None:
        settings = Settings.from_env()
        task = asyncio.ensure_future(_scan(message, Clamd.from_settings(settings),
                                           settings.clamd_max_concurrent_scans))
        message.shared["clamav"] = task
    # Shielded: one check timing out must not cancel the scan another awaits.
    return await asyncio.shield(task)
