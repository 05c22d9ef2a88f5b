"""A stub ACME CA that answers every new order with a rate limit, for what Pebble cannot do.

Pebble (Let's Encrypt's test CA) has no rate limits, so the answer Let's Encrypt gives when one
is reached (RFC 8555 6.6: HTTP 429, ``urn:ietf:params:acme:error:rateLimited`` and a
Retry-After header) comes from this stub: a real HTTPS server on loopback that speaks just
enough ACME for a client to reach ``newOrder`` (a directory, nonces, an account) and records
when each order was asked for. It checks no signatures: it tests the client, not itself.
"""

from __future__ import annotations

import http.server
import json
import secrets
import ssl
import threading
import time
from pathlib import Path

from tests.support.cdn import make_ca_and_leaf

RATE_LIMITED = "urn:ietf:params:acme:error:rateLimited"


class RateLimitingCa:
    """An HTTPS ACME directory at :attr:`directory` whose ``newOrder`` always answers 429
    rateLimited with ``Retry-After: retry_after``; :attr:`orders` holds the monotonic time of
    each order asked for. :attr:`ca_bundle` checks its TLS (``--acme-ca-bundle``)."""

    def __init__(self, workdir: Path, retry_after: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca_bundle = make_ca_and_leaf(workdir, "localhost")
        self.retry_after = retry_after
        self.orders: list[float] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: the test prints what it needs

            def _answer(self, status: int, body: dict[str, object] | None,
                        content_type: str = "application/json",
                        headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Replay-Nonce", secrets.token_urlsafe(16))
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_HEAD(self) -> None:  # newNonce
                self._answer(200, None)

            def do_GET(self) -> None:  # the directory
                base = stub.base
                self._answer(200, {"newNonce": f"{base}/nonce", "newAccount": f"{base}/account",
                                   "newOrder": f"{base}/order",
                                   "revokeCert": f"{base}/revoke", "keyChange": f"{base}/key"})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path == "/account":
                    self._answer(201, {"status": "valid"},
                                 headers={"Location": f"{stub.base}/account/1"})
                elif self.path == "/order":
                    stub.orders.append(time.monotonic())
                    self._answer(429, {"type": RATE_LIMITED,
                                       "detail": "too many new orders recently"},
                                 content_type="application/problem+json",
                                 headers={"Retry-After": str(stub.retry_after)})
                else:
                    self._answer(404, {"type": "urn:ietf:params:acme:error:malformed"},
                                 content_type="application/problem+json")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(workdir / "cdn-cert.pem", workdir / "cdn-key.pem")
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.base = f"https://localhost:{self.server.server_address[1]}"
        self.directory = f"{self.base}/dir"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
