"""veil's own TLS 1.3 client, sans-IO, with a browser's ClientHello (see ``profile.py``)."""

from veil.transport.tls13.client import State, TlsClient
from veil.transport.tls13.errors import (
    TlsAlertReceived,
    TlsFailure,
    TlsProtocolViolation,
    TlsServerAuthFailure,
    TlsUsageError,
)
from veil.transport.tls13.events import ApplicationData, Event, HandshakeComplete, PeerClosed
from veil.transport.tls13.profile import CHROME, ClientHelloSpec

__all__ = [
    "CHROME",
    "ApplicationData",
    "ClientHelloSpec",
    "Event",
    "HandshakeComplete",
    "PeerClosed",
    "State",
    "TlsAlertReceived",
    "TlsClient",
    "TlsFailure",
    "TlsProtocolViolation",
    "TlsServerAuthFailure",
    "TlsUsageError",
]
