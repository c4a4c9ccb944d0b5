"""Outbound TLS: which policy applies to a delivery, and a connection that honours it.

The policy for one destination, strongest first (each recorded on the
``delivery.attempted`` event with the TLS version, cipher and whether the
certificate was validated, and why not):

1. ``requiretls``: the message was sent with ``MAIL FROM:<...> REQUIRETLS``
   (RFC 8689). TLS 1.2 or later with a validated certificate, and for MX
   routes an MX host validated by MTA-STS (section 4.2.1; DANE is not built);
   the next hop must advertise REQUIRETLS, which is passed on (4.1). Anything
   less bounces with 5.7.30 and is never downgraded.
2. ``mta-sts``: the domain's MTA-STS policy is ``enforce`` (RFC 8461 4.1):
   only MX hosts matching its patterns, TLS 1.2+, a WebPKI-valid certificate
   for the MX name; otherwise deferred, and bounced past the delivery period.
3. ``pinned`` / ``verified``: a configured mail server with a pinned
   certificate, or one Bulwark logs in to (the password goes only over TLS
   with a validated or pinned certificate, never in clear).
4. ``mta-sts-testing``: delivered as opportunistic, with failures reported.
5. ``opportunistic`` (RFC 7435): STARTTLS whenever offered; an unvalidated
   certificate is used and recorded as such.
6. ``cleartext-retry``: a TLS negotiation with this destination failed less
   than an hour ago (the guide's "SSL negotiation failures will retry without
   SSL for up to one hour"); the failed attempt itself is deferred, not
   downgraded in place, and the memory is shared by every delivery process
   (the ``delivery.tls-fallbacks`` topic).
7. ``none``: STARTTLS is off in the policy.

A message carrying ``TLS-Required: No`` (RFC 8689 section 5) asks that
recipient TLS policies be ignored: it is delivered opportunistically, unless
it also carries REQUIRETLS, which wins (section 5).
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from pathlib import Path

import aiosmtplib

from schemas import events as ev
from sinks.mta_sts import mx_matches
from sinks.routing import Route

#: RFC 8460 section 4.3 result types for certificate problems, from OpenSSL's
#: verify codes (X509_V_ERR_*).
_VERIFY_RESULT = {
    10: "certificate-expired",          # CERT_HAS_EXPIRED
    62: "certificate-host-mismatch",    # HOSTNAME_MISMATCH
    18: "certificate-not-trusted",      # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "certificate-not-trusted",      # SELF_SIGNED_CERT_IN_CHAIN
    20: "certificate-not-trusted",      # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "certificate-not-trusted",      # UNABLE_TO_VERIFY_LEAF_SIGNATURE
}


@dataclass(frozen=True)
class TlsRequirement:
    policy: str
    starttls: bool = True
    must_encrypt: bool = False
    must_verify: bool = False
    #: MTA-STS patterns an MX host must match (enforce, and REQUIRETLS).
    mx_patterns: tuple[str, ...] | None = None
    #: Pass REQUIRETLS on; the next hop must advertise it.
    requiretls: bool = False

    @property
    def strict(self) -> bool:
        """A failure to meet it defers or bounces; it is never delivered with less."""
        return self.must_encrypt


class TlsFailure(Exception):
    """The policy could not be met on this connection.

    ``permanent``: a REQUIRETLS failure, which bounces (5.7.30); others defer.
    ``negotiation``: the TLS handshake itself failed (the cleartext-retry rule).
    """

    def __init__(self, outcome: ev.TlsOutcome, text: str, permanent: bool = False, negotiation: bool = False):
        super().__init__(text)
        self.outcome = outcome
        self.permanent = permanent
        self.negotiation = negotiation


def tls_required_no(raw: bytes) -> bool:
    """The message asks for its TLS policies to be ignored (RFC 8689 section 5)."""
    headers = BytesHeaderParser().parsebytes(raw[:64 * 1024])
    return any(str(v).strip().lower() == "no" for v in headers.get_all("TLS-Required", []))


def requirement(*, starttls_enabled: bool, requiretls: bool, ignore_policies: bool, route_kind: str,
                mta_sts: ev.MtaStsPolicyFetched | None, cleartext_retry: bool,
                auth: bool, pinned: bool) -> TlsRequirement:
    """The TLS policy for one destination (the module docstring's order)."""
    sts = mta_sts if (mta_sts is not None and mta_sts.mode in ("enforce", "testing")) else None
    if requiretls:
        patterns = tuple(sts.mx) if (route_kind == "mx" and sts is not None) else None
        return TlsRequirement("requiretls", must_encrypt=True, must_verify=True, mx_patterns=patterns,
                              requiretls=True)
    if sts is not None and sts.mode == "enforce" and route_kind == "mx" and not ignore_policies:
        return TlsRequirement("mta-sts", must_encrypt=True, must_verify=True, mx_patterns=tuple(sts.mx))
    if pinned:
        return TlsRequirement("pinned", must_encrypt=True, must_verify=True)
    if auth:
        return TlsRequirement("verified", must_encrypt=True, must_verify=True)
    if not starttls_enabled:
        return TlsRequirement("none", starttls=False)
    if cleartext_retry:
        return TlsRequirement("cleartext-retry", starttls=False)
    if sts is not None and route_kind == "mx" and not ignore_policies:
        return TlsRequirement("mta-sts-testing", mx_patterns=tuple(sts.mx))
    return TlsRequirement("opportunistic")


def route_allowed(route: Route, req: TlsRequirement) -> ev.TlsOutcome | None:
    """None when the route may be tried; otherwise the failure (RFC 8461 4.1: MX not in the policy)."""
    if not route.from_mx:
        return None
    if req.policy == "requiretls" and req.mx_patterns is None:
        # RFC 8689 4.2.1: the MX must be validated (DNSSEC/DANE or MTA-STS);
        # without either, a REQUIRETLS message cannot be sent.
        return ev.TlsOutcome(policy=req.policy, failure="validation-failure",
                             verify_error="the domain has no MTA-STS policy to validate its MX (DANE is not built)")
    if req.mx_patterns is not None and req.policy in ("requiretls", "mta-sts") and \
            not mx_matches(route.host, list(req.mx_patterns)):
        return ev.TlsOutcome(policy=req.policy, failure="certificate-host-mismatch",
                             verify_error=f"MX {route.host} is not in the domain's MTA-STS policy")
    return None


def client_context(ca_file: Path | None, verify: bool, min_tls12: bool) -> ssl.SSLContext:
    if verify:
        context = ssl.create_default_context()
        if ca_file is not None:
            context.load_verify_locations(cafile=str(ca_file))
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if min_tls12:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _outcome_from(client: aiosmtplib.SMTP, req: TlsRequirement, verified: bool,
                  verify_error: str | None) -> ev.TlsOutcome:
    ssl_object = client.transport.get_extra_info("ssl_object") if client.transport else None
    if ssl_object is None:
        return ev.TlsOutcome(policy=req.policy)
    cipher = ssl_object.cipher()
    return ev.TlsOutcome(policy=req.policy, version=ssl_object.version(), cipher=cipher[0] if cipher else None,
                         verified=verified, verify_error=verify_error)


async def open_connection(route: Route, req: TlsRequirement, *, local_hostname: str, timeout: float,
                          ca_file: Path | None) -> tuple[aiosmtplib.SMTP, ev.TlsOutcome]:
    """A connected client that meets ``req`` (after EHLO), and its TLS outcome.

    Raises TlsFailure when the policy cannot be met (the connection closed),
    OSError or SMTPException when the server cannot be reached.
    """

    async def connect() -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(hostname=route.connect_to, port=route.port, local_hostname=local_hostname,
                                 timeout=timeout, start_tls=False)
        await client.connect()
        await client.ehlo()
        return client

    client = await connect()
    if not req.starttls:
        return client, ev.TlsOutcome(policy=req.policy)
    if not client.supports_extension("starttls"):
        if req.must_encrypt:
            client.close()
            raise TlsFailure(ev.TlsOutcome(policy=req.policy, failure="starttls-not-supported"),
                             f"{route} does not offer STARTTLS", permanent=req.requiretls)
        return client, ev.TlsOutcome(policy=req.policy)

    pinned = route.pin_sha256 is not None
    verify = not pinned
    verified, verify_error = False, None
    try:
        await client.starttls(server_hostname=route.host,
                              tls_context=client_context(ca_file, verify, req.must_encrypt))
        verified = verify
    except ssl.SSLCertVerificationError as exc:
        failure = _VERIFY_RESULT.get(exc.verify_code, "validation-failure")
        verify_error = f"{failure}: {exc.verify_message}"
        client.close()
        if req.must_verify:
            raise TlsFailure(ev.TlsOutcome(policy=req.policy, failure=failure, verify_error=verify_error),
                             f"{route}: certificate not valid ({exc.verify_message})",
                             permanent=req.requiretls) from None
        # Opportunistic: the handshake is repeated without validation. Python
        # 3.11 exposes neither the peer's chain nor a verify callback, so the
        # certificate cannot be judged after an unvalidated handshake; the
        # second connection is the price of recording "not validated, and why".
        client = await connect()
        try:
            await client.starttls(server_hostname=route.host, tls_context=client_context(None, False, False))
        except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc2:
            client.close()
            raise TlsFailure(ev.TlsOutcome(policy=req.policy, failure="validation-failure",
                                           verify_error=verify_error),
                             f"{route}: TLS negotiation failed: {exc2}", negotiation=True) from None
    except (ssl.SSLError, aiosmtplib.SMTPException, ConnectionError) as exc:
        client.close()
        raise TlsFailure(ev.TlsOutcome(policy=req.policy, failure="validation-failure",
                                       verify_error=f"TLS negotiation failed: {exc}"),
                         f"{route}: TLS negotiation failed: {exc}", permanent=req.requiretls,
                         negotiation=True) from None

    outcome = _outcome_from(client, req, verified, verify_error)
    if pinned:
        der = client.transport.get_extra_info("ssl_object").getpeercert(binary_form=True) or b""
        if hashlib.sha256(der).hexdigest() != route.pin_sha256.lower().replace(":", ""):
            client.close()
            raise TlsFailure(replace_outcome(outcome, verified=False, failure="certificate-not-trusted",
                                             verify_error="certificate does not match the pinned SHA-256"),
                             f"{route}: certificate does not match the pinned SHA-256")
        outcome = replace_outcome(outcome, verified=True)
    if req.requiretls:
        await client.ehlo()
        if not client.supports_extension("requiretls"):
            client.close()
            raise TlsFailure(replace_outcome(outcome, failure="starttls-not-supported",
                                             verify_error="the next hop does not offer REQUIRETLS"),
                             f"{route} does not offer REQUIRETLS", permanent=True)
        outcome = replace_outcome(outcome, requiretls_relayed=True)
    return client, outcome


def replace_outcome(outcome: ev.TlsOutcome, **changes) -> ev.TlsOutcome:
    return outcome.model_copy(update=changes)

