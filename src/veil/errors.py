"""One exception tree for veil.

::

    VeilError
    ├── ProtocolError            bytes on the wire that break the protocol
    │   ├── NoiseError                   (protocol.noise) a Noise handshake or message failed
    │   ├── LocalProtocolError   we were asked to send something the protocol forbids
    │   │   └── TlsUsageError            (transport.tls13.errors)
    │   └── RemoteProtocolError  the peer sent something the protocol forbids
    │       ├── TlsAlertReceived         (transport.tls13.errors)
    │       └── TlsProtocolViolation     (transport.tls13.errors)
    ├── AuthError                a credential or server identity did not check out
    │   ├── TlsServerAuthFailure         (transport.tls13.errors)
    │   ├── PinMismatchError             (net.trojan_client; also a ConnectionError)
    │   └── UntrustedServerError         (net.trojan_client; also a ConnectionError)
    ├── TransportError           a connection could not be made or was lost
    │   ├── TlsHandshakeError            (transport.tls; also a ConnectionError)
    │   ├── ResolveError                 (server.policy) a destination's name did not resolve
    │   └── RefusedDestination           (server.policy) the policy refuses every address
    ├── StoreError               the user store failed or was asked something impossible
    ├── ConfigError              user input (flags, files, access keys) is invalid
    │   └── UriError                     (protocol.uri) a veil:// or trojan:// URI's shape
    ├── AcmeError                (manage.acme) an ACME order failed: unreachable, refused, invalid
    └── TunError                 (net.tun_linux) the TUN device or its routes failed

Each error carries a machine-readable ``code`` (a short snake_case string) so callers and
metrics can branch on it without parsing messages. Layers convert foreign exceptions into
these with ``raise ... from``. A connect failure that callers catch as an ``OSError`` (the
dialers' retry loops, ``DirectDialer``: any ``OSError`` from a connect means "unreachable")
keeps ``ConnectionError`` as a second base, so it is both.
"""

from __future__ import annotations


class VeilError(Exception):
    """Base of every error veil raises on purpose."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ProtocolError(VeilError):
    code = "protocol_error"


class LocalProtocolError(ProtocolError):
    code = "local_protocol_error"


class RemoteProtocolError(ProtocolError):
    code = "remote_protocol_error"


class AuthError(VeilError):
    code = "auth_failed"


class TransportError(VeilError):
    code = "transport_error"


class StoreError(VeilError):
    code = "store_error"


class ConfigError(VeilError):
    code = "config_error"
