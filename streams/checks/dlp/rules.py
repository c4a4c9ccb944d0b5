"""The Data Leak Prevention rule table: what each rule detects and how it proves it.

A rule is a pattern (the shape of the number or secret), a validator where the
format has one (a checksum, a date inside the number, a registry of issued
prefixes), and keywords. Outbound hits are quarantined by default, so a rule
that fires on ordinary mail stops real mail: where the shape is one that
order, invoice, tracking and phone numbers also take, a passing checksum is
not enough (a one-digit check passes one number in ten, a date-and-check
one in thirty), and the rule needs one of its keywords near the match; where
there is no validator at all, the keyword must label the value ("Passport
No. A12345678"). A rule finds without a keyword only where its shape is its
own (letters in fixed places, a country prefix, separators no one else uses)
and its validator is strong. ``tests/dlp_corpus.py`` is the ordinary mail the
rules are measured against.

Keywords match as whole words, in any case, except those written here in
capitals: those are acronyms that are also words in some language (SIN is
Spanish for "without", EIN German for "a", NIE German for "never") and match
only as written.

National numbers are validated with python-stdnum, which implements each
country's checksum from the issuing authority's documentation; a validator is
hand-written here only where stdnum has none, and says so.

Every rule carries a valid example and, where it has a validator, one that
fails the validator: the unit tests run both, so no rule ships untested.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
import re
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Literal

from stdnum import iban, luhn, numdb

from . import cards

Category = Literal["payment_card", "banking", "national_id", "tax_id", "passport", "driving_licence", "health", "secret"]
RuleDirection = Literal["outbound", "inbound", "internal", "both", "all"]
RuleAction = Literal["quarantine", "redirect", "reject", "tag", "deliver"]

#: Each rule's result is ``DLP_<rule name>``, so the policy's ``actions:`` can name it.
RESULT_PREFIX = "DLP_"


@dataclass(frozen=True)
class Rule:
    name: str
    category: Category
    detects: str
    pattern: re.Pattern[str]
    #: True when the match is genuine (checksum, date, issued prefix...); None: the format is all there is.
    validator: Callable[[str], bool] | None
    #: What the validator checks, for ``bulwark dlp rules``.
    validator_name: str | None
    keywords: tuple[str, ...]
    needs_keyword: bool
    example: str
    #: Same shape as the example but failing the validator (None when there is no validator).
    counterexample: str | None
    #: Secrets are masked to their public prefix (e.g. ``AKIA``), numbers to their last digits.
    secret_prefix: int | None = None
    default_action: RuleAction = "quarantine"
    default_direction: RuleDirection = "outbound"
    #: Lower-case fragments one of which any match contains: a text without
    #: them is skipped at C speed instead of searched (most mail has no "AKIA").
    hints: tuple[str, ...] = ()
    #: The values a match may hold, best first, each a head of the match (a
    #: card followed by its expiry date); None: the match itself.
    candidates: Callable[[str], Iterable[str]] | None = None

    @property
    def result_name(self) -> str:
        return RESULT_PREFIX + self.name

    def accepts(self, match: str) -> bool:
        return self.validator is None or self.validator(match)

    def valid_value(self, match: str) -> str | None:
        """The genuine value a match holds, if any (the whole match, or its head that validates)."""
        for value in self.candidates(match) if self.candidates else (match,):
            if self.accepts(value):
                return value
        return None


# -- building blocks -----------------------------------------------------------

# A number must not be part of a longer run of letters or digits.
_L = r"(?<![A-Za-z0-9])"
_R = r"(?![A-Za-z0-9])"


def _num(body: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(_L + "(?:" + body + ")" + _R, flags)


def _stdnum(module: str) -> tuple[Callable[[str], bool], str]:
    mod = importlib.import_module(f"stdnum.{module}")

    def is_valid(text: str) -> bool:
        # A validator's own bug is not a finding, nor a reason to fail the
        # check: stdnum 2.2's cn.ric raises KeyError for some region codes.
        try:
            return mod.is_valid(text)
        except Exception:  # any failure inside stdnum means "not valid"
            return False

    return is_valid, f"stdnum.{module}"


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


# -- payment cards --------------------------------------------------------------
#
# An issuer prefix and a Luhn digit are passed by one 16-digit number in a
# hundred, and by one in ten of those that start with a 4: cards need a
# keyword (cards.py says why, and how cards are written).

RULES: list[Rule] = [
    Rule(f"CREDIT_CARD_{name}", "payment_card", f"{brand} payment card number", cards.PATTERN,
         cards.valid(prefixes, lengths), "issuer prefix, length and Luhn", cards.KEYWORDS, True, example, counter,
         candidates=cards.candidates)
    for name, brand, prefixes, lengths, example, counter in cards.BRANDS
]


# -- banking ----------------------------------------------------------------------


def _iban_lengths() -> dict[str, int]:
    """Country code -> IBAN length, from the IBAN registry as python-stdnum ships it."""
    lengths = {}
    for _, country, _, info, _ in numdb.get("iban").prefixes:
        bban = sum(int(count) for count in re.findall(r"(\d+)!", info["bban"]))
        lengths[country] = 4 + bban
    return lengths


def _iban_pattern() -> re.Pattern[str]:
    """Each registry country at its own length, electronic ("BE68539007547034") or print format ("BE68 5390 0754 7034").

    Knowing the length is what lets an IBAN end where it ends: "BE68 5390
    0754 7034 BIC GKCCBEBB" holds a 16-character IBAN, not a 23-character one.
    """
    by_length: dict[int, list[str]] = {}
    for country, length in _iban_lengths().items():
        by_length.setdefault(length, []).append(country)
    shapes = []
    for length, countries in sorted(by_length.items(), reverse=True):
        body, groups, rest = length - 4, (length - 4) // 4, (length - 4) % 4
        printed = f"(?: [A-Z0-9]{{4}}){{{groups}}}" + (f" [A-Z0-9]{{{rest}}}" if rest else "")
        shapes.append(f"(?:{'|'.join(sorted(countries))})\\d{{2}}(?:[A-Z0-9]{{{body}}}|{printed})")
    # The lookahead fails fast where no IBAN can start, before the alternation is tried.
    return _num(r"(?=[A-Z]{2}\d\d)(?:" + "|".join(shapes) + ")")


def _iban(text: str) -> bool:
    # The ISO 7064 check and the registry's structure, not stdnum's national
    # extras: its directory of Belgian bank codes is a snapshot that misses
    # real banks (the registry's own example, BE68 5390 0754 7034, among them).
    return iban.is_valid(text, check_country=False)


RULES += [
    # A registry country, its exact length and structure, and an ISO 7064
    # check that one string in 97 passes: strong enough without a keyword.
    Rule("IBAN", "banking", "International Bank Account Number (ISO 13616)", _iban_pattern(),
         _iban, "stdnum.iban: ISO 7064 check digits, the registry's length and structure",
         ("iban", "account", "bank", "konto", "compte", "cuenta"), False,
         "DE89 3704 0044 0532 0130 00", "DE89 3704 0044 0532 0130 01"),
    # Eight capitals are a word as often as a bank code: needs its keyword.
    Rule("BIC", "banking", "Bank Identifier Code / SWIFT code (ISO 9362)",
         _num(r"[A-Z]{6}[A-Z0-9]{2}(?:[A-Z0-9]{3})?"),
         *_stdnum("bic"), ("bic", "swift"), True, "DEUTDEFF500", "DEUTXXFF500"),
    # Not bare "transit" or "routing": parcels are "in transit" next to their
    # 9-digit numbers, and freight has a "Routing: FRA-JFK".
    Rule("US_ABA_ROUTING_NUMBER", "banking", "US ABA bank routing transit number",
         _num(r"\d{9}"), *_stdnum("us.rtn"),
         ("routing number", "routing no", "routing #", "ABA", "routing transit", "transit number", "wire routing",
          "bank routing"), True,
         "111000025", "112000025"),
]


# -- national identity and tax numbers ------------------------------------------
#
# (name, category, what, stdnum module, pattern, keywords, needs_keyword, example, counterexample)
# needs_keyword is True where order, invoice, tracking, phone or part numbers
# take the same shape and the validator lets through more than a few in a
# thousand of them; the comment says why where it is not obvious. Found
# without one: UK VAT (its GB prefix), codice fiscale and CURP (letters in
# fixed places), AHV (756), CPF and CNPJ (dots, slash and two check digits),
# CUIT (2-8-1 dashes, a type prefix and a check digit).

_NATIONAL: list[tuple[str, Category, str, str, str, tuple[str, ...], bool, str, str]] = [
    # No check digit since 2011: nine in ten 3-2-4 numbers are valid, and
    # invoices numbered branch-year-sequence (100-26-0042) take that shape.
    ("US_SSN", "national_id", "US Social Security Number", "us.ssn", r"\d{3}-\d{2}-\d{4}|\d{3} \d{2} \d{4}",
     ("ssn", "ssns", "social security", "social security number", "ss#", "soc sec"), True,
     "536-90-4399", "666-90-4399"),
    ("US_ITIN", "tax_id", "US Individual Taxpayer Identification Number", "us.itin", r"9\d{2}[- ]\d{2}[- ]\d{4}",
     ("itin", "taxpayer", "tax id"), True, "912-90-3456", "912-93-4567"),
    ("US_EIN", "tax_id", "US Employer Identification Number", "us.ein", r"\d{2}-\d{7}",
     ("EIN", "employer identification", "tax id", "fein"), True, "91-1144442", "07-1144442"),
    ("US_PTIN", "tax_id", "US Preparer Tax Identification Number", "us.ptin", r"P-?\d{8}",
     ("ptin", "preparer"), True, "P01594846", "Q01594846"),
    ("UK_UTR", "tax_id", "UK Unique Taxpayer Reference", "gb.utr", r"\d{5} ?\d{5}",
     ("utr", "unique taxpayer", "self assessment", "hmrc"), True, "1955839661", "2955839661"),
    ("UK_VAT", "tax_id", "UK VAT registration number", "gb.vat", r"GB ?\d{3} ?\d{4} ?\d{2}(?: ?\d{3})?",
     ("vat",), False, "GB 980 7806 84", "GB 980 7806 85"),
    ("DE_TAX_ID", "tax_id", "German tax identification number (Steuer-IdNr)", "de.idnr",
     r"\d{2} ?\d{3} ?\d{3} ?\d{3}",
     ("steuer-id", "steueridentifikationsnummer", "identifikationsnummer", "idnr", "steuer-idnr", "tax id"), True,
     "36 574 261 809", "36 574 261 890"),
    # Written without spaces it is fifteen digits, a FedEx Ground tracking
    # number's shape, and its two-digit key lets one in 97 through.
    ("FR_NIR", "national_id", "French social security number (NIR, carte Vitale)", "fr.nir",
     r"[12] ?\d{2} ?\d{2} ?(?:\d{2}|2A|2B) ?\d{3} ?\d{3} ?\d{2}",
     ("sécurité sociale", "securite sociale", "nir", "carte vitale", "numéro de sécu", "n° ss", "insee",
      "social security"), True,
     "2 95 10 99 126 111 93", "2 95 10 99 126 111 99"),
    ("FR_NIF", "tax_id", "French tax number (numéro fiscal)", "fr.nif", r"[0-3]\d ?\d{2} ?\d{3} ?\d{3} ?\d{3}",
     ("numéro fiscal", "numero fiscal", "nif", "SPI", "impots", "impôts"), True, "3023217600053", "3023217600054"),
    # A check letter passes one in 23, and digits with a letter are the
    # commonest shape of a part or booking reference.
    ("ES_DNI", "national_id", "Spanish national identity document number (DNI)", "es.dni", r"\d{8}-?[A-Z]",
     ("dni", "documento nacional", "nif"), True, "54362315-K", "54362315-Z"),
    ("ES_NIE", "national_id", "Spanish foreigner identity number (NIE)", "es.nie", r"[XYZ]-?\d{7}-?[A-Z]",
     ("NIE", "extranjero", "número de identidad de extranjero"), True, "X-2482300-W", "X-2482300-A"),
    ("IT_CODICE_FISCALE", "tax_id", "Italian fiscal code (codice fiscale)", "it.codicefiscale",
     r"[A-Z]{6}\d{2}[A-EHLMPRST]\d{2}[A-Z]\d{3}[A-Z]",
     ("codice fiscale", "CF"), False, "RCCMNL83S18D969H", "RCCMNL83S18D969A"),
    ("NL_BSN", "national_id", "Dutch citizen service number (BSN)", "nl.bsn", r"\d{4}\.?\d{2}\.?\d{3}|\d{9}",
     ("bsn", "burgerservicenummer", "sofinummer"), True, "1112.22.333", "1112.52.333"),
    ("BE_NATIONAL_NUMBER", "national_id", "Belgian national register number", "be.nn",
     r"\d{2}\.?\d{2}\.?\d{2}[- ]?\d{3}\.?\d{2}|\d{2} \d{2} \d{2} \d{3} \d{2}",
     ("rijksregisternummer", "numéro national", "national number", "registre national", "insz", "niss"), True,
     "85.07.30-033.28", "85.07.30-033.29"),
    # A date and a Luhn digit: order numbers that start with their date
    # (20260112-0042) pass one in ten.
    ("SE_PERSONNUMMER", "national_id", "Swedish personal identity number (personnummer)", "se.personnummer",
     r"(?:\d{2})?\d{6}[-+]\d{4}",
     ("personnummer", "personnr", "personal identity number"), True, "880320-0016", "880320-0018"),
    ("NO_FODSELSNUMMER", "national_id", "Norwegian national identity number (fødselsnummer)", "no.fodselsnummer",
     r"\d{6} ?\d{5}", ("fødselsnummer", "fodselsnummer", "personnummer"), True, "151086 95088", "151086 95077"),
    ("DK_CPR", "national_id", "Danish personal identification number (CPR)", "dk.cpr", r"\d{6}-?\d{4}",
     ("cpr", "personnummer"), True, "211062-5629", "511062-5629"),
    # A date and a check character (one in 31): date-first references pass.
    ("FI_HETU", "national_id", "Finnish personal identity code (henkilötunnus)", "fi.hetu",
     r"\d{6}[-+A-FU-Y]\d{3}[0-9A-Y]",
     ("hetu", "henkilötunnus", "henkilotunnus", "personbeteckning", "personal identity code"), True,
     "131052-308T", "131052-308U"),
    ("PL_PESEL", "national_id", "Polish national identification number (PESEL)", "pl.pesel", r"\d{11}",
     ("pesel",), True, "44051401359", "44051401358"),
    # Twelve digits pass its check one time in ten: order, frequent-flyer and
    # tracking numbers were held as citizen cards.
    ("PT_CITIZEN_CARD", "national_id", "Portuguese citizen card number (Cartão de Cidadão)", "pt.cc",
     r"\d{8} ?\d ?[A-Z0-9]{2}\d",
     ("cartão de cidadão", "cartao de cidadao", "CC", "citizen card", "n.º documento", "documento de identificação"),
     True, "00000000 0 ZZ4", "00000000 0 ZZ3"),
    ("PT_NIF", "tax_id", "Portuguese tax number (NIF)", "pt.nif", r"(?:PT ?)?\d{3} ?\d{3} ?\d{3}",
     ("nif", "contribuinte"), True, "501 964 843", "501 964 842"),
    # Seven digits and a check letter (one in 23): a part number's shape.
    ("IE_PPS", "national_id", "Irish Personal Public Service number", "ie.pps", r"\d{7}[A-W][ABHW]?",
     ("pps", "ppsn", "personal public service"), True, "6433435F", "6433435E"),
    # 756 (Switzerland in ISO 3166) and an EAN check digit: one 13-digit number
    # in ten thousand, and no retail barcode starts 756.
    ("CH_AHV", "national_id", "Swiss social security number (AHV/AVS)", "ch.ssn", r"756\.?\d{4}\.?\d{4}\.?\d{2}",
     ("ahv", "avs", "sozialversicherung"), False, "756.9217.0769.85", "756.9217.0769.84"),
    ("AT_SOCIAL_INSURANCE", "health", "Austrian social insurance number (e-card)", "at.vnr", r"\d{4} ?\d{6}",
     ("sozialversicherungsnummer", "svnr", "vnr", "e-card", "versicherungsnummer"), True,
     "1237 010180", "2237 010180"),
    ("CA_SIN", "national_id", "Canadian Social Insurance Number", "ca.sin", r"\d{3}[- ]?\d{3}[- ]?\d{3}",
     ("SIN", "social insurance", "numéro d'assurance sociale", "NAS"), True, "123-456-782", "123-456-783"),
    ("CA_BC_PHN", "health", "British Columbia Personal Health Number", "ca.bc_phn", r"9\d{3} ?\d{3} ?\d{3}",
     ("phn", "personal health number", "carecard", "health number"), True, "9698 658 215", "9698 648 215"),
    ("AU_TFN", "tax_id", "Australian Tax File Number", "au.tfn", r"\d{3} ?\d{3} ?\d{2,3}",
     ("tfn", "tax file number"), True, "123 456 782", "999 999 999"),
    ("AU_ABN", "tax_id", "Australian Business Number", "au.abn", r"\d{2} ?\d{3} ?\d{3} ?\d{3}",
     ("abn", "australian business number"), True, "83 914 571 673", "99 999 999 999"),
    ("BR_CPF", "national_id", "Brazilian individual taxpayer number (CPF)", "br.cpf", r"\d{3}\.\d{3}\.\d{3}-\d{2}",
     ("cpf",), False, "390.533.447-05", "231.002.999-00"),
    ("BR_CNPJ", "tax_id", "Brazilian company taxpayer number (CNPJ)", "br.cnpj", r"\d{2}\.\d{3}\.\d{3}/\d{4}-\d{2}",
     ("cnpj",), False, "16.727.230/0001-97", "16.727.230/0001-98"),
    ("MX_CURP", "national_id", "Mexican population registry code (CURP)", "mx.curp",
     r"[A-Z]{4}\d{6}[HMX][A-Z]{5}[0-9A-Z]\d", ("curp",), False, "BOXW310820HNERXN09", "BOXW310820HNERXN08"),
    ("MX_RFC", "tax_id", "Mexican federal taxpayer registry code (RFC)", "mx.rfc",
     r"[A-ZÑ&]{3,4}-? ?\d{6}-? ?[A-Z0-9]{3}", ("rfc",), True, "GODE 561231 GR8", "GODE 561331 GR8"),
    ("IN_AADHAAR", "national_id", "Indian Aadhaar number", "in_.aadhaar", r"[2-9]\d{3} ?\d{4} ?\d{4}",
     ("aadhaar", "aadhar", "uidai"), True, "2341 2341 2346", "2341 2341 2347"),
    ("IN_PAN", "tax_id", "Indian Permanent Account Number (PAN)", "in_.pan", r"[A-Z]{5}\d{4}[A-Z]",
     ("PAN", "permanent account number", "income tax"), True, "ACUPA7085R", "ABMXA3211G"),
    # Thirteen digits: every retail barcode (EAN-13) has that shape, and a date,
    # a sex digit and a check digit let a few in a thousand of them through.
    ("ZA_ID", "national_id", "South African identity number", "za.idnr", r"\d{6} ?\d{4} ?\d{2} ?\d",
     ("identity number", "id number", "rsa id"), True, "7503305044089", "8503305044089"),
    # Eighteen digits are an online shop's order number as often as an identity card.
    ("CN_RESIDENT_ID", "national_id", "Chinese resident identity card number", "cn.ric", r"\d{17}[\dX]",
     ("身份证", "resident identity", "id card", "identity card"), True, "360426199101010071", "360426199101010072"),
    ("KR_RRN", "national_id", "South Korean resident registration number", "kr.rrn", r"\d{6}-?\d{7}",
     ("주민등록번호", "resident registration", "rrn"), True, "971013-9019902", "971013-9019903"),
    ("JP_MY_NUMBER", "national_id", "Japanese individual number (My Number)", "jp.in_", r"\d{4} ?\d{4} ?\d{4}",
     ("マイナンバー", "個人番号", "my number", "individual number"), True, "6214 9832 0257", "6214 9832 0258"),
    # Not "id number" alone: nine digits pass one in ten, and every customer has an ID number.
    ("IL_ID", "national_id", "Israeli identity number (Teudat Zehut)", "il.idnr", r"\d{7,8}-?\d",
     ("teudat zehut", "תעודת זהות", "israeli id", "mispar zehut"), True, "3933742-3", "3933742-2"),
    ("TR_TC_KIMLIK", "national_id", "Turkish identification number (T.C. Kimlik No)", "tr.tckimlik", r"[1-9]\d{10}",
     ("kimlik", "tc kimlik", "tckn"), True, "17291716060", "17291716050"),
    ("GR_AMKA", "health", "Greek social security number (AMKA)", "gr.amka", r"\d{11}",
     ("amka", "αμκα"), True, "01013099997", "01013099999"),
    ("RO_CNP", "national_id", "Romanian personal numeric code (CNP)", "ro.cnp", r"[1-9]\d{12}",
     ("cnp", "cod numeric personal"), True, "1630615123457", "1630615123458"),
    # Nine-digit birth numbers (before 1954) have no check digit at all:
    # any date-first reference "250112/042" is one.
    ("CZ_SK_BIRTH_NUMBER", "national_id", "Czech and Slovak birth number (rodné číslo)", "cz.rc",
     r"\d{6}/\d{3,4}", ("rodné číslo", "rodne cislo", "birth number"), True,
     "710319/2745", "710319/2746"),
    ("BG_EGN", "national_id", "Bulgarian unified civil number (EGN)", "bg.egn", r"\d{10}",
     ("егн", "egn"), True, "8032056031", "8032056032"),
    ("HR_OIB", "national_id", "Croatian personal identification number (OIB)", "hr.oib", r"(?:HR ?)?\d{11}",
     ("oib",), True, "33392005961", "33392005962"),
    ("SI_EMSO", "national_id", "Slovenian unique master citizen number (EMŠO)", "si.emso", r"\d{13}",
     ("emšo", "emso"), True, "0101006500006", "0101006500007"),
    ("LT_ASMENS_KODAS", "national_id", "Lithuanian personal code (asmens kodas)", "lt.asmens", r"[1-6]\d{10}",
     ("asmens kodas",), True, "33309240064", "33309240164"),
    ("EE_ISIKUKOOD", "national_id", "Estonian personal identification code (isikukood)", "ee.ik", r"[1-6]\d{10}",
     ("isikukood",), True, "36805280109", "36805280108"),
    ("IS_KENNITALA", "national_id", "Icelandic identity number (kennitala)", "is_.kennitala", r"\d{6}-?\d{4}",
     ("kennitala", "kt."), True, "120174-3399", "120174-3398"),
    # One check digit (one in 11), and without its dots it is a phone number
    # with an extension ("030 1175703-0").
    ("CL_RUT", "national_id", "Chilean national tax number (RUT/RUN)", "cl.rut", r"\d{1,2}\.?\d{3}\.?\d{3}-[\dkK]",
     ("RUT", "RUN", "rol único tributario", "rol unico tributario"), True, "12.531.909-2", "12.531.909-3"),
    ("AR_CUIT", "tax_id", "Argentinian tax number (CUIT/CUIL)", "ar.cuit", r"\d{2}-\d{8}-\d",
     ("cuit", "cuil"), False, "20-05536168-2", "20-26756539-2"),
    # A date and a place code, no check digit.
    ("MY_NRIC", "national_id", "Malaysian identity card number (MyKad NRIC)", "my.nric", r"\d{6}-\d{2}-\d{4}",
     ("nric", "mykad", "kad pengenalan"), True, "770305-02-1234", "771305-02-1234"),
    ("NZ_IRD", "tax_id", "New Zealand IRD number", "nz.ird", r"\d{2,3}-?\d{3}-?\d{3}",
     ("IRD", "inland revenue"), True, "49-098-576", "136-410-133"),
    ("EU_VAT", "tax_id", "EU VAT identification number (any member state)", "eu.vat",
     r"(?:AT|BE|BG|CY|CZ|DE|DK|EE|EL|ES|FI|FR|HR|HU|IE|IT|LT|LU|LV|MT|NL|PL|PT|RO|SE|SI|SK) ?[0-9A-Z][0-9A-Z ]{7,13}[0-9A-Z]",
     ("vat", "ust-idnr", "tva", "iva", "btw", "mwst"), True, "DE 136695976", "DE 136695978"),
]

for _name, _cat, _what, _mod, _pattern, _kw, _needs, _ex, _counter in _NATIONAL:
    RULES.append(Rule(_name, _cat, _what, _num(_pattern), *_stdnum(_mod), _kw, _needs, _ex, _counter))


# -- numbers stdnum does not cover: hand-written validators ------------------------
#
# Each algorithm below is the issuer's published one, short enough to keep here.

_UK_NINO_PREFIX_BANNED = {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"}


def _uk_nino(text: str) -> bool:
    # HMRC's rules: first letter not D, F, I, Q, U, V; second not those nor O;
    # some prefixes never issued (the administrative ones above).
    value = re.sub(r"\s", "", text).upper()
    first, second = value[0], value[1]
    return first not in "DFIQUV" and second not in "DFIQUVO" and value[:2] not in _UK_NINO_PREFIX_BANNED


def _uk_driving_licence(text: str) -> bool:
    # DVLA: digits 6-11 encode the birth date: decade, month (+50 for women), day, year.
    month, day = int(text[6:8]), int(text[8:10])
    return (1 <= month <= 12 or 51 <= month <= 62) and 1 <= day <= 31


def _uk_nhs(text: str) -> bool:
    from stdnum.gb import nhs
    return nhs.is_valid(text)


def _us_npi(text: str) -> bool:
    # CMS: Luhn over the number prefixed with 80840 (the US health industry prefix).
    return luhn.is_valid("80840" + _digits(text))


def _us_dea(text: str) -> bool:
    # DEA registration: (d1+d3+d5) + 2*(d2+d4+d6); its last digit is d7.
    d = [int(c) for c in text[2:]]
    return (d[0] + d[2] + d[4] + 2 * (d[1] + d[3] + d[5])) % 10 == d[6]


def _us_mbi(text: str) -> bool:
    # CMS Medicare Beneficiary Identifier: positions 2, 5, 8 and 9 are letters
    # excluding S, L, O, I, B and Z, so a random 11-character code rarely fits.
    value = text.replace("-", "").upper()
    letters = set("ACDEFGHJKMNPQRTUVWXY")
    return value[0] in "123456789" and all(value[i] in letters for i in (1, 4, 7, 8))


def _au_medicare(text: str) -> bool:
    # Services Australia: weights 1,3,7,9,1,3,7,9 over the first 8 digits, mod 10 is digit 9.
    d = [int(c) for c in _digits(text)]
    return 2 <= d[0] <= 6 and sum(a * b for a, b in zip(d[:8], (1, 3, 7, 9, 1, 3, 7, 9))) % 10 == d[8]


def _de_kvnr(text: str) -> bool:
    # Krankenversichertennummer (GKV): the letter as two digits (A=01), then the
    # first 9 digits weighted 1,2,1,2... with digit sums, mod 10 is the check digit.
    value = text.upper()
    digits = f"{ord(value[0]) - 64:02d}" + value[1:9]
    total = 0
    for i, c in enumerate(digits):
        product = int(c) * (1 if i % 2 == 0 else 2)
        total += product // 10 + product % 10
    return total % 10 == int(value[9])


def _mrz_digit(value: str) -> int:
    # ICAO Doc 9303 part 3: weights 7, 3, 1; digits as themselves, A-Z as 10-35, '<' as 0.
    total = 0
    for i, c in enumerate(value):
        n = int(c) if c.isdigit() else (ord(c) - 55 if c.isalpha() else 0)
        total += n * (7, 3, 1)[i % 3]
    return total % 10


def _passport_mrz(text: str) -> bool:
    # Line 2 of a passport's machine readable zone (TD3): four check digits and a composite.
    line = text
    fields = [(line[0:9], line[9]), (line[13:19], line[19]), (line[21:27], line[27])]
    if any(not check.isdigit() or _mrz_digit(value) != int(check) for value, check in fields):
        return False
    composite = line[0:10] + line[13:20] + line[21:43]
    return line[43].isdigit() and _mrz_digit(composite) == int(line[43])


def _jwt(text: str) -> bool:
    # A JSON Web Token's first segment is base64url JSON naming its algorithm (RFC 7519).
    header = text.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (binascii.Error, ValueError):
        return False
    return isinstance(decoded, dict) and "alg" in decoded


_PLACEHOLDERS = {"password", "passwort", "changeme", "required", "expired", "protected", "reset", "forgotten"}


def _plain_password(text: str) -> bool:
    # "password: reset" and "password: ********" are talk about passwords, not
    # passwords: the value must mix character classes and not be a placeholder.
    value = re.split(r"[:=]\s*", text, maxsplit=1)[1].strip("\"'")
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"\d", r"[^A-Za-z0-9]"))
    return value.lower() not in _PLACEHOLDERS and len(set(value)) > 2 and classes >= 2 and "<" not in value


def _url_credentials(text: str) -> bool:
    password = text.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    return password.strip("*") != "" and password.lower() not in _PLACEHOLDERS and not password.startswith("$")


_HEALTH_KW = ("patient", "health", "insurance", "medical", "medicare")

RULES += [
    Rule("UK_NINO", "national_id", "UK National Insurance number",
         _num(r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]"),
         _uk_nino, "HMRC prefix rules", ("national insurance", "nino", "ni number", "ni no"), True,
         "AB 12 34 56 C", "GB 12 34 56 C"),
    # Sixteen characters with letters and a birth date in fixed places: its own shape.
    Rule("UK_DRIVING_LICENCE", "driving_licence", "UK (DVLA) driving licence number",
         _num(r"[A-Z9]{5}\d{6}[A-Z9]{2}\d[A-Z]{2}"), _uk_driving_licence, "DVLA birth-date encoding",
         ("driving licence", "driving license", "dvla", "licence number"), False,
         "MORGA657054SM9IJ", "MORGA613054SM9IJ"),
    Rule("UK_NHS_NUMBER", "health", "UK NHS number", _num(r"\d{3}[ -]?\d{3}[ -]?\d{4}"),
         _uk_nhs, "stdnum.gb.nhs", ("nhs", "nhs number", "patient", "chi number"), True,
         "943 476 5870", "943 476 5871"),
    Rule("US_NPI", "health", "US National Provider Identifier", _num(r"[12]\d{9}"),
         _us_npi, "Luhn with the 80840 prefix", ("npi", "national provider", "provider id"), True,
         "1234567893", "1234567894"),
    Rule("US_DEA_NUMBER", "health", "US DEA registration number", _num(r"[ABCDEFGHJKLMPRSTUX][A-Z9]\d{7}"),
         _us_dea, "DEA check digit", ("DEA", "dea number", "prescriber"), True, "AB1234563", "AB1234564"),
    Rule("US_MBI", "health", "US Medicare Beneficiary Identifier",
         _num(r"[1-9][A-Z][A-Z0-9]\d-?[A-Z][A-Z0-9]\d-?[A-Z]{2}\d{2}"), _us_mbi, "CMS position rules",
         ("medicare", "mbi", "beneficiary"), True, "1EG4-TE5-MK73", "1SG4-TE5-MK73"),
    Rule("AU_MEDICARE", "health", "Australian Medicare card number", _num(r"[2-6]\d{3} ?\d{5} ?\d(?:[-/ ]?\d)?"),
         _au_medicare, "Medicare check digit", ("medicare",), True, "2123 45670 1", "2123 45671 1"),
    Rule("DE_HEALTH_INSURANCE_NUMBER", "health", "German health insurance number (Krankenversichertennummer)",
         _num(r"[A-Z]\d{9}"), _de_kvnr, "GKV check digit",
         ("krankenversichertennummer", "versichertennummer", "krankenkasse", "kvnr", "gesundheitskarte"), True,
         "A123456780", "A123456781"),
    Rule("PASSPORT_MRZ", "passport", "Passport machine readable zone (ICAO 9303), second line",
         _num(r"[A-Z0-9<]{9}\d[A-Z<]{3}\d{6}\d[MFX<]\d{6}\d[A-Z0-9<]{14}[\d<]\d"), _passport_mrz,
         "ICAO 9303 check digits", ("passport", "mrz"), False,
         "L898902C36UTO7408122F1204159ZE184226B<<<<<10", "L898902C36UTO7408122F1204159ZE184226B<<<<<11"),
    # Passport and driving licence numbers below have no check digit anyone can
    # compute from the number alone: the format plus a keyword labelling it
    # ("Passport No. A12345678") is the evidence.
    Rule("US_PASSPORT", "passport", "US (or UK) passport number", _num(r"[A-Z]\d{8}|\d{9}"), None, None,
         ("passport", "passport number", "passport no"), True, "A12345678", None),
    Rule("DE_PASSPORT", "passport", "German passport or identity card number",
         _num(r"[CFGHJK][CFGHJKLMNPRTVWXYZ0-9]{8}"), None, None,
         ("reisepass", "passport", "personalausweis", "ausweisnummer", "passnummer"), True, "C01X00T47", None),
    Rule("FR_PASSPORT", "passport", "French passport number", _num(r"\d{2}[A-Z]{2}\d{5}"), None, None,
         ("passeport", "passport"), True, "12AB34567", None),
    Rule("CA_PASSPORT", "passport", "Canadian passport number", _num(r"[A-Z]{2}\d{6}"), None, None,
         ("passport", "passeport"), True, "GA123456", None),
    Rule("IN_PASSPORT", "passport", "Indian passport number", _num(r"[A-PR-WY][1-9]\d ?\d{4}[1-9]"), None, None,
         ("passport",), True, "J8369854", None),
    Rule("US_DRIVERS_LICENSE", "driving_licence", "US driver's license number (letter and 7 digits: CA, NY, FL...)",
         _num(r"[A-Z]\d{7}"), None, None,
         ("driver's license", "drivers license", "driver license", "driver's licence", "dl#", "dl number"), True,
         "D1234567", None),
    Rule("AU_DRIVERS_LICENCE", "driving_licence", "Australian driver licence number",
         _num(r"\d{8,9}"), None, None, ("driver licence", "drivers licence", "driver's licence"), True,
         "12345678", None),
]


# -- secrets ------------------------------------------------------------------------
#
# (name, what, pattern, public prefix length shown in evidence, keywords, needs_keyword, validator, example, counter)

_SECRETS: list[tuple[str, str, str, int, tuple[str, ...], bool, tuple, str, str | None]] = [
    ("PRIVATE_KEY", "Private key (PEM or OpenSSH)",
     # The armour line and the start of a key body: a key, not a mention of one.
     r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?-----\s+[A-Za-z0-9+/=\s]{64,}",
     0, (), False, (None, None),
     "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw\n", None),
    ("AWS_ACCESS_KEY_ID", "AWS access key id", r"(?:AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}", 4, ("aws",), False,
     (None, None), "AKIAIOSFODNN7EXAMPLE", None),
    ("AWS_SECRET_ACCESS_KEY", "AWS secret access key", r"[A-Za-z0-9/+]{40}", 0,
     ("aws_secret_access_key", "secret access key", "aws secret", "secretaccesskey"), True, (None, None),
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", None),
    ("GOOGLE_API_KEY", "Google Cloud API key", r"AIza[0-9A-Za-z_-]{35}", 4, (), False, (None, None),
     "AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe", None),
    ("AZURE_STORAGE_ACCOUNT_KEY", "Azure storage account key in a connection string",
     r"AccountKey=[A-Za-z0-9+/]{86}==", 11, (), False, (None, None),
     "AccountKey=" + "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==", None),
    ("AZURE_CLIENT_SECRET", "Azure AD application client secret", r"[A-Za-z0-9_~.-]{3}\dQ~[A-Za-z0-9_~.-]{31,34}", 0,
     (), False, (None, None), "abc8Q~" + "x" * 10 + "Y" * 10 + "z0123456789_~", None),
    ("GITHUB_TOKEN", "GitHub personal access, OAuth or app token",
     r"(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82}", 4, (), False, (None, None),
     "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8", None),
    ("GITLAB_TOKEN", "GitLab personal access token", r"glpat-[A-Za-z0-9_-]{20}", 6, (), False, (None, None),
     "glpat-" + "Ab3dEf6hIj9lMn2pQr5t", None),
    ("SLACK_TOKEN", "Slack API token", r"xox[baprs]-[A-Za-z0-9-]{10,}", 5, (), False, (None, None),
     "xoxb-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", None),
    ("SLACK_WEBHOOK_URL", "Slack incoming webhook URL",
     r"https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]{24}", 33, (), False, (None, None),
     "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX", None),
    ("STRIPE_SECRET_KEY", "Stripe live secret or restricted key", r"(?:sk|rk)_live_[A-Za-z0-9]{24,99}", 8, (), False,
     (None, None), "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc", None),
    ("SENDGRID_API_KEY", "SendGrid API key", r"SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}", 3, (), False,
     (None, None), "SG." + "a" * 22 + "." + "B" * 43, None),
    ("OPENAI_API_KEY", "OpenAI API key",
     r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}T3BlbkFJ[A-Za-z0-9_-]{20,}", 3, (), False, (None, None),
     "sk-proj-" + "a1B2" * 6 + "T3BlbkFJ" + "c3D4" * 6, None),
    ("ANTHROPIC_API_KEY", "Anthropic API key", r"sk-ant-(?:api|admin)\d{2}-[A-Za-z0-9_-]{80,}", 7, (), False,
     (None, None), "sk-ant-api03-" + "Ab1_" * 23, None),
    ("NPM_TOKEN", "npm access token", r"npm_[A-Za-z0-9]{36}", 4, (), False, (None, None),
     "npm_" + "Z9y8X7w6V5u4T3s2R1q0P9o8N7m6L5k4J3i2", None),
    ("PYPI_TOKEN", "PyPI API token", r"pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}", 5, (), False, (None, None),
     "pypi-AgEIcHlwaS5vcmc" + "CJ" * 30, None),
    ("HASHICORP_VAULT_TOKEN", "HashiCorp Vault service token", r"hvs\.[A-Za-z0-9_-]{90,}", 4, (), False,
     (None, None), "hvs." + "CAESI" * 19, None),
    ("SHOPIFY_ACCESS_TOKEN", "Shopify access token", r"shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}", 6, (), False,
     (None, None), "shpat_" + "0123456789abcdef" * 2, None),
    ("JSON_WEB_TOKEN", "JSON Web Token (bearer credential)",
     r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{10,}", 3, (), False, (_jwt, "decodes to a JWT header"),
     "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     "eyJub3RhIjoiand0In0.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
    ("PASSWORD_IN_TEXT", "A password written out in plain text",
     r"(?i:password|passwd|pwd|passwort|kennwort|mot de passe|contraseña|senha)\s*[:=]\s*\S{6,}", 0, (), False,
     (_plain_password, "not a placeholder; mixed characters"), "Password: Winter2024!", "Password: ********"),
    ("CREDENTIALS_IN_URL", "A URL or connection string carrying a user name and password",
     r"[a-z][a-z0-9+.-]{1,20}://[^\s:/@]+:[^\s/@]{3,}@[^\s/]+", 0, (), False,
     (_url_credentials, "a real password, not a placeholder"),
     "postgres://app:S3cr3t-Pa55@db.internal:5432/app", "postgres://app:****@db.internal:5432/app"),
]

for _name, _what, _pattern, _prefix, _kw, _needs, (_validator, _vname), _ex, _counter in _SECRETS:
    RULES.append(Rule(_name, "secret", _what, _num(_pattern), _validator, _vname, _kw, _needs, _ex, _counter,
                      secret_prefix=_prefix))

_HINTS = {
    "PRIVATE_KEY": ("private key",),
    "AWS_ACCESS_KEY_ID": ("akia", "asia", "abia", "acca"),
    "GOOGLE_API_KEY": ("aiza",),
    "AZURE_STORAGE_ACCOUNT_KEY": ("accountkey=",),
    "AZURE_CLIENT_SECRET": ("q~",),
    "GITHUB_TOKEN": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    "GITLAB_TOKEN": ("glpat-",),
    "SLACK_TOKEN": ("xox",),
    "SLACK_WEBHOOK_URL": ("hooks.slack.com",),
    "STRIPE_SECRET_KEY": ("_live_",),
    "SENDGRID_API_KEY": ("sg.",),
    "OPENAI_API_KEY": ("t3blbkfj",),
    "ANTHROPIC_API_KEY": ("sk-ant-",),
    "NPM_TOKEN": ("npm_",),
    "PYPI_TOKEN": ("pypi-",),
    "HASHICORP_VAULT_TOKEN": ("hvs.",),
    "SHOPIFY_ACCESS_TOKEN": ("shpat_", "shpca_", "shppa_", "shpss_"),
    "JSON_WEB_TOKEN": ("eyj",),
    "PASSWORD_IN_TEXT": ("password", "passwd", "pwd", "passwort", "kennwort", "mot de passe", "contraseña", "senha"),
    "CREDENTIALS_IN_URL": ("://",),
    "PASSPORT_MRZ": ("<",),
}
RULES = [replace(rule, hints=_HINTS.get(rule.name, ())) for rule in RULES]

BY_NAME: dict[str, Rule] = {rule.name: rule for rule in RULES}
assert len(BY_NAME) == len(RULES), "rule names must be unique"


# -- masking -------------------------------------------------------------------------


def mask(rule: Rule, match: str) -> str:
    """What may leave the message: the last digits of a number at most, a secret's kind and public prefix.

    A number keeps its separators (so "**** **** **** 1111" still reads as a
    card) and shows at most its last four characters, fewer for short
    numbers, where four would give away too much of it.
    """
    if rule.secret_prefix is not None:
        if rule.name == "PASSWORD_IN_TEXT":
            return re.split(r"[:=]", match, maxsplit=1)[0].strip() + ": ****"
        if rule.name == "CREDENTIALS_IN_URL":
            return match.split("://", 1)[0] + "://****"
        if rule.name == "PRIVATE_KEY":  # the armour line names the kind of key and is not secret
            return "-----" + match.split("-----", 2)[1] + "----- ****"
        return match[: min(rule.secret_prefix, len(match))] + "****"
    chars = [c for c in match if c.isalnum()]
    reveal = min(4, len(chars) // 3)
    shown, out = 0, []
    for c in reversed(match):
        if c.isalnum():
            out.append(c if shown < reveal else "*")
            shown += 1
        else:
            out.append(c)
    return "".join(reversed(out))
