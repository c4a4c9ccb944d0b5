"""Keys and DNS records for the sender authentication tests.

The keys are made once per test run, when this module is first imported:
the test modules that sign messages and the fixtures that publish the keys
in NSD (tests/integration/conftest.py among them) import this one module
in the same process, so they always agree. Ed25519 keys come from fixed
seeds (deterministic); RSA keys cannot be derived from a seed with
``cryptography``, and 2048-bit ones take a fraction of a second to make.
Nothing here is a real key of anyone's.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


@dataclass(frozen=True)
class Key:
    algorithm: bytes  # dkimpy's signature_algorithm
    private: bytes  # what dkimpy signs with: PKCS#1 PEM (RSA) or the base64 seed (Ed25519)
    public: str  # the p= of the DNS record

    def record(self) -> str:
        kind = "ed25519" if self.algorithm == b"ed25519-sha256" else "rsa"
        return f"v=DKIM1; k={kind}; p={self.public}"


def rsa_key(bits: int = 2048) -> Key:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return Key(b"rsa-sha256", private, base64.b64encode(public).decode())


def ed25519_key(name: str) -> Key:
    seed = hashlib.sha256(f"bulwark sender authentication test key {name}".encode()).digest()
    public = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Key(b"ed25519-sha256", base64.b64encode(seed), base64.b64encode(public).decode())


RSA = rsa_key()
RSA_1024 = rsa_key(1024)
ED25519 = ed25519_key("ed")
#: The forwarders' ARC sealing keys (ARC signs with RSA only, RFC 8617 uses DKIM's algorithms).
ARC_TRUSTED = rsa_key()
ARC_OTHER = rsa_key()


def txt(owner: str, text: str) -> str:
    """A TXT record line for a zone file, split into strings of at most 255 octets (RFC 1035)."""
    chunks = [text[i:i + 255] for i in range(0, len(text), 255)] or [""]
    return f"{owner} TXT " + " ".join('"' + c.replace('"', '\\"') + '"' for c in chunks)
