"""A syslog collector for the export tests: RFC 5425 (TLS) with octet-counted frames (RFC 6587).

A thread per connection, blocking sockets, every complete message kept in
arrival order. A frame cut short by a dying sender is counted in ``torn``
and dropped, as a real collector does.

``pause()`` stops reading, as a collector that stalls does: with a small
receive buffer (``receive_buffer``), the sender's TCP soon stops being
acknowledged, which is how the tests catch an exporter holding a written
but unacknowledged, so uncommitted, batch.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time


class Collector:
    def __init__(self, context: ssl.SSLContext, host: str = "127.0.0.1", receive_buffer: int | None = None):
        self.context = context
        self.host = host
        self.receive_buffer = receive_buffer
        self.port = 0
        self.messages: list[bytes] = []
        self.connections = 0
        self.torn = 0
        self._lock = threading.Lock()
        self._reading = threading.Event()
        self._reading.set()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._open: dict[threading.Thread, socket.socket] = {}
        self._acceptor: threading.Thread | None = None

    def start(self) -> "Collector":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.receive_buffer:  # before listen(): accepted sockets inherit it
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        listener.bind((self.host, 0))
        listener.listen(8)
        listener.settimeout(0.2)
        self._listener, self.port = listener, listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="syslog-collector", daemon=True)
        self._acceptor.start()
        return self

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                raw, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(raw,), name="syslog-connection", daemon=True)
            with self._lock:
                self.connections += 1
                self._open[thread] = raw
            thread.start()

    def _serve(self, raw: socket.socket) -> None:
        buffer = b""
        sock = raw
        try:
            raw.settimeout(30)
            sock = conn = self.context.wrap_socket(raw, server_side=True)  # raw is detached: its fd is conn's
            with self._lock:
                self._open[threading.current_thread()] = conn
            conn.settimeout(0.2)
            while not self._stopping.is_set():
                if not self._reading.wait(0.2):
                    continue
                try:
                    data = conn.recv(4096)
                except (TimeoutError, socket.timeout):
                    continue
                if not data:
                    break
                buffer += data
                while True:
                    length, space, rest = buffer.partition(b" ")
                    if not space or not length.isdigit() or len(rest) < int(length):
                        break
                    with self._lock:
                        self.messages.append(rest[:int(length)])
                    buffer = rest[int(length):]
        except (OSError, ssl.SSLError):
            pass
        finally:
            if buffer:
                with self._lock:
                    self.torn += 1
            sock.close()
            with self._lock:
                self._open.pop(threading.current_thread(), None)

    def received(self) -> list[bytes]:
        with self._lock:
            return list(self.messages)

    def pause(self) -> None:
        self._reading.clear()

    def resume(self) -> None:
        self._reading.set()

    def pending_bytes(self) -> int:
        """Bytes waiting in the kernel's receive queues of the open connections (read by no one yet)."""
        import fcntl
        import termios

        total = 0
        with self._lock:
            sockets = list(self._open.values())
        for raw in sockets:
            try:
                total += struct.unpack("i", fcntl.ioctl(raw.fileno(), termios.FIONREAD, b"\0" * 4))[0]
            except OSError:
                pass
        return total

    def wait_idle(self, timeout: float = 30) -> None:
        """Until every connection has ended (its sender closed it, or died and its kernel closed it)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                open_now = list(self._open)
            if not open_now:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(open_now)} connection(s) still open after {timeout:g}s")
            time.sleep(0.05)

    def drop_connections(self) -> None:
        """Reset every open connection, as a collector restarting would; return once they are gone."""
        with self._lock:
            sockets = list(self._open.values())
        for raw in sockets:
            try:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.wait_idle(10)

    def wait_for(self, predicate, timeout: float = 10, what: str = "messages") -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.received()
            if predicate(got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} at the collector within {timeout:g}s ({len(got)} received)")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stopping.set()
        self._reading.set()
        if self._acceptor is not None:
            self._acceptor.join(5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            threads = list(self._open)
        for thread in threads:
            thread.join(5)
