"""A syslog collector for the export tests: RFC 5425 (TLS) with octet-counted frames (RFC 6587).

An asyncio TLS server on its own thread that keeps every complete message
in arrival order. A frame cut short by a dying sender is counted in
``torn`` and dropped, as a real collector does.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time


class Collector:
    def __init__(self, context: ssl.SSLContext, host: str = "127.0.0.1"):
        self.context = context
        self.host = host
        self.port = 0
        self.messages: list[bytes] = []
        self.connections = 0
        self.torn = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> "Collector":
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(ready)), name="syslog-collector",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the collector did not start")
        return self

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._serve, self.host, 0, ssl=self.context)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        await self._stopping.wait()
        server.close()
        self._abort_all()
        await server.wait_closed()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.wait(tasks, timeout=5) if tasks else None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    length = await reader.readuntil(b" ")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        self.torn += 1
                    return
                try:
                    message = await reader.readexactly(int(length[:-1]))
                except asyncio.IncompleteReadError:
                    self.torn += 1
                    return
                with self._lock:
                    self.messages.append(message)
        except (ConnectionError, ssl.SSLError, ValueError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    def received(self) -> list[bytes]:
        with self._lock:
            return list(self.messages)

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    def drop_connections(self) -> None:
        """Reset every open connection, as a collector restarting would; return once they are gone."""
        async def drop():
            self._abort_all()
            while self._writers:
                await asyncio.sleep(0.01)

        asyncio.run_coroutine_threadsafe(drop(), self._loop).result(10)

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
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)
