"""A small MaxMind-format country database for the Location Screening tests.

Written with mmdb-writer in the GeoIP2-Country layout geoip2 reads, so the
tests need no downloaded database and can map loopback addresses to countries.
"""

from __future__ import annotations

from pathlib import Path

from mmdb_writer import MMDBWriter
from netaddr import IPSet


def write_country_db(path: Path, countries: dict[str, str]) -> Path:
    """``countries``: address or CIDR range -> ISO country code."""
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-Country",
                        languages=["en"], description="Bulwark test countries")
    for network, code in countries.items():
        writer.insert_network(IPSet([network]), {"country": {"iso_code": code, "names": {"en": code}}})
    writer.to_db_file(str(path))
    return path
