"""A small active prober for tests: send bytes, record what comes back and how it ends.

It sees only what a censor's prober sees: bytes and the way the connection closes (a TLS
close_notify, a FIN without one, a reset, or still open when the prober gives up).
"""

from __future__ import annotations

import random
import re
import socket
import ssl
import time
from dataclasses import dataclass

DATE = re.compile(rb"\r\nDate: [^\r]*")


@dataclass(frozen=True)
class Outcome:
    data: bytes
    close: str  # "close_notify", "fin", "reset", "open", "tls_failed"

    def normalised(self) -> Outcome:
        """The same outcome with the Date header blanked (it differs by the second)."""
        return Outcome(DATE.sub(b"\r\nDate: -", self.data), self.close)


def _client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _read_all(sock: socket.socket | ssl.SSLSocket, deadline: float) -> Outcome:
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Outcome(b"".join(chunks), "open")
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except (TimeoutError, socket.timeout):
            return Outcome(b"".join(chunks), "open")
        except ssl.SSLEOFError:
            return Outcome(b"".join(chunks), "fin")
        except ConnectionResetError:
            return Outcome(b"".join(chunks), "reset")
        except ssl.SSLError as exc:
            return Outcome(b"".join(chunks), f"tls_error:{exc.reason}")
        if not data:
            return Outcome(b"".join(chunks), "close_notify" if isinstance(sock, ssl.SSLSocket)
                           else "fin")
        chunks.append(data)


def probe_raw(port: int, payload: bytes, wait: float = 1.5) -> Outcome:
    """Send ``payload`` on a fresh TCP connection (no TLS)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if payload:
            sock.sendall(payload)
        return _read_all(sock, time.monotonic() + wait)


def probe_tls(port: int, payload: bytes, wait: float = 1.5, sni: str | None = None,
              alpn: list[str] | None = None) -> Outcome:
    """Complete a TLS handshake, then send ``payload`` as one record."""
    context = _client_context()
    if alpn:
        context.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        tls = context.wrap_socket(raw, server_hostname=sni, suppress_ragged_eofs=False)
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        return Outcome(b"", f"tls_failed:{type(exc).__name__}")
    with tls:
        if payload:
            tls.sendall(payload)
        return _read_all(tls, time.monotonic() + wait)


def peer_certificate(port: int, sni: str | None) -> bytes:
    context = _client_context()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=sni) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


# The random-probe lengths seen from the GFW (Alice et al. 2020; Frolov et al. 2020), plus a
# spread up to 2,000 bytes.
GFW_LENGTHS = [7, 8, 9, 11, 12, 13, 15, 16, 17, 21, 22, 23, 32, 33, 34, 40, 41, 42, 48, 49, 50,
               221]


def random_payloads(seed: int, count: int = 20, max_len: int = 2000) -> list[bytes]:
    rng = random.Random(seed)
    lengths = GFW_LENGTHS + [1, 2, 3, 64, 100, 517, 1000, 1460, max_len]
    lengths += [rng.randint(1, max_len) for _ in range(count)]
    return [rng.randbytes(n) for n in lengths]
