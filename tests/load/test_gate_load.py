"""Silent connections after the TLS handshake: what each costs the server, and that the gate
counts them toward its bound on connections it has not handed on yet. And the replay filter
at its bound: its memory, and that it still lets key holders in.

A stranger who completes the handshake and then says nothing holds the connection until the
cover's header timeout (nginx: client_header_timeout, 60 s). That is nginx's behaviour, so
the gate keeps it; what it must not do is let such connections cost much more than nginx's,
or escape the bound that caps connections in the gate (nginx: worker_connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tests.support import procs
from tests.support.strangers import NoUsers, never_accept
from tests.support.wait import wait_until
from veil.cover.backends import BuiltinCover
from veil.manage.state import server_ssl_context
from veil.protocol.auth import MAX_REPLAY_ENTRIES, MAX_REPLAY_ENTRIES_PER_KEY, ReplayFilter
from veil.server.gate import Authenticator, Gate, VeilWayIn

pytestmark = pytest.mark.slow

SILENT = 2000
# nginx in procs.nginx() has worker_connections 1024 (listeners included): stay under it.
SILENT_NGINX = 900
# What one silent post-handshake connection may cost veil's server in resident memory:
# generous (allocator noise on shared cores), but well under the 69 KiB it cost before the
# gate stopped allocating buffers the connection does not need yet. nginx: ~13 KiB.
SILENT_KIB_PER_CONNECTION = 48.0
# The memory of an idle server settles once the warm-up's connections are gone.
SETTLE_S = 1.0


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _client_context(alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def _silent_kib_per_connection(pid: int, port: int, count: int) -> float:
    """Open ``count`` TLS connections to ``port`` that complete the handshake and say nothing;
    the server's resident memory growth per connection, in KiB."""
    context = _client_context()
    with contextlib.closing(context.wrap_socket(socket.create_connection(("127.0.0.1", port)))):
        pass  # warm up: lazy imports, first handshake
    time.sleep(SETTLE_S)
    idle_fds, idle_rss = _fds(pid), _rss_kib(pid)
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(count):
            held.append(context.wrap_socket(socket.create_connection(("127.0.0.1", port))))
        # The client's handshake ends at its Finished; the server's when it has read it.
        wait_until(lambda: _fds(pid) >= idle_fds + count, 20,
                   lambda: f"the server to hold {count} connections ({_fds(pid) - idle_fds})")
        time.sleep(SETTLE_S)
        return (_rss_kib(pid) - idle_rss) / count
    finally:
        for sock in held:
            sock.close()


def test_silent_connections_after_the_handshake_cost_little(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    started = procs.start_veil_server(tmp_path_factory.mktemp("gate-load"))
    try:
        veil_kib = _silent_kib_per_connection(started.proc.pid, started.port, SILENT)
    finally:
        procs.stop(started.proc)
    nginx_kib: float | None = None
    if Path(procs.NGINX).exists():
        with procs.nginx() as nginx:
            nginx_kib = _silent_kib_per_connection(nginx.proc.pid, nginx.https_port,
                                                   SILENT_NGINX)
    print(f"\nsilent post-handshake connections: veil {veil_kib:.1f} KiB each ({SILENT}); "
          f"nginx {'-' if nginx_kib is None else f'{nginx_kib:.1f}'} KiB each ({SILENT_NGINX})")
    assert veil_kib < SILENT_KIB_PER_CONNECTION


# ---------------------------------------------------------------------- the replay filter
# The filter at its bound: 8-byte fingerprints in tables at most half full, so at most
# 32 MiB whatever the spread over its buckets (before: 155-164 MiB of dict and bytes).
REPLAY_FILTER_MIB = 32.0


def test_the_replay_filter_at_its_bound_is_small_and_refuses_nobody() -> None:
    now = 1_800_000_000.0
    replay = ReplayFilter()
    # Keys flood at their own bound each, with timestamps over two buckets (clocks a minute
    # off either way), until the filter is full. Nonces need not be random: the filter
    # hashes them with its own key.
    for i in range(MAX_REPLAY_ENTRIES):
        key_id = (i // MAX_REPLAY_ENTRIES_PER_KEY).to_bytes(8, "big")
        stamp = now - 60 if i % 2 else now + 60
        assert replay.check_and_add(key_id, i.to_bytes(16, "big"), stamp, now) is None
    # Its tables, not the process's RSS: freed memory of earlier tests in this process
    # would hide them (measured alone, RSS grows by as much: 16.6 MiB).
    used_mib = replay.table_bytes / 2**20
    assert len(replay) == MAX_REPLAY_ENTRIES
    # Full: a key that has not flooded still gets in.
    assert replay.check_and_add(b"newcomer", os.urandom(16), now, now + 1) is None
    print(f"\nreplay filter at its bound ({MAX_REPLAY_ENTRIES:,} entries): {used_mib:.1f} MiB")
    assert used_mib < REPLAY_FILTER_MIB


# ---------------------------------------------------------------------- the gate's bound




MAX_PENDING = 16


@pytest.fixture
def small_gate() -> Iterator[tuple[Gate, int]]:
    """veil's gate with room for MAX_PENDING connections, on a loop in a thread."""
    certs = Path(tempfile.mkdtemp(prefix="veil-gate-load-"))
    cert, key = procs.make_cert(certs)
    state = cast(Any, SimpleNamespace(cert_path=cert, key_path=key))
    cover = BuiltinCover()
    gate = Gate(ssl_context=server_ssl_context(state, cover.alpn_protocols), cover=cover,
                ways_in=(VeilWayIn(Authenticator(cast(Any, NoUsers())), never_accept),),
                max_pending=MAX_PENDING)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.setblocking(False)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(gate.serve(listener))

    task = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    try:
        yield gate, listener.getsockname()[1]
    finally:
        async def stop() -> None:
            task.cancel()
            gate.close()
            await asyncio.sleep(0.05)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        listener.close()


def _handshake(port: int, alpn: list[str]) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        tls = _client_context(alpn).wrap_socket(sock)
    except BaseException:
        sock.close()
        raise
    # TLS 1.3: the server has the connection once it has read our Finished; a read that
    # times out (nothing to say, or only the session tickets) gives it that time.
    tls.settimeout(0.2)
    with contextlib.suppress(TimeoutError, ssl.SSLWantReadError):
        tls.recv(1)
    return tls


@pytest.mark.parametrize("alpn", [["http/1.1"], ["h2"]])
def test_silent_connections_after_the_handshake_count_toward_the_bound(
        small_gate: tuple[Gate, int], alpn: list[str]) -> None:
    gate, port = small_gate
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(MAX_PENDING):
            held.append(_handshake(port, alpn))
        dropped = gate.stats.dropped
        # One more: the gate closes it at once (as nginx past worker_connections), before TLS.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            held.append(_handshake(port, alpn))
        assert gate.stats.dropped == dropped + 1
        # A connection that leaves frees its place.
        held.pop(0).close()
        wait_until(lambda: gate.pending < MAX_PENDING, 5, "the gate to forget a closed one")
        held.append(_handshake(port, alpn))
    finally:
        for sock in held:
            sock.close()
