"""The closes the cover site uses on veil's TLS transport send their FIN only after every byte
written before them: an answer is never cut off by its own close.

The stop-23 CI failure: the built-in cover answered a wrong key (HTTP/2 SETTINGS + GOAWAY),
then shut the socket's write side directly; uvloop 0.19 still held the answer (it queues writes
until the end of the loop's turn), so the client got a bare FIN and reported a cut path
instead of a refused key. Here the server writes more than the kernel buffers (the transport
must hold the rest) and closes at once; a plain Python TLS client reads only afterwards and
must get every byte, then the end the close promises.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.test_carrier_backpressure import client_context, server_context
from veil.transport.tls import TlsTransport

#: Far more than loopback's socket buffers hold: the transport keeps the rest.
ANSWER = bytes(range(256)) * (16 * 1024)  # 4 MiB
#: Any single wait.
TIMEOUT_S = 10.0


class _Answers(asyncio.Protocol):
    """Writes ANSWER, then ends the connection with ``close``; notes what it reads after."""

    def __init__(self, close: Callable[[TlsTransport], None]) -> None:
        self.close = close
        self.read_after = 0
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TlsTransport)
        transport.write(ANSWER)
        assert transport.get_write_buffer_size() > 0  # held by the transport, not the kernel
        self.close(transport)

    def data_received(self, data: bytes) -> None:
        self.read_after += len(data)

    def eof_received(self) -> bool:
        return True  # a lingering close reads on until the application closes

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


def _client(port: int, late: bool, result: dict[str, object]) -> None:
    context = client_context()
    # Debian's Python reports a bare FIN as a clean close_notify: keep them apart.
    context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw, \
            context.wrap_socket(raw, suppress_ragged_eofs=False) as tls:
        time.sleep(0.3)  # the server has written and closed by now
        if late:
            tls.sendall(b"late bytes")  # a lingering close reads on (and drops them)
        received = bytearray()
        try:
            while chunk := tls.recv(65536):
                received += chunk
            result["end"] = "close_notify"
        except ssl.SSLEOFError:
            result["end"] = "fin"
        except ssl.SSLError as exc:
            # Python 3.11.2 (Debian's) reports a bare FIN as this SSLError, later ones as
            # SSLEOFError.
            bare_fin = getattr(exc, "reason", None) == "UNEXPECTED_EOF_WHILE_READING"
            result["end"] = "fin" if bare_fin else repr(exc)
        except OSError as exc:
            result["end"] = repr(exc)
        result["received"] = bytes(received)


def _run(tmp: Path, close: Callable[[TlsTransport], None],
         late: bool = False) -> tuple[dict[str, object], int]:
    from veil.transport.tls import start_tls_server

    result: dict[str, object] = {}
    served: list[_Answers] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        client = threading.Thread(target=_client, args=(port, late, result))
        client.start()
        sock, _ = await loop.sock_accept(listener)
        listener.close()

        def answers() -> _Answers:
            served.append(_Answers(close))
            return served[-1]

        transport = await start_tls_server(sock, server_context(tmp), answers, TIMEOUT_S)
        await asyncio.to_thread(client.join, TIMEOUT_S)
        await asyncio.sleep(0.1)
        transport.close()
        await asyncio.wait_for(served[0].lost, TIMEOUT_S)

    asyncio.run(main())
    return result, served[0].read_after


@pytest.mark.parametrize("close, end", [
    (lambda t: t.end_writing(close_notify=False), "fin"),  # nginx's HTTP/2 lingering close
    (lambda t: t.end_writing(close_notify=True), "close_notify"),  # its HTTP/1.1 one
    (lambda t: t.close_quietly(), "fin"),  # its quiet shutdown
    (lambda t: t.close(), "close_notify"),  # its ordinary close
], ids=["linger", "linger-notify", "quiet", "close"])
def test_a_close_comes_after_everything_written_before_it(
        tmp_path: Path, close: Callable[[TlsTransport], None], end: str) -> None:
    result, _ = _run(tmp_path, close)
    received = result["received"]
    assert isinstance(received, bytes)
    assert len(received) == len(ANSWER) and received == ANSWER, (
        f"the client got {len(received)} of {len(ANSWER)} bytes before the close")
    assert result["end"] == end


def test_a_lingering_close_reads_on(tmp_path: Path) -> None:
    result, read_after = _run(tmp_path, lambda t: t.end_writing(close_notify=False), late=True)
    assert result["end"] == "fin" and result["received"] == ANSWER
    assert read_after > 0  # the client's late record reached the application


def test_a_closed_connection_whose_peer_reads_nothing_is_cut_after_the_flush_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a close still holds is sent first, but not for ever: a peer that reads nothing
    would keep the socket and its buffer (nginx's send_timeout)."""
    from veil.transport import carrier
    from veil.transport.tls import start_tls_server

    monkeypatch.setattr(carrier, "CLOSE_FLUSH_TIMEOUT_S", 0.5)
    served: list[_Answers] = []
    release = threading.Event()

    def silent_client(port: int) -> None:
        context = client_context()
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw, \
                context.wrap_socket(raw):
            release.wait(TIMEOUT_S)  # connected, and never reads

    async def main() -> float:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        client = threading.Thread(target=silent_client, args=(listener.getsockname()[1],))
        client.start()
        try:
            sock, _ = await loop.sock_accept(listener)
            listener.close()

            def answers() -> _Answers:
                served.append(_Answers(lambda t: t.close_quietly()))
                return served[-1]

            started = loop.time()
            await start_tls_server(sock, server_context(tmp_path), answers, TIMEOUT_S)
            await asyncio.wait_for(served[0].lost, TIMEOUT_S)
            return loop.time() - started
        finally:
            release.set()
            await asyncio.to_thread(client.join, TIMEOUT_S)

    took = asyncio.run(main())
    assert took < 5.0, took
