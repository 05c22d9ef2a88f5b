"""A borrowed identity (server/borrow.py) in front of a real nginx 1.22 with TLS 1.3, h2 and a
test CA's certificate: strangers get nginx itself, a veil hello gets the tunnel in nginx's
shape, a replayed veil hello gets nginx; the lab's borrowed-identity detector passes veil."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from tests.support import procs
from tests.support.borrow import (
    TARGET_NAME,
    Target,
    recorded_handshake,
    target_nginx,
    tls13_handshake,
)
from tests.support.wait import wait_until, wait_until_async
from veil.cover.backends import UrlCover
from veil.lab import borrowed
from veil.lab.passive import analyse
from veil.lab.probe import (
    Probe,
    ProbeReport,
    ProbeResult,
    differences,
    probe_server,
    run_probe,
)
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.auth import Credential, build_auth, new_secret
from veil.protocol.borrow import HelloSeal
from veil.server.borrow import Borrowed
from veil.server.gate import Authenticator, Gate, VeilWayIn
from veil.store.base import User
from veil.transport.tls13 import TlsClient

WAIT_S = 10.0


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    if not Path(procs.NGINX).exists():
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it)")
    with target_nginx() as site:
        yield site


class Users:
    def __init__(self, user: User) -> None:
        self.user = user

    def find_by_key_id(self, key_id: bytes) -> User | None:
        return self.user if key_id == self.user.key_id else None

    def find_by_trojan_hash(self, password_hash: str) -> User | None:
        return None

    def refusal(self, user: User, device: str | None = None) -> str | None:
        return None


@dataclass
class Server:
    port: int
    gate: Gate
    credential: Credential
    static_public: bytes
    tunnels: list[tuple[asyncio.Transport, User, bytes]] = field(default_factory=list)

    def seal(self) -> HelloSeal:
        return HelloSeal(self.credential, self.static_public, time.time)


@asynccontextmanager
async def borrowed_server(target: Target, directory: Path) -> AsyncIterator[Server]:
    secret = new_secret()
    credential = Credential.from_secret(secret)
    user = User("alice", secret, credential.key_id, time.time())
    static = x25519.X25519PrivateKey.generate()
    borrow = Borrowed(Address("127.0.0.1", target.port), TARGET_NAME, static)
    await borrow.learn()
    cert, key = procs.make_cert(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    cover = UrlCover(f"https://127.0.0.1:{target.port}")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.setblocking(False)
    tunnels: list[tuple[asyncio.Transport, User, bytes]] = []
    gate = Gate(ssl_context=context, cover=cover, borrow=borrow, ways_in=[
        VeilWayIn(Authenticator(Users(user)),
                  lambda transport, who, rest: tunnels.append((transport, who, rest)))])
    task = asyncio.get_running_loop().create_task(gate.serve(listener))
    server = Server(listener.getsockname()[1], gate, credential,
                    static.public_key().public_bytes_raw(), tunnels)
    try:
        yield server
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gate.close()
        for transport, _user, _rest in tunnels:
            transport.abort()
        cover.close()
        listener.close()
        await asyncio.sleep(0.05)  # aborted transports finish closing


def authenticator_message(server: Server) -> Callable[[TlsClient], bytes]:
    """What veil's client sends after its Finished: its authenticator, then frames."""
    def then(tls: TlsClient) -> bytes:
        return build_auth(server.credential, tls.tls_unique, time.time()) + b"frames"
    return then


def test_strangers_get_the_site_veil_gets_the_tunnel_replays_get_the_site(
        target: Target, tmp_path: Path) -> None:
    async def run() -> None:
        async with borrowed_server(target, tmp_path) as server:
            assert server.gate.borrow is not None and server.gate.borrow.profile is not None
            # nginx's shape, learned: four flight records, two tickets and SETTINGS after.
            assert server.gate.borrow.profile.flight_records == 4
            assert {len(sample) for sample in server.gate.borrow.profile.post_handshake} == {3}

            reference = await recorded_handshake(target.port, TlsClient(TARGET_NAME))
            stranger_tls, _r, writer = await tls13_handshake(server.port)
            writer.close()
            assert stranger_tls.peer_certificate_der == target.cert_der

            then = authenticator_message(server)
            veil = await recorded_handshake(
                server.port, TlsClient(TARGET_NAME, sealer=server.seal()),
                then=then)
            await wait_until_async(lambda: len(server.tunnels) == 1, WAIT_S, "the tunnel")
            assert server.tunnels[0][1].name == "alice" and server.tunnels[0][2] == b"frames"

            ref_shape = borrowed.flow_shape(reference)
            veil_shape = borrowed.flow_shape(veil)
            assert ref_shape is not None and veil_shape is not None
            verdict = borrowed.judge(ref_shape, veil_shape, "passive")
            assert not verdict.flagged, verdict.evidence
            # Every passive detector of the lab on the same connection, for the lab table.
            [report] = analyse([veil])
            assert not report.flagged, [v.evidence for v in report.flagged]

            # The prober replays veil's recorded hello: nginx answers it, not veil.
            loop = asyncio.get_running_loop()
            hello = borrowed.client_hello_records(veil)
            relayed_before = server.gate.stats.cover_borrowed
            # Both at once: each waits for its server to go quiet.
            answer, direct = await asyncio.gather(*(
                loop.run_in_executor(None, borrowed.replay_hello, "127.0.0.1", port, hello)
                for port in (server.port, target.port)))
            verdict = borrowed.judge(borrowed.answer_shape(direct),
                                     borrowed.answer_shape(answer), "replay")
            assert not verdict.flagged, verdict.evidence
            assert server.gate.stats.cover_borrowed == relayed_before + 1
            assert len(server.tunnels) == 1

            # curl, as any visitor: nginx's certificate (by the test CA) and its page.
            ca = tmp_path / "ca.pem"
            ca.write_bytes(target.ca_pem)
            page = await loop.run_in_executor(None, _curl, server.port, ca)
            assert "the borrowed site" in page

    asyncio.run(run())


def _curl(port: int, ca: Path) -> str:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(ca), "--resolve",
         f"{TARGET_NAME}:{port}:127.0.0.1", f"https://{TARGET_NAME}:{port}/"],
        check=True, capture_output=True, text=True).stdout


def test_veil_serve_borrow_and_veil_connect(target: Target, tmp_path: Path) -> None:
    """The option end to end: `veil serve --borrow`, its key (borrowed=1, the site's name as
    SNI, nk), a stranger's curl getting the site's page, `veil connect` carrying bytes."""
    echo = procs.TcpEcho()
    server = procs.start_veil_server(tmp_path / "server", "--borrow",
                                     f"localhost:{target.port}")
    try:
        assert "borrowed=1" in server.key and "sni=localhost" in server.key
        log = server.log.read_text()
        assert "borrowed identity of localhost" in log and "none of its own" in log
        page = subprocess.run(["curl", "-sSk", "--max-time", "10",
                               f"https://127.0.0.1:{server.port}/"],
                              check=True, capture_output=True, text=True).stdout
        assert "the borrowed site" in page
        spec = f"0:127.0.0.1:{echo.port}"
        client = procs.start_veil_client(tmp_path, server.key, socks=False,
                                         forwards=[spec])
        try:
            with socket.create_connection(("127.0.0.1", client.forwards[spec]),
                                          timeout=WAIT_S) as conn:
                conn.sendall(b"through the borrowed identity")
                assert conn.recv(100) == b"through the borrowed identity"
        finally:
            procs.stop(client.proc)
        # A key the server does not know: its hello is relayed to the site like a stranger's,
        # and the client says the key was refused (not that the way is blocked).
        wrong = dataclasses.replace(AccessKey.parse(server.key), secret=new_secret())
        stranger = procs.start_veil_client(tmp_path, wrong.to_uri(), forwards=[spec],
                                           socks=False, wait=False)
        try:
            wait_until(lambda: "answered as localhost: it refused the key"
                       in stranger.log.read_text(), WAIT_S, "the refusal in the client's log")
        finally:
            procs.stop(stranger.proc)
    finally:
        procs.stop(server.proc)
        echo.close()


# The prober's wait for an answer: nginx answers every probe at once or not before its 60 s
# header timeout, so a short wait tells the same apart.
PROBE_WAIT_S = 2.0


def test_the_prober_sees_the_borrowed_site(target: Target, tmp_path: Path) -> None:
    """`veil lab probe`'s repertoire, replays of a veil hello included, against the borrowed
    server and against the site itself: no difference, and the site's CA-issued certificate."""
    async def run() -> ProbeReport:
        async with borrowed_server(target, tmp_path) as server:
            veil = await recorded_handshake(
                server.port, TlsClient(TARGET_NAME, sealer=server.seal()),
                then=authenticator_message(server))
            hello = borrowed.client_hello_records(veil)
            return await asyncio.get_running_loop().run_in_executor(
                None, lambda: probe_server(f"127.0.0.1:{server.port}",
                                           f"127.0.0.1:{target.port}", wait=PROBE_WAIT_S,
                                           replay=hello, sni=TARGET_NAME, workers=48))

    report = asyncio.run(run())
    assert report.differences == [], "\n".join(report.differences)
    assert {"replay", "replay-byte0", "tls-http-get"} <= {r.probe.name for r in report.results}
    assert report.certificate is not None and not report.certificate.flagged, \
        report.certificate.evidence


def test_a_silent_borrowed_connection_counts_as_pending_and_ends_with_the_gate(
        target: Target, tmp_path: Path) -> None:
    async def run() -> None:
        async with borrowed_server(target, tmp_path) as server:
            _tls, reader, writer = await tls13_handshake(
                server.port, client=TlsClient(TARGET_NAME, sealer=server.seal()))
            try:
                # Through the handshake and waiting for its authenticator, as _AwaitAuth's.
                await wait_until_async(lambda: len(server.gate._awaiting) == 1, WAIT_S,
                                       "the connection to wait for its first record")
                assert server.gate.pending == 1
                server.gate.close()
                await wait_until_async(lambda: server.gate.pending == 0, WAIT_S,
                                       lambda: f"no pending connection: {server.gate.pending}")
                async with asyncio.timeout(WAIT_S):
                    while await reader.read(65536):
                        pass  # the post-handshake records, then the cut
            finally:
                writer.close()
            assert not server.tunnels

    asyncio.run(run())


def test_silence_and_partial_hellos_meet_the_sites_own_timeout(tmp_path: Path) -> None:
    """The site hears every connection from its first byte: a silent prober, or one that
    sends part of a hello, is closed when the site closes it (here nginx with a 1 s
    client_header_timeout), not by a timeout of veil's."""
    if not Path(procs.NGINX).exists():
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it)")
    probes = [Probe("silence", b""), Probe("part-of-a-hello", b"\x16\x03\x01\x02"),
              Probe("garbage", b"\x00" * 7)]

    async def run(site: Target) -> list[ProbeResult]:
        async with borrowed_server(site, tmp_path) as server:
            loop = asyncio.get_running_loop()

            async def both(probe: Probe) -> ProbeResult:
                mine, theirs = await asyncio.gather(*(
                    loop.run_in_executor(None, run_probe, "127.0.0.1", port, probe, 3.0)
                    for port in (server.port, site.port)))
                return ProbeResult(probe, mine, theirs)

            return list(await asyncio.gather(*(both(p) for p in probes)))

    with target_nginx(header_timeout=1) as site:
        results = asyncio.run(run(site))
    assert differences(results) == []
    for result in results:
        assert result.target.close == "fin" and result.target.elapsed < 3.0, result
