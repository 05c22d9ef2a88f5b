"""The ClientHello veil sends, as data: one spec per browser release (cf. uTLS's ClientHelloSpec).

Following a new Chrome release is a change here plus a fresh capture: the integration test
``tests/integration/test_chrome_fingerprint.py`` captures Debian's ``chromium`` and fails when
the two differ in anything but random values, GREASE values, key shares and extension order.

Reference: Chromium 156.0.8078.108 (Debian 12), captured headless against a local listener on
2026-11-29. Its ClientHello (BoringSSL), in the order BoringSSL defines before it shuffles:

- cipher suites: GREASE, the three TLS 1.3 suites, then eleven TLS 1.2 suites (offered for
  the look of it: veil's client completes TLS 1.3 only, see ``client.py``);
- extensions: a GREASE extension (empty) first; then, in an order shuffled per connection,
  server_name (only for a host name; none for an IP literal), extended_master_secret,
  renegotiation_info, supported_groups, ec_point_formats, session_ticket, ALPN, status_request,
  signature_algorithms, signed_certificate_timestamp, key_share, psk_key_exchange_modes,
  supported_versions, compress_certificate, application_settings (new code point 0x44cd),
  encrypted_client_hello (GREASE) and trust_anchors (0xca34, Chrome's root store IDs); then a
  second GREASE extension (one zero byte); padding only when the hello would be 256..511
  bytes long (never, with an ML-KEM key share);
- signature algorithms: GREASE, ML-DSA-44/65/87, then ECDSA, RSA-PSS and PKCS#1 as Chrome has
  offered them for years;
- one GREASE value per connection for each of: cipher suite, group (supported_groups and the
  one-byte GREASE key share), version, first extension, second extension (never equal to
  the first), signature algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.transport.tls13.wire import (
    CertificateCompression,
    CipherSuite,
    ExtensionType,
    NamedGroup,
    SignatureScheme,
)

GREASE = -1  # "a GREASE value here" in a list of code points
GREASE_EMPTY = -2  # extension slot: a GREASE extension with no body
GREASE_ONE_BYTE = -3  # extension slot: a GREASE extension with a single zero byte
PADDING = -4  # extension slot: padding (RFC 7685), when the length rule says so


@dataclass(frozen=True, slots=True)
class EchGrease:
    """A GREASE encrypted_client_hello (draft-ietf-tls-esni §6.2): random bytes shaped
    like an outer ECH extension."""

    kdf_id: int
    aead_id: int
    enc_len: int
    payload_lens: tuple[int, ...]  # one is chosen at random per connection


@dataclass(frozen=True, slots=True)
class ClientHelloSpec:
    """Everything a ClientHello says, except its random values and key shares."""

    name: str
    record_version: int  # of the record carrying the first ClientHello
    cipher_suites: tuple[int, ...]
    # The extension slots before, among and after the shuffled ones.
    first: tuple[int, ...]
    shuffled: tuple[int, ...]
    last: tuple[int, ...]
    shuffle: bool
    supported_versions: tuple[int, ...]
    supported_groups: tuple[int, ...]
    key_share_groups: tuple[int, ...]  # GREASE shares carry one zero byte
    signature_algorithms: tuple[int, ...]
    alpn: tuple[bytes, ...]
    alps_protocols: tuple[bytes, ...]
    alps_settings: bytes  # sent in the client's EncryptedExtensions if the server agrees
    cert_compression: tuple[int, ...]
    ec_point_formats: bytes
    psk_modes: bytes
    status_request: bytes  # the extension body: OCSP, no responder ids, no extensions
    session_id_len: int
    ech_grease: EchGrease | None
    # Pad hellos whose length (handshake header included) falls in [low, high) to `high`.
    padding_window: tuple[int, int]
    # Send a dummy change_cipher_spec before the second flight (RFC 8446 §D.4).
    middlebox_ccs: bool
    # The literal bodies of the extensions whose content never varies.
    fixed: tuple[tuple[int, bytes], ...] = ()


CHROME = ClientHelloSpec(
    name="chrome-156",
    record_version=0x0301,
    cipher_suites=(
        GREASE,
        CipherSuite.TLS_AES_128_GCM_SHA256,
        CipherSuite.TLS_AES_256_GCM_SHA384,
        CipherSuite.TLS_CHACHA20_POLY1305_SHA256,
        0xC02B,  # ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        0xC02F,  # ECDHE_RSA_WITH_AES_128_GCM_SHA256
        0xC02C,  # ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        0xC030,  # ECDHE_RSA_WITH_AES_256_GCM_SHA384
        0xCCA9,  # ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        0xCCA8,  # ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        0xC013,  # ECDHE_RSA_WITH_AES_128_CBC_SHA
        0xC014,  # ECDHE_RSA_WITH_AES_256_CBC_SHA
        0x009C,  # RSA_WITH_AES_128_GCM_SHA256
        0x009D,  # RSA_WITH_AES_256_GCM_SHA384
        0x002F,  # RSA_WITH_AES_128_CBC_SHA
        0x0035,  # RSA_WITH_AES_256_CBC_SHA
    ),
    first=(GREASE_EMPTY,),
    shuffled=(
        ExtensionType.SERVER_NAME,
        ExtensionType.EXTENDED_MASTER_SECRET,
        ExtensionType.RENEGOTIATION_INFO,
        ExtensionType.SUPPORTED_GROUPS,
        ExtensionType.EC_POINT_FORMATS,
        ExtensionType.SESSION_TICKET,
        ExtensionType.ALPN,
        ExtensionType.STATUS_REQUEST,
        ExtensionType.SIGNATURE_ALGORITHMS,
        ExtensionType.SIGNED_CERTIFICATE_TIMESTAMP,
        ExtensionType.KEY_SHARE,
        ExtensionType.PSK_KEY_EXCHANGE_MODES,
        ExtensionType.SUPPORTED_VERSIONS,
        ExtensionType.COMPRESS_CERTIFICATE,
        ExtensionType.APPLICATION_SETTINGS,
        ExtensionType.ENCRYPTED_CLIENT_HELLO,
        ExtensionType.TRUST_ANCHORS,
        ExtensionType.COOKIE,  # the second ClientHello only (after a HelloRetryRequest)
    ),
    last=(GREASE_ONE_BYTE, PADDING),
    shuffle=True,
    supported_versions=(GREASE, 0x0304, 0x0303),
    supported_groups=(GREASE, NamedGroup.X25519MLKEM768, NamedGroup.X25519,
                      NamedGroup.SECP256R1, NamedGroup.SECP384R1),
    key_share_groups=(GREASE, NamedGroup.X25519MLKEM768, NamedGroup.X25519),
    signature_algorithms=(
        GREASE,
        SignatureScheme.MLDSA44,
        SignatureScheme.MLDSA65,
        SignatureScheme.MLDSA87,
        SignatureScheme.ECDSA_SECP256R1_SHA256,
        SignatureScheme.RSA_PSS_RSAE_SHA256,
        SignatureScheme.RSA_PKCS1_SHA256,
        SignatureScheme.ECDSA_SECP384R1_SHA384,
        SignatureScheme.RSA_PSS_RSAE_SHA384,
        SignatureScheme.RSA_PKCS1_SHA384,
        SignatureScheme.RSA_PSS_RSAE_SHA512,
        SignatureScheme.RSA_PKCS1_SHA512,
    ),
    alpn=(b"h2", b"http/1.1"),
    alps_protocols=(b"h2",),
    alps_settings=b"",
    cert_compression=(CertificateCompression.BROTLI,),
    ec_point_formats=b"\x00",  # uncompressed only
    psk_modes=b"\x01",  # psk_dhe_ke
    status_request=b"\x01\x00\x00\x00\x00",
    session_id_len=32,
    ech_grease=EchGrease(kdf_id=0x0001, aead_id=0x0001, enc_len=32,
                         payload_lens=(144, 176, 208, 240)),
    padding_window=(256, 512),
    middlebox_ccs=True,
    fixed=(
        (ExtensionType.EXTENDED_MASTER_SECRET, b""),
        (ExtensionType.RENEGOTIATION_INFO, b"\x00"),
        (ExtensionType.SESSION_TICKET, b""),
        (ExtensionType.SIGNED_CERTIFICATE_TIMESTAMP, b""),
        # The trust anchor IDs of Chrome's root store (relative OIDs), as this build sends
        # them; a Chrome whose root store was updated by its component updater may send
        # another list.
        (ExtensionType.TRUST_ANCHORS, bytes.fromhex(
            "00b80582df1302010582df1302060582df13020d0582df13020e0582df13020f0582df1302120582"
            "df1302130582df13021408839a648c9b2d010708839a648c9b2d010808839a648c9b2d010908839a"
            "648c9b2d010a08839a648c9b2d010b08839a648c9b2d010c08839a648c9b2d010d08839a648c9b2d"
            "011208839a648c9b2d011304d679090104d679090404d679090504d679090604d679090704d67909"
            "0804d679090a04d679090b04d679090c04d679090d04d679090f")),
    ),
)
