"""A programmable SMTP server playing the organisation's mail server in tests.

Real aiosmtpd on a real socket (in a thread, through aiosmtpd's Controller).
Recipients can be told to answer with a list of replies, one per attempt,
before they start accepting.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller


@dataclass
class Delivered:
    mail_from: str
    rcpt_to: list[str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


@dataclass
class Downstream:
    #: recipient -> replies to give at RCPT, one per attempt (then 250)
    scripted: dict[str, list[str]] = field(default_factory=dict)
    #: recipients refused for ever
    refused: dict[str, str] = field(default_factory=dict)
    received: list[Delivered] = field(default_factory=list)
    rcpt_attempts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server, session, envelope, address, options):
        with self.lock:
            self.rcpt_attempts[address] = self.rcpt_attempts.get(address, 0) + 1
            if address in self.refused:
                return self.refused[address]
            script = self.scripted.get(address)
            if script:
                return script.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            sender = "" if envelope.mail_from == "<>" else envelope.mail_from
            self.received.append(Delivered(sender, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 Ok: stored"

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "a delivery") -> list[Delivered]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [d for d in self.received if predicate(d)]
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no {what} within {timeout:.0f}s; downstream has {len(self.received)} message(s)")

    def matching(self, predicate) -> list[Delivered]:
        with self.lock:
            return [d for d in self.received if predicate(d)]


def start_downstream(port: int) -> tuple[Downstream, Controller]:
    downstream = Downstream()
    controller = Controller(downstream, hostname="127.0.0.1", port=port, decode_data=False)
    controller.start()
    return downstream, controller
