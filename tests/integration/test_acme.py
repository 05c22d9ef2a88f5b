"""``veil serve --public NAME`` gets its certificate from an ACME CA (issue #18): a real
Pebble with real TLS-ALPN-01 validation against veil's own port, through a name server the
test runs. Strangers then see the CA's chain; the access keys (they pin the server's key, which
every order reuses) keep working, across renewals too; a failed validation leaves the server
serving what it had; Pebble's injected badNonce answers are retried."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.support import procs
from tests.support.acme_stub import RATE_LIMITED, RateLimitingCa
from tests.support.pebble import PEBBLE, NameServer, Pebble, pebble
from tests.support.socks_echo import ROUND_TRIP_TIMEOUT_S, echo_target
from tests.support.wait import wait_until, wait_until_async
from veil.config import ServerOptions
from veil.manage.state import init_state, load_state
from veil.protocol.accesskey import AccessKey, spki_pin
from veil.protocol.address import Address
from veil.server.acme import CertificateRenewer
from veil.server.service import VeilServer

NAME = "www.veil-acme.org"
# An order with Pebble takes well under a second with PEBBLE_VA_NOSLEEP; this leaves room for
# a loaded CI machine.
ORDER_TIMEOUT_S = 30.0
# Renewals tried at most for the badNonce test to have met at least one rejection: at 50 % per
# request and ~10 requests an order, P(none in 5 orders) ~ 2^-50.
MAX_RENEWALS_FOR_A_REJECTION = 5
# The first retry's delay in the tests that watch retries (60 s in service).
QUICK_RETRY_S = 0.2
# _ssl's DER constant (ssl does not re-export it): 3.11's ssl has no public way to the chain a
# server sent, only its leaf; the private get_unverified_chain (3.10+) gives it all.
_ENCODING_DER = 2


def presented_chain(port: int, root_pem: bytes | None) -> list[x509.Certificate]:
    """The chain the server presents to a client naming NAME; with ``root_pem``, the client
    verifies it up to that root and the name, as a browser would."""
    if root_pem is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cadata=root_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=NAME) as tls:
        chain = tls._sslobj.get_unverified_chain()  # type: ignore[union-attr]
        return [x509.load_der_x509_certificate(c.public_bytes(_ENCODING_DER))
                for c in chain]


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


@asynccontextmanager
async def acme_server(tmp_path: Path, ca: Pebble | RateLimitingCa, port: int, *,
                      directory: str | None = None,
                      tune: Callable[[CertificateRenewer], None] | None = None,
                      ) -> AsyncIterator[VeilServer]:
    """A server on ``port`` whose certificate comes from ``ca`` (or the CA at ``directory``,
    checked with ``ca``'s bundle); ``tune`` adjusts its renewer before it starts. The state
    is tmp_path/state, made on first use and kept: a second server on it starts with what the
    first obtained."""
    state_dir = tmp_path / "state"
    if (state_dir / "config.json").exists():
        state = load_state(state_dir)
    else:
        state, _ = init_state(state_dir, listen=Address("127.0.0.1", port),
                              public=f"{NAME}:{port}")
    server = VeilServer(state, ServerOptions(
        listen=Address("127.0.0.1", port), allow_private=True,
        acme_directory=directory or ca.directory, acme_ca_bundle=ca.ca_bundle))
    assert server.acme is not None
    if tune is not None:
        tune(server.acme)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def acme_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ERROR lines the server logged about ACME orders, one per failed order."""
    return [r.getMessage() for r in caplog.records if r.name == "veil.server"
            and r.levelno == logging.ERROR and r.getMessage().startswith("ACME")]


def quick_retries(acme: CertificateRenewer) -> None:
    """Retries after 0.2 s, 0.4 s, 0.8 s ... instead of 1 min, 2 min, 4 min ... (the same
    doubling, in a test's time)."""
    acme.retry_first_s = QUICK_RETRY_S


@dataclasses.dataclass
class Ca:
    pebble: Pebble
    #: Where Pebble's validations resolve NAME (a test may point it elsewhere).
    dns: NameServer
    #: The port the veil server listens on, where Pebble's TLS-ALPN-01 validations go.
    port: int


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ca]:
    """One Pebble for the module (it starts in ~1 s), rejecting half the good nonces it gets
    (PEBBLE_WFE_NONCEREJECT=50): every order here meets badNonce answers and must retry."""
    if not Path(PEBBLE).exists():
        pytest.skip("needs Debian's pebble (scripts/install-deps installs it)")
    port = procs.unused_port()
    dns = NameServer({NAME: "127.0.0.1"})
    try:
        with pebble(tmp_path_factory.mktemp("pebble"), port, dns.port,
                    nonce_reject_percent=50) as running:
            yield Ca(running, dns, port)
    finally:
        dns.close()


def client_key(server: VeilServer) -> str:
    """A new user's key, dialled at 127.0.0.1 (NAME resolves only in Pebble's name server)."""
    key = AccessKey.parse(server.users.access_key(server.users.add("alice")))
    assert key.sni == NAME
    return dataclasses.replace(key, server=Address("127.0.0.1", server.address.port)).to_uri()


def test_the_server_presents_the_certificate_pebble_issued_after_validating_it(
        tmp_path: Path, ca: Ca) -> None:
    ca.dns.addresses[NAME] = "127.0.0.1"
    root = ca.pebble.issuing_root()

    async def test() -> None:
        async with acme_server(tmp_path, ca.pebble, ca.port) as server:
            acme = server.acme
            assert acme is not None
            self_signed = await asyncio.to_thread(presented_chain, ca.port, None)
            await wait_until_async(lambda: acme.obtained, ORDER_TIMEOUT_S,
                                   lambda: ca.pebble.log.read_text()[-2000:])
            assert server.state.cert_source == "acme"
            assert server.gate.stats.acme_validations >= 1
            assert server.gate.acme_challenges == {}  # withdrawn once validated
            # A client that trusts Pebble's root verifies the chain and the name.
            chain = await asyncio.to_thread(presented_chain, ca.port, root)
            leaf = chain[0]
            print(f"presented: {[c.subject.rfc4514_string() for c in chain]}; "
                  f"{acme.bad_nonces} badNonce answers retried")
            assert leaf.issuer != leaf.subject and len(chain) >= 2
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert san.value.get_values_for_type(x509.DNSName) == [NAME]
            # The same key as the self-signed certificate before: the pin holds.
            assert spki_pin(leaf) == spki_pin(self_signed[0]) == server.state.pin
            key = client_key(server)
            assert AccessKey.parse(key).pin == spki_pin(leaf)
            client = await asyncio.to_thread(procs.start_veil_client, tmp_path, key)
            procs.stop(client.proc)

    run(test)


def test_a_failed_validation_is_reported_and_the_server_keeps_its_certificate(
        tmp_path: Path, ca: Ca, caplog: pytest.LogCaptureFixture) -> None:
    # The name points elsewhere: Pebble's validation reaches no veil there.
    ca.dns.addresses[NAME] = "127.0.0.2"

    async def test() -> None:
        async with acme_server(tmp_path, ca.pebble, ca.port) as server:
            acme = server.acme
            assert acme is not None
            before = await asyncio.to_thread(presented_chain, ca.port, None)
            await wait_until_async(lambda: acme.failures, ORDER_TIMEOUT_S,
                                   lambda: ca.pebble.log.read_text()[-2000:])
            assert server.state.cert_source == "self-signed"
            assert acme.obtained == 0
            after = await asyncio.to_thread(presented_chain, ca.port, None)
            assert after[0] == before[0]
            client = await asyncio.to_thread(procs.start_veil_client, tmp_path,
                                             client_key(server))
            procs.stop(client.proc)

    with caplog.at_level(logging.ERROR, logger="veil.server"):
        run(test)
    (error,) = [r.getMessage() for r in caplog.records if r.name == "veil.server"
                and r.levelno == logging.ERROR and r.getMessage().startswith("ACME")]
    print(error)
    assert f"could not validate {NAME}" in error and "127.0.0.2" in error
    assert "still presenting the self-signed certificate" in error
    assert "next try in 60 s" in error


def test_renewals_survive_injected_bad_nonces_and_keep_live_sessions(
        tmp_path: Path, ca: Ca) -> None:
    ca.dns.addresses[NAME] = "127.0.0.1"

    async def test() -> None:
        async with acme_server(tmp_path, ca.pebble, ca.port) as server:
            acme = server.acme
            assert acme is not None
            await wait_until_async(lambda: acme.obtained, ORDER_TIMEOUT_S,
                                   lambda: ca.pebble.log.read_text()[-2000:])
            first = (await asyncio.to_thread(presented_chain, ca.port, None))[0]
            client = await asyncio.to_thread(procs.start_veil_client, tmp_path,
                                             client_key(server))
            try:
                sessions = set(server.live.connections)
                assert len(sessions) == 1
                await acme.renew()  # due or not
                while acme.bad_nonces == 0:  # until Pebble has rejected one
                    assert acme.obtained < MAX_RENEWALS_FOR_A_REJECTION
                    await acme.renew()
                renewed = (await asyncio.to_thread(presented_chain, ca.port, None))[0]
                print(f"{acme.obtained} orders, {acme.bad_nonces} badNonce answers retried")
                # A new certificate, same key, swapped in without a restart ...
                assert renewed.serial_number != first.serial_number
                assert spki_pin(renewed) == spki_pin(first) == server.state.pin
                # ... and the session from before is still there.
                assert set(server.live.connections) == sessions
                assert client.proc.poll() is None
                assert client.log_text().count("connected to") == 1
            finally:
                procs.stop(client.proc)

    run(test)


class WrongAnswer:
    """A TLS server at 127.0.0.4:``port`` that agrees on ``acme-tls/1`` and presents an
    ordinary certificate for NAME, not the challenge's: what a CA meets when the name points
    at another server on port 443."""

    def __init__(self, workdir: Path, port: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        cert, key = procs.make_cert(workdir, NAME)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.set_alpn_protocols(["acme-tls/1"])
        self.sock = socket.create_server(("127.0.0.4", port))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    with self.context.wrap_socket(conn, server_side=True):
                        pass  # the handshake is the answer
                except OSError:  # the validator hangs up on what it sees
                    pass

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.sock.close()
        self._thread.join(timeout=5)


@pytest.mark.parametrize("elsewhere", ["nothing there", "a wrong answer"])
def test_a_failed_validation_is_retried_with_a_doubling_delay(
        tmp_path: Path, ca: Ca, elsewhere: str, caplog: pytest.LogCaptureFixture) -> None:
    """The name resolves to an address where no veil is: nothing listens there, or another
    TLS server answers with its own certificate. Every validation fails."""
    wrong = WrongAnswer(tmp_path / "other", ca.port) if elsewhere == "a wrong answer" else None
    ca.dns.addresses[NAME] = "127.0.0.4" if wrong is not None else "127.0.0.2"

    async def test() -> None:
        async with acme_server(tmp_path, ca.pebble, ca.port, tune=quick_retries) as server:
            acme = server.acme
            assert acme is not None
            before = await asyncio.to_thread(presented_chain, ca.port, None)
            await wait_until_async(lambda: acme.failures >= 3, ORDER_TIMEOUT_S,
                                   lambda: ca.pebble.log.read_text()[-2000:])
            # Each failure waits twice as long as the one before, and the server presents
            # what it had all along.
            assert acme.retry_delays[:3] == [QUICK_RETRY_S, 2 * QUICK_RETRY_S,
                                             4 * QUICK_RETRY_S]
            assert acme.obtained == 0 and server.state.cert_source == "self-signed"
            assert (await asyncio.to_thread(presented_chain, ca.port, None))[0] == before[0]

    try:
        with caplog.at_level(logging.ERROR, logger="veil.server"):
            run(test)
    finally:
        if wrong is not None:
            wrong.close()
    errors = acme_errors(caplog)
    print("\n".join(errors))
    assert len(errors) >= 3  # one line per failed order, no more
    assert all(f"could not validate {NAME}" in e for e in errors)
    assert [e.rsplit("next try in ", 1)[1] for e in errors[:3]] == ["0.2 s", "0.4 s", "0.8 s"]


def test_a_rate_limit_answer_is_obeyed_no_retry_before_its_retry_after(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Pebble has no rate limits: a stub CA answers every order as Let's Encrypt does past
    one (429, rateLimited, Retry-After). The backoff alone would retry after 0.2 s."""
    retry_after = 2
    stub = RateLimitingCa(tmp_path / "ca", retry_after)

    async def test() -> None:
        async with acme_server(tmp_path, stub, procs.unused_port(),
                               tune=quick_retries) as server:
            acme = server.acme
            assert acme is not None
            await wait_until_async(lambda: len(stub.orders) >= 2, ORDER_TIMEOUT_S,
                                   lambda: f"a second order, {acme.retry_delays}")
            assert acme.retry_delays[0] == retry_after
            assert server.state.cert_source == "self-signed"

    try:
        with caplog.at_level(logging.ERROR, logger="veil.server"):
            run(test)
    finally:
        stub.close()
    gap = stub.orders[1] - stub.orders[0]
    errors = acme_errors(caplog)
    print(f"second order {gap:.2f} s after the first; {errors[0]}")
    assert gap >= retry_after
    assert RATE_LIMITED.rsplit(":", 1)[1] in errors[0]
    assert f"asks to wait {retry_after} s" in errors[0]
    assert errors[0].endswith(f"next try in {retry_after} s")


class SilentListener:
    """A TCP listener on ``host``:``port`` that accepts and never says a word: a CA that hangs,
    or a validation that waits. :attr:`peers` are the connections it holds open."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_server((host, port))
        self.peers: list[socket.socket] = []
        self._closing = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self._closing:
                conn.close()
                return
            self.peers.append(conn)

    @staticmethod
    def still_open(conn: socket.socket) -> bool:
        """Whether ``conn``'s peer has not closed it (what it sent is read and dropped)."""
        conn.setblocking(False)
        try:
            while conn.recv(65536):
                pass
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # an end of stream: the peer closed

    def close(self) -> None:
        self._closing = True
        with socket.create_connection(self.sock.getsockname()[:2], timeout=5):
            pass  # wakes accept()
        self._thread.join(timeout=5)
        self.sock.close()
        for conn in self.peers:
            conn.close()


@pytest.mark.parametrize("down", ["refused", "hanging"])
def test_a_ca_that_is_down_leaves_the_ca_certificate_in_force(
        tmp_path: Path, ca: Ca, down: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A first server gets a certificate from Pebble; the next start on the same state finds
    it due and its CA down (nothing listens, or a listener that never answers): it keeps
    presenting the CA's chain, retries with a doubling delay, and says why in one line each."""
    ca.dns.addresses[NAME] = "127.0.0.1"
    root = ca.pebble.issuing_root()
    dead_port = procs.unused_port()
    hanging = SilentListener("127.0.0.1", dead_port) if down == "hanging" else None

    def ca_down(acme: CertificateRenewer) -> None:
        quick_retries(acme)
        acme.request_timeout_s = 0.5  # the hanging CA's request times out in a test's time
        monkeypatch.setattr(acme, "due_in", lambda: 0.0)

    async def test() -> None:
        async with acme_server(tmp_path, ca.pebble, ca.port) as first:
            acme = first.acme
            assert acme is not None
            await wait_until_async(lambda: acme.obtained, ORDER_TIMEOUT_S,
                                   lambda: ca.pebble.log.read_text()[-2000:])
        issued = (await asyncio.to_thread(presented_chain_at_rest, tmp_path))
        async with acme_server(tmp_path, ca.pebble, ca.port,
                               directory=f"https://localhost:{dead_port}/dir",
                               tune=ca_down) as server:
            acme = server.acme
            assert acme is not None and server.state.cert_source == "acme"
            await wait_until_async(lambda: acme.failures >= 3, ORDER_TIMEOUT_S,
                                   lambda: f"three failures, {acme.retry_delays}")
            assert acme.retry_delays[:3] == [QUICK_RETRY_S, 2 * QUICK_RETRY_S,
                                             4 * QUICK_RETRY_S]
            chain = await asyncio.to_thread(presented_chain, ca.port, root)
            assert chain[0] == issued and server.state.cert_source == "acme"
            client = await asyncio.to_thread(procs.start_veil_client, tmp_path,
                                             client_key(server))
            procs.stop(client.proc)

    try:
        with caplog.at_level(logging.ERROR, logger="veil.server"):
            run(test)
    finally:
        if hanging is not None:
            hanging.close()
    errors = acme_errors(caplog)
    print("\n".join(errors))
    assert len(errors) >= 3
    assert all("cannot reach the CA" in e and "still presenting the acme certificate" in e
               for e in errors)
    assert ("Connection refused" if down == "refused" else "no answer within") in errors[0]


def presented_chain_at_rest(tmp_path: Path) -> x509.Certificate:
    """The leaf of the CA chain a server left in its state."""
    return x509.load_pem_x509_certificate((tmp_path / "state" / "acme-cert.pem").read_bytes())


def test_stopping_during_a_pending_order_abandons_it_at_once(
        tmp_path: Path, ca: Ca, caplog: pytest.LogCaptureFixture) -> None:
    """The name points at a listener that accepts Pebble's validation and never answers, so
    the order stays pending; the server stops meanwhile: it neither waits for the CA's
    validation to time out nor leaves a thread polling, and logs no error."""
    ca.dns.addresses[NAME] = "127.0.0.3"
    waiting = SilentListener("127.0.0.3", ca.port)
    stopping: list[float] = []

    async def test() -> None:
        async with acme_server(tmp_path, ca.pebble, ca.port) as server:
            await wait_until_async(lambda: waiting.peers, ORDER_TIMEOUT_S,
                                   lambda: ca.pebble.log.read_text()[-2000:])
            assert server.gate.acme_challenges  # the order waits for its validation
            stopping.append(time.monotonic())
        assert server.gate.acme_challenges == {}

    try:
        with caplog.at_level(logging.INFO, logger="veil.server"):
            run(test)  # asyncio.run returns: no executor thread holds the exit either
        ended = time.monotonic()
        # Pebble's validation is still waiting on its connection: the stop did not wait
        # for the CA to give up, and the order's thread is gone all the same.
        assert waiting.still_open(waiting.peers[0])
        assert not [t for t in threading.enumerate() if t.name == "veil-acme"]
    finally:
        waiting.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "veil.server"]
    print(f"exit {ended - stopping[0]:.2f} s after the stop began; "
          f"{[m for m in messages if m.startswith('ACME')]}")
    assert acme_errors(caplog) == []
    assert f"ACME: the order for {NAME} under way was abandoned at stop" in messages


# Load across a renewal: tunnelled streams (through a veil client's SOCKS5 port, to an echo
# server) and strangers' keep-alive HTTPS connections to the cover site, each going round
# trip after round trip; every one must finish ROUNDS_AFTER more after the new certificate is
# in force, over the same connection.
LOAD_STREAMS = 4
LOAD_STRANGERS = 4
LOAD_CHUNK = 64 * 1024
ROUNDS_AFTER = 3
# A stranger's pause between two page loads: the cover closes a keep-alive connection after
# KEEPALIVE_REQUESTS (1,000, nginx's keepalive_requests) as nginx does; at 20 a second that
# takes 50 s, past the renewal's own bound (ORDER_TIMEOUT_S).
STRANGER_PAUSE_S = 0.05


async def tunnelled_stream(socks_port: int, target: int, mark: int, rounds: list[int],
                           renewed: asyncio.Event) -> None:
    """Echo round trips of LOAD_CHUNK through the tunnel, each checked byte for byte, until
    ROUNDS_AFTER of them came after ``renewed``; ``rounds[mark]`` counts them all."""
    reader, writer = await asyncio.open_connection("127.0.0.1", socks_port)
    try:
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target.to_bytes(2, "big"))
        assert (await reader.readexactly(10))[:2] == b"\x05\x00"
        after = 0
        while after < ROUNDS_AFTER:
            was_renewed = renewed.is_set()
            payload = bytes([mark, rounds[mark] % 256]) * (LOAD_CHUNK // 2)
            writer.write(payload)
            got = await asyncio.wait_for(reader.readexactly(len(payload)),
                                         ROUND_TRIP_TIMEOUT_S)
            assert got == payload
            rounds[mark] += 1
            after += was_renewed
    finally:
        writer.close()


async def stranger_fetches(port: int, root: bytes, mark: int, rounds: list[int],
                           renewed: asyncio.Event) -> x509.Certificate:
    """A stranger's one TLS connection (verifying the CA's chain) fetching the cover's front
    page again and again, as above; returns the certificate it was given at its handshake."""
    context = ssl.create_default_context(cadata=root.decode())
    context.set_alpn_protocols(["http/1.1"])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname=NAME)
    try:
        tls = writer.get_extra_info("ssl_object")
        leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        after = 0
        while after < ROUNDS_AFTER:
            was_renewed = renewed.is_set()
            writer.write(f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ROUND_TRIP_TIMEOUT_S)
            assert head.startswith(b"HTTP/1.1 200 "), head
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await asyncio.wait_for(reader.readexactly(length), ROUND_TRIP_TIMEOUT_S)
            rounds[mark] += 1
            after += was_renewed
            await asyncio.sleep(STRANGER_PAUSE_S)
        return leaf
    finally:
        writer.close()


def test_a_renewal_under_load_drops_nothing_and_keys_from_before_connect(
        tmp_path: Path, ca: Ca) -> None:
    ca.dns.addresses[NAME] = "127.0.0.1"
    root = ca.pebble.issuing_root()

    async def test() -> None:
        target = await echo_target()
        try:
            async with acme_server(tmp_path, ca.pebble, ca.port) as server:
                acme = server.acme
                assert acme is not None
                await wait_until_async(lambda: acme.obtained, ORDER_TIMEOUT_S,
                                       lambda: ca.pebble.log.read_text()[-2000:])
                first = (await asyncio.to_thread(presented_chain, ca.port, root))[0]
                key_before = client_key(server)
                client = await asyncio.to_thread(procs.start_veil_client, tmp_path,
                                                 key_before)
                try:
                    await load_across_a_renewal(server, client, target, root, first)
                    # A key handed out before the renewal still connects (it pins the key).
                    again = await asyncio.to_thread(procs.start_veil_client, tmp_path,
                                                    key_before)
                    procs.stop(again.proc)
                finally:
                    procs.stop(client.proc)
        finally:
            target.close()
            await target.wait_closed()

    run(test)


async def load_across_a_renewal(server: VeilServer, client: procs.VeilClient,
                                target: asyncio.Server, root: bytes,
                                first: x509.Certificate) -> None:
    acme = server.acme
    assert acme is not None and client.socks is not None
    sessions = set(server.live.connections)
    assert len(sessions) == 1
    target_port = target.sockets[0].getsockname()[1]
    rounds = [0] * (LOAD_STREAMS + LOAD_STRANGERS)
    renewed = asyncio.Event()
    streams = [asyncio.create_task(tunnelled_stream(client.socks, target_port, i, rounds,
                                                    renewed)) for i in range(LOAD_STREAMS)]
    strangers = [asyncio.create_task(stranger_fetches(server.address.port, root, i, rounds,
                                                      renewed))
                 for i in range(LOAD_STREAMS, LOAD_STREAMS + LOAD_STRANGERS)]
    everything = [*streams, *strangers]
    try:
        # Every connection open and moving before the renewal starts.
        await wait_until_async(lambda: all(rounds) or any(t.done() for t in everything),
                               ORDER_TIMEOUT_S, lambda: f"round trips {rounds}")
        before = list(rounds)
        await acme.renew()
        renewed.set()
        await asyncio.wait_for(asyncio.gather(*everything), ORDER_TIMEOUT_S)
    finally:
        for task in everything:
            task.cancel()
        await asyncio.gather(*everything, return_exceptions=True)
    given = {t.result() for t in strangers}
    print(f"round trips before the renewal {before}, in all {rounds}")
    # The strangers kept the certificate of their handshake, the one before the renewal ...
    assert given == {first}
    # ... new handshakes get the new one, for the same key ...
    renewed_leaf = (await asyncio.to_thread(presented_chain, server.address.port, root))[0]
    assert renewed_leaf.serial_number != first.serial_number
    assert spki_pin(renewed_leaf) == spki_pin(first) == server.state.pin
    # ... and the tunnel's session is the one from before.
    assert set(server.live.connections) == sessions
    assert client.proc.poll() is None and client.log_text().count("connected to") == 1


def test_veil_serve_with_a_name_gets_and_presents_the_ca_certificate(
        tmp_path: Path, ca: Ca) -> None:
    """The command line as an operator types it, as a process: the start-up line says where
    the certificate comes from, the next that it came, and strangers then get the CA's chain;
    the first key works; a stop ends cleanly."""
    ca.dns.addresses[NAME] = "127.0.0.1"
    root = ca.pebble.issuing_root()
    server = procs.start_veil_server(
        tmp_path, "--public", f"{NAME}:{ca.port}", "--acme-directory", ca.pebble.directory,
        "--acme-ca-bundle", str(ca.pebble.ca_bundle), port=ca.port)
    try:
        obtained = f"ACME: obtained a certificate for {NAME} from {ca.pebble.directory}"
        wait_until(lambda: obtained in server.log_text() or server.proc.poll() is not None,
                   ORDER_TIMEOUT_S, lambda: server.log_text()[-2000:])
        log = server.log_text()
        (line,) = [x for x in log.splitlines() if "certificate: " in x]
        print(line)
        assert f"certificate: a CA's for {NAME}, over ACME from {ca.pebble.directory}" in line
        assert obtained in log
        chain = presented_chain(ca.port, root)
        assert chain[0].issuer != chain[0].subject
        assert spki_pin(chain[0]) == AccessKey.parse(server.key).pin
        key = AccessKey.parse(server.key)
        client = procs.start_veil_client(tmp_path, dataclasses.replace(
            key, server=Address("127.0.0.1", ca.port)).to_uri())
        procs.stop(client.proc)
    finally:
        status = procs.stop(server.proc)
    assert status == 0 and "Traceback" not in server.log_text()


def test_veil_serve_stopped_during_a_pending_order_exits_at_once(
        tmp_path: Path, ca: Ca) -> None:
    """SIGTERM while Pebble's validation waits on a listener that never answers: the process
    exits cleanly (status 0, no traceback) within procs.stop's 5 s, long before Pebble gives
    up on that validation."""
    ca.dns.addresses[NAME] = "127.0.0.3"
    waiting = SilentListener("127.0.0.3", ca.port)
    try:
        server = procs.start_veil_server(
            tmp_path, "--public", f"{NAME}:{ca.port}", "--acme-directory",
            ca.pebble.directory, "--acme-ca-bundle", str(ca.pebble.ca_bundle), port=ca.port)
        try:
            wait_until(lambda: waiting.peers or server.proc.poll() is not None,
                       ORDER_TIMEOUT_S, lambda: server.log_text()[-2000:])
        finally:
            status = procs.stop(server.proc)
        assert waiting.still_open(waiting.peers[0])
    finally:
        waiting.close()
    log = server.log_text()
    assert status == 0 and "Traceback" not in log, log[-2000:]
    assert f"ACME: the order for {NAME} under way was abandoned at stop" in log
