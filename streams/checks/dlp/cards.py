"""Payment card numbers: how they are written, which issuer they belong to, what shows one is real.

A card number is 12 to 19 digits with an issuer prefix and a Luhn check
digit, which about one in ten of any digits pass: a 16-digit order number
that starts with a 4 is a valid-looking Visa one time in ten. So the number
alone is not believed, only next to a word that says it is a card ("card",
"Visa", "CVV", "exp"...). Not even with a date after it: an order export's
next column is often a month and year ("5164 3649 1045 2631 ; 08/26").

Cards are written as printed on them (groups of four; 4-6-5 for American
Express, 4-6-4 for Diners) with spaces or dashes, or as one run of digits,
and are often followed by what else is needed to pay with them: an expiry
date and a security code, in the same layout ("4111 1111 1111 1111 12 27
123"). The pattern takes the digit groups as they come, and ``candidates``
finds the card at their head.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

from stdnum import luhn

# Not inside a longer run of letters and digits, and not starting in the middle
# of a sequence of digit groups (the account part of an IBAN, a phone number).
PATTERN = re.compile(
    r"(?<![A-Za-z0-9])(?=\d{4})(?<!\d[ -])"
    r"(?:\d{12,19}"
    # A short group followed by "/" is a date ("12/27"), not more of the number.
    r"|\d{4}(?P<sep>[ -])\d{2,6}(?:(?P=sep)(?:\d{3,6}|\d{1,2}(?![/.]\d))){1,5})"
    r"(?![A-Za-z0-9])"
)

# What may follow the card in its own layout: a security code (3 digits, 4
# for American Express), an expiry month and year, or both.
_TAIL = re.compile(r"(?:(?:0[1-9]|1[0-2])[ -](?:\d{2}|20\d{2})(?:[ -]\d{3,4})?|\d{3,4})")

KEYWORDS = (
    "card", "cards", "credit card", "debit card", "card number", "card no", "cardholder", "CC", "CC#",
    "visa", "mastercard", "amex", "american express", "discover card", "diners club", "jcb", "unionpay",
    "maestro", "expiry", "expiration", "exp", "valid thru", "cvv", "cvv2", "cvc", "security code",
    "kreditkarte", "carte bancaire", "carte de crédit", "tarjeta", "cartão",
)


def candidates(match: str) -> Iterator[str]:
    """The card number a match may be: its head when what follows is an expiry date or security code, else all of it.

    The head comes first: "4111 1111 1111 1111 123" is a card and its code
    far more often than a 19-digit card.
    """
    ends = [m.end() for m in re.finditer(r"\d+", match)]
    for end in reversed(ends[2:-1]):
        if _TAIL.fullmatch(match[end + 1:]):
            yield match[:end]
    yield match


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def _in_range(number: str, width: int, low: int, high: int) -> bool:
    return low <= int(number[:width]) <= high


def valid(prefixes: Callable[[str], bool], lengths: tuple[int, ...]) -> Callable[[str], bool]:
    def check(text: str) -> bool:
        number = _digits(text)
        return len(number) in lengths and prefixes(number) and luhn.is_valid(number)
    return check


#: name, brand, issuer prefixes (IIN ranges), lengths, example, counterexample (Luhn fails)
#
# Lengths are those of cards in use. The 13-digit Visa, the 15-digit Diners
# and the 12- to 15-digit Maestro of the old specifications are left out: no
# card in anyone's wallet has them, and every retail barcode (EAN-13; 400-440
# is Germany, 500-509 the UK) and many references have those shapes.
BRANDS: list[tuple[str, str, Callable[[str], bool], tuple[int, ...], str, str]] = [
    ("VISA", "Visa", lambda n: n.startswith("4"), (16, 19), "4111 1111 1111 1111", "4111 1111 1111 1112"),
    ("MASTERCARD", "Mastercard",
     lambda n: _in_range(n, 2, 51, 55) or _in_range(n, 4, 2221, 2720), (16,),
     "5555-5555-5555-4444", "5555-5555-5555-4445"),
    ("AMEX", "American Express", lambda n: n[:2] in ("34", "37"), (15,), "3782 822463 10005", "3782 822463 10006"),
    ("DISCOVER", "Discover",
     lambda n: n.startswith("6011") or n.startswith("65") or _in_range(n, 3, 644, 649), (16, 17, 18, 19),
     "6011111111111117", "6011111111111118"),
    ("DINERS", "Diners Club",
     lambda n: _in_range(n, 3, 300, 305) or n.startswith("3095") or n[:2] in ("36", "38", "39"),
     (14, 16, 17, 18, 19), "3056 930902 5904", "3056 930902 5905"),
    ("JCB", "JCB", lambda n: _in_range(n, 4, 3528, 3589), (16, 17, 18, 19), "3530111333300000", "3530111333300001"),
    ("UNIONPAY", "UnionPay", lambda n: n.startswith("62"), (16, 17, 18, 19), "6200000000000005", "6200000000000006"),
    ("MAESTRO", "Maestro",
     lambda n: n[:4] in ("5018", "5020", "5038", "5893", "6304", "6759", "6761", "6762", "6763"),
     (16, 17, 18, 19), "6759649826438453", "6759649826438454"),
    ("MIR", "Mir", lambda n: _in_range(n, 4, 2200, 2204), (16, 17, 18, 19), "2200000000000004", "2200000000000005"),
]
