"""What the TLS client reports: one small frozen class per thing that happened."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The server proved its key and both Finished messages are exchanged.

    ``tls_unique`` is the client's Finished verify_data: what OpenSSL returns as the
    ``tls-unique`` channel binding of a TLS 1.3 connection (veil's authenticator binds to it).
    """

    cipher_suite: int
    group: int
    alpn: str | None
    peer_certificate_der: bytes
    tls_unique: bytes
    hello_retry: bool  # the server asked for another key share first


@dataclass(frozen=True, slots=True)
class ApplicationData:
    """Decrypted bytes of one or more consecutive records.

    ``data`` is a view of the client's plaintext buffer: valid only until the next
    ``receive_data`` call (copy it to keep it).
    """

    data: memoryview


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The server sent close_notify: it will send nothing more."""


Event = HandshakeComplete | ApplicationData | PeerClosed
