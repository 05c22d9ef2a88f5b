"""``veil serve --workers 2``: connections spread over two worker processes, each of which does
the work; the workers share what one process guarantees (a replay reaching the other worker is
refused, tickets resume on either, usage is counted once, a second device is refused by both, a
revoked user is cut on both within a second, one panel sums them); a killed worker is
replaced, SIGTERM stops them all, and a parent killed outright leaves no worker behind.

Which worker served a session is read from its log line (every worker's lines carry
``[worker I pid P]``). SO_REUSEPORT hashes each connection's 4-tuple, so which worker a
connection lands on is the kernel's draw: a test that needs both opens connections until
both have one, up to :data:`MAX_DRAWS` (the chance that 64 draws all land on one of two
workers is 2**-63)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import procs
from tests.support.borrow import Target, recorded_handshake, target_nginx
from tests.support.procs import VEIL, VeilServer
from tests.support.wait import wait_until
from veil.lab import borrowed
from veil.manage.state import load_state
from veil.protocol.accesskey import AccessKey
from veil.protocol.auth import AUTH_SIZE, Credential, build_auth
from veil.protocol.borrow import HelloSeal
from veil.protocol.frames import FrameType, frame
from veil.transport.tls13 import TlsClient

#: Connections a test may open to reach both workers (see the module docstring).
MAX_DRAWS = 64
#: The issue's bound for a change to reach live sessions.
CUT_WITHIN_S = 1.0
#: How long a server with two workers may take to start on a loaded machine.
START_TIMEOUT_S = 60.0
#: Bytes of PADDING each counted session sends after its authenticator.
PADDING = 1000
_SESSION = re.compile(r"\[worker (\d+) pid (\d+)\]: session started for user (\S+)")
_WORKERS = re.compile(r"listening on \S+ \(2 workers: (\d+) (\d+)\)")


@contextlib.contextmanager
def running(directory: Path, *extra: str) -> Iterator[VeilServer]:
    """``veil serve --workers 2`` with ``extra``, once both workers serve; stopped after."""
    # Three interpreters start (~1.2 s of CPU each): on a loaded 2-core machine, many seconds.
    server = procs.start_veil_server(directory, "--workers", "2", *extra,
                                     start_timeout=START_TIMEOUT_S)
    try:
        wait_until(lambda: _WORKERS.search(server.log_text()), START_TIMEOUT_S,
                   "both workers to start")
        yield server
    finally:
        pids = worker_pids(server) if server.proc.poll() is None else set()
        status = procs.stop(server.proc, timeout=15)
    # SIGTERM stops every worker and the parent cleanly (a test that killed the parent
    # itself checks its workers).
    if pids:
        assert status == 0, server.log_text()[-1500:]
        assert not [pid for pid in pids if _alive(pid)], "a worker outlived its parent"


@pytest.fixture(scope="module")
def shared(module_dir: Path) -> Iterator[VeilServer]:
    """A server the tests that leave it running share (each with its own user where it
    counts or changes one)."""
    with running(module_dir / "shared", "--max-devices-per-user", "1",
                 "--admin", "127.0.0.1:0") as server:
        yield server


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[VeilServer]:
    """A server of its own, for a test that kills part of it."""
    with running(tmp_path) as server:
        yield server


def worker_pids(server: VeilServer) -> set[int]:
    """The workers running now: the parent's children."""
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    return {int(pid) for pid in children.read_text().split()}


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    return context


class Session:
    """One veil session opened by hand: TLS, the authenticator, the server's first frame."""

    def __init__(self, server: VeilServer, key: str, context: ssl.SSLContext,
                 ticket: ssl.SSLSession | None = None, padding: int = 0) -> None:
        before = len(_SESSION.findall(server.log_text()))
        self.tls = authenticate(server, key, context, ticket=ticket, padding=padding)
        try:
            assert self.tls.recv(1) == bytes([FrameType.PADDING]), "the key must open a session"
            self.resumed = self.tls.session_reused
            self.ticket = self.tls.session
            # The line is written before the server's first frame: it is there now.
            worker, pid, _user = _SESSION.findall(server.log_text())[before]
            self.worker, self.pid = int(worker), int(pid)
        except BaseException:
            self.tls.close()
            raise

    def close(self) -> None:
        self.tls.close()


def authenticate(server: VeilServer, key: str, context: ssl.SSLContext, *,
                 ticket: ssl.SSLSession | None = None, padding: int = 0,
                 source: str = "127.0.0.1") -> ssl.SSLSocket:
    """A TLS connection from ``source`` that has sent ``key``'s authenticator."""
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                   source_address=(source, 0))
    try:
        tls = context.wrap_socket(raw, session=ticket)
    except BaseException:
        raw.close()
        raise
    try:
        binding = tls.get_channel_binding("tls-unique")
        assert binding is not None
        secret = AccessKey.parse(key).secret
        message = build_auth(Credential.from_secret(secret), binding, time.time())
        if padding:
            message += frame(FrameType.PADDING, 0, bytes(padding))
        tls.sendall(message)
    except BaseException:
        tls.close()
        raise
    return tls


@contextlib.contextmanager
def sessions_on_both(server: VeilServer, key: str, context: ssl.SSLContext,
                     **kwargs: object) -> Iterator[dict[int, Session]]:
    """A session on each worker (by worker number); the others opened meanwhile are closed."""
    found: dict[int, Session] = {}
    extra: list[Session] = []
    try:
        for _ in range(MAX_DRAWS):
            session = Session(server, key, context, **kwargs)  # type: ignore[arg-type]
            if session.worker in found:
                extra.append(session)
            else:
                found[session.worker] = session
            if len(found) == 2:
                break
        assert len(found) == 2, f"{MAX_DRAWS} connections all reached one worker"
        for session in extra:
            session.close()
        extra.clear()
        yield found
    finally:
        for session in [*found.values(), *extra]:
            session.close()


def test_connections_spread_over_the_workers_and_each_serves(shared: VeilServer) -> None:
    pids = worker_pids(shared)
    assert len(pids) == 2
    with sessions_on_both(shared, shared.key, client_context()) as both:
        assert {s.pid for s in both.values()} == pids
    # Each worker did the handshakes' work itself: CPU time in both.
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(fields[11]) + int(fields[12]) > 0  # utime + stime, in clock ticks


def test_the_panels_metrics_sum_the_workers(shared: VeilServer) -> None:
    """One admin panel, in the parent: /metrics counts the sessions of both workers."""
    port = procs.bound_port(shared.log, "admin panel on", shared.proc)

    def sessions_active() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples if sample.name == "veil_sessions_active")

    with sessions_on_both(shared, shared.key, client_context()):
        # Each worker sends its status every second.
        wait_until(lambda: sessions_active() == 2, 10,
                   lambda: f"2 sessions in /metrics, not {sessions_active()}")


def test_a_ticket_from_one_worker_resumes_on_the_other(shared: VeilServer) -> None:
    context = client_context()
    first = Session(shared, shared.key, context)
    try:
        ticket = first.ticket
        assert ticket is not None and ticket.has_ticket
        for _ in range(MAX_DRAWS):
            again = Session(shared, shared.key, context, ticket=ticket)
            again.close()
            assert again.resumed, f"worker {again.worker} did not resume worker " \
                                  f"{first.worker}'s ticket"
            if again.worker != first.worker:
                break
        assert again.worker != first.worker, f"{MAX_DRAWS} connections all reached one worker"
    finally:
        first.close()


def test_usage_is_counted_once(shared: VeilServer) -> None:
    key = shared.add_user("counted")
    context = client_context()
    opened = 0
    seen: set[int] = set()
    while len(seen) < 2 and opened < MAX_DRAWS:
        session = Session(shared, key, context, padding=PADDING)
        session.close()
        seen.add(session.worker)
        opened += 1
    assert len(seen) == 2, f"{MAX_DRAWS} connections all reached one worker"
    # What each session sent: the authenticator and one PADDING frame.
    sent = opened * (AUTH_SIZE + len(frame(FrameType.PADDING, 0, bytes(PADDING))))
    state = load_state(shared.state)
    store = state.open_store()
    try:
        def stored_up() -> int:
            usage = store.usage_by_user(None).get("counted")
            return usage.up if usage is not None else 0

        # Each worker writes its connections' bytes within a refresh interval.
        wait_until(lambda: stored_up() >= sent, 10,
                   lambda: f"{sent} bytes up in the store, not {stored_up()}")
        time.sleep(1.5)  # the scenario: three more refreshes must add nothing
        assert stored_up() == sent
        hourly = store.usage_series("counted", 0)
        assert sum(usage.up for _hour, usage in hourly) == sent
    finally:
        store.close()


def test_a_revoked_user_is_cut_on_every_worker_within_a_second(shared: VeilServer) -> None:
    key = shared.add_user("cut-everywhere")
    with sessions_on_both(shared, key, client_context()) as both:
        subprocess.run([*VEIL, "user", "revoke", "cut-everywhere", "--state",
                        str(shared.state)], capture_output=True, check=True, timeout=30)
        returned = time.monotonic()
        for session in both.values():
            session.tls.settimeout(10)
            with contextlib.suppress(ConnectionResetError, TimeoutError, ssl.SSLError):
                while session.tls.recv(4096):
                    pass
            assert time.monotonic() - returned < CUT_WITHIN_S, f"worker {session.worker}"


def test_a_traffic_limit_counts_the_bytes_of_every_worker(shared: VeilServer) -> None:
    """A 100 KB limit, 60 KB through each worker: neither worker alone reaches the limit, the
    store's total does, and both cut the user within a refresh or two."""
    key = shared._change_users("add", "quota", "--limit", "100KB")
    with sessions_on_both(shared, key, client_context()) as both:
        for session in both.values():
            for _ in range(4):
                session.tls.sendall(frame(FrameType.PADDING, 0, bytes(15_000)))
        for session in both.values():
            session.tls.settimeout(10)
            with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                while session.tls.recv(4096):
                    pass
    with authenticate(shared, key, client_context()) as tls:
        assert tls.recv(1) != bytes([FrameType.PADDING]), "over the limit, yet a session"


def test_a_second_device_is_refused_by_every_worker(shared: VeilServer) -> None:
    """--max-devices-per-user 1: with one device (127.0.0.1) connected to one worker, a
    second (127.0.0.2) is refused on MAX_DRAWS connections, which reach the other worker
    too (a worker counting only its own devices would let it in there); once the first
    device is gone, the second gets in."""
    key = shared.add_user("one-device")
    context = client_context()
    first = Session(shared, key, context)
    try:
        for _ in range(MAX_DRAWS):
            with authenticate(shared, key, context, source="127.0.0.2") as tls:
                answer = tls.recv(1)
            assert answer != bytes([FrameType.PADDING]), "a second device got a session"
    finally:
        first.close()
    wait_until(lambda: _opens(shared, key, "127.0.0.2"), 10, "the second device to get in")


def _opens(server: VeilServer, key: str, source: str) -> bool:
    with authenticate(server, key, client_context(), source=source) as tls:
        return tls.recv(1) == bytes([FrameType.PADDING])


def test_a_killed_worker_is_replaced_and_a_killed_parent_leaves_none(
        workers: VeilServer) -> None:
    pids = worker_pids(workers)
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(worker_pids(workers) - {victim}) == 2, 15,
               lambda: f"a new worker: {workers.log_text()[-1500:]}")
    (new,) = worker_pids(workers) - pids
    wait_until(lambda: f"pid {new}]: listening on" in workers.log_text(), START_TIMEOUT_S,
               "the new worker to serve")
    # The new worker serves: sessions reach both workers again.
    with sessions_on_both(workers, workers.key, client_context()) as both:
        assert victim not in {s.pid for s in both.values()}
    # The parent killed outright: each worker sees its channel to the parent close and
    # stops (not at once: it closes its sessions and writes its last usage first).
    survivors = worker_pids(workers)
    workers.proc.kill()
    workers.proc.wait()
    wait_until(lambda: not any(_alive(pid) for pid in survivors), 15, "the workers to stop")


# ------------------------------------------------------------------ a replay to the other worker
_REPLAY_REFUSED = re.compile(r"\[worker (\d+) pid \d+\]: borrowed identity: a veil hello "
                             r"refused \(replay\)")


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    if not Path(procs.NGINX).exists():
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it)")
    with target_nginx() as site:
        yield site


def test_a_replay_reaching_the_other_worker_gets_the_site(target: Target, tmp_path: Path) -> None:
    """An authenticator is bound to its TLS connection on the plain port, so a replay fails
    there on any worker anyway; a borrowed identity's sealed hello is what a prober can
    replay whole (its claim is only as fresh as the replay filter says). The hello of a
    session on one worker, replayed until a replay reaches the other worker, is refused by
    that worker too (relayed to the borrowed site, as to a stranger): one table for both.
    Positive control: with a filter per worker, the other worker takes the replay for a
    fresh hello, logs no refusal, and this test times out."""
    with running(tmp_path, "--borrow", f"localhost:{target.port}") as server:
        key = AccessKey.parse(server.key)
        assert key.noise_key is not None and key.sni == "localhost"
        credential = Credential.from_secret(key.secret)
        before = len(_SESSION.findall(server.log_text()))

        def then(tls: TlsClient) -> bytes:
            return build_auth(credential, tls.tls_unique, time.time())

        flow = asyncio.run(recorded_handshake(
            server.port, TlsClient(key.sni, sealer=HelloSeal(credential, key.noise_key,
                                                              time.time)), then=then))
        wait_until(lambda: len(_SESSION.findall(server.log_text())) > before, 10,
                   "the sealed hello's session")
        accepted_by = int(_SESSION.findall(server.log_text())[before][0])
        hello = borrowed.client_hello_records(flow)
        for _ in range(MAX_DRAWS):
            if _replay_refused_by(server, hello) != accepted_by:
                break
        else:
            raise AssertionError(f"{MAX_DRAWS} connections all reached one worker")


def _replay_refused_by(server: VeilServer, hello: bytes) -> int:
    """Replay ``hello`` on a fresh connection: the worker that refused it."""
    refusals = len(_REPLAY_REFUSED.findall(server.log_text()))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(hello)
        wait_until(lambda: len(_REPLAY_REFUSED.findall(server.log_text())) > refusals,
                   10, lambda: f"the replay refused: {server.log_text()[-1500:]}")
    return int(_REPLAY_REFUSED.findall(server.log_text())[refusals])


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
