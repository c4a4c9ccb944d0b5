"""Data Leak Prevention: the rules, masking, extraction, settings and the verdict's tag and redirect."""

from __future__ import annotations

import asyncio
import random
import re
import string
from datetime import datetime, timezone
from email.message import EmailMessage

import pytest
from click.testing import CliRunner
from stdnum import luhn, numdb

from bulwark.policy import PolicyError, parse
from schemas.events import Envelope
from sinks.tagging import tag_subject
from streams.checks import dlp
from streams.checks.dlp import Settings, check, scan_message
from streams.checks.dlp.extract import Extracted, Limits, extract_file, html_to_text, ooxml_text
from streams.checks.dlp.rules import BY_NAME, RULES, mask
from streams.checks.dlp.scan import scan
from streams.checks.dlp.extract import Text
from streams.message import Message
from streams.verdict import decide

from . import dlp_samples as samples

POLICY = "hostname: gw\nlocal_domains: [example.test]\n"
ALL_DIRECTIONS = None


def _context(rule, value: str) -> str:
    # A weak format is only believed next to one of its keywords, a bare format labelled by one.
    return f"Please find below my {rule.keywords[0]}: {value}\nThanks." if rule.keywords else f"Here: {value} ok"


def _found(text: str, settings: Settings | None = None) -> dict:
    settings = settings or Settings()
    return scan([Text("body", text)], settings.active(ALL_DIRECTIONS), settings.keyword_window)


def _message(body: str = "Hello.", direction: str = "outbound", subject: str = "hi",
             attachments: dict[str, bytes] | None = None, html: str | None = None) -> Message:
    msg = EmailMessage()
    msg["From"] = "erin@example.test"
    msg["To"] = "frank@partner.test"
    msg["Subject"] = subject
    msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for name, data in (attachments or {}).items():
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    env = Envelope(mail_from="erin@example.test", rcpt_to=["frank@partner.test"], sha256="0" * 64, size=1,
                   client_ip="127.0.0.10", received_at=datetime.now(timezone.utc))
    return Message("m1", "s1", env, direction, msg.as_bytes())


def _names(results) -> set[str]:
    return {r.name for r in results}


# -- the rule table -------------------------------------------------------------------


def test_there_are_at_least_seventy_rules_covering_every_category():
    assert len(RULES) >= 70
    assert {r.category for r in RULES} == {"payment_card", "banking", "national_id", "tax_id", "passport",
                                           "driving_licence", "health", "secret"}
    assert len({r.name for r in RULES}) == len(RULES)
    # Outbound quarantine by default, as in the guide's product.
    assert {(r.default_action, r.default_direction) for r in RULES} == {("quarantine", "outbound")}
    # Everything that has a validator has a counterexample, and only those.
    for rule in RULES:
        assert (rule.counterexample is not None) == (rule.validator is not None), rule.name
        assert rule.detects and (rule.validator is None) == (rule.validator_name is None), rule.name
        assert not rule.needs_keyword or rule.keywords, rule.name


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_rule_hits_its_valid_example_with_masked_evidence(rule):
    found = _found(_context(rule, rule.example))
    assert rule.name in found, f"{rule.name} missed {rule.example!r}"
    [finding] = found[rule.name].findings
    # The full value never appears in the evidence; at most its last four characters do.
    assert finding.masked != rule.example
    assert re.sub(r"\W", "", rule.example) not in re.sub(r"\W", "", finding.masked)
    visible = re.sub(r"[^0-9A-Za-z]", "", finding.masked)
    if rule.secret_prefix is None:
        assert len(visible) <= 4, finding.masked


@pytest.mark.parametrize("rule", [r for r in RULES if r.counterexample], ids=lambda r: r.name)
def test_rule_is_silent_when_the_validator_fails(rule):
    found = _found(_context(rule, rule.counterexample))
    assert rule.name not in found, f"{rule.name} accepted {rule.counterexample!r}"


@pytest.mark.parametrize("rule", [r for r in RULES if r.needs_keyword], ids=lambda r: r.name)
def test_a_weak_format_needs_its_keyword(rule):
    assert rule.name not in _found(f"Order reference {rule.example} shipped today.")


def test_card_numbers_by_brand_with_luhn():
    found = _found(f"card {samples.VISA}, amex 3782 822463 10005 and a typo {samples.VISA_BAD}")
    assert set(found) >= {"CREDIT_CARD_VISA", "CREDIT_CARD_AMEX"}
    assert [f.masked for f in found["CREDIT_CARD_VISA"].findings] == ["**** **** **** 1111"]


# How cards travel in mail: on one line with what else it takes to pay with them.
@pytest.mark.parametrize("line, rule, masked", [
    ("Card: 4111-1111-1111-1111 12 27", "CREDIT_CARD_VISA", "****-****-****-1111"),
    ("Please charge my Visa 4111 1111 1111 1111 exp 12/27 cvv 123, thanks", "CREDIT_CARD_VISA", "**** **** **** 1111"),
    ("card 4111 1111 1111 1111 12/27", "CREDIT_CARD_VISA", "**** **** **** 1111"),
    ("Card number: 4111 1111 1111 1111 123", "CREDIT_CARD_VISA", "**** **** **** 1111"),
    ("card 4111 1111 1111 1111 12 27 123", "CREDIT_CARD_VISA", "**** **** **** 1111"),
    ("Kreditkarte 4111111111111111 12/27 123", "CREDIT_CARD_VISA", "************1111"),
    ("CC 4111111111111111|12|27|123", "CREDIT_CARD_VISA", "************1111"),
    ("name,card number,expiry,cvv\nErin,4111111111111111,12/27,123", "CREDIT_CARD_VISA", "************1111"),
    ("name ; card ; exp\nErin ; 4111 1111 1111 1111 ; 12/27", "CREDIT_CARD_VISA", "**** **** **** 1111"),
    ("exp 06/27 card 4111 1111 1111 1111/12/27", "CREDIT_CARD_VISA", "**** **** **** 1111"),
    ("Mastercard 5555-5555-5555-4444 12 2027", "CREDIT_CARD_MASTERCARD", "****-****-****-4444"),
    ("Tarjeta: 5555 5555 5555 4444 12 27 123", "CREDIT_CARD_MASTERCARD", "**** **** **** 4444"),
    ("amex 3782 822463 10005 exp 11/26 cid 1234", "CREDIT_CARD_AMEX", "**** ****** *0005"),
    ("Amex 3782 822463 10005 1234", "CREDIT_CARD_AMEX", "**** ****** *0005"),
    ("Diners Club 3056 930902 5904 09 28", "CREDIT_CARD_DINERS", "**** ****** 5904"),
])
def test_a_card_followed_by_its_expiry_and_code_is_found_and_only_the_card_shown(line, rule, masked):
    found = _found(line)
    assert [f.masked for f in found[rule].findings] == [masked]


def test_a_card_shaped_number_without_a_card_word_is_not_a_card():
    # 5164 3649 1045 2631 passes Mastercard's prefix and Luhn; here it is an
    # order number, and the month after it the order's date.
    export = "order ; date ; carrier ; amount\n5164 3649 1045 2631 ; 08/26 ; UPS ; £635.70\n"
    assert _found(export) == {}
    assert "CREDIT_CARD_MASTERCARD" in _found("card " + export)


def test_a_thirteen_digit_barcode_or_tracking_number_is_not_a_visa_card():
    # Every German retail barcode (EAN-13, prefix 400-440) and many tracking
    # numbers are 13 digits; one in ten of those starting with a 4 pass Luhn.
    number = "442635678428"
    number += luhn.calc_check_digit(number)
    assert _found(f"Paid by card. 2 x EAN {number}, tracking {number}") == {}


def test_masking_keeps_the_shape_and_at_most_four_characters():
    assert mask(BY_NAME["CREDIT_CARD_VISA"], "4111-1111-1111-1111") == "****-****-****-1111"
    assert mask(BY_NAME["US_SSN"], "536-90-4399") == "***-**-*399"
    assert mask(BY_NAME["AWS_ACCESS_KEY_ID"], "AKIAIOSFODNN7EXAMPLE") == "AKIA****"
    assert mask(BY_NAME["PASSWORD_IN_TEXT"], "password: Winter2024!") == "password: ****"
    assert mask(BY_NAME["CREDENTIALS_IN_URL"], "postgres://app:S3cr3t-Pa55@db") == "postgres://****"


def test_keywords_in_other_scripts_match_without_word_boundaries():
    assert "JP_MY_NUMBER" in _found("マイナンバーは 6214 9832 0257 です")


def _iban_registry() -> dict[str, str]:
    """Country -> BBAN structure ("8!n10!n"), from the IBAN registry as python-stdnum ships it."""
    return {country: info["bban"] for _, country, _, info, _ in numdb.get("iban").prefixes}


def _valid_iban(country: str, structure: str, rng: random.Random) -> str:
    alphabet = {"n": string.digits, "a": string.ascii_uppercase, "c": string.digits + string.ascii_uppercase}
    bban = "".join(rng.choice(alphabet[kind]) for count, kind in re.findall(r"(\d+)!([nac])", structure)
                   for _ in range(int(count)))
    # ISO 7064 MOD 97-10: country code and "00" moved to the end, letters as 10-35.
    check = 98 - int("".join(str(int(c, 36)) for c in bban + country + "00")) % 97
    return f"{country}{check:02d}{bban}"


@pytest.mark.parametrize("country", sorted(_iban_registry()))
def test_an_iban_of_every_registry_country_is_found_electronic_and_printed(country):
    iban = _valid_iban(country, _iban_registry()[country], random.Random(country))
    printed = " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))
    for written in (iban, printed):
        found = _found(f"Please pay to IBAN {written} BIC GKCCBEBB by Friday.")
        assert "IBAN" in found, f"missed {written}"
        [finding] = found["IBAN"].findings
        assert finding.masked.replace("*", "").replace(" ", "") == iban[-4:]
    wrong = f"{country}{int(iban[2:4]) % 97 + 2:02d}{iban[4:]}"  # any other check digits
    assert "IBAN" not in _found(f"IBAN {wrong}")


def test_the_iban_registrys_belgian_example_is_found():
    # 16 characters, at a bank python-stdnum's Belgian bank directory does not list.
    found = _found("IBAN BE68 5390 0754 7034 BIC GKCCBEBB")
    assert [f.masked for f in found["IBAN"].findings] == ["**** **** **** 7034"]


def test_acronym_keywords_match_only_in_capitals():
    # "sin" is Spanish for "without", "ein" German for "a".
    assert "CA_SIN" not in _found("Envío sin coste, pedido 123 456 782.")
    assert "CA_SIN" in _found("My SIN is 123 456 782.")
    assert "US_EIN" not in _found("Wir haben ein Paket 91-1144442 verschickt.")
    assert "US_EIN" in _found("EIN: 91-1144442")


@pytest.mark.parametrize("rule", [r for r in RULES if r.needs_keyword and r.validator is None], ids=lambda r: r.name)
def test_a_format_without_a_check_digit_needs_its_keyword_as_its_label(rule):
    keyword = rule.keywords[0]
    assert rule.name not in _found(f"Please bring your {keyword} to the desk. Booking {rule.example}.")
    assert rule.name in _found(f"{keyword.capitalize()} no. {rule.example}")


def test_a_validator_failing_inside_stdnum_is_no_finding_and_no_crash():
    # python-stdnum 2.2's cn.ric raises KeyError for region 526113 instead of answering "invalid".
    assert "CN_RESIDENT_ID" not in _found("身份证 526113199001011234")


def test_the_same_number_twice_is_one_finding():
    found = _found(f"IBAN {samples.IBAN}; again: {samples.IBAN.replace(' ', '')}")
    assert found["IBAN"].distinct == 1


# -- settings -------------------------------------------------------------------------


def test_rules_apply_to_outbound_mail_by_default():
    body = f"card {samples.VISA}"
    assert "DLP_CREDIT_CARD_VISA" in _names(scan_message(_message(body, "outbound"), Settings(), "outbound"))
    assert _names(scan_message(_message(body, "inbound"), Settings(), "inbound")) == {"DLP_OK"}
    both = Settings(rules={"CREDIT_CARD_VISA": {"direction": "both"}})
    assert "DLP_CREDIT_CARD_VISA" in _names(scan_message(_message(body, "inbound"), both, "inbound"))


def test_rules_can_be_disabled_retuned_and_thresholded():
    body = f"card {samples.VISA}"
    off = Settings(rules={"CREDIT_CARD_VISA": {"enabled": False}})
    assert "CREDIT_CARD_VISA" not in _found(body, off)
    assert "CREDIT_CARD_VISA" not in _found(body, Settings(disabled_categories=["payment_card"]))
    assert "CREDIT_CARD_VISA" not in _found(body, Settings(rules={"CREDIT_CARD_VISA": {"min_matches": 2}}))
    picky = Settings(rules={"CREDIT_CARD_VISA": {"require_keyword": True, "keywords": ["corporate card"]}})
    assert "CREDIT_CARD_VISA" not in _found(body, picky)
    assert "CREDIT_CARD_VISA" in _found(f"corporate card {samples.VISA}", picky)
    loose = Settings(rules={"NL_BSN": {"require_keyword": False}})
    assert "NL_BSN" in _found("ref 111222333", loose)


def test_policy_validates_dlp_settings_with_file_line_and_field():
    text = POLICY + "checks:\n  dlp:\n    rules:\n      VISA_TYPO: {action: quarantine}\n"
    with pytest.raises(PolicyError) as err:
        parse(text, "p.yaml")
    assert "p.yaml:6: checks.dlp.rules" in str(err.value) and "VISA_TYPO" in str(err.value)
    text = POLICY + "checks:\n  dlp:\n    rules:\n      US_SSN: {action: encrypt}\n"
    with pytest.raises(PolicyError) as err:
        parse(text, "p.yaml")
    assert "checks.dlp.rules.US_SSN.action" in str(err.value)


# -- the verdict: quarantine by default, redirect, reject, tag --------------------------


def _verdict(policy_text: str, body: str):
    policy = parse(POLICY + policy_text)
    message = _message(body)
    return decide(message, asyncio.run(check(message, Settings.model_validate(policy.checks.get("dlp", {})))), policy)


def test_a_leak_is_quarantined_by_default_with_masked_evidence():
    verdict = _verdict("", f"My card {samples.VISA} and IBAN {samples.IBAN}")
    assert verdict.action == "quarantine"
    assert set(verdict.reasons) == {"DLP_CREDIT_CARD_VISA", "DLP_IBAN"}
    dumped = verdict.model_dump_json()
    assert "4111 1111 1111 1111" not in dumped and "0532 0130 00" not in dumped
    visa = next(r for r in verdict.results if r.name == "DLP_CREDIT_CARD_VISA")
    assert visa.evidence == ["body: **** **** **** 1111"] and visa.version == dlp.RULESET_VERSION


def test_invalid_checksums_are_delivered():
    verdict = _verdict("", f"My card {samples.VISA_BAD} and IBAN {samples.IBAN_BAD}")
    assert verdict.action == "deliver" and [r.name for r in verdict.results] == ["DLP_OK"]


def test_a_rule_can_redirect_to_its_own_address_or_the_policys():
    own = "checks:\n  dlp:\n    rules:\n      US_SSN: {action: redirect, redirect_to: privacy@example.test}\n"
    verdict = _verdict(own + "redirect_to: compliance@example.test\n", "SSN 536-90-4399")
    assert (verdict.action, verdict.redirect_to) == ("redirect", "privacy@example.test")
    shared = "checks:\n  dlp:\n    rules:\n      US_SSN: {action: redirect}\nredirect_to: compliance@example.test\n"
    assert _verdict(shared, "SSN 536-90-4399").redirect_to == "compliance@example.test"
    # The policy's actions: has the last word over the rule's own action.
    overridden = own + "actions:\n  DLP_US_SSN: reject\n"
    assert _verdict(overridden, "SSN 536-90-4399").action == "reject"


def test_tag_delivers_the_message_marked():
    verdict = _verdict("checks:\n  dlp:\n    rules:\n      US_SSN: {action: tag}\n", "SSN 536-90-4399")
    assert (verdict.action, verdict.tags, verdict.reasons) == ("deliver", ["DLP_US_SSN"], [])
    # A tag never weakens another rule's action.
    both = _verdict("checks:\n  dlp:\n    rules:\n      US_SSN: {action: tag}\n",
                    f"SSN 536-90-4399 card {samples.VISA}")
    assert both.action == "quarantine" and both.tags == ["DLP_US_SSN"]


def test_subject_tagging_edits_only_the_subject():
    raw = b"From: a@example.test\r\nSubject: Figures\r\n\r\nBody Subject: stays\r\n"
    tagged = tag_subject(raw, "[SENSITIVE]")
    assert tagged == b"From: a@example.test\r\nSubject: [SENSITIVE] Figures\r\n\r\nBody Subject: stays\r\n"
    assert tag_subject(tagged, "[SENSITIVE]") == tagged
    assert tag_subject(b"From: a\r\n\r\nbody", "[S]").startswith(b"Subject: [S]\r\n")


# -- extraction: where the text is ---------------------------------------------------


def _hits(message: Message) -> set[str]:
    return _names(scan_message(message, Settings(), "outbound"))


def test_subject_and_html_bodies_are_scanned():
    assert "DLP_CREDIT_CARD_VISA" in _hits(_message(subject=f"card {samples.VISA}"))
    html = f"<html><body><p>IBAN</p><p>{samples.IBAN}</p><script>x=1</script></body></html>"
    assert "DLP_IBAN" in _hits(_message(html=html))
    assert html_to_text("<b>a</b><p>b &amp; c</p>").split() == ["a", "b", "&", "c"]


@pytest.mark.parametrize("name,build", [
    ("figures.docx", lambda: samples.docx(f"Card: {samples.VISA}")),
    ("figures.xlsx", lambda: samples.xlsx([["name", "card"], ["Erin", samples.VISA]])),
    ("figures.pdf", lambda: samples.pdf(f"Card: {samples.VISA}")),
    ("figures.csv", lambda: f"name,card\nErin,{samples.VISA}\n".encode()),
    ("figures.txt", lambda: f"card {samples.VISA}".encode("utf-16")),
    ("figures.zip", lambda: samples.zip_of({"inner/figures.docx": samples.docx(f"Card: {samples.VISA}")})),
])
def test_attachments_are_scanned(name, build):
    results = scan_message(_message(attachments={name: build()}), Settings(), "outbound")
    [visa] = [r for r in results if r.name == "DLP_CREDIT_CARD_VISA"]
    assert visa.evidence[0].startswith(name) and visa.evidence[0].endswith("**** **** **** 1111")


def test_a_decompression_bomb_is_a_finding_not_a_crash():
    results = scan_message(_message(attachments={"big.zip": samples.zip_bomb()}), Settings(), "outbound")
    [bomb] = [r for r in results if r.name == "DLP_DECOMPRESSION_BOMB"]
    assert bomb.outcome == "hit" and "big.zip" in bomb.evidence and ":1" in bomb.detail
    deep = samples.nested_zip(6, f"card {samples.VISA}".encode())
    results = scan_message(_message(attachments={"deep.zip": deep}), Settings(), "outbound")
    assert "DLP_DECOMPRESSION_BOMB" in _names(results)
    # Within the limits, nesting is followed.
    shallow = samples.nested_zip(2, f"card {samples.VISA}".encode())
    assert "DLP_CREDIT_CARD_VISA" in _hits(_message(attachments={"shallow.zip": shallow}))
    assert dlp.DEFAULT_ACTIONS["DLP_DECOMPRESSION_BOMB"] == "quarantine"


def test_archive_limits_are_policy():
    out = Extracted()
    extract_file("big.zip", samples.zip_bomb(2), out, Limits(max_expanded_bytes=1024 * 1024))
    assert out.problems and out.problems[0].kind == "bomb" and "expands to" in out.problems[0].detail


def test_damaged_documents_are_unscannable_and_held():
    results = scan_message(_message(attachments={"broken.pdf": b"%PDF-1.7 garbage"}), Settings(), "outbound")
    [failed] = [r for r in results if r.name == "DLP_UNSCANNABLE"]
    assert failed.outcome == "fail" and failed.evidence == ["broken.pdf"]


def test_ooxml_text_keeps_paragraphs_and_unescapes():
    xml = '<w:p><w:r><w:t>IBAN &amp; more</w:t></w:r></w:p><w:p><w:r><w:t xml:space="preserve">DE89</w:t></w:r></w:p>'
    assert ooxml_text(xml) == "IBAN & more\nDE89\n"


# -- the CLI ------------------------------------------------------------------------------


def test_cli_lists_the_rules_and_tests_a_file(tmp_path):
    from bulwark.cli import main

    runner = CliRunner()
    listing = runner.invoke(main, ["dlp", "rules"])
    assert listing.exit_code == 0, listing.output
    assert "CREDIT_CARD_VISA" in listing.output and "Luhn" in listing.output and "outbound" in listing.output
    assert "format only; keyword required, labelling it" in listing.output
    assert len([line for line in listing.output.splitlines() if line and line[0].isupper()]) >= 70

    document = tmp_path / "figures.docx"
    document.write_bytes(samples.docx(f"Card: {samples.VISA}\nIBAN: {samples.IBAN}"))
    result = runner.invoke(main, ["dlp", "test", str(document)])
    assert result.exit_code == 1, result.output  # something found
    assert "DLP_CREDIT_CARD_VISA" in result.output and "**** **** **** 1111" in result.output
    assert "DLP_IBAN" in result.output and "4111 1111 1111 1111" not in result.output

    eml = tmp_path / "clean.eml"
    eml.write_bytes(_message("Nothing to see.").raw)
    clean = runner.invoke(main, ["dlp", "test", str(eml)])
    assert clean.exit_code == 0 and "nothing found" in clean.output
