"""Where an export writes, and what "written" means for each.

``write`` returns only when a batch is as durable as the destination allows;
the exporter commits its Kafka offsets after that, never before:

- a file: appended and fsync'd (the data and the file's size are on disk);
- syslog over TLS (RFC 5425): sent, and every byte acknowledged by the
  collector's TCP (the kernel's send queue is empty and the connection
  was not reset). Syslog has no application-level acknowledgement, so a
  collector that crashes after its kernel took the bytes but before it
  wrote them loses them; that is the limit of the protocol, not of the
  exporter;
- standard output: written and flushed (whatever reads the pipe decides).

A failed write raises ``OutputError``; the exporter backs off and writes
the same batch again (over a new connection), so a collector may receive a
message twice, never lose one.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import ssl
import struct
import sys
import termios
import time
from pathlib import Path

from .syslog import octet_counted

log = logging.getLogger(__name__)


class OutputError(Exception):
    """The batch was not (certainly) written; write it again."""


class FileOutput:
    """Appends one line per record, fsync'd before ``write`` returns.

    Follows rotation as logrotate does it (rename, then a new file): when
    the path names another file, or none, it is opened again. A line torn by
    a crash mid-write was never committed (offsets are committed after the
    fsync of whole lines), so it is cut off when the file is opened; the
    records it held are written again from the committed offsets.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)  # read: the torn-line check
        try:
            self._cut_torn_line(fd)
            if created:  # make the new directory entry itself durable
                directory = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
        except BaseException:
            os.close(fd)
            raise
        st = os.fstat(fd)
        self._fd, self._inode = fd, (st.st_dev, st.st_ino)

    def _cut_torn_line(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        end = size
        while end > 0:
            start = max(0, end - 65536)
            chunk = os.pread(fd, end - start, start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        log.warning("%s ended in a torn line (a crash mid-write); cut %d bytes, to be written again",
                    self.path, size - end)
        os.ftruncate(fd, end)
        os.fsync(fd)

    def _rotated(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._inode

    def write(self, payloads: list[bytes]) -> None:
        try:
            if self._fd is not None and self._rotated():
                self.close()
            if self._fd is None:
                self._open()
            data = memoryview(b"".join(p + b"\n" for p in payloads))
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
            os.fsync(self._fd)
        except OSError as exc:
            self.close()
            raise OutputError(f"{self.path}: {exc}") from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __str__(self) -> str:
        return str(self.path)


class StdoutOutput:
    """One line per record on standard output, flushed: for a pipe to a forwarder, or a look."""

    def write(self, payloads: list[bytes]) -> None:
        try:
            sys.stdout.buffer.write(b"".join(p + b"\n" for p in payloads))
            sys.stdout.buffer.flush()
        except OSError as exc:
            raise OutputError(f"standard output: {exc}") from exc

    def close(self) -> None:
        pass

    def __str__(self) -> str:
        return "standard output"


def tls_context(ca_file: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context that validates the collector: its chain and its name (RFC 5425 section 5.2)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 9662 updates RFC 5425 to TLS 1.2 at least
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


#: tcp_info's first byte is the connection state (linux/tcp.h).
_TCP_ESTABLISHED, _TCP_CLOSE_WAIT = 1, 8


class SyslogTlsOutput:
    """RFC 5424 messages, octet-counted, over TLS to a collector (RFC 5425; port 6514 by default).

    Connects on first use and after any failure. A batch counts as written
    once the collector's TCP has acknowledged all of it: on Linux the
    socket's unacknowledged byte count (SIOCOUTQ) is watched until it is
    zero, and the connection must still be up (a reset empties the send
    queue too). Elsewhere the flush of the TLS write is all there is.
    """

    def __init__(self, host: str, port: int, context: ssl.SSLContext, server_name: str | None = None,
                 timeout: float = 30.0):
        self.host, self.port = host, port
        self.context = context
        self.server_name = server_name or host
        self.timeout = timeout
        self._sock: ssl.SSLSocket | None = None

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            sock = self.context.wrap_socket(raw, server_hostname=self.server_name)
        except BaseException:
            raw.close()
            raise
        log.info("connected to %s:%d (%s, %s)", self.host, self.port, sock.version(), sock.cipher()[0])
        return sock

    def write(self, payloads: list[bytes]) -> None:
        try:
            if self._sock is not None and self._peer_closed():
                log.warning("the collector closed the connection; connecting again")
                self.close()
            if self._sock is None:
                self._sock = self._connect()
            self._sock.sendall(b"".join(octet_counted(p) for p in payloads))
            self._wait_acknowledged()
        except (OSError, ssl.SSLError, OutputError) as exc:
            self.close()
            raise OutputError(f"{self.host}:{self.port}: {exc}") from exc

    def _peer_closed(self) -> bool:
        """A collector never sends application data: anything readable is its close (or a session ticket)."""
        sock = self._sock
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        sock.setblocking(False)
        try:
            return sock.recv(4096) == b""
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return False  # only TLS records that carry no data (TLS 1.3 session tickets)
        except (OSError, ssl.SSLError):
            return True
        finally:
            sock.settimeout(self.timeout)

    def _wait_acknowledged(self) -> None:
        sock = self._sock
        deadline = time.monotonic() + self.timeout
        pause = 0.001
        while True:
            try:
                unacknowledged = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            except OSError as exc:
                if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                    return  # not Linux: the flush is all there is
                raise
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OutputError(os.strerror(error))
            if unacknowledged == 0:
                break
            if time.monotonic() > deadline:
                raise OutputError(f"{unacknowledged} bytes not acknowledged after {self.timeout:g}s")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        if not hasattr(socket, "TCP_INFO"):
            return
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        if state not in (_TCP_ESTABLISHED, _TCP_CLOSE_WAIT):
            raise OutputError(f"connection lost (TCP state {state}) before the collector acknowledged everything")

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def __str__(self) -> str:
        return f"tls://{self.host}:{self.port}"
