"""TLS failures, in veil's error tree; each names the alert involved (``alert``)."""

from __future__ import annotations

from veil.errors import AuthError, LocalProtocolError, RemoteProtocolError
from veil.transport.tls13.wire import AlertDescription


class TlsAlertReceived(RemoteProtocolError):
    """The server sent a fatal alert (or closed the connection during the handshake)."""

    code = "tls_alert_received"

    def __init__(self, alert: int, message: str | None = None) -> None:
        name = AlertDescription.name_of(alert)
        super().__init__(message or f"the server sent the TLS alert {name}")
        self.alert = alert


class TlsProtocolViolation(RemoteProtocolError):
    """The server broke TLS 1.3; we sent it ``alert`` and the connection is over."""

    code = "tls_protocol_violation"

    def __init__(self, alert: int, message: str) -> None:
        super().__init__(f"{message} (sent alert {AlertDescription.name_of(alert)})")
        self.alert = alert


class TlsServerAuthFailure(AuthError):
    """The server did not prove that it holds the key of its certificate (or sent a wrong
    Finished): a forged or intercepted handshake. We sent it ``alert``."""

    code = "tls_server_auth"

    def __init__(self, alert: int, message: str) -> None:
        super().__init__(f"{message} (sent alert {AlertDescription.name_of(alert)})")
        self.alert = alert


class TlsUsageError(LocalProtocolError):
    """The client was asked something its state does not allow (e.g. data before the
    handshake completed)."""

    code = "tls_usage"


TlsFailure = TlsAlertReceived | TlsProtocolViolation | TlsServerAuthFailure
