"""The console's administrator accounts: name, role and Argon2id verifier.

Kept in one small JSON file under the data directory (``console/admins.json``,
mode 0600), not on a Kafka topic: an Argon2 verifier is offline-guessable
material, and a topic is read by every consumer with access to it (SIEM
exports included), while this file is read only by the console on its own
host. A JSON file rather than a RocksDB index because ``bulwark console
add-admin`` writes it while the console runs, and RocksDB allows one writer
per directory; the file is replaced atomically (write, fsync, rename), and the
console reads it again at every login, so a new admin can log in at once.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bulwark.passwords import hash_password, verify_password, weaknesses

ROLES = ("admin", "helpdesk")
#: A login name: letters, digits and . _ @ - (an address is fine).
NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
#: The guide's "Use Strong Passwords", as for mail accounts (bulwark/passwords.py):
#: at least this long, and "safely unguessable" (3 of 4) by zxcvbn.
MIN_PASSWORD_LENGTH = 12
MIN_STRENGTH = 3


#: The issuer authenticator apps show next to the account.
TOTP_ISSUER = "Bulwark console"


@dataclass(frozen=True)
class Admin:
    name: str
    role: str
    #: Whether a one-time code (TOTP, RFC 6238) is asked too.
    totp: bool = False
    #: At login: the time step of the code just accepted (a code works once).
    totp_step: int | None = field(default=None, compare=False)


def totp_step(secret: str, code: str, at: float) -> int | None:
    """The 30-second time step ``code`` is valid for around ``at`` (one step of clock
    drift either way, as RFC 6238 section 6 allows), or None.

    The step, not a yes/no, so the console can refuse a code used once
    already (a code seen over a shoulder or in a phishing proxy).
    """
    import pyotp

    code = code.strip().replace(" ", "")
    if not (code.isdigit() and len(code) == 6):
        return None
    totp = pyotp.TOTP(secret)
    now = totp.timecode(datetime.fromtimestamp(at, timezone.utc))
    for step in (now - 1, now, now + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


def admins_path(data_dir: Path) -> Path:
    return data_dir / "console" / "admins.json"


class AdminStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def _write(self, records: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(records, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def add(self, name: str, role: str, password: str) -> Admin:
        """Create or replace ``name``; raises ValueError with a reason (never the password)."""
        if not NAME.match(name):
            raise ValueError("a name is 1 to 64 letters, digits, '.', '_', '@' or '-'")
        if role not in ROLES:
            raise ValueError(f"the role is one of {', '.join(ROLES)}")
        problems = weaknesses(password, name, MIN_PASSWORD_LENGTH, MIN_STRENGTH)
        if problems:
            raise ValueError("the password is too weak: " + "; ".join(problems))
        records = self._read()
        # A reset keeps the second factor (set or removed with `console totp`).
        kept = {k: v for k, v in records.get(name, {}).items() if k in ("totp_secret", "totp_last_step")}
        totp = kept.get("totp_secret")
        records[name] = {"role": role, "password_hash": hash_password(password), **kept}
        self._write(records)
        return Admin(name, role, bool(totp))

    def set_totp(self, name: str, enabled: bool = True) -> str | None:
        """Give ``name`` a new TOTP secret (returned, to enrol an app) or remove it."""
        import pyotp

        records = self._read()
        if name not in records:
            raise ValueError(f"no console account {name}")
        secret = pyotp.random_base32() if enabled else None
        if secret:
            records[name]["totp_secret"] = secret
        else:
            records[name].pop("totp_secret", None)
        self._write(records)
        return secret

    @staticmethod
    def provisioning_uri(name: str, secret: str) -> str:
        """The otpauth:// URI an authenticator app reads (as a QR code or typed in)."""
        import pyotp

        return pyotp.TOTP(secret).provisioning_uri(name=name, issuer_name=TOTP_ISSUER)

    def all(self) -> list[Admin]:
        return [Admin(name, r["role"], "totp_secret" in r) for name, r in sorted(self._read().items())]

    def authenticate(self, name: str, password: str, code: str = "", at: float | None = None) -> Admin | None:
        """The admin when the password is right, and the one-time code too for an
        account that has one (``totp_step`` then says which step the code was
        for). Slow on purpose (Argon2): call it in a thread.

        An unknown name costs the same as a wrong password (verify_password
        checks a dummy hash), and a wrong code is refused like a wrong
        password, after the same work: the login form reveals neither who
        exists nor who has a second factor. A code works once (RFC 6238
        section 5.2): the step of the last one accepted is kept in the
        account's record, so it and older steps stay refused after the
        console restarts, and between two console processes.
        """
        import time

        record = self._read().get(name)
        ok = verify_password(record["password_hash"] if record else None, password)
        if not (ok and record):
            return None
        secret = record.get("totp_secret")
        if not secret:
            return Admin(name, record["role"])
        step = totp_step(secret, code, time.time() if at is None else at)
        if step is None:
            return None
        with self._lock:  # two logins with one code: the first takes it
            records = self._read()
            current = records.get(name)
            if current is None or current.get("totp_secret") != secret:
                return None  # removed or re-enrolled meanwhile
            if step <= current.get("totp_last_step", -1):
                return None
            current["totp_last_step"] = step
            self._write(records)
        return Admin(name, record["role"], True, step)
