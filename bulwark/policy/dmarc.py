"""Policy section for the DMARC aggregate reports other organisations send (``dmarc_reports:``).

A local domain asks for reports with ``rua=mailto:ADDRESS`` in its DMARC
record (RFC 7489 section 7.2); mail to one of ``addresses`` is delivered as
any other, and sinks/dmarc_reports.py also reads the report in it into an
event (docs/admin-guide.md, "DMARC aggregate reports").

A top-level section, not a setting of the ``dmarc`` check: that check judges
inbound mail in the stream workers, while reports are read after the verdict
by a sink of their own, and turning the check off must not stop them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, Field, field_validator

from bulwark.policy.sections import _Section, mail_address

if TYPE_CHECKING:
    from bulwark.policy import Policy

MIB = 1024 * 1024

#: Checked one by one, so an error names the entry (dmarc_reports.addresses.N).
ReportAddress = Annotated[str, AfterValidator(lambda value: mail_address(value).lower())]


class DmarcReports(_Section):
    addresses: list[ReportAddress] = Field(
        default_factory=list,
        description="Where reports arrive: the rua=mailto: addresses of the local domains' DMARC records (none: "
                    "reports are delivered as ordinary mail and not read)",
    )
    max_report_bytes: int = Field(
        # Large providers' daily reports for a busy domain run to a few
        # megabytes of XML; a gzip or zip that inflates past this is a bomb.
        default=16 * MIB, ge=64 * 1024, le=256 * MIB,
        description="Largest report read, once decompressed; a larger one is recorded as unreadable",
    )

    @field_validator("addresses")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    def is_report_address(self, address: str) -> bool:
        return address.strip().strip("<>").lower() in self.addresses


def dmarc_report_problems(policy: "Policy") -> list[tuple[tuple, str]]:
    """(location, message) for every report address outside the local domains."""
    return [
        (("dmarc_reports", "addresses", i),
         f"{address} is not in a local domain: reports are read from mail the gateway receives for its own domains")
        for i, address in enumerate(policy.dmarc_reports.addresses)
        if not policy.is_local_domain(address.rpartition("@")[2])
    ]
