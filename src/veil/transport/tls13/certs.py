"""The server's certificate message, its CertificateVerify, and RFC 8879 decompression.

veil does not use the web PKI: the certificate is pinned by its key one layer up. What this
module guarantees is that the server holds the private key of the certificate it presented
(the CertificateVerify signature over the transcript), so that nobody can replay a server's
certificate without its key.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from veil.transport.tls13.wire import (
    CertificateCompression,
    DecodeError,
    ExtensionType,
    Reader,
    SignatureScheme,
    extensions,
)

try:  # ML-DSA arrived in cryptography 47.
    from cryptography.hazmat.primitives.asymmetric import mldsa

    # draft-ietf-tls-mldsa: pure ML-DSA over the CertificateVerify content, empty context.
    _MLDSA: dict[int, type[mldsa.MLDSA44PublicKey | mldsa.MLDSA65PublicKey
                           | mldsa.MLDSA87PublicKey]] = {
        SignatureScheme.MLDSA44: mldsa.MLDSA44PublicKey,
        SignatureScheme.MLDSA65: mldsa.MLDSA65PublicKey,
        SignatureScheme.MLDSA87: mldsa.MLDSA87PublicKey,
    }
except ImportError:  # pragma: no cover - depends on the installed cryptography
    _MLDSA = {}

# The largest certificate message accepted, compressed or not. Real chains are a few KiB;
# the largest seen in the wild stay well under 64 KiB.
MAX_CERTIFICATE_MESSAGE = 256 * 1024

_SERVER_CONTEXT = b" " * 64 + b"TLS 1.3, server CertificateVerify\x00"

# The schemes a TLS 1.3 CertificateVerify may use (RFC 8446 §4.4.3: no PKCS#1 v1.5).
_ECDSA: dict[int, tuple[type[ec.EllipticCurve], hashes.HashAlgorithm]] = {
    SignatureScheme.ECDSA_SECP256R1_SHA256: (ec.SECP256R1, hashes.SHA256()),
    SignatureScheme.ECDSA_SECP384R1_SHA384: (ec.SECP384R1, hashes.SHA384()),
    SignatureScheme.ECDSA_SECP521R1_SHA512: (ec.SECP521R1, hashes.SHA512()),
}
_RSA_PSS: dict[int, hashes.HashAlgorithm] = {
    SignatureScheme.RSA_PSS_RSAE_SHA256: hashes.SHA256(),
    SignatureScheme.RSA_PSS_RSAE_SHA384: hashes.SHA384(),
    SignatureScheme.RSA_PSS_RSAE_SHA512: hashes.SHA512(),
}
TLS13_SIGNATURE_SCHEMES = frozenset(_ECDSA) | frozenset(_RSA_PSS) | frozenset(_MLDSA)
_KEY_TYPES = (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, *_MLDSA.values())


class CertificateError(Exception):
    """The certificate message is unusable; ``alert`` is what to tell the server."""

    def __init__(self, message: str, alert: int) -> None:
        super().__init__(message)
        self.alert = alert


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    leaf_der: bytes
    chain_der: tuple[bytes, ...]
    ocsp_response: bytes | None
    public_key: object  # one of _KEY_TYPES


def parse_certificate(body: bytes, offered: set[int]) -> ServerCertificate:
    """A Certificate message body (RFC 8446 §4.4.2) from the server."""
    reader = Reader(body)
    context = reader.vec8()
    if context:
        raise DecodeError("a server's certificate_request_context must be empty")
    entries = Reader(reader.vec24())
    reader.done()
    chain: list[bytes] = []
    ocsp: bytes | None = None
    while entries.remaining:
        der = entries.vec24()
        if not der:
            raise DecodeError("empty certificate entry")
        for ext_type, data in extensions(entries):
            if ext_type not in offered or ext_type not in (
                    ExtensionType.STATUS_REQUEST, ExtensionType.SIGNED_CERTIFICATE_TIMESTAMP,
                    ExtensionType.TRUST_ANCHORS):
                raise CertificateError(f"certificate entry with extension {ext_type}",
                                       alert=110)  # unsupported_extension
            if ext_type == ExtensionType.STATUS_REQUEST and not chain:
                ocsp = data
        chain.append(der)
    if not chain:
        raise CertificateError("the server sent no certificate", alert=50)  # decode_error
    try:
        key = x509.load_der_x509_certificate(chain[0]).public_key()
    except UnsupportedAlgorithm as exc:  # e.g. an EC key on a curve OpenSSL does not know
        raise CertificateError(f"unsupported server certificate key: {exc}",
                               alert=43) from exc  # unsupported_certificate
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise CertificateError(f"unreadable server certificate: {exc}", alert=42) from exc
    if not isinstance(key, _KEY_TYPES):
        raise CertificateError(f"unsupported certificate key type {type(key).__name__}",
                               alert=43)  # unsupported_certificate
    return ServerCertificate(chain[0], tuple(chain), ocsp, key)


def verify_signature(certificate: ServerCertificate, scheme: int, signature: bytes,
                     transcript_hash: bytes) -> None:
    """Check a server's CertificateVerify; raise CertificateError (decrypt_error) if it is
    not a signature by the certificate's key over this handshake."""
    content = _SERVER_CONTEXT + transcript_hash
    key = certificate.public_key
    try:
        if scheme in _ECDSA:
            curve, algorithm = _ECDSA[scheme]
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve,
                                                                                 curve):
                raise CertificateError(f"signature scheme 0x{scheme:04x} does not fit the "
                                       "certificate's key", alert=47)  # illegal_parameter
            key.verify(signature, content, ec.ECDSA(algorithm))
        elif scheme in _RSA_PSS:
            if not isinstance(key, rsa.RSAPublicKey):
                raise CertificateError(f"signature scheme 0x{scheme:04x} does not fit the "
                                       "certificate's key", alert=47)
            algorithm = _RSA_PSS[scheme]
            key.verify(signature, content,
                       padding.PSS(mgf=padding.MGF1(algorithm),
                                   salt_length=algorithm.digest_size), algorithm)
        elif scheme in _MLDSA:
            if not isinstance(key, _MLDSA[scheme]):
                raise CertificateError(f"signature scheme 0x{scheme:04x} does not fit the "
                                       "certificate's key", alert=47)
            key.verify(signature, content)
        else:
            raise CertificateError(f"signature scheme 0x{scheme:04x} not allowed in TLS 1.3",
                                   alert=47)
    except InvalidSignature:
        raise CertificateError("CertificateVerify does not verify with the certificate's "
                               "key: the server does not hold the key of the certificate "
                               "it presented (forged or intercepted handshake)",
                               alert=51) from None  # decrypt_error


# ---------------------------------------------------------------------- RFC 8879
@functools.cache
def _brotli_decoder() -> ctypes.CDLL | None:
    path = ctypes.util.find_library("brotlidec")
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    lib.BrotliDecoderDecompress.restype = ctypes.c_int
    lib.BrotliDecoderDecompress.argtypes = [ctypes.c_size_t, ctypes.c_char_p,
                                            ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p]
    return lib


def brotli_available() -> bool:
    return _brotli_decoder() is not None


def _brotli(data: bytes, size: int) -> bytes:
    lib = _brotli_decoder()
    if lib is None:
        raise CertificateError("the server sent a brotli-compressed certificate and "
                               "libbrotlidec (Debian: libbrotli1) is not installed", alert=42)
    out = ctypes.create_string_buffer(size + 1)  # one spare byte: a longer result is an error
    out_size = ctypes.c_size_t(size + 1)
    result = lib.BrotliDecoderDecompress(len(data), data, ctypes.byref(out_size), out)
    if result != 1 or out_size.value != size:  # BROTLI_DECODER_RESULT_SUCCESS
        raise CertificateError("compressed certificate does not decompress to its stated "
                               "length", alert=42)
    return out.raw[:size]


def decompress_certificate(body: bytes, offered: tuple[int, ...]) -> bytes:
    """The Certificate message body inside a CompressedCertificate (RFC 8879 §4)."""
    reader = Reader(body)
    algorithm = reader.u16()
    size = reader.u24()
    data = reader.vec24()
    reader.done()
    if algorithm not in offered:
        raise CertificateError(f"certificate compressed with algorithm {algorithm}, which "
                               "was not offered", alert=47)
    if not 0 < size <= MAX_CERTIFICATE_MESSAGE:
        raise CertificateError(f"compressed certificate of {size} bytes", alert=42)
    if algorithm == CertificateCompression.BROTLI:
        return _brotli(data, size)
    raise CertificateError(f"no decoder for certificate compression {algorithm}", alert=42)
