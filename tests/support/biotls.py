"""TLS over memory BIOs on a plain socket: the test sees every record and every close
(close_notify and the TCP FIN apart), which ssl.SSLSocket hides."""

from __future__ import annotations

import socket
import ssl


def bio_handshake(sock: socket.socket, context: ssl.SSLContext,
                  server_hostname: str | None = "localhost",
                  session: ssl.SSLSession | None = None
                  ) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """Complete a client handshake on ``sock`` (resuming ``session`` if given); (the TLS
    object, its incoming BIO, its outgoing BIO). The socket's timeout bounds each read; a
    close mid-handshake fails."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname, session=session)
    while True:
        try:
            tls.do_handshake()
            return tls, incoming, outgoing
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection during the handshake"
            incoming.write(chunk)
