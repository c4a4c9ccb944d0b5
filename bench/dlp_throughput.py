"""DLP scanning throughput, in process: how long the check takes per message.

Builds outbound messages of typical shapes (a plain body, a 1 MB text, a
DOCX, an XLSX, a PDF, a ZIP of CSVs) and times ``scan_message`` with every
rule on. Prints numbers; asserts nothing.

    .venv/bin/python bench/dlp_throughput.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import dlp_samples as samples  # noqa: E402
from tests.test_dlp import _message  # noqa: E402
from streams.checks.dlp import Settings, scan_message  # noqa: E402
from streams.checks.dlp.rules import RULES  # noqa: E402


def _prose(chars: int) -> str:
    rng = random.Random(7)
    words = ["invoice", "order", "meeting", "figures", "shipment", "2026", "ref", "12345", "total", "EUR", "the"]
    out, size = [], 0
    while size < chars:
        word = rng.choice(words)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def measure(rounds: int = 20) -> None:
    settings = Settings()
    page = _prose(3000) + f"\nCard {samples.VISA}\n"
    cases = {
        "plain body, 3 kB": _message(page),
        "text body, 1 MB": _message(_prose(1_000_000)),
        "DOCX attachment": _message("see attached", attachments={"a.docx": samples.docx(page)}),
        "XLSX attachment, 500 rows": _message("see attached", attachments={
            "a.xlsx": samples.xlsx([[f"row {i}", _prose(60), "12345"] for i in range(500)])}),
        "PDF attachment, 1 page": _message("see attached", attachments={"a.pdf": samples.pdf(page[:1500])}),
        "ZIP of 20 CSVs": _message("see attached", attachments={"a.zip": samples.zip_of(
            {f"f{i}.csv": (_prose(5000) + "\n").encode() for i in range(20)})}),
    }
    print(f"{len(RULES)} rules, {rounds} rounds each")
    for label, message in cases.items():
        scan_message(message, settings, "outbound")  # warm caches (regexes, imports)
        start = time.perf_counter()
        for _ in range(rounds):
            message.__dict__.pop("mime", None)  # parse afresh each round, as the worker does
            scan_message(message, settings, "outbound")
        per = (time.perf_counter() - start) / rounds
        print(f"{label:28} {per * 1000:8.1f} ms/message  {1 / per:8.1f} messages/s  ({len(message.raw) / 1024:.0f} kB)")


def run() -> None:
    measure()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    measure(parser.parse_args().rounds)


if __name__ == "__main__":
    main()
