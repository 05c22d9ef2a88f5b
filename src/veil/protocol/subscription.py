"""The signature on a subscription's answer (veil.manage.subscription makes it,
veil.client.subscription checks it).

Through a CDN, TLS ends at the CDN, so its certificate vouches for the CDN, not for veil's
server: a CDN (or whoever holds a certificate for its name) could hand out another server's
key. The answer therefore carries a signature by the server's own TLS key, the key that
access keys and ``#pin=`` pin (SHA-256 of its SubjectPublicKeyInfo): a client that knows the
pin takes an answer only if that key signed it, whichever way it came.

What is signed: the JSON text of ``{"key": ..., "subscription_urls": [...]}`` with sorted keys
and no spaces (what decides where the client connects and fetches next). The signature is
ECDSA with SHA-256 for an EC key, RSA-PSS (MGF1, SHA-256, 32-byte salt) for an RSA key.

The rule data's list (``rules``: each file's SHA-256, which a client checks the files it then
fetches against) is signed apart, as ``signature.rules`` over the JSON of ``{"rules": ...}``
the same way: clients older than it check the first signature only, and neither signed text
can pass for the other (their only keys differ).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from veil.errors import AuthError

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def signed_part(document: Mapping[str, object]) -> bytes:
    """The bytes the signature covers."""
    return json.dumps({"key": document.get("key"),
                       "subscription_urls": document.get("subscription_urls")},
                      sort_keys=True, separators=(",", ":")).encode()


def signed_rules_part(document: Mapping[str, object]) -> bytes:
    """The bytes ``signature.rules`` covers."""
    return json.dumps({"rules": document.get("rules")}, sort_keys=True,
                      separators=(",", ":")).encode()


def spki_of(key: SigningKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(key: SigningKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    return key.sign(data, _PSS, hashes.SHA256())


def check_signature(spki: bytes, pin: bytes, data: bytes, signature: bytes) -> None:
    """Raise AuthError unless ``spki`` is the pinned key and signed ``data``."""
    if hashlib.sha256(spki).digest() != pin:
        raise AuthError("the subscription is signed by another key than the pinned one",
                        code="pin_mismatch")
    try:
        public = serialization.load_der_public_key(spki)
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, _PSS, hashes.SHA256())
        else:
            raise AuthError("the subscription's signing key is of an unknown type",
                            code="bad_signature")
    except (InvalidSignature, ValueError) as exc:
        raise AuthError("the subscription's signature does not verify",
                        code="bad_signature") from exc
