"""DMARC aggregate reports as reporters send them (RFC 7489 section 7.2 and appendix C), for the tests.

``GOOGLE_XML`` is written out in full, in the shape the large mailbox
providers' daily reports have (appendix C's elements, in its order, no
namespace); ``report_xml`` builds others. ``report_mail`` wraps a report as
section 7.2.1.1 says: a ``multipart/mixed`` mail with a short text part and
the report as ``application/gzip`` (``.xml.gz``), ``application/zip``
(``.zip``) or ``text/xml``, named ``receiver!policy-domain!begin!end.ext``.
"""

from __future__ import annotations

import gzip
import io
import zipfile
from email.message import EmailMessage
from email.utils import make_msgid

#: 2026-11-30 00:00:00 to 23:59:59 UTC.
BEGIN, END = 1795996800, 1796083199

GOOGLE_XML = f"""<?xml version="1.0" encoding="UTF-8" ?>
<feedback>
  <version>1.0</version>
  <report_metadata>
    <org_name>google.com</org_name>
    <email>noreply-dmarc-support@google.com</email>
    <extra_contact_info>https://support.google.com/a/answer/2466580</extra_contact_info>
    <report_id>5717107811868587391</report_id>
    <date_range>
      <begin>{BEGIN}</begin>
      <end>{END}</end>
    </date_range>
  </report_metadata>
  <policy_published>
    <domain>example.test</domain>
    <adkim>r</adkim>
    <aspf>r</aspf>
    <p>none</p>
    <sp>none</sp>
    <pct>100</pct>
    <fo>0</fo>
  </policy_published>
  <record>
    <row>
      <source_ip>192.0.2.10</source_ip>
      <count>12</count>
      <policy_evaluated>
        <disposition>none</disposition>
        <dkim>pass</dkim>
        <spf>pass</spf>
      </policy_evaluated>
    </row>
    <identifiers>
      <header_from>example.test</header_from>
      <envelope_from>example.test</envelope_from>
    </identifiers>
    <auth_results>
      <dkim>
        <domain>example.test</domain>
        <selector>s2026a</selector>
        <result>pass</result>
      </dkim>
      <spf>
        <domain>example.test</domain>
        <scope>mfrom</scope>
        <result>pass</result>
      </spf>
    </auth_results>
  </record>
  <record>
    <row>
      <source_ip>2001:db8::25</source_ip>
      <count>3</count>
      <policy_evaluated>
        <disposition>none</disposition>
        <dkim>pass</dkim>
        <spf>fail</spf>
        <reason>
          <type>forwarded</type>
          <comment>mailing list</comment>
        </reason>
      </policy_evaluated>
    </row>
    <identifiers>
      <header_from>Example.TEST</header_from>
      <envelope_from>lists.example.org</envelope_from>
    </identifiers>
    <auth_results>
      <dkim>
        <domain>example.test</domain>
        <selector>s2026a</selector>
        <result>pass</result>
      </dkim>
      <dkim>
        <domain>lists.example.org</domain>
        <result>pass</result>
      </dkim>
      <spf>
        <domain>lists.example.org</domain>
        <scope>mfrom</scope>
        <result>pass</result>
      </spf>
    </auth_results>
  </record>
  <record>
    <row>
      <source_ip>203.0.113.66</source_ip>
      <count>5</count>
      <policy_evaluated>
        <disposition>none</disposition>
        <dkim>fail</dkim>
        <spf>fail</spf>
      </policy_evaluated>
    </row>
    <identifiers>
      <header_from>example.test</header_from>
      <envelope_from>spoofer.example</envelope_from>
    </identifiers>
    <auth_results>
      <spf>
        <domain>spoofer.example</domain>
        <scope>mfrom</scope>
        <result>softfail</result>
      </spf>
    </auth_results>
  </record>
</feedback>
""".encode()


def row_xml(source_ip: str, count: int, disposition: str = "none", dkim: str = "pass", spf: str = "pass",
            header_from: str = "example.test") -> str:
    return f"""  <record>
    <row><source_ip>{source_ip}</source_ip><count>{count}</count>
      <policy_evaluated><disposition>{disposition}</disposition><dkim>{dkim}</dkim><spf>{spf}</spf></policy_evaluated>
    </row>
    <identifiers><header_from>{header_from}</header_from></identifiers>
    <auth_results><spf><domain>{header_from}</domain><result>{spf}</result></spf></auth_results>
  </record>
"""


def report_xml(org: str = "Yahoo", report_id: str = "1764547200.123456", domain: str = "example.test",
               p: str = "quarantine", rows: list[str] | None = None, begin: int = BEGIN, end: int = END,
               namespace: str | None = None, email: str = "dmarchelp@yahooinc.com") -> bytes:
    xmlns = f' xmlns="{namespace}"' if namespace else ""
    body = "".join(rows if rows is not None else [row_xml("198.51.100.7", 4)])
    return f"""<?xml version="1.0"?>
<feedback{xmlns}>
  <report_metadata>
    <org_name>{org}</org_name>
    <email>{email}</email>
    <report_id>{report_id}</report_id>
    <date_range><begin>{begin}</begin><end>{end}</end></date_range>
  </report_metadata>
  <policy_published><domain>{domain}</domain><adkim>s</adkim><aspf>r</aspf><p>{p}</p><pct>100</pct></policy_published>
{body}</feedback>
""".encode()


def gzipped(xml: bytes) -> bytes:
    return gzip.compress(xml)


def zipped(xml: bytes, name: str = "report.xml", *extra: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, xml)
        for member, content in extra:
            archive.writestr(member, content)
    return buffer.getvalue()


FORMATS = {
    "gzip": ("application", "gzip", ".xml.gz", gzipped),
    "zip": ("application", "zip", ".zip", zipped),
    "xml": ("text", "xml", ".xml", lambda xml: xml),
}


def report_mail(report: bytes, kind: str = "gzip", sender: str = "noreply-dmarc-support@google.com",
                to: str = "dmarc-reports@example.test", domain: str = "example.test",
                receiver: str = "google.com", filename: str | None = None,
                content_type: tuple[str, str] | None = None) -> EmailMessage:
    """A report mail; ``report`` is already in the ``kind``'s form (gzipped, zipped or plain)."""
    maintype, subtype, suffix, _ = FORMATS[kind]
    if content_type:
        maintype, subtype = content_type
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"Report domain: {domain} Submitter: {receiver} Report-ID: <{BEGIN}>"
    msg["Message-ID"] = make_msgid(domain=receiver)
    msg.set_content(f"This is an aggregate report from {receiver}.\n")
    name = filename or f"{receiver}!{domain}!{BEGIN}!{END}{suffix}"
    if maintype == "text":
        msg.add_attachment(report.decode(), subtype=subtype, filename=name)
    else:
        msg.add_attachment(report, maintype=maintype, subtype=subtype, filename=name)
    return msg


def in_form(xml: bytes, kind: str) -> bytes:
    return FORMATS[kind][3](xml)
