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
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.support import procs
from tests.support.pebble import PEBBLE, NameServer, Pebble, pebble
from tests.support.wait import wait_until_async
from veil.config import ServerOptions
from veil.manage.state import init_state
from veil.protocol.accesskey import AccessKey, spki_pin
from veil.protocol.address import Address
from veil.server.service import VeilServer

NAME = "www.veil-acme.org"
# An order with Pebble takes well under a second with PEBBLE_VA_NOSLEEP; this leaves room for
# a loaded CI machine.
ORDER_TIMEOUT_S = 30.0
# Renewals tried at most for the badNonce test to have met at least one rejection: at 50 % per
# request and ~10 requests an order, P(none in 5 orders) ~ 2^-50.
MAX_RENEWALS_FOR_A_REJECTION = 5
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
async def acme_server(tmp_path: Path, ca: Pebble, port: int) -> AsyncIterator[VeilServer]:
    state, _ = init_state(tmp_path / "state", listen=Address("127.0.0.1", port),
                          public=f"{NAME}:{port}")
    server = VeilServer(state, ServerOptions(
        listen=Address("127.0.0.1", port), allow_private=True,
        acme_directory=ca.directory, acme_ca_bundle=ca.ca_bundle))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


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
