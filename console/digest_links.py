"""Signed, expiring links with which a user releases a message held for them.

A link carries the message id and the recipient it releases to, signed with
HMAC (``itsdangerous``, the Pallets project's signer) under a key kept in
``DATA_DIR/secrets/digest.key`` (32 random bytes, mode 0600, made on first
use). The delivery process signs (it sends the digests); the console checks
the signature and the link's age against the policy's ``link_hours``. Nothing
else authenticates the user: whoever holds the link may release that one
message to that one address, which is what the digest was sent to say.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

SALT = "bulwark-quarantine-digest-release"


class LinkExpired(Exception):
    pass


class LinkInvalid(Exception):
    pass


def key_path(data_dir: Path) -> Path:
    return Path(data_dir) / "secrets" / "digest.key"


def load_key(data_dir: Path) -> bytes:
    path = key_path(data_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it a moment ago
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
    key = path.read_bytes()
    if len(key) < 32:
        raise ValueError(f"digest link key {path} is shorter than 32 bytes")
    return key


class DigestLinks:
    def __init__(self, key: bytes):
        self._signer = URLSafeTimedSerializer(key, salt=SALT)

    def token(self, message_id: str, recipient: str) -> str:
        return self._signer.dumps({"m": message_id, "r": recipient})

    def open(self, token: str, max_hours: int) -> tuple[str, str]:
        """(message id, recipient) of a link signed here less than ``max_hours`` ago."""
        try:
            data = self._signer.loads(token, max_age=max_hours * 3600)
        except SignatureExpired:
            raise LinkExpired() from None
        except BadSignature:
            raise LinkInvalid() from None
        if not isinstance(data, dict) or not isinstance(data.get("m"), str) or not isinstance(data.get("r"), str):
            raise LinkInvalid()
        return data["m"], data["r"]
