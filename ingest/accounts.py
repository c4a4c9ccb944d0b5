"""The accounts ingest knows, from memory: who exists, who is disabled, and AUTH.

Built on two compacted topics read from the beginning and followed
(:class:`bulwark.state.StateView`): ``directory.accounts`` (AccountRecorded,
keyed by the lower-cased address) and ``accounts.state``
(AccountStateChanged). So ``exists``/``get``/``is_disabled`` never wait on a
remote query; only ``authenticate`` may, for accounts a verification source
vouched for (their password lives in that source).

    directory = AccountDirectory(settings, policy_holder)
    await directory.start()
    directory.exists("alice@example.com")
    await directory.authenticate("alice@example.com", password)  # True / False / None

``authenticate`` answers whether the credentials are right; it does not judge
disabled accounts (an ``on_auth`` guard refuses those before the password is
checked, so a disabled account's owner is told so rather than counted as a
password guesser).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bulwark.passwords import verify_password
from bulwark.settings import Settings
from bulwark.state import StateView
from schemas import events as ev
from schemas.topics import ACCOUNT_STATE, ACCOUNTS

#: How much lower the Argon2 threads' CPU priority is than the rest of ingest.
ARGON2_NICE = 10


def _yield_cpu_to_mail() -> None:
    """Lower this thread's CPU priority (Linux: nice is per thread, and the
    threads Argon2 starts for its lanes inherit it).

    One verification is about 180 ms of CPU on four lanes: an AUTH flood kept
    both cores of a small gateway busy and a probe client's end-of-DATA reply
    waited (p99 146 -> 582 ms, bench/abuse.py). At a lower priority a guess
    waits for CPU that mail does not need; alone, it runs as fast as before.
    """
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + ARGON2_NICE))
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted: run at the same priority
        log.info("Argon2 threads keep ingest's CPU priority: %s", exc)


#: Argon2 verification on threads of its own, two at a time: an AUTH flood
#: waits here, never in front of the blob store or a directory lookup.
ARGON2_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="argon2", initializer=_yield_cpu_to_mail)

log = logging.getLogger(__name__)

LOCAL_SOURCE = "local"


def account_key(address: str) -> str:
    """The key accounts are stored under: the address, lower-cased."""
    return address.strip().strip("<>").lower()


class AccountDirectory:
    def __init__(self, settings: Settings, policy: Any = None):
        """``policy`` is a Policy or anything with ``.current`` (a PolicyHolder);
        it is only needed to authenticate against verification sources."""
        self._policy = policy
        self.accounts = StateView(settings, ACCOUNTS)
        self.states = StateView(settings, ACCOUNT_STATE)

    @property
    def policy(self):
        return getattr(self._policy, "current", self._policy)

    async def start(self) -> None:
        await asyncio.gather(self.accounts.start(), self.states.start())

    async def stop(self) -> None:
        await asyncio.gather(self.accounts.stop(), self.states.stop())

    # -- questions from memory -------------------------------------------

    def get(self, address: str) -> ev.AccountRecorded | None:
        event = self.accounts.get(account_key(address))
        return event if isinstance(event, ev.AccountRecorded) else None

    def exists(self, address: str) -> bool:
        return self.get(address) is not None

    def is_disabled(self, address: str) -> bool:
        state = self.states.get(account_key(address))
        return isinstance(state, ev.AccountStateChanged) and not state.enabled

    def all(self) -> list[tuple[ev.AccountRecorded, bool]]:
        """Every account with whether it is enabled, sorted by address."""
        return [
            (account, not self.is_disabled(key))
            for key, account in sorted(self.accounts.items())
            if isinstance(account, ev.AccountRecorded)
        ]

    # -- AUTH -------------------------------------------------------------

    async def authenticate(self, login: str, password: str) -> bool | None:
        """True: right credentials. False: wrong (or no such account).
        None: could not check (the verification source did not answer)."""
        account = self.get(login)
        if account is None or account.source == LOCAL_SOURCE:
            # An unknown login is checked against a dummy hash: the same cost
            # as a wrong password, so AUTH does not reveal who exists.
            # Argon2 takes tens of milliseconds of CPU; a thread keeps the
            # SMTP event loop serving everyone else meanwhile.
            return await asyncio.get_running_loop().run_in_executor(
                ARGON2_POOL, verify_password, account.password_hash if account else None, password)
        try:
            from ingest import verification
        except ImportError:
            log.warning("account %s is vouched for by %r, but verification sources are not available",
                        account.address, account.source)
            return None
        try:
            return await verification.authenticate(self.policy, account.source, account.address, password)
        except Exception as exc:  # a source failing is "could not check", never a crash
            # Only the exception's type: its text could quote the exchange.
            log.error("verification source %r failed to authenticate %s: %s",
                      account.source, account.address, type(exc).__name__)
            return None
