"""Backscatter Protection: BATV "prvs" signatures on the return path.

Outgoing mail from a local sender leaves with its MAIL FROM signed
(draft-levine-smtp-batv-01, section 4.1, "Simple Private Signature"):

    prvs=KDDDSSSSSS=user@example.com

K is the key number (one digit), DDD the last day the address is valid (days
since 1970-01-01, modulo 1000) and SSSSSS the first three bytes, in hex, of
an HMAC-SHA1 over "KDDD" and the original address. A delivery status
notification or auto-reply addressed to a local user is genuine only if it
comes back to such an address, unexpired and with a good signature.

Keys: the key material is never in an event or the policy (both are
published to Kafka). Each key is derived from one master secret held in a
file (``$BULWARK_BACKSCATTER_SECRET_FILE``, created 0600 on first use) and the
key's rotation record, which *is* an event (``backscatter.key_rotated``, on
a compacted topic): rotating publishes a new key number and its start, every
node derives the same key from it, and the previous key stays valid for the
validity period so replies to recently signed mail still verify.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

EPOCH = date(1970, 1, 1)
_PRVS = re.compile(r"^prvs=(?P<k>\d)(?P<ddd>\d{3})(?P<sig>[0-9a-f]{6})=(?P<local>.+)@(?P<domain>[^@]+)$", re.I)


@dataclass(frozen=True)
class Key:
    number: int
    started: datetime
    material: bytes


def load_master_secret(path: Path) -> bytes:
    """The master secret, created with 32 random bytes (mode 0600) if missing."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    data = path.read_bytes()
    if len(data) < 32:
        raise ValueError(f"backscatter secret {path} is shorter than 32 bytes")
    return data


def derive_key(master: bytes, number: int, started: datetime) -> Key:
    # HKDF-style expansion with one HMAC: a key number reused after ten
    # rotations gets different material because its start differs.
    info = f"bulwark-batv-prvs/{number}/{started.astimezone(timezone.utc).isoformat()}".encode()
    return Key(number, started, hmac.new(master, info, hashlib.sha256).digest())


def day_number(when: datetime) -> int:
    return (when.astimezone(timezone.utc).date() - EPOCH).days


def _signature(key: Key, k_ddd: str, address: str) -> str:
    return hmac.new(key.material, (k_ddd + address.lower()).encode(), hashlib.sha1).hexdigest()[:6]


def sign(address: str, key: Key, now: datetime, validity_days: int) -> str:
    """The prvs form of ``address``; the null sender and signed addresses are left alone."""
    if not address or address.lower().startswith("prvs="):
        return address
    local, _, domain = address.rpartition("@")
    k_ddd = f"{key.number}{(day_number(now) + validity_days) % 1000:03d}"
    return f"prvs={k_ddd}{_signature(key, k_ddd, address)}={local}@{domain}"


@dataclass(frozen=True)
class Check:
    status: str  # "valid", "missing", "invalid", "expired"
    address: str  # the untagged address
    reason: str = ""


def verify(address: str, keys: dict[int, Key], now: datetime, validity_days: int) -> Check:
    match = _PRVS.match(address)
    if not match:
        return Check("missing", address, "no BATV signature")
    original = f"{match['local']}@{match['domain']}"
    k, ddd, sig = int(match["k"]), match["ddd"], match["sig"].lower()
    key = keys.get(k)
    if key is None:
        return Check("invalid", original, f"unknown or retired key {k}")
    if not hmac.compare_digest(_signature(key, f"{k}{ddd}", original), sig):
        return Check("invalid", original, "signature does not match")
    # DDD is the last valid day modulo 1000: it lies between today and
    # today + validity (modulo 1000) for a live address.
    days_left = (int(ddd) - day_number(now)) % 1000
    if days_left > validity_days:
        return Check("expired", original, "signature expired")
    return Check("valid", original)


def usable_keys(rotations: list[tuple[int, datetime]], master: bytes, now: datetime,
                validity_days: int) -> tuple[Key | None, dict[int, Key]]:
    """(the signing key, the keys a signature may use) from the rotation history.

    The newest rotation signs; an older key verifies until ``validity_days``
    after it was superseded, since mail signed just before the rotation may
    still be answered.
    """
    ordered = sorted(rotations, key=lambda r: r[1])
    if not ordered:
        return None, {}
    keys: dict[int, Key] = {}
    for (number, started), nxt in zip(ordered, [*ordered[1:], None]):
        if nxt is None or now - nxt[1] <= timedelta(days=validity_days):
            keys[number] = derive_key(master, number, started)
    current = ordered[-1]
    return keys[current[0]], keys


AUTO_REPLY_HEADERS = {
    "auto-submitted": lambda v: v.strip().lower() != "no",
    "x-autoreply": lambda v: True,
    "x-autorespond": lambda v: True,
    "precedence": lambda v: v.strip().lower() in ("auto_reply", "auto-reply"),
}


def is_auto_reply(headers) -> bool:
    """RFC 3834 Auto-Submitted, and the common vacation-responder markers."""
    for name, test in AUTO_REPLY_HEADERS.items():
        value = headers.get(name)
        if value is not None and test(str(value)):
            return True
    return False


# --------------------------------------------------------------------------
# Policy and run time.
# --------------------------------------------------------------------------

from pydantic import BaseModel, ConfigDict, Field  # noqa: E402


class BackscatterSettings(BaseModel):
    """The guide's Backscatter Protection screen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Sign outgoing return paths and check returned mail")
    reject: bool = Field(
        default=False,
        description="Refuse returned mail without a valid signature (it is always logged as a session.flagged event)",
    )
    validity_days: int = Field(default=7, ge=1, le=30, description="How long a signed return path stays valid")
    exclude_allow_listed: bool = Field(default=True, description="Skip allow-listed client addresses and hosts")
    exclude_authenticated: bool = Field(default=True, description="Skip authenticated sessions")
    exclude_domain_mail_servers: bool = Field(default=True, description="Skip the domain mail servers")


class Keyring:
    """The backscatter keys at run time: the master secret plus the rotation events."""

    def __init__(self, settings):
        from bulwark.state import StateView
        from schemas.topics import BACKSCATTER_KEYS

        self.master = load_master_secret(settings.backscatter_secret_file)
        self.view = StateView(settings, BACKSCATTER_KEYS)

    async def start(self) -> None:
        await self.view.start()

    async def stop(self) -> None:
        await self.view.stop()

    def keys(self, now: datetime, validity_days: int) -> tuple[Key, dict[int, Key]]:
        # Key 0 from the epoch is the key before any rotation: derived from
        # the master secret alone, so a fresh gateway signs without ceremony.
        rotations = [(0, datetime(1970, 1, 1, tzinfo=timezone.utc))]
        rotations += [(e.key_number, e.occurred_at) for e in self.view.state.values()]
        current, keys = usable_keys(rotations, self.master, now, validity_days)
        assert current is not None
        return current, keys
