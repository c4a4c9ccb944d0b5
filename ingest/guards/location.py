"""Location Screening: refuse SMTP connections, or only AUTH, from listed countries.

The country of the client address comes from a MaxMind-format country
database (``geoip2``) at the policy's ``location_screening.database``. An
address the database does not know (a private range, say) has no country and
is never refused. The same decision serves the HTTP endpoints through
:func:`http_refusal`.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import geoip2.database
import geoip2.errors
import maxminddb

from bulwark.policy import Policy
from bulwark.policy.runtime import current
from ingest.guards import Refusal
from ingest.guards.lists import allow_listed

if TYPE_CHECKING:
    from ingest.guards.session import GuardSession

log = logging.getLogger(__name__)


class LocationDatabaseError(RuntimeError):
    pass


class CountryLookup:
    """One open database, reopened when the policy points elsewhere or the file changes."""

    def __init__(self):
        self._reader: geoip2.database.Reader | None = None
        self._key: tuple | None = None
        self._lock = threading.Lock()

    def _open(self, path: Path) -> geoip2.database.Reader:
        try:
            stat = path.stat()
        except OSError as exc:
            raise LocationDatabaseError(
                f"Location Screening is enabled but its country database {path} cannot be read: {exc.strerror}"
            ) from None
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key != self._key:
                try:
                    reader = geoip2.database.Reader(str(path))
                except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
                    raise LocationDatabaseError(
                        f"Location Screening is enabled but {path} is not a MaxMind country database: {exc}"
                    ) from None
                if self._reader is not None:
                    self._reader.close()
                self._reader, self._key = reader, key
            return self._reader

    def country(self, path: Path, ip: str) -> str | None:
        reader = self._open(path)
        try:
            return reader.country(ip).country.iso_code
        except (geoip2.errors.AddressNotFoundError, ValueError):
            return None


#: Shared by every listener and the HTTP endpoints of one process.
LOOKUP = CountryLookup()


def check_database(policy: Policy) -> None:
    """Raise LocationDatabaseError now (at start-up) if the feature is on and the database is unusable."""
    screening = policy.location_screening
    if screening.enabled:
        LOOKUP._open(Path(screening.database))


def country_of(policy: Policy, ip: str) -> str | None:
    return LOOKUP.country(Path(policy.location_screening.database), ip)


def http_refusal(policy: Policy, ip: str, login: bool = False) -> str | None:
    """For HTTP endpoints: the reason to answer 403, or None."""
    screening = policy.location_screening
    if not screening.enabled:
        return None
    country = country_of(policy, ip)
    if country in screening.refuse_http_from or (login and country in screening.refuse_http_auth_from):
        return f"location screening: {'login' if login else 'request'} from {country}"
    return None


class LocationGuard:
    name = "location_screening"

    def __init__(self, policy: Policy):
        self.policy = policy  # a PolicyHolder in the server: read when judging
        # A missing database is a clear error at start-up, not at the first client.
        check_database(current(policy))

    def _country(self, policy: Policy, session: "GuardSession") -> tuple[str | None, Refusal | None]:
        try:
            country = country_of(policy, session.client_ip)
        except LocationDatabaseError as exc:
            # The database vanished after start-up: fail closed, but
            # temporarily, so legitimate senders retry once it is back.
            log.error("%s", exc)
            return None, Refusal("421 4.3.0 Temporary local problem; please try again later",
                                 "location screening: country database unavailable", close=True)
        session.client_country = country
        return country, None

    def _screen(self, session: "GuardSession", refuse, reply: str, reason: str, close: bool) -> Refusal | None:
        """Refuse when the client's country is in ``refuse(screening)``."""
        policy = current(self.policy)
        screening = policy.location_screening
        if not screening.enabled or allow_listed(policy, session, "location_screening"):
            return None
        country, failed = self._country(policy, session)
        if failed:
            return failed
        if country in refuse(screening):
            return Refusal(reply.format(country=country), reason.format(country=country), close=close)
        return None

    async def on_connect(self, session: "GuardSession") -> Refusal | None:
        # RFC 5321 3.1: 554 instead of the greeting refuses the session.
        return self._screen(
            session, lambda s: s.refuse_connections_from,
            "554 5.7.1 No SMTP service for connections from your location ({country})",
            "location screening: connection from {country}", close=True)

    async def on_auth(self, session: "GuardSession", login: str) -> Refusal | None:
        return self._screen(
            session, lambda s: {*s.refuse_auth_from, *s.refuse_connections_from},
            "554 5.7.1 Authentication is not accepted from your location ({country})",
            "location screening: AUTH from {country}", close=False)
