"""Ordinary business mail, generated: the numbers DLP must let through.

Order and invoice confirmations, shipping notices with the big carriers'
tracking numbers, meeting invitations, support tickets, quotes with part
numbers and barcodes, travel bookings, payment reminders and signatures with
phone numbers in many national formats, in several languages. Every value is
drawn from a seeded generator, so the corpus is large and the same on every
run.

Nothing here is what a rule is meant to find: there is no card, IBAN, VAT or
national number with its label. There are numbers of the same shapes (16
digits, 12 digits, an IBAN with a wrong check digit, a barcode whose check
digit happens to be right), which is what an ordinary mailbox holds.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Callable

SEED = 13
MESSAGES = 1500

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_NAMES = ["Erin", "Frank", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena", "Marta", "Noor", "Oskar", "Priya"]
_CITIES = [("SW1A 1AA", "London"), ("10115", "Berlin"), ("75008", "Paris"), ("28013", "Madrid"),
           ("1012 AB", "Amsterdam"), ("20121", "Milano"), ("NY 10001", "New York"), ("1000-001", "Lisboa"),
           ("8001", "Zürich"), ("00-950", "Warszawa"), ("111 22", "Stockholm"), ("2000", "Sydney")]


@dataclass
class Mail:
    kind: str
    text: str
    #: Every number the text carries (identifiers, amounts, dates, phones), as written.
    numbers: list[str] = field(default_factory=list)


class _Numbers:
    """Draws the values; each one drawn is remembered as one number of the corpus."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.drawn: list[str] = []

    def _keep(self, value: str) -> str:
        self.drawn.append(value)
        return value

    def digits(self, n: int, lead: str = "123456789") -> str:
        return self.rng.choice(lead) + "".join(self.rng.choice(string.digits) for _ in range(n - 1))

    def letters(self, n: int) -> str:
        return "".join(self.rng.choice(string.ascii_uppercase) for _ in range(n))

    def pick(self, *makers: Callable[[], str]) -> str:
        return self._keep(self.rng.choice(makers)())

    @staticmethod
    def grouped(value: str, size: int = 4, sep: str = " ") -> str:
        return sep.join(value[i:i + size] for i in range(0, len(value), size))

    # -- orders, invoices, references ---------------------------------------------

    def order(self) -> str:
        d, r = self.digits, self.rng
        return self.pick(
            lambda: d(r.choice((8, 9, 10, 12, 13, 14, 16))),
            lambda: f"{d(3)}-{d(7, '0123456789')}-{d(7, '0123456789')}",  # marketplace style
            lambda: f"#{d(r.choice((4, 5, 6)))}",
            lambda: f"ORD-{r.randint(2019, 2027)}-{d(6, '0123456789')}",
            lambda: f"SO{d(6)}",
            lambda: f"{r.randint(2019, 2027)}{r.randint(1, 12):02d}{r.randint(1, 28):02d}-{d(4, '0')}",
            lambda: f"{r.randint(19, 27)}{r.randint(1, 12):02d}{r.randint(1, 28):02d}-{d(4, '0123456789')}",
            lambda: self.grouped(d(16)),
        )

    def invoice(self) -> str:
        d, r = self.digits, self.rng
        return self.pick(
            lambda: f"INV-{r.randint(2019, 2027)}-{d(5, '0')}",
            lambda: f"{r.randint(2019, 2027)}/{d(4, '0')}",
            lambda: d(r.choice((6, 8, 9, 10, 11, 12))),
            lambda: f"RE{d(8)}",
            lambda: f"FT {r.randint(2019, 2027)}/{d(3)}",
            lambda: f"{d(2)}-{d(7)}",
            lambda: f"{d(3)}-{r.randint(19, 27)}-{d(4, '0')}",  # branch, year, sequence
        )

    def purchase_order(self) -> str:
        d = self.digits
        return self.pick(lambda: f"45{d(8, '0123456789')}", lambda: f"PO-{d(6)}", lambda: d(10),
                         lambda: f"{d(2)}-{d(5)}-{d(2, '0123456789')}")

    def customer(self) -> str:
        d, r = self.digits, self.rng
        return self.pick(lambda: d(r.choice((6, 7, 8, 9, 10, 11))), lambda: f"C{d(7)}",
                         lambda: f"{d(4)} {d(4, '0123456789')} {d(4, '0123456789')}",
                         lambda: f"{d(3)} {d(3, '0123456789')} {d(3, '0123456789')}")

    def ticket(self) -> str:
        d = self.digits
        return self.pick(lambda: f"INC{d(7, '0')}", lambda: f"CS{d(8, '0')}", lambda: f"#{d(6)}",
                         lambda: f"SR 1-{d(9)}", lambda: f"{self.letters(4)}-{d(4)}", lambda: d(8),
                         lambda: f"RMA {d(6)}", lambda: f"{d(4)}-{d(6, '0123456789')}-{d(5, '0123456789')}")

    def reference(self) -> str:
        d, r = self.digits, self.rng
        return self.pick(
            lambda: f"{r.randint(2019, 2027)}/{self.letters(3)}/{d(5, '0')}",
            lambda: self.letters(6),
            lambda: f"{self.letters(2)}{d(6)}{self.letters(1)}",
            lambda: d(r.choice((11, 12, 13, 15, 18, 20))),
            lambda: f"{d(8)}{self.letters(1)}",
            lambda: f"{self.letters(1)}{d(7)}{self.letters(1)}",
            lambda: f"{d(6)}-{d(3, '0123456789')}{r.choice('0123456789ABCDEFHJKLMNPRSTUVWXY')}",
            lambda: f"{d(6)}/{d(4, '0123456789')}",
            lambda: f"{d(6)}-{d(2)}-{d(4, '0123456789')}",
        )

    # -- products ---------------------------------------------------------------

    def ean13(self) -> str:
        # A retail barcode: GS1 prefix (400-440 is Germany), a real EAN check digit.
        body = self.rng.choice(["40", "41", "42", "43", "44", "50", "54", "57", "76", "80", "87", "93"]) + \
            self.digits(10, "0123456789")
        check = (10 - sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(body)) % 10) % 10
        return self._keep(body + str(check))

    def part(self) -> str:
        d, r = self.digits, self.rng
        return self.pick(
            lambda: f"{d(4)}-{d(4, '0123456789')}-{d(2, '0123456789')}",
            lambda: f"{d(3)}-{d(5, '0123456789')}-{d(2, '0123456789')}",
            lambda: f"{self.letters(3)}-{d(4)}-{self.letters(3)}",
            lambda: f"{d(5)}-{self.letters(3)}",
            lambda: d(r.choice((7, 8, 9, 10, 11))),
            lambda: f"{self.letters(1)}{d(7)}",
            lambda: f"{d(7)}{self.letters(1)}",
            lambda: f"{self.letters(2)}-{self.letters(1)}{d(4)}{self.letters(1)}-{d(2)}",
            lambda: f"978-{d(1)}-{d(2, '0123456789')}-{d(6, '0123456789')}-{d(1, '0123456789')}",
            lambda: f"{self.letters(3)}{d(4)}{self.letters(1)}{d(1)}{self.letters(2)}",  # serial numbers
            lambda: self.grouped(d(r.choice((12, 16, 20)))),
        )

    # -- shipping ---------------------------------------------------------------

    def tracking(self) -> tuple[str, str]:
        d, r, letters = self.digits, self.rng, self.letters
        carriers: list[tuple[str, Callable[[], str]]] = [
            ("UPS", lambda: f"1Z{letters(3)}{d(3)}{d(10, '0123456789')}"),
            ("UPS", lambda: f"1Z {letters(3)} {d(3)} {d(2)} {d(4, '0123456789')} {d(4, '0123456789')}"),
            ("FedEx", lambda: d(12, "4567")),
            ("FedEx Ground", lambda: d(15)),
            ("FedEx", lambda: "96" + d(20, "0123456789")),
            ("USPS", lambda: self.grouped(r.choice(["9400", "9205", "9361", "9270"]) + d(18, "0123456789"))),
            ("USPS", lambda: r.choice(["9400", "9205", "9361"]) + d(18, "0123456789")),
            ("USPS Priority Mail Express", lambda: f"E{letters(1)}{d(9)}US"),
            ("DHL Express", lambda: d(10)),
            ("DHL Paket", lambda: "00340434" + d(12, "0123456789")),
            ("DHL Paket", lambda: d(12)),
            ("DHL eCommerce", lambda: f"GM{d(18)}"),
            ("Royal Mail", lambda: f"{letters(2)} {d(4)} {d(4, '0123456789')} {d(1)}GB"),
            ("Royal Mail", lambda: f"{letters(2)}{d(9)}GB"),
            ("Canada Post", lambda: d(16)),
            ("DPD", lambda: d(14, "0")),
            ("GLS", lambda: d(r.choice((11, 12)))),
            ("Evri", lambda: d(16)),
            ("PostNL", lambda: f"3S{letters(4)}{d(7)}"),
            ("Colissimo", lambda: f"6A{d(11)}"),
            ("Amazon Logistics", lambda: f"TBA{d(12)}"),
            ("China Post", lambda: f"L{letters(1)}{d(9)}CN"),
            ("Japan Post", lambda: f"{d(4)}-{d(4, '0123456789')}-{d(4, '0123456789')}"),
            ("Australia Post", lambda: f"{d(2)}{letters(3)}{d(7)}"),
            ("TNT", lambda: d(9)),
            ("Aramex", lambda: d(11)),
            ("Correos", lambda: f"PQ{d(4)}{letters(2)}{d(14)}"),
            ("Poste Italiane", lambda: d(13)),
        ]
        carrier, make = r.choice(carriers)
        return carrier, self._keep(make())

    # -- dates, amounts, phones ----------------------------------------------------

    def date(self) -> str:
        r = self.rng
        y, m, day = r.randint(2024, 2028), r.randint(1, 12), r.randint(1, 28)
        return self.pick(lambda: f"{m:02d}/{day:02d}/{y}", lambda: f"{day:02d}.{m:02d}.{y}", lambda: f"{y}-{m:02d}-{day:02d}",
                         lambda: f"{day} {_MONTHS[m - 1][:3]} {y}", lambda: f"{_MONTHS[m - 1]} {day}, {y}",
                         lambda: f"{day:02d}/{m:02d}/{y}", lambda: f"{m:02d}/{y % 100:02d}", lambda: f"{m}/{day}")

    def amount(self) -> str:
        r = self.rng
        value = r.choice([r.randint(1, 999), r.randint(1000, 99999), r.randint(100000, 9999999)]) + r.randint(0, 99) / 100
        us = f"{value:,.2f}"
        eu = us.replace(",", " ").replace(".", ",").replace(" ", ".")
        return self.pick(lambda: f"${us}", lambda: f"€ {eu}", lambda: f"EUR {eu}", lambda: f"£{us}",
                         lambda: f"{eu} €", lambda: f"USD {us}", lambda: f"CHF {us.replace(',', chr(39))}",
                         lambda: f"¥{int(value):,}", lambda: f"{eu} zł", lambda: f"R$ {eu}")

    def quantity(self) -> str:
        return self._keep(str(self.rng.choice([1, 2, 3, 5, 10, 12, 20, 24, 50, 100, 250, 1000])))

    def phone(self) -> str:
        d = self.digits
        z = "0123456789"
        return self.pick(
            lambda: f"({d(3)}) {d(3, z)}-{d(4, z)}", lambda: f"+1 {d(3)}-{d(3, z)}-{d(4, z)}",
            lambda: f"{d(3)}.{d(3, z)}.{d(4, z)}", lambda: f"1-800-{d(3)}-{d(4, z)}",
            lambda: f"+44 20 {d(4, z)} {d(4, z)}", lambda: f"020 {d(4, z)} {d(4, z)}", lambda: f"07{d(3, z)} {d(6, z)}",
            lambda: f"+44 (0){d(4)} {d(6, z)}",
            lambda: f"+49 30 {d(8, z)}", lambda: f"030 {d(7, z)}-0", lambda: f"+49 (0)89 {d(3, z)} {d(3, z)} {d(2, z)}",
            lambda: f"+49 151 {d(8, z)}", lambda: f"0{d(4)}/{d(6, z)}",
            lambda: f"+33 1 {d(2, z)} {d(2, z)} {d(2, z)} {d(2, z)}", lambda: f"0{d(1)} {d(2, z)} {d(2, z)} {d(2, z)} {d(2, z)}",
            lambda: f"+31 20 {d(3, z)} {d(4, z)}", lambda: f"06-{d(8, z)}",
            lambda: f"+34 9{d(2, z)} {d(3, z)} {d(3, z)}", lambda: f"6{d(2, z)} {d(2, z)} {d(2, z)} {d(2, z)}",
            lambda: f"+39 02 {d(4, z)} {d(4, z)}", lambda: f"+39 3{d(2, z)} {d(3, z)} {d(4, z)}",
            lambda: f"+81 3-{d(4, z)}-{d(4, z)}", lambda: f"090-{d(4, z)}-{d(4, z)}",
            lambda: f"+61 2 {d(4, z)} {d(4, z)}", lambda: f"04{d(2, z)} {d(3, z)} {d(3, z)}",
            lambda: f"+91 9{d(4, z)} {d(5, z)}", lambda: f"+55 11 9{d(4, z)}-{d(4, z)}",
            lambda: f"+86 1{d(2, z)} {d(4, z)} {d(4, z)}", lambda: f"08-{d(3, z)} {d(3, z)} {d(2, z)}",
            lambda: f"+48 {d(2)} {d(3, z)} {d(2, z)} {d(2, z)}", lambda: f"+41 44 {d(3, z)} {d(2, z)} {d(2, z)}",
            lambda: f"+351 21 {d(3, z)} {d(4, z)}", lambda: f"+353 1 {d(3, z)} {d(4, z)}",
            lambda: f"+46 8 {d(3, z)} {d(3, z)} {d(2, z)}", lambda: f"+45 {d(2)} {d(2, z)} {d(2, z)} {d(2, z)}",
            lambda: f"+82 10-{d(4, z)}-{d(4, z)}", lambda: f"+27 11 {d(3, z)} {d(4, z)}",
        )

    def meeting_id(self) -> str:
        d, z = self.digits, "0123456789"
        return self.pick(lambda: f"{d(3)} {d(4, z)} {d(4, z)}", lambda: f"{d(3)} {d(3, z)} {d(3, z)} {d(3, z)}",
                         lambda: f"{d(4)} {d(3, z)} {d(4, z)}", lambda: d(11))

    def passcode(self) -> str:
        return self.pick(lambda: self.digits(6, "0123456789"), lambda: self.letters(2) + self.digits(4))

    # -- banking lookalikes -----------------------------------------------------------

    def invalid_iban(self) -> str:
        # The shape of a real IBAN, with check digits that do not match: a typo.
        country, length = self.rng.choice([("DE", 22), ("FR", 27), ("GB", 22), ("NL", 18), ("ES", 24), ("IT", 27),
                                           ("BE", 16), ("AT", 20), ("CH", 21), ("PL", 28)])
        if country == "GB":
            bban = self.letters(4) + self.digits(14, "0123456789")
        elif country == "NL":
            bban = self.letters(4) + self.digits(10, "0123456789")
        elif country == "IT":
            bban = self.letters(1) + self.digits(22, "0123456789")
        else:
            bban = self.digits(length - 4, "0123456789")
        right = 98 - int("".join(str(int(c, 36)) for c in bban + country + "00")) % 97
        wrong = self.rng.choice([check for check in range(2, 99) if check != right])
        value = f"{country}{wrong:02d}{bban}"
        return self._keep(self.rng.choice([value, self.grouped(value)]))


# -- the mails --------------------------------------------------------------------


def _order_confirmation(n: _Numbers) -> str:
    r = n.rng
    lines = [f"Hello {r.choice(_NAMES)},", "",
             f"Thank you for your order {n.order()} placed on {n.date()}.",
             f"Customer number: {n.customer()}", ""]
    for _ in range(r.randint(1, 4)):
        lines.append(f"  {n.quantity()} x Item {n.part()}  EAN {n.ean13()}  {n.amount()}")
    lines += ["", f"Order total: {n.amount()} (incl. tax {n.amount()})",
              f"Paid with: {r.choice(['card ending in ' + n._keep(n.digits(4, '0123456789')), 'PayPal', 'bank transfer', 'invoice'])}",
              f"Questions? Call us at {n.phone()}."]
    return "\n".join(lines)


def _shipping_notice(n: _Numbers) -> str:
    r = n.rng
    carrier, number = n.tracking()
    return r.choice([
        f"Good news! Your order {n.order()} has shipped.\nCarrier: {carrier}\nTracking number: {number}\n"
        f"Estimated delivery: {n.date()}\nStatus: in transit.",
        f"Ihre Bestellung {n.order()} ist unterwegs. Sendungsnummer ({carrier}): {number}. "
        f"Voraussichtliche Zustellung am {n.date()}. Wir haben nie Zugriff auf Ihre Zahlungsdaten.",
        f"Su pedido {n.order()} ha sido enviado sin coste adicional con {carrier}, número de seguimiento {number}.",
        f"Votre colis {number} ({carrier}) est en cours d'acheminement, livraison prévue le {n.date()}.",
        f"Shipment {number} via {carrier} for PO {n.purchase_order()} left our warehouse on {n.date()}; "
        f"{n.quantity()} cartons, {n.quantity()} kg. Routing: {r.choice(['FRA-JFK', 'AMS-ORD', 'HKG-LAX'])}.",
        f"{carrier} {number}\n{carrier} {n.tracking()[1]}\n{carrier} {n.tracking()[1]}\nAll three parcels are in transit.",
    ])


def _invoice(n: _Numbers) -> str:
    r = n.rng
    lines = [f"Invoice {n.invoice()}", f"Invoice date: {n.date()}   Due date: {n.date()}",
             f"Customer no.: {n.customer()}   Your PO: {n.purchase_order()}", ""]
    for _ in range(r.randint(1, 5)):
        lines.append(f"{n.part()} ; {n.quantity()} ; {n.amount()} ; {n.amount()}")
    lines += ["", f"Net: {n.amount()}  Tax: {n.amount()}  Total: {n.amount()}",
              r.choice(["Payment by bank transfer or card within 30 days, quoting the invoice number.",
                        "Please pay by card online or by transfer; reference: invoice number.",
                        "Zahlbar innerhalb von 14 Tagen ohne Abzug.",
                        "Pagamento a 30 giorni data fattura."]),
              f"Payment reference: {n.reference()}"]
    return "\n".join(lines)


def _payment_reminder(n: _Numbers) -> str:
    return (f"Dear customer,\n\nour records show invoice {n.invoice()} of {n.date()} for {n.amount()} is still open. "
            f"If you have paid in the meantime (bank reference {n.reference()}), please ignore this reminder. "
            f"You can also pay by card in the customer portal with your account number {n.customer()}.\n"
            f"Accounts receivable, {n.phone()}")


def _meeting(n: _Numbers) -> str:
    return (f"Join the meeting\nMeeting ID: {n.meeting_id()}\nPasscode: {n.passcode()}\n"
            f"Dial in: {n.phone()},,{n._keep(n.digits(10))}# or {n.phone()}\n"
            f"When: {n.date()} {n._keep(f'{n.rng.randint(8, 17)}:{n.rng.choice([0, 15, 30, 45]):02d}')}")


def _support(n: _Numbers) -> str:
    r = n.rng
    return (f"Case {n.ticket()} has been updated.\nProduct: {n.part()}  Serial number: {n.part()}\n"
            f"Firmware {n._keep(f'{r.randint(1, 9)}.{r.randint(0, 20)}.{r.randint(0, 99)}')}, "
            f"reported {n.date()}. Replacement part {n.part()} ships under RMA with tracking {n.tracking()[1]}.\n"
            f"Ref {n.reference()}, ticket {n.ticket()}.")


def _quote(n: _Numbers) -> str:
    lines = [f"Quote Q-{n._keep(n.digits(6))} valid until {n.date()}", "Part number ; EAN ; Qty ; Unit price"]
    for _ in range(n.rng.randint(2, 6)):
        lines.append(f"{n.part()} ; {n.ean13()} ; {n.quantity()} ; {n.amount()}")
    lines.append(f"Delivery {n.rng.choice(['2-3 weeks', 'ex works', 'DDP'])}; contact {n.phone()}.")
    return "\n".join(lines)


def _travel(n: _Numbers) -> str:
    r = n.rng
    flight = n._keep(f"{r.choice(['LH', 'BA', 'AF', 'UA', 'KL', 'IB'])} {r.randint(1, 9999)}")
    return (f"Your booking {n.reference()} is confirmed.\nFlight {flight} on {n.date()}, e-ticket {n._keep('220' + n.digits(10, '0123456789'))}.\n"
            f"Please make sure your passport is valid for six months after travel.\n"
            f"Hotel confirmation number {n._keep(n.digits(r.choice((8, 9, 10, 12))))}, total {n.amount()}. "
            f"A credit card is required at check-in.\n"
            f"Frequent flyer {n._keep(n.digits(r.choice((9, 10, 12))))}. Need help? {n.phone()}")


def _car_rental(n: _Numbers) -> str:
    r = n.rng
    return (f"Your reservation {n._keep(n.digits(r.choice((9, 10, 12))))} is confirmed.\n"
            f"Pick-up: {n.date()} at {r.choice(_CITIES)[1]} airport, return {n.date()}.\n"
            f"Please bring your driver's license and the credit card used for the booking.\n"
            f"Rental agreement {n._keep(n.letters(1) + n.digits(7))}, vehicle group {n._keep(n.letters(4))}, "
            f"estimated total {n.amount()}. Customer service {n.phone()}.")


def _signature(n: _Numbers) -> str:
    r = n.rng
    postcode, city = r.choice(_CITIES)
    return (f"Best regards,\n{r.choice(_NAMES)}\nAccount Manager\nTel. {n.phone()}\nMobile {n.phone()}\n"
            f"Fax {n.phone()}\n{n._keep(str(r.randint(1, 250)))} Example Street, {postcode} {city}\n"
            f"Registered in {city}, company no. {n._keep(n.digits(8, '0'))}")


def _bank_details_question(n: _Numbers) -> str:
    return (f"Hi, the IBAN on your last invoice {n.invoice()} ({n.invalid_iban()}) is rejected by our bank "
            f"as invalid. Could you send the correct bank details? The amount is {n.amount()}.")


def _spreadsheet_rows(n: _Numbers) -> str:
    lines = ["order ; date ; carrier ; tracking ; amount"]
    for _ in range(n.rng.randint(3, 8)):
        carrier, number = n.tracking()
        lines.append(f"{n.order()} ; {n.date()} ; {carrier} ; {number} ; {n.amount()}")
    return "\n".join(lines)


KINDS: dict[str, Callable[[_Numbers], str]] = {
    "order confirmation": _order_confirmation,
    "shipping notice": _shipping_notice,
    "invoice": _invoice,
    "payment reminder": _payment_reminder,
    "meeting invitation": _meeting,
    "support ticket": _support,
    "quote": _quote,
    "travel booking": _travel,
    "car rental": _car_rental,
    "signature": _signature,
    "bank details question": _bank_details_question,
    "order export": _spreadsheet_rows,
}


def business_mail(seed: int = SEED, messages: int = MESSAGES) -> list[Mail]:
    """``messages`` ordinary mails, each a message body as DLP sees it, the same for the same seed."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(messages):
        kind = rng.choice(sorted(KINDS))
        numbers = _Numbers(rng)
        body = KINDS[kind](numbers)
        if rng.random() < 0.5:
            body += "\n\n" + _signature(numbers)
        corpus.append(Mail(kind, body, numbers.drawn))
    return corpus
