"""A programmable SMTP server playing the organisation's mail server in tests.

Real aiosmtpd on a real socket (in a thread, through aiosmtpd's Controller).
Recipients can be told to answer with a list of replies, one per attempt,
before they start accepting; and a test can hold the server's reply to DATA
or QUIT until it says go (``hold``), to do something while the client waits.
"""

from __future__ import annotations

import asyncio
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
class Hold:
    """One reply held back: ``reached`` is set when the client is waiting for
    it, and the server answers once the test calls ``release()`` (or after
    ``limit`` seconds). The client's own timeout keeps running meanwhile
    (the delivery sink waits ``delivery.connect_timeout_seconds`` for any
    reply): ``answered`` says whether the client was still there to get it.
    A held DATA whose client hung up is not counted as received, nor one
    answered with a ``reply`` of its own (a refusal)."""

    recipient: str
    command: str
    #: what to answer instead of the usual reply
    reply: str | None = None
    limit: float = 60.0
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()

    def wait_reached(self, timeout: float = 60.0) -> None:
        if not self.reached.wait(timeout):
            raise AssertionError(f"no {self.command} for {self.recipient} within {timeout:.0f}s")

    async def wait(self, server) -> bool:
        """Wait for the release; False if the client hung up meanwhile."""
        self.reached.set()
        deadline = time.monotonic() + self.limit
        while not self.released.is_set() and time.monotonic() < deadline:
            if server.transport is None or server.transport.is_closing():
                return False
            await asyncio.sleep(0.02)
        if server.transport is None or server.transport.is_closing():
            return False
        self.answered.set()
        return True


@dataclass
class Downstream:
    #: recipient -> replies to give at RCPT, one per attempt (then 250)
    scripted: dict[str, list[str]] = field(default_factory=dict)
    #: recipients refused for ever
    refused: dict[str, str] = field(default_factory=dict)
    received: list[Delivered] = field(default_factory=list)
    rcpt_attempts: dict[str, int] = field(default_factory=dict)
    #: (command, recipient) -> the replies held back, one per transaction, in order
    holds: dict[tuple[str, str], list[Hold]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hold(self, recipient: str, command: str = "DATA", reply: str | None = None) -> Hold:
        """Hold the reply to DATA (the 250: the message is counted as received
        when it is sent) or to the QUIT after it, in the next transaction for
        this recipient that no earlier hold is waiting for."""
        assert command in ("DATA", "QUIT")
        hold = Hold(recipient, command, reply)
        with self.lock:
            self.holds.setdefault((command, recipient), []).append(hold)
        return hold

    def _take_hold(self, command: str, rcpts: list[str]) -> Hold | None:
        with self.lock:
            for rcpt in rcpts:
                if self.holds.get((command, rcpt)):
                    return self.holds[(command, rcpt)].pop(0)
        return None

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
        hold = self._take_hold("DATA", envelope.rcpt_tos)
        if hold is not None:
            if not await hold.wait(server):
                return "451 4.3.0 the client left"  # never heard: not received
            if hold.reply:
                return hold.reply
        # The recipients of the session's last transaction, for a held QUIT.
        session.downstream_rcpts = list(envelope.rcpt_tos)
        with self.lock:
            sender = "" if envelope.mail_from == "<>" else envelope.mail_from
            self.received.append(Delivered(sender, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 Ok: stored"

    async def handle_QUIT(self, server, session, envelope):
        hold = self._take_hold("QUIT", getattr(session, "downstream_rcpts", []))
        if hold is not None:
            await hold.wait(server)
        return hold.reply if hold is not None and hold.reply else "221 Bye"

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
