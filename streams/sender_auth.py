"""Sender authentication of one message: SPF, DKIM, ARC and DMARC, each evaluated once.

The checks in ``streams/checks/`` (spf, dkim, arc, dmarc, local_spoofing,
impersonation) report their part; they share these evaluations through
``message.shared``, as antivirus and macros share one clamd scan: DMARC needs
SPF's and DKIM's results and the ARC chain, local spoofing needs DMARC's.
Nothing here raises for a message or a DNS answer, however malformed: every
problem is a result (``temperror``, ``permerror``) with its reason.

Every lookup goes to the project's resolver (``BULWARK_DNS_RESOLVER``,
bulwark/dns.py), never to a library's own idea of one.

The libraries, and why each:

- **pyspf** (RFC 7208) evaluates SPF. It is the reference implementation,
  kept by an author of RFC 7208 (who also keeps dkimpy), and passes the
  RFC's test suite: macros, include and redirect, the ten-lookup and
  two-void-lookup limits. checkdmarc's SPF code parses and audits a
  domain's record for its owner; it does not evaluate a client address
  against it. pyspf looks names up through one module-level driver function
  (``spf.DNSLookup``, its switch between dnspython and pydns); that driver is
  replaced here with one that asks the project's resolver.
- **dkimpy** (RFC 6376, RFC 8463 Ed25519 with PyNaCl, RFC 8617 ARC) verifies
  each DKIM signature and the ARC chain; its ``dnsfunc`` parameter is the hook
  for key lookups, so they go to the project's resolver too. Its asyncio
  variant needs aiodns (c-ares, with a resolver configuration of its own), so
  the blocking API runs on a thread instead.
- **DMARC** (RFC 7489) is evaluated here: record discovery, the tags, identifier
  alignment and ``pct`` are a page of code. The ``dmarc`` package on PyPI
  counts any parent domain as relaxed-aligned when no Public Suffix List is
  loaded (so ``d=com`` would align with every .com From:) and applies DMARCbis
  tags; checkdmarc's parser fetches records with a resolver of its own and
  validates reporting addresses over DNS. The Organizational Domain comes
  from **publicsuffixlist**, which ships the Public Suffix List and is
  released as the list changes.
- **authres** parses the ARC-Authentication-Results a trusted forwarder
  sealed (RFC 8601 grammar, comments and quoting included); dkimpy's ARC
  signing uses it too.
"""

from __future__ import annotations

import asyncio
import contextvars
import email.errors
import email.header
import email.utils
import hashlib
import ipaddress
import logging
import re
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from functools import lru_cache

import authres
import authres.arc
import authres.dmarc
import dkim
import dkim.util
import dns.asyncresolver
import dns.exception
import dns.resolver
import spf
from publicsuffixlist import PublicSuffixList

from bulwark.dns import blocking_resolver_for, resolver_for
from bulwark.headers import header_section
from bulwark.settings import Settings
from streams.message import Message

log = logging.getLogger(__name__)

#: One DNS lookup may take this long (RFC 7208 section 4.6.4 suggests at
#: least 20 s for a whole SPF evaluation, which SPF_SECONDS bounds).
LOOKUP_SECONDS = 5.0
SPF_SECONDS = 20.0
#: Answers the content checks' resolvers keep (each for its TTL).
CACHED_ANSWERS = 10_000
#: RFC 8301 section 3.2: RSA keys shorter than 1024 bits are not accepted.
MIN_RSA_BITS = 1024

# dkimpy logs every bad signature at ERROR; the result carries the reason,
# so its log is kept out of the worker's.
_DKIM_LOG = logging.getLogger("streams.sender_auth.dkimpy")
_DKIM_LOG.propagate = False
_DKIM_LOG.addHandler(logging.NullHandler())


# -- DNS -------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _resolvers(address: str | None) -> tuple[dns.asyncresolver.Resolver, dns.resolver.Resolver]:
    """Both resolvers share a cache that keeps each answer for its TTL.

    A sender's SPF, DKIM and DMARC records are asked for with each of its
    messages; without a cache every lookup was a query and a Python-side
    parse (about 3 % of the worker's CPU at 20 msg/s in py-spy, more with a
    remote resolver). Negative answers are kept for their SOA minimum, as a
    caching resolver does (RFC 2308).
    """
    cache = dns.resolver.LRUCache(CACHED_ANSWERS)
    asynchronous, blocking = resolver_for(address, LOOKUP_SECONDS), blocking_resolver_for(address, LOOKUP_SECONDS)
    asynchronous.cache = blocking.cache = cache
    return asynchronous, blocking


def resolvers() -> tuple[dns.asyncresolver.Resolver, dns.resolver.Resolver]:
    """The project's resolver, for the event loop and for threads."""
    return _resolvers(Settings.from_env().dns_resolver)


#: DNS failures that say nothing about the name (it may well exist): a
#: temperror. NXDOMAIN, no answer, or a name DNS cannot hold is an answer.
TEMPORARY = (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.NoResolverConfiguration)

#: The resolver pyspf's lookups use on the current thread (set around each evaluation).
_SPF_RESOLVER: contextvars.ContextVar[dns.resolver.Resolver] = contextvars.ContextVar("spf_resolver")


def _spf_lookup(name, qtype, strict=True, timeout=LOOKUP_SECONDS):
    """pyspf's DNS driver (the shape of its own ``DNSLookup_dnspython``), asking our resolver.

    A name that does not exist or has no such record is an empty answer
    (SPF counts it as a void lookup); any other DNS failure is SPF's
    temperror.
    """
    resolver = _SPF_RESOLVER.get(None)
    if resolver is None:
        raise spf.TempError("DNS: no resolver configured for SPF")
    try:
        answer = resolver.resolve(name, qtype, search=False, lifetime=min(timeout, LOOKUP_SECONDS))
    except TEMPORARY as exc:
        raise spf.TempError(f"DNS {type(exc).__name__} looking up {name} {qtype}") from None
    except (dns.exception.DNSException, ValueError):  # no such name, or not one DNS can hold
        return []
    found = []
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            found.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            found.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            found.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            found.append(((name, qtype), rdata.strings))
    return found


spf.DNSLookup = _spf_lookup


class KeyLookup:
    """dkimpy's ``dnsfunc``: TXT records from our resolver, and what happened, for the result."""

    def __init__(self, resolver: dns.resolver.Resolver):
        self.resolver = resolver
        self.names: list[str] = []
        self.temperror: str | None = None
        self.missing: str | None = None
        self.found: bytes | None = None

    def __call__(self, name, timeout=LOOKUP_SECONDS):
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
        self.names.append(text)
        try:
            answer = self.resolver.resolve(text, "TXT", search=False)
        except TEMPORARY as exc:
            self.temperror = f"DNS {type(exc).__name__} looking up {text} TXT"
            raise dkim.DnsTimeoutError(self.temperror) from None
        except (dns.exception.DNSException, ValueError):  # no such name, or not one DNS can hold
            self.missing = text
            return None
        # RFC 6376 3.6.2.2: the strings of one record are concatenated.
        self.found = b"".join(next(iter(answer)).strings)
        return self.found


# -- the From: domain ----------------------------------------------------------------


@dataclass(frozen=True)
class Author:
    """The RFC 5322.From of a message, as DMARC and the spoofing checks read it."""

    #: (display name, address) of every address in every From: field.
    addresses: tuple[tuple[str, str], ...]
    fields: int

    @property
    def domains(self) -> set[str]:
        return {domain_of(a) for _, a in self.addresses if domain_of(a)}

    @property
    def domain(self) -> str | None:
        """The one From: domain, or None when there is none or several (RFC 7489 6.6.1)."""
        domains = self.domains
        return next(iter(domains)) if self.fields == 1 and len(domains) == 1 else None

    def problem(self) -> str | None:
        if self.fields == 0:
            return "the message has no From: field"
        if self.fields > 1:
            return f"the message has {self.fields} From: fields"
        if not self.domains:
            return "the From: field holds no address with a domain"
        if len(self.domains) > 1:
            return f"the From: field names several domains ({', '.join(sorted(self.domains))})"
        return None


def domain_of(address: str) -> str:
    local, at, domain = address.strip().rpartition("@")
    return domain.strip().strip("[]").lower().rstrip(".") if at and local else ""


def decoded(text: str) -> str:
    """A display name with its RFC 2047 encoded words decoded (as a mail reader shows it)."""
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        return text


def author(message: Message) -> Author:
    cached = message.shared.get("sender_auth.author")
    if cached is None:
        # compat32 reads the fields as sent, never raising on a malformed one.
        headers = BytesHeaderParser(policy=compat32).parsebytes(message.raw)
        fields = [str(f) for f in headers.get_all("From") or []]
        pairs = email.utils.getaddresses(fields)
        cached = Author(tuple((decoded(n), a) for n, a in pairs if a), len(fields))
        message.shared["sender_auth.author"] = cached
    return cached


_PSL = PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the domain one label below its public suffix (itself when it is one)."""
    domain = domain.lower().rstrip(".")
    try:
        return _PSL.privatesuffix(domain) or domain
    except Exception:  # a name the list cannot read (stray characters): its own organisation
        return domain


def aligned(one: str, other: str, mode: str) -> bool:
    """Identifier alignment (RFC 7489 3.1): the same name (strict) or Organizational Domain (relaxed)."""
    one, other = one.lower().rstrip("."), other.lower().rstrip(".")
    if not one or not other:
        return False
    return one == other if mode == "s" else organizational_domain(one) == organizational_domain(other)


# -- SPF ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpfResult:
    identity: str  # "mailfrom" or "helo"
    #: What was checked: the MAIL FROM address, or the HELO name.
    subject: str
    domain: str
    result: str  # pass fail softfail neutral none temperror permerror
    explanation: str


def _helo_name(helo: str | None) -> str | None:
    """The HELO name when it is a domain SPF can check (RFC 7208 2.3): not an address, not one label."""
    if not helo or helo.startswith("[") or "." not in helo.strip("."):
        return None
    try:
        ipaddress.ip_address(helo)
        return None
    except ValueError:
        return helo.rstrip(".").lower()


def _evaluate_spf(resolver: dns.resolver.Resolver, ip: str, sender: str, helo: str) -> tuple[str, str]:
    """(result, explanation) of one pyspf evaluation; on a thread, never raising."""
    _SPF_RESOLVER.set(resolver)
    try:
        result, _code, explanation = spf.query(i=ip, s=sender, h=helo, timeout=LOOKUP_SECONDS,
                                               querytime=SPF_SECONDS).check()
    except Exception as exc:  # a library bug on a strange record must not lose the message
        return "permerror", f"SPF evaluation failed: {type(exc).__name__}: {exc}"
    result = str(result).lower()
    # pyspf's RFC 4408 names, should it ever give them.
    return {"error": "temperror", "unknown": "permerror"}.get(result, result), str(explanation or "")


async def _spf(message: Message) -> tuple[SpfResult, SpfResult]:
    _, blocking = resolvers()
    envelope = message.envelope
    ip = envelope.client_ip
    helo = _helo_name(envelope.client_helo)
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        none = SpfResult("helo", envelope.client_helo or "", helo or "", "none", f"client address {ip!r} is not an IP")
        return none, SpfResult("mailfrom", envelope.mail_from, domain_of(envelope.mail_from), "none", none.explanation)

    if helo is None:
        helo_result = SpfResult("helo", envelope.client_helo or "", "", "none",
                                f"HELO {envelope.client_helo!r} is not a domain name")
    else:
        result, why = await asyncio.to_thread(_evaluate_spf, blocking, ip, "", helo)
        helo_result = SpfResult("helo", helo, helo, result, why)

    sender = envelope.mail_from
    if not sender:
        # RFC 7208 2.4: the null reverse-path's identity is postmaster@HELO.
        stands = f"postmaster@{helo}" if helo else ""
        mailfrom = SpfResult("mailfrom", stands, helo or "", helo_result.result,
                             f"null sender: the HELO identity stands for it (RFC 7208 2.4); {helo_result.explanation}")
    elif not domain_of(sender):
        mailfrom = SpfResult("mailfrom", sender, "", "none", "MAIL FROM has no domain")
    else:
        result, why = await asyncio.to_thread(_evaluate_spf, blocking, ip, sender, helo or domain_of(sender))
        mailfrom = SpfResult("mailfrom", sender, domain_of(sender), result, why)
    return mailfrom, helo_result


# -- DKIM --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DkimResult:
    result: str  # pass fail permerror temperror
    detail: str
    domain: str | None = None
    selector: str | None = None
    algorithm: str | None = None
    #: The first 8 characters of b= (RFC 6008): tells two signatures of one domain apart.
    b: str | None = None
    #: The key's size, once it verified.
    key_bits: int | None = None

    @property
    def describe(self) -> str:
        if not self.domain:
            return self.detail
        return f"d={self.domain} s={self.selector} a={self.algorithm}: {self.detail}"


def _tag(fields: dict, name: bytes) -> str | None:
    value = fields.get(name)
    return value.decode("ascii", "replace").strip() if value is not None else None


def _verify_signature(raw: bytes, index: int, value: bytes, resolver: dns.resolver.Resolver) -> DkimResult:
    try:
        fields = dkim.util.parse_tag_value(value)
    except Exception as exc:
        return DkimResult("permerror", f"signature is not a tag list: {exc}")
    domain, selector, algorithm = _tag(fields, b"d"), _tag(fields, b"s"), _tag(fields, b"a")
    b = _tag(fields, b"b")
    found = dict(domain=domain and domain.lower(), selector=selector, algorithm=algorithm,
                 b="".join((b or "").split())[:8] or None)
    if algorithm == "rsa-sha1":
        return DkimResult("permerror", "rsa-sha1 signatures are not accepted (RFC 8301)", **found)
    lookup = KeyLookup(resolver)
    verifier = dkim.DKIM(raw, logger=_DKIM_LOG, minkey=MIN_RSA_BITS, timeout=LOOKUP_SECONDS)
    try:
        valid = verifier.verify(idx=index, dnsfunc=lookup)
    except dkim.DKIMException as exc:
        if not lookup.names:  # refused before its key was fetched: the signature itself is unusable
            return DkimResult("permerror", f"malformed signature: {exc}", **found)
        if isinstance(exc, dkim.ValidationError):  # the body hash did not match
            return DkimResult("fail", str(exc), **found)
        return DkimResult("permerror", str(exc), **found)
    except Exception as exc:
        mismatch = _key_mismatch(algorithm, lookup.found)
        return DkimResult("permerror", mismatch or f"could not be verified: {type(exc).__name__}: {exc}", **found)
    if valid:
        return DkimResult("pass", "signature verified", **found, key_bits=getattr(verifier, "keysize", None))
    if lookup.temperror:
        return DkimResult("temperror", lookup.temperror, **found)
    if lookup.missing:
        return DkimResult("permerror", f"no key at {lookup.missing}", **found)
    if lookup.found is not None:
        key = dict(_key_tags(lookup.found))
        if key.get(b"p", b"x").strip() == b"":
            return DkimResult("permerror", "the key is revoked (empty p=)", **found)
        try:
            dkim.evaluate_pk(lookup.names[-1], lookup.found)
        except Exception as exc:
            return DkimResult("permerror", f"unusable key: {exc}", **found)
        mismatch = _key_mismatch(algorithm, lookup.found)
        if mismatch:
            return DkimResult("permerror", mismatch, **found)
    return DkimResult("fail", "signature did not verify", **found)


def _key_mismatch(algorithm: str | None, key: bytes | None) -> str | None:
    """RFC 6376 3.6.1: a key of another algorithm than the signature's (k= against a=)."""
    if key is None or not algorithm:
        return None
    kind = dict(_key_tags(key)).get(b"k", b"rsa").decode("ascii", "replace").strip().lower()
    if not algorithm.lower().startswith(kind + "-"):
        return f"the key is k={kind}, the signature a={algorithm}"
    return None


def _key_tags(text: bytes):
    try:
        return dkim.util.parse_tag_value(text).items()
    except Exception:
        return []


def _evaluate_dkim(raw: bytes, resolver: dns.resolver.Resolver) -> list[DkimResult]:
    try:
        parsed = dkim.DKIM(raw, logger=_DKIM_LOG)
        signatures = [v for n, v in parsed.headers if n.lower() == b"dkim-signature"]
    except Exception as exc:
        if b"dkim-signature" in header_section(raw).lower():
            return [DkimResult("permerror", f"the message could not be parsed: {type(exc).__name__}: {exc}")]
        return []
    return [_verify_signature(raw, i, value, resolver) for i, value in enumerate(signatures)]


# -- ARC ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArcSet:
    instance: int
    sealer: str  # the ARC-Seal's d=
    signer: str  # the ARC-Message-Signature's d=
    results: str  # the ARC-Authentication-Results value (without i=)


@dataclass(frozen=True)
class ArcResult:
    result: str  # pass fail none temperror
    detail: str
    #: Newest first; each as sealed, whether the chain validated or not.
    sets: tuple[ArcSet, ...] = ()


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


def _evaluate_arc(raw: bytes, resolver: dns.resolver.Resolver) -> ArcResult:
    lookup = KeyLookup(resolver)
    try:
        cv, found, reason = dkim.arc_verify(raw, logger=_DKIM_LOG, dnsfunc=lookup, minkey=MIN_RSA_BITS)
    except Exception as exc:  # dkimpy raises more than DKIMException on some broken sets
        cv, found, reason = dkim.CV_Fail, [], f"{type(exc).__name__}: {exc}"
    sets = tuple(
        ArcSet(int(r.get("instance", 0)), _text(r.get("as-domain")).lower(), _text(r.get("ams-domain")).lower(),
               _text(r.get("aar-value")).split(";", 1)[-1].strip())
        for r in found or []
    )
    result = {dkim.CV_Pass: "pass", dkim.CV_None: "none"}.get(cv, "fail")
    if result == "fail" and lookup.temperror:
        return ArcResult("temperror", lookup.temperror, sets)
    return ArcResult(result, _text(reason), sets)


# -- DMARC -------------------------------------------------------------------------------


DISPOSITIONS = ("none", "quarantine", "reject")


@dataclass(frozen=True)
class DmarcRecord:
    domain: str  # where it was found
    p: str
    sp: str | None
    adkim: str
    aspf: str
    pct: int
    text: str


@dataclass
class DmarcResult:
    result: str  # pass fail none temperror permerror
    detail: str
    from_domain: str | None = None
    record: DmarcRecord | None = None
    #: The policy requested for this From: domain (p, or sp for a subdomain).
    policy: str | None = None
    #: What the policy asks done with this message, after pct: none, quarantine or reject.
    disposition: str = "none"
    spf_aligned: bool = False
    dkim_aligned: bool = False
    #: The trusted forwarder whose ARC set vouched for a message that failed.
    forwarder: str | None = None
    notes: list[str] = field(default_factory=list)


class RecordError(ValueError):
    pass


def parse_record(text: str, domain: str) -> DmarcRecord:
    """A DMARC record (RFC 7489 6.3, 6.4); RecordError when it cannot be used."""
    tags: dict[str, str] = {}
    for number, part in enumerate(p.strip() for p in text.split(";")):
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq:
            raise RecordError(f"{part!r} is not a tag=value pair")
        name, value = name.strip().lower(), value.strip()
        if number == 0 and (name != "v" or value != "DMARC1"):
            raise RecordError("the record does not start with v=DMARC1")
        tags.setdefault(name, value)
    p, sp = tags.get("p", "").lower(), tags.get("sp", "").lower() or None
    if p not in DISPOSITIONS or (sp is not None and sp not in DISPOSITIONS):
        # 6.6.3 step 6: no valid policy, but a reporting address: as if p=none.
        if "rua" in tags:
            p, sp = "none", None
        else:
            raise RecordError(f"no valid p= (p={tags.get('p', '')!r}, sp={tags.get('sp')!r})")
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    return DmarcRecord(domain, p, sp, adkim if adkim in ("r", "s") else "r", aspf if aspf in ("r", "s") else "r",
                       min(max(pct, 0), 100), text)


async def _txt(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    """TXT strings at ``name`` ([] when there are none); raises DNSException on a failure."""
    try:
        answer = await resolver.resolve(name, "TXT", search=False)
    except TEMPORARY:
        raise
    except (dns.exception.DNSException, ValueError):  # no such name, or not one DNS can hold
        return []
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]


async def discover(resolver: dns.asyncresolver.Resolver, domain: str) -> DmarcRecord | None:
    """RFC 7489 6.6.3: the From: domain's record, else its Organizational Domain's.

    Raises DNSException (a temporary failure) or RecordError (several records, or an unusable one).
    """
    for name in dict.fromkeys([domain, organizational_domain(domain)]):
        records = [t for t in await _txt(resolver, f"_dmarc.{name}") if t.startswith("v=DMARC1")]
        if len(records) > 1:
            raise RecordError(f"_dmarc.{name} has {len(records)} DMARC records")
        if records:
            return parse_record(records[0], name)
    return None


def _sampled(message: Message, pct: int) -> bool:
    """Whether pct applies the policy to this message; by message id, so a replay decides the same."""
    if pct >= 100:
        return True
    return int(hashlib.sha256(message.message_id.encode()).hexdigest()[:8], 16) % 100 < pct


def _trusted_forwarders(message: Message) -> tuple[str, ...]:
    """The ARC check's trusted forwarders (none when that check is off: ARC is then not read)."""
    from streams.checks import CHECKS  # the checks import this module

    arc = CHECKS.get("arc")
    if arc is None or message.policy is None:
        return ()
    settings = arc.settings(message.policy)
    return tuple(settings.trusted_forwarders) if settings.enabled else ()


def vouches(arc_set: ArcSet, from_domain: str, adkim: str = "r", aspf: str = "r") -> str | None:
    """What in a sealed ARC-Authentication-Results says the message passed DMARC for ``from_domain``."""
    try:
        parsed = authres.FeatureContext(authres.arc, authres.dmarc).parse_value(arc_set.results)
    except Exception:
        return None
    for r in parsed.results:
        props = {f"{p.type}.{p.name}": str(p.value or "") for p in getattr(r, "properties", [])}
        if r.result != "pass":
            continue
        if r.method == "dmarc" and props.get("header.from", "").lower().rstrip(".") == from_domain:
            return "dmarc=pass"
        if r.method == "dkim" and aligned(props.get("header.d", ""), from_domain, adkim):
            return f"dkim=pass header.d={props['header.d']}"
        if r.method == "spf" and aligned(domain_of(props.get("smtp.mailfrom", "")) or props.get("smtp.mailfrom", ""),
                                         from_domain, aspf):
            return f"spf=pass smtp.mailfrom={props['smtp.mailfrom']}"
    return None


def _trusted(sealer: str, forwarders: tuple[str, ...]) -> bool:
    return any(sealer == t or sealer.endswith("." + t) for t in forwarders)


async def _dmarc(message: Message) -> DmarcResult:
    who = author(message)
    problem = who.problem()
    if problem:
        return DmarcResult("permerror", problem)
    domain = who.domain
    resolver, _ = resolvers()
    (mailfrom, helo), signatures = await asyncio.gather(spf_results(message), dkim_results(message))
    record, result = None, DmarcResult("none", "", domain)
    try:
        record = result.record = await discover(resolver, domain)
    except RecordError as exc:
        result = DmarcResult("permerror", f"{exc}; no DMARC policy applies", domain)
    except dns.exception.DNSException as exc:
        result = DmarcResult("temperror", f"DNS {type(exc).__name__} looking up _dmarc.{domain}", domain)

    adkim, aspf = (record.adkim, record.aspf) if record else ("r", "r")
    # 3.1.2: the SPF-authenticated identifier is MAIL FROM's domain (for the
    # null sender, HELO's, which _spf already put in its place).
    spf_identity = mailfrom
    dkim_passes = [s for s in signatures if s.result == "pass" and s.domain]
    # Alignment is worked out even without a usable record: the local
    # spoofing check asks whether a local From: domain was authenticated.
    result.spf_aligned = spf_identity.result == "pass" and aligned(spf_identity.domain, domain, aspf)
    result.dkim_aligned = any(aligned(s.domain, domain, adkim) for s in dkim_passes)
    passed = result.spf_aligned or result.dkim_aligned
    if result.result != "none":
        return result
    if record is None:
        result.detail = f"{domain} publishes no DMARC record"
        return result
    result.policy = record.sp if (record.sp and record.domain != domain) else record.p
    if passed:
        result.result = "pass"
        result.detail = "aligned " + " and ".join(n for n, ok in (("SPF", result.spf_aligned),
                                                                    ("DKIM", result.dkim_aligned)) if ok)
        return result
    # An aligned identifier whose check could not finish: its owner may be
    # authentic; DMARC cannot tell (6.6.2), so no policy is applied on a guess.
    unfinished = []
    if spf_identity.result == "temperror" and aligned(spf_identity.domain, domain, aspf):
        unfinished.append(f"SPF {spf_identity.domain}")
    unfinished += [f"DKIM d={s.domain}" for s in signatures
                   if s.result == "temperror" and s.domain and aligned(s.domain, domain, adkim)]
    if unfinished:
        result.result = "temperror"
        result.detail = f"no aligned pass, and {', '.join(unfinished)} could not be checked (DNS)"
        return result

    result.result = "fail"
    result.disposition = result.policy
    spf_note = "" if aligned(spf_identity.domain, domain, aspf) or not spf_identity.domain else " (not aligned)"
    reasons = [f"SPF {spf_identity.result} for {spf_identity.domain or 'no domain'}{spf_note}"]
    reasons += [f"DKIM {s.result} d={s.domain}" + ("" if s.domain and aligned(s.domain, domain, adkim)
                                                   else " (not aligned)") for s in signatures]
    if not signatures:
        reasons.append("no DKIM signature")
    result.detail = "; ".join(reasons)
    if result.disposition != "none" and not _sampled(message, record.pct):
        # 6.6.4: a message pct leaves out gets the next less strict policy.
        result.disposition = DISPOSITIONS[DISPOSITIONS.index(result.disposition) - 1]
        result.notes.append(f"sampled out by pct={record.pct}")

    forwarders = _trusted_forwarders(message)
    if forwarders:
        chain = await arc_result(message)
        newest = chain.sets[0] if chain.sets else None
        if chain.result == "pass" and newest and _trusted(newest.sealer, forwarders):
            said = vouches(newest, domain, adkim, aspf)
            if said:
                result.forwarder = newest.sealer
                result.notes.append(f"trusted forwarder {newest.sealer} (ARC i={newest.instance}) saw {said}")
    return result


# -- shared, once per message ------------------------------------------------------------


async def _once(message: Message, key: str, make):
    task = message.shared.get(key)
    if task is None:
        task = asyncio.ensure_future(make())
        message.shared[key] = task
    # Shielded: one check timing out must not cancel the work another awaits.
    return await asyncio.shield(task)


async def spf_results(message: Message) -> tuple[SpfResult, SpfResult]:
    """(MAIL FROM, HELO) SPF results of this message."""
    return await _once(message, "sender_auth.spf", lambda: _spf(message))


#: A header field that would make dkimpy find a signature (or an ARC set).
#: A message without one gets dkimpy's own answer for unsigned mail at once:
#: dkimpy would parse the whole message on a worker thread to say the same,
#: 6 % of the streams worker's CPU under bench/e2e_relay.py (py-spy --gil;
#: docs/performance.md, "Seventh session"). A name found in another field's
#: value only means the full evaluation runs.
_DKIM_FIELD = re.compile(rb"^dkim-signature[ \t]*:", re.IGNORECASE | re.MULTILINE)
_ARC_FIELD = re.compile(rb"^arc-[a-z-]+[ \t]*:", re.IGNORECASE | re.MULTILINE)
#: What ``dkim.arc_verify`` says about a message with no ARC header field.
NOT_ARC_SIGNED = ArcResult("none", "Message is not ARC signed", ())


async def dkim_results(message: Message) -> list[DkimResult]:
    """One result per DKIM-Signature, in header order; [] when unsigned."""
    async def run():
        if not _DKIM_FIELD.search(header_section(message.raw)):
            return []
        return await asyncio.to_thread(_evaluate_dkim, message.raw, resolvers()[1])
    return await _once(message, "sender_auth.dkim", run)


async def arc_result(message: Message) -> ArcResult:
    async def run():
        if not _ARC_FIELD.search(header_section(message.raw)):
            return NOT_ARC_SIGNED
        return await asyncio.to_thread(_evaluate_arc, message.raw, resolvers()[1])
    return await _once(message, "sender_auth.arc", run)


async def dmarc_result(message: Message) -> DmarcResult:
    return await _once(message, "sender_auth.dmarc", lambda: _dmarc(message))
