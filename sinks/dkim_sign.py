"""Outbound DKIM signing (RFC 6376; Ed25519 per RFC 8463) of the organisation's mail.

The delivery sink signs each transaction's bytes as the last step, after
the Received header and every other header it adds, so the signature covers
the message exactly as it leaves. A message is signed when

- the policy's ``dkim_signing`` has keys for its From: domain (the d= domain
  is the From: domain, so DMARC finds the signature aligned);
- it is leaving: the recipients' domain is not local (nor made local at run
  time). Mail to local recipients goes to the organisation's own servers and
  gains nothing from a signature;
- the organisation sent it: an authenticated session, a domain mail server,
  an address the relay exceptions list, or the gateway itself (DSNs,
  notifications, TLS reports). Mail from the Internet is never signed, even
  when a verdict (a redirect) sends it out again: a forged "From: ceo@" would
  otherwise leave carrying the organisation's own signature.

With an RSA and an Ed25519 key both configured the message gets both
signatures (verifiers without Ed25519 still have the RSA one; RFC 8463), RSA
on top for verifiers that read only the first. A TLS report (RFC 8460
section 3 requires it signed by the submitter's domain) uses the domain's
``use: tlsrpt`` keys when it has them (their record carries ``s=tlsrpt``),
else its other keys; RFC 8460 forbids ``l=``, which Bulwark never sets.

Headers signed: RFC 6376 5.4.1's recommended set and the MIME and list
headers (RFC 8058 requires List-Unsubscribe-Post signed), each as often as
it occurs; the singletons a reader sees (From, Subject, Date, To, ...) are
signed once more than they occur ("oversigned", 8.15), so a second From or
Subject added on the way breaks the signature instead of being shown.
Canonicalisation relaxed/relaxed: header refolding and trailing whitespace
on the way do not break it.

If no configured key of the domain can sign (its file is missing,
unreadable or not the key the policy says), the recipients are deferred with
4.7.0 and the reason, logged and recorded as a ``delivery.attempted`` event
without a server: unsigned mail from a domain that publishes DMARC
p=reject would be refused or lost at the receivers, while deferred mail goes
out signed as soon as the key is fixed, or bounces to its sender when the
delivery period ends. If one of two keys fails, the other signs (one aligned
signature satisfies DMARC) and the failure is logged.

Why dkimpy: it is the maintained DKIM implementation for Python (signing and
verifying, RSA and Ed25519, ARC, the RFC 8460 tlsrpt rules), behind
dkimpy-milter, and the same library verifies inbound signatures, so both
directions canonicalise alike. Key files are read with ``cryptography``
(PEM in PKCS#1 or PKCS#8, as opendkim-genkey, openssl and ``bulwark dkim
keygen`` write them) and handed to dkimpy in the forms it takes. No key
material is ever logged or put in an event: errors name the file and the
kind of problem only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from bulwark.networks import in_networks
import logging
import os
import re
import time
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path
from typing import TYPE_CHECKING

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from bulwark.policy.dkim import DkimKey
from schemas import events as ev

if TYPE_CHECKING:
    from bulwark.policy import Policy
    from sinks.delivery import DeliverySink

log = logging.getLogger(__name__)

#: RFC 6376 5.4.1's recommended set, the MIME headers, Sender, Message-ID,
#: List-Unsubscribe-Post (RFC 8058 section 4) and the TLS report headers.
SIGNED_HEADERS = (
    "from", "reply-to", "subject", "date", "to", "cc", "sender", "message-id",
    "resent-date", "resent-from", "resent-sender", "resent-to", "resent-cc", "resent-message-id",
    "in-reply-to", "references",
    "list-id", "list-help", "list-unsubscribe", "list-unsubscribe-post", "list-subscribe", "list-post",
    "list-owner", "list-archive",
    "mime-version", "content-type", "content-transfer-encoding", "content-id", "content-description",
    "tls-report-domain", "tls-report-submitter",
)
#: Signed once more than they occur (RFC 6376 8.15); From always (it must occur once).
OVERSIGNED = ("from", "sender", "reply-to", "subject", "date", "to", "cc", "message-id", "in-reply-to",
              "references")

#: Sources of mail the gateway writes itself (sinks/dsn.py, notify.py, tlsrpt.py).
OWN_SOURCES = ("dsn", "notification", "tlsrpt")

#: RFC 8301 section 3.2: signers MUST use RSA keys of at least 1024 bits.
MIN_RSA_BITS = 1024
#: A failure of the same key is logged at most this often (every message would try it).
LOG_EVERY_SECONDS = 600

_ALGORITHMS = {"rsa-sha256": "rsa", "ed25519-sha256": "ed25519"}


class KeyProblem(Exception):
    """A key file that cannot be used; the message names the file, never its content."""


class SigningFailed(Exception):
    """No configured key could sign: the recipients are deferred."""


# -- key files -------------------------------------------------------------------------


def read_private_key(path: Path, algorithm: str) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    """The private key in ``path`` (PEM, or dkimpy's base64 Ed25519 seed), checked against ``algorithm``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyProblem(f"cannot read the key file {path}: {exc.strerror or type(exc).__name__}") from None
    kind = _ALGORITHMS[algorithm]
    key = None
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise KeyProblem(f"the key file {path} is encrypted; Bulwark reads unencrypted keys "
                             "(protect the file with its mode and owner)") from None
        except (ValueError, UnicodeError):
            raise KeyProblem(f"the key file {path} holds no private key that can be read (PEM expected)") from None
    elif kind == "ed25519":
        # dknewkey (dkimpy) writes an Ed25519 key as the base64 of its 32-byte seed.
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) == 32:
            key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    if key is None:
        raise KeyProblem(f"the key file {path} holds no private key (PEM expected)")
    if kind == "rsa" and not isinstance(key, rsa.RSAPrivateKey):
        raise KeyProblem(f"the key file {path} is not an RSA key, but the policy says {algorithm}")
    if kind == "ed25519" and not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyProblem(f"the key file {path} is not an Ed25519 key, but the policy says {algorithm}")
    if kind == "rsa" and key.key_size < MIN_RSA_BITS:
        raise KeyProblem(f"the RSA key in {path} has {key.key_size} bits; RFC 8301 requires at least "
                         f"{MIN_RSA_BITS} (2048 recommended)")
    return key


def generate_private_key(algorithm: str, bits: int = 2048) -> bytes:
    """A new private key as unencrypted PKCS#8 PEM."""
    if _ALGORITHMS[algorithm] == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private_key(path: Path, pem: bytes) -> None:
    """Write ``pem`` to a new file readable by its owner only; an existing file is never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def record_value(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, use: str = "all") -> str:
    """The DKIM key record (RFC 6376 3.6.1) of a private key: p= is the public key."""
    public = key.public_key()
    if isinstance(key, rsa.RSAPrivateKey):
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        kind, p = "rsa", base64.b64encode(der).decode()
    else:  # RFC 8463 section 4.2: the raw 32-byte public key
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        kind, p = "ed25519", base64.b64encode(raw).decode()
    service = "; s=tlsrpt" if use == "tlsrpt" else ""
    return f"v=DKIM1; k={kind}{service}; p={p}"


def txt_strings(value: str) -> list[str]:
    """The record as TXT character-strings of at most 255 octets (RFC 1035 3.3.14; RFC 6376 3.6.2.2)."""
    return [value[i:i + 255] for i in range(0, len(value), 255)] or [""]


def zone_line(selector: str, domain: str, value: str) -> str:
    """The record as a zone file line; resolvers join its strings without spaces."""
    strings = " ".join(f'"{s}"' for s in txt_strings(value))
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"


@dataclass(frozen=True)
class SigningKey:
    """A key ready for dkimpy: what it signs as, and its private key in the form dkimpy takes."""

    domain: str
    selector: str
    algorithm: str
    material: bytes

    def __repr__(self) -> str:  # never the material, whatever prints this
        return f"SigningKey({self.selector}._domainkey.{self.domain}, {self.algorithm})"


def signing_key(key: DkimKey) -> SigningKey:
    private = read_private_key(key.key_file, key.algorithm)
    if isinstance(private, rsa.RSAPrivateKey):
        # dkimpy reads RSA keys in PKCS#1 PEM.
        material = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption())
    else:
        # ... and Ed25519 keys as the base64 of the 32-byte seed.
        material = base64.b64encode(private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                          serialization.NoEncryption()))
    return SigningKey(key.domain, key.selector, key.algorithm, material)


# -- the message -----------------------------------------------------------------------


def _headers(message: bytes) -> list[tuple[bytes, bytes]]:
    # The header section only: dkimpy's parser splits every line of what it is given.
    end = re.search(rb"\r?\n\r?\n", message)
    headers, _ = dkim.rfc822_parse(message[:end.end()] if end else message)
    return headers


def author_domain(message: bytes) -> str | None:
    """The From: domain (RFC 5322.From, what DMARC aligns with); None unless exactly one From with one domain."""
    values = [value for name, value in _headers(message) if name.lower() == b"from"]
    if len(values) != 1:
        return None
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
    domains = {address.rpartition("@")[2].strip().lower().rstrip(".")
               for _, address in getaddresses([text]) if "@" in address}
    return domains.pop() if len(domains) == 1 else None


def headers_to_sign(message: bytes) -> list[bytes]:
    """h=: each recommended header as often as it occurs, then the oversigned ones once more."""
    present = [name.lower() for name, _ in _headers(message) if name.lower().decode("ascii", "replace")
               in SIGNED_HEADERS]
    extra = [name.encode() for name in OVERSIGNED if name.encode() in present or name == "from"]
    return present + extra


def sign_message(message: bytes, keys: list[SigningKey], tlsrpt: bool = False) -> bytes:
    """The DKIM-Signature header fields (CRLF-terminated) to put on top of ``message``, one per key."""
    include = headers_to_sign(message)
    # RSA first: on top, where a verifier that reads one signature looks.
    ordered = sorted(keys, key=lambda k: k.algorithm != "rsa-sha256")
    signatures = [
        dkim.sign(message, k.selector.encode(), k.domain.encode(), k.material,
                  canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=k.algorithm.encode(),
                  include_headers=include, linesep=b"\r\n", tlsrpt=tlsrpt)
        for k in ordered
    ]
    return b"".join(signatures)


# -- the delivery sink's side ----------------------------------------------------------


def sent_by_organisation(policy: "Policy", source: str, envelope: ev.Envelope) -> bool:
    """Was this message sent by the organisation (what relay control lets send out), or by the gateway?"""
    if source in OWN_SOURCES or envelope.authenticated_user:
        return True
    if in_networks(envelope.client_ip, policy.relay_control.exceptions.relay_for_addresses):
        return True
    try:
        return policy.is_domain_mail_server(envelope.client_ip)
    except ValueError:  # not an address: not one of ours
        return False


def keys_for(policy: "Policy", domain: str, tlsrpt: bool) -> list[DkimKey]:
    """The keys that sign mail from ``domain``: a TLS report's own keys if it has them."""
    if not policy.dkim_signing.enabled:
        return []
    mine = [k for k in policy.dkim_signing.keys if k.domain == domain]
    reports = [k for k in mine if k.use == "tlsrpt"]
    return reports if tlsrpt and reports else [k for k in mine if k.use == "all"]


class OutboundSigner:
    """What the delivery sink calls: signs a transaction's bytes, or says why it cannot."""

    def __init__(self, sink: "DeliverySink"):
        self.sink = sink
        #: Keys read from their files, reread when a file changes (a key replaced in place).
        self._cache: dict[tuple[str, str], tuple[tuple, SigningKey]] = {}
        self._logged: dict[tuple[str, str], float] = {}

    def _load(self, key: DkimKey) -> SigningKey:
        try:
            st = os.stat(key.key_file)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None  # signing_key() says why
        cached = self._cache.get((str(key.key_file), key.algorithm))
        if stamp is not None and cached is not None and cached[0] == stamp:
            return SigningKey(key.domain, key.selector, key.algorithm, cached[1].material)
        loaded = signing_key(key)
        if stamp is not None:
            self._cache[(str(key.key_file), key.algorithm)] = (stamp, loaded)
        return loaded

    def _log_problem(self, key: DkimKey, problem: str) -> None:
        ident = (f"{key.selector}._domainkey.{key.domain}", problem)
        now = time.monotonic()
        if now - self._logged.get(ident, -LOG_EVERY_SECONDS) >= LOG_EVERY_SECONDS:
            self._logged[ident] = now
            log.error("DKIM key %s (%s) cannot sign: %s", ident[0], key.algorithm, problem)

    def _sign_sync(self, data: bytes, keys: list[DkimKey], tlsrpt: bool) -> bytes:
        usable, problems = [], []
        for key in keys:
            try:
                usable.append(self._load(key))
            except KeyProblem as exc:
                self._log_problem(key, str(exc))
                problems.append(f"{key.selector} ({key.algorithm}): {exc}")
        if not usable:
            raise SigningFailed("; ".join(problems))
        try:
            return sign_message(data, usable, tlsrpt=tlsrpt) + data
        except dkim.DKIMException as exc:
            # A message dkimpy cannot parse: never sent unsigned in its domain's name.
            raise SigningFailed(f"the message cannot be signed: {exc}") from None

    async def sign(self, entry: dict, envelope: ev.Envelope, rcpt_domain: str, data: bytes) -> bytes:
        """``data`` with its DKIM signatures on top, or unchanged when it is not to be signed.

        Raises SigningFailed when it should be signed and cannot be.
        """
        policy = self.sink.policy.current
        tlsrpt = entry["source"] == "tlsrpt"
        if not (policy.dkim_signing.keys or tlsrpt):
            return data
        if policy.is_local_domain(rcpt_domain) or rcpt_domain in self.sink.created_domains:
            return data
        if not sent_by_organisation(policy, entry["source"], envelope):
            return data
        author = author_domain(data)
        keys = keys_for(policy, author, tlsrpt) if author else []
        if not keys:
            if tlsrpt:
                why = f"no DKIM key for {author}" if policy.dkim_signing.enabled else "dkim_signing is disabled"
                log.warning("TLS report %s to %s leaves unsigned: %s (RFC 8460 section 3: receivers ignore "
                            "unsigned reports)", entry["message_id"], rcpt_domain, why)
            return data
        # Off the event loop: canonicalising and hashing a large message takes a while.
        return await asyncio.to_thread(self._sign_sync, data, keys, tlsrpt)

    def defer(self, entry: dict, domain: str, rcpts: list[str], error: SigningFailed) -> list[ev.RecipientResult]:
        """Every recipient of ``domain`` deferred because no signature could be made; recorded as an attempt."""
        reply = f"4.7.0 not sent: no DKIM signature could be made: {error}"
        log.error("%s to %s deferred: %s", entry["message_id"], domain, reply)
        results = [ev.RecipientResult(recipient=r, outcome="deferred", reply=reply) for r in rcpts]
        sink = self.sink
        sink._record(entry, ev.DeliveryAttempted(
            message_id=entry["message_id"], session_id=entry["session_id"], attempt=entry["attempts"],
            server="(none: not signed)", destination=domain, tls=None, recipients=results,
            next_attempt_at=sink._next_attempt(entry),
        ))
        return results
