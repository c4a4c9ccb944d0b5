"""DLP precision: how much ordinary business mail the rules would hold.

Runs every rule (as ``bulwark dlp test`` does) over the generated corpus of
ordinary business mail in ``tests/dlp_corpus.py`` (orders, invoices, tracking
numbers, phone numbers, meeting invitations, quotes...), in which nothing is
a card, an IBAN or a national number. Prints the corpus size, the messages
held and, per rule, its findings per thousand numbers. The target is 0.

    .venv/bin/python bench/dlp_precision.py [--seed 13] [--messages 1500]
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.checks.dlp import Settings  # noqa: E402
from streams.checks.dlp.extract import Text  # noqa: E402
from streams.checks.dlp.rules import RULES  # noqa: E402
from streams.checks.dlp.scan import scan  # noqa: E402
from tests.dlp_corpus import MESSAGES, SEED, business_mail  # noqa: E402


def measure(seed: int = SEED, messages: int = MESSAGES) -> None:
    corpus = business_mail(seed, messages)
    numbers = sum(len(mail.numbers) for mail in corpus)
    settings = Settings()
    active = settings.active(None)
    findings: Counter[str] = Counter()
    held_by: Counter[str] = Counter()
    kinds: defaultdict[str, Counter[str]] = defaultdict(Counter)
    held = 0
    start = time.perf_counter()
    for mail in corpus:
        found = scan([Text("body", mail.text)], active, settings.keyword_window)
        held += bool(found)
        for name, entry in found.items():
            findings[name] += entry.distinct
            held_by[name] += 1
            kinds[name][mail.kind] += 1
    elapsed = time.perf_counter() - start

    print(f"corpus: {len(corpus):,} messages of {len({m.kind for m in corpus})} kinds (seed {seed}), "
          f"{numbers:,} numbers, {sum(len(m.text) for m in corpus) / 1024:,.0f} kB; {len(active)} rules, "
          f"{elapsed:.2f} s")
    print(f"messages held: {held:,} ({held / len(corpus):.2%}); "
          f"findings: {sum(findings.values()):,} ({sum(findings.values()) / numbers * 1000:.2f} per 1,000 numbers)")
    if findings:
        print(f"  {'rule':28} {'findings':>8} {'per 1,000':>9} {'held':>6}  mostly in")
    for name, count in findings.most_common():
        where = ", ".join(f"{kind} {n}" for kind, n in kinds[name].most_common(3))
        print(f"  {name:28} {count:8,} {count / numbers * 1000:9.2f} {held_by[name]:6,}  {where}")
    silent = [rule.name for rule in RULES if rule.name not in findings]
    print(textwrap.fill(f"0 findings ({len(silent)} rules): {', '.join(silent)}", width=110,
                        initial_indent="  ", subsequent_indent="    "))


def run() -> None:
    measure()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--messages", type=int, default=MESSAGES)
    args = parser.parse_args()
    measure(args.seed, args.messages)


if __name__ == "__main__":
    main()
