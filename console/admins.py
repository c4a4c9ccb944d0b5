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

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bulwark.passwords import hash_password, verify_password, weaknesses

ROLES = ("admin", "helpdesk")
#: A login name: letters, digits and . _ @ - (an address is fine).
NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
#: The guide's "Use Strong Passwords", as for mail accounts (bulwark/passwords.py):
#: at least this long, and "safely unguessable" (3 of 4) by zxcvbn.
MIN_PASSWORD_LENGTH = 12
MIN_STRENGTH = 3


@dataclass(frozen=True)
class Admin:
    name: str
    role: str


def admins_path(data_dir: Path) -> Path:
    return data_dir / "console" / "admins.json"


class AdminStore:
    def __init__(self, path: Path):
        self.path = Path(path)

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
        records[name] = {"role": role, "password_hash": hash_password(password)}
        self._write(records)
        return Admin(name, role)

    def all(self) -> list[Admin]:
        return [Admin(name, r["role"]) for name, r in sorted(self._read().items())]

    def authenticate(self, name: str, password: str) -> Admin | None:
        """The admin when the password is right. Slow on purpose (Argon2): call it in a thread.

        An unknown name costs the same as a wrong password (verify_password
        checks a dummy hash), so the login form does not reveal who exists.
        """
        record = self._read().get(name)
        ok = verify_password(record["password_hash"] if record else None, password)
        return Admin(name, record["role"]) if ok and record else None
