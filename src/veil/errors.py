"""One exception tree for veil.

::

    VeilError
    ├── ProtocolError            bytes on the wire that break the protocol
    │   ├── LocalProtocolError   we were asked to send something the protocol forbids
    │   └── RemoteProtocolError  the peer sent something the protocol forbids
    ├── AuthError                a credential or server identity did not check out
    ├── TransportError           a connection could not be made or was lost
    ├── StoreError               the user store failed or was asked something impossible
    └── ConfigError              user input (flags, files, access keys) is invalid

Each error carries a machine-readable ``code`` (a short snake_case string) so callers and
metrics can branch on it without parsing messages. Layers convert foreign exceptions into
these with ``raise ... from``.
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
