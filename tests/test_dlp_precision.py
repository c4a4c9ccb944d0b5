"""DLP precision: ordinary business mail goes through, real leaks inside it are still held.

Outbound DLP hits are quarantined by default, so every false positive stops
a real message. The corpus (``dlp_corpus.py``) is thousands of ordinary
numbers of the shapes the rules look for; ``bench/dlp_precision.py`` prints
the same measurement per rule.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from bulwark.cli import main
from streams.checks.dlp import Settings
from streams.checks.dlp.extract import Text
from streams.checks.dlp.scan import scan

from . import dlp_corpus
from .dlp_corpus import Mail, business_mail


@pytest.fixture(scope="module")
def corpus() -> list[Mail]:
    return business_mail()


def _found(text: str, settings: Settings | None = None, only: str | None = None) -> dict:
    settings = settings or Settings()
    active = [a for a in settings.active(None) if only is None or a.rule.name == only]
    return scan([Text("body", text)], active, settings.keyword_window)


def test_the_corpus_is_large_varied_and_the_same_on_every_run(corpus):
    assert len(corpus) == dlp_corpus.MESSAGES
    assert sum(len(mail.numbers) for mail in corpus) >= 10_000
    assert {mail.kind for mail in corpus} == set(dlp_corpus.KINDS)
    assert [mail.text for mail in business_mail()[:100]] == [mail.text for mail in corpus[:100]]


def test_ordinary_business_mail_is_not_held(corpus):
    held = [(mail.kind, name, [f.masked for f in entry.findings])
            for mail in corpus for name, entry in _found(mail.text).items()]
    assert held == []


def test_bulwark_dlp_test_finds_nothing_in_a_file_of_ordinary_mail(corpus, tmp_path):
    mailbox = tmp_path / "business-mail.txt"
    mailbox.write_text("\n\n-----\n\n".join(mail.text for mail in corpus[:300]))
    result = CliRunner().invoke(main, ["dlp", "test", str(mailbox)])
    assert (result.exit_code, result.output.splitlines()[-1]) == (0, "nothing found"), result.output


# The rules the user saw holding ordinary mail, and one more of each kind of
# weakness (no check digit; a date and a Luhn digit).
@pytest.mark.parametrize("rule", ["PT_CITIZEN_CARD", "CREDIT_CARD_VISA", "US_SSN", "SE_PERSONNUMMER"])
def test_the_corpus_would_be_held_by_the_rule_without_its_keyword(corpus, rule):
    # So the test above means something: the corpus carries the shapes that fooled these rules.
    loose = Settings(rules={rule: {"require_keyword": False}})
    assert any(_found(mail.text, loose, only=rule) for mail in corpus)


@pytest.mark.parametrize("leak, rule", [
    ("PS: my card is 4111 1111 1111 1111, exp 12/27, CVV 123.", "CREDIT_CARD_VISA"),
    ("Please use the company Mastercard 5555-5555-5555-4444 12 27 for the deposit.", "CREDIT_CARD_MASTERCARD"),
    ("Refund to IBAN BE68 5390 0754 7034, BIC GKCCBEBB.", "IBAN"),
    ("Our new hire's SSN is 536-90-4399.", "US_SSN"),
    ("Número do cartão de cidadão: 00000000 0 ZZ4", "PT_CITIZEN_CARD"),
    ("Traveller: Erin Example, passport no. A12345678, expires 2031.", "US_PASSPORT"),
])
def test_a_real_leak_inside_ordinary_mail_is_still_held(corpus, leak, rule):
    for mail in corpus[:20]:
        text = mail.text.replace("\n\n", f"\n\n{leak}\n\n", 1) if "\n\n" in mail.text else f"{mail.text}\n{leak}"
        assert rule in _found(text), f"{rule} missed in a {mail.kind}"
