"""The Faust workers' windowed tables, as the console asks for them.

The counters live in the workers' RocksDB tables, not in the console: it asks
a worker's web server (``streams/web.py``) over HTTPS, pinning the gateway's
certificate, as ``bulwark tables`` does; the worker routes a question about
one key to the worker that owns it.
"""

from __future__ import annotations

import urllib.parse

import aiohttp


class TablesUnavailable(Exception):
    """No worker answered (the page says so; the rest of it still works)."""


class StreamsTables:
    def __init__(self, base_url: str, cafile):
        self.base_url = base_url.rstrip("/")
        self.cafile = cafile

    async def _get(self, path: str) -> dict:
        from ingest.tls import client_context

        try:
            context = client_context(self.cafile)
            timeout = aiohttp.ClientTimeout(total=15)
            async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=context)) as http:
                async with http.get(self.base_url + path) as response:
                    if response.status != 200:
                        raise TablesUnavailable(f"the worker answered HTTP {response.status}")
                    return await response.json()
        except TablesUnavailable:
            raise
        except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
            raise TablesUnavailable(f"no streams worker answered at {self.base_url} ({type(exc).__name__})") from None

    async def ip(self, ip: str) -> dict:
        """Dynamic Screening's counters for an address, their window and limits, and its ban."""
        return await self._get(f"/screening/ip/{urllib.parse.quote(ip, safe='')}/")

    async def account(self, address: str) -> dict:
        """Account Hijack Detection's count for an account, its window and state."""
        return await self._get(f"/hijack/account/{urllib.parse.quote(address.lower(), safe='')}/")


def streams_tables(settings) -> StreamsTables:
    from ingest.tls import certificate_path

    url = settings.streams_web_url or f"https://127.0.0.1:{settings.streams_web_port}"
    return StreamsTables(url, certificate_path(settings))
