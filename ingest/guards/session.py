"""What a guard sees of an SMTP session.

The guards judge a session without knowing the server that runs it: this
protocol is all they read, and ``ingest.server.GatewaySession`` (aiosmtpd's
session plus Bulwark's facts) is the one implementation. So the guards do
not import the server, and a test can judge a guard with any object of this
shape. A guard that needs to remember something about a session between two
phases keeps it on the session under a name of its own (``sender_note``,
``backscatter_checks``...), read with ``getattr`` and a default.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiosmtpd.smtp import Envelope


class GuardSession(Protocol):
    #: The session's event id: every event of the session carries it.
    id: str
    client_ip: str
    #: What the connect guards learned: the allow-list entry that matched the
    #: client (or the sender, at MAIL), its host name and its country.
    allow_listed_client: str | None
    allow_listed_sender: str | None
    client_host: str | None
    client_country: str | None
    #: Commands so far and RCPTs beyond the recipient limit (session limits).
    commands: int
    recipient_overshoot: int
    #: aiosmtpd's: whether AUTH succeeded, and with what (the login).
    authenticated: bool | None
    auth_data: Any
    #: The transaction in progress, or None between transactions.
    envelope: Envelope | None
