"""Antivirus and macros: clamd INSTREAM throughput, a whole message's scan, olevba per document.

A private clamd (infra/clamav/clamd.sh, the project's signature database) on a
free port; no broker. Prints:

- INSTREAM scans of random bytes at 10 KB, 1 MB and 10 MB, one at a time and
  four at once (the default BULWARK_CLAMD_MAX_CONCURRENT_SCANS);
- the antivirus check's scan of a whole message (the message plus each decoded
  part) for a 20 KB message with a zip and a document attached;
- olevba's inspection of one .doc and one .docm with macros (the macros check).

A full signature database (an operator's BULWARK_CLAMAV_DB) is much larger
than the project's, so absolute clamd figures there are slower; the ratios hold.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from email.message import EmailMessage

from bulwark.devstack import free_port
from bulwark.policy import parse
from bulwark.settings import REPO_ROOT
from schemas.events import Envelope
from streams import clamav
from streams.checks import macros
from streams.message import Message
from tests import samples

SCRIPT = REPO_ROOT / "infra" / "clamav" / "clamd.sh"


def _message(raw: bytes) -> Message:
    env = Envelope(mail_from="a@partner.test", rcpt_to=["b@example.test"], sha256="0" * 64, size=len(raw),
                   client_ip="192.0.2.1", received_at=datetime.now(timezone.utc))
    return Message("bench", None, env, "inbound", raw, parse("hostname: b\nlocal_domains: [example.test]\n"))


def _mail() -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@partner.test", "b@example.test", "figures"
    msg.set_content(("The quarterly figures are attached. " * 2 + "\n") * 130)
    msg.add_attachment(samples.zipped({"figures.csv": b"q,amount\n" + b"1,100\n" * 1000}),
                       maintype="application", subtype="zip", filename="figures.zip")
    msg.add_attachment(samples.plain_word97(), maintype="application", subtype="msword", filename="notes.doc")
    return msg.as_bytes()


async def _instream(clamd: clamav.Clamd, size: int, parallel: int, rounds: int) -> tuple[float, float]:
    data = os.urandom(size)
    semaphore = asyncio.Semaphore(parallel)

    async def one():
        async with semaphore:
            reply = await clamd.instream("bench", data)
            assert reply.kind == "clean", reply

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(rounds)))
    elapsed = time.perf_counter() - start
    return rounds / elapsed, rounds * size / elapsed / 1e6


async def _measure(port: int) -> None:
    os.environ["BULWARK_CLAMD_PORT"] = str(port)
    clamd = clamav.Clamd("127.0.0.1", port, timeout=60)
    print(f"  clamd: {await clamd.version()}")
    for size, rounds in ((10_000, 200), (1_000_000, 40), (10_000_000, 8)):
        for parallel in (1, 4):
            per_s, mb_s = await _instream(clamd, size, parallel, rounds)
            print(f"  INSTREAM {size / 1e6:>5.2f} MB x{rounds:<3} parallel {parallel}: "
                  f"{per_s:8.1f} scans/s {mb_s:8.1f} MB/s")

    raw = _mail()
    times = []
    for _ in range(50):
        message = _message(raw)
        start = time.perf_counter()
        scan = await clamav.scan(message)
        times.append(time.perf_counter() - start)
        assert not scan.of_kind("failed"), scan
    print(f"  whole-message scan, {len(raw) / 1000:.0f} KB, {len(clamav.targets(_message(raw)))} targets: "
          f"median {statistics.median(times) * 1000:.1f} ms, p95 {sorted(times)[int(len(times) * 0.95)] * 1000:.1f} ms")


def _olevba() -> None:
    settings = macros.Settings()
    for name, data in (("invoice.doc", samples.word97_with_vba()), ("invoice.docm", samples.ooxml_with_vba("docm"))):
        macros.inspect(name, data, settings, macros.Findings())  # first call imports olevba
        start = time.perf_counter()
        for _ in range(50):
            found = macros.Findings()
            macros.inspect(name, data, settings, found)
            assert found.documents == [name]
        print(f"  olevba {name:13} ({len(data) / 1000:.1f} KB): {(time.perf_counter() - start) / 50 * 1000:.1f} ms each")


def run() -> None:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bulwark-bench-clamd-")
    env = {**os.environ, "BULWARK_CLAMD_PORT": str(port), "BULWARK_CLAMD_DIR": workdir, "BULWARK_CLAMAV_DB": ""}
    subprocess.run(["bash", str(SCRIPT), "start"], env=env, check=True, capture_output=True)
    try:
        asyncio.run(_measure(port))
        _olevba()
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True)


if __name__ == "__main__":
    run()
