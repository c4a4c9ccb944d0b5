"""Local account passwords: Argon2id verifiers and the strong-password rule.

The guide's "Use Strong Passwords": a password that is easy to guess is
refused whenever one is set, with a message that says why. Strength is
estimated by zxcvbn (Dropbox's estimator), which knows common passwords,
names, keyboard walks and l33t substitutions; a length floor on top of it
keeps short but "random-looking" strings out.

Nothing here logs or raises with the password in it.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# argon2-cffi's defaults are RFC 9106's second recommended profile for
# Argon2id (t=3, m=64 MiB, p=4): the variant and cost the RFC recommends when
# memory is constrained. Kept explicit so a library upgrade cannot lower them.
_HASHER = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4)

# Verified when an account does not exist, so that "no such user" costs the
# same time as "wrong password" and AUTH cannot be used to list accounts.
_DUMMY_HASH = _HASHER.hash("bulwark: no such account")


def hash_password(password: str) -> str:
    """An Argon2id verifier (PHC string) for ``password``. Slow on purpose."""
    return _HASHER.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when ``password`` matches; never raises for a bad or missing hash.

    Slow on purpose (tens of milliseconds): run it in a thread from asyncio.
    """
    try:
        return _HASHER.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def weaknesses(password: str, address: str, min_length: int, min_strength: int) -> list[str]:
    """Why ``password`` is too weak for ``address``; empty when it is strong enough.

    ``min_strength`` is on zxcvbn's scale: 0 (too guessable) to 4 (very
    unguessable); 3 is "safely unguessable: moderate protection from offline
    slow-hash scenario".
    """
    problems: list[str] = []
    address = address.lower()
    local, _, domain = address.rpartition("@")
    if len(password) < min_length:
        problems.append(f"it is shorter than {min_length} characters")
    lowered = password.lower()
    # The domain's first label ("example" of example.com) is what an attacker
    # tries first, so it counts as "the domain" too.
    label = domain.split(".")[0]
    if local and local in lowered:
        problems.append("it contains the account's name")
    if domain and (domain in lowered or (len(label) >= 3 and label in lowered)):
        problems.append("it contains the account's domain")
    from zxcvbn import zxcvbn  # imported here: it loads its dictionaries on import

    # zxcvbn only looks at the first 100 characters; longer ones are strong
    # by length alone.
    estimate = zxcvbn(password[:100], user_inputs=[address, local, domain, label])
    if estimate["score"] < min_strength:
        feedback = estimate.get("feedback") or {}
        hint = feedback.get("warning") or "it would be guessed quickly"
        problems.append(
            f"it is too easy to guess (strength {estimate['score']} of 4, at least {min_strength} needed: "
            f"{hint.rstrip('.').lower()})"
        )
    return problems
