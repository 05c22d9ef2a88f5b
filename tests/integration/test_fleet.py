"""A fleet: several `veil serve` processes on one PostgreSQL share users, usage adds up across
them, and a change made through any of them reaches every server's live sessions."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.postgres import PostgresServer, postgres_server
from tests.support.procs import VEIL, TcpEcho, VeilServer
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def veil_user(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VEIL, "user", *args, "--state", str(state)],
                          capture_output=True, text=True, check=check, timeout=30)


def send_through(port: int, size: int) -> socket.socket:
    """Echo ``size`` bytes through a forward; the connection stays open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    payload = bytes(size)
    sock.sendall(payload)
    got = 0
    while got < size:
        got += len(sock.recv(65536))
    return sock


def test_two_servers_share_users_and_usage(tmp_path: Path, pg: PostgresServer) -> None:
    url = pg.create_database("fleet")
    echo = TcpEcho()
    servers: list[VeilServer] = []
    clients: list[procs.VeilClient] = []
    try:
        first = procs.start_veil_server(tmp_path / "a", "--db", url)
        servers.append(first)
        assert first.key.startswith("veil://")  # the first server made the first user
        # The second server needs the same store key (docs/store.md), nothing else.
        (tmp_path / "b" / "state").mkdir(parents=True, mode=0o700)
        shutil.copy(first.state / "store.key", tmp_path / "b" / "state" / "store.key")
        second = procs.start_veil_server(tmp_path / "b", "--db", url)
        servers.append(second)
        assert second.key == ""  # users exist already: no second default user

        veil_user(first.state, "add", "alice")  # through server a's state directory...
        key_b = veil_user(second.state, "show", "alice").stdout.strip()  # ...seen by b
        key_a = veil_user(first.state, "show", "alice").stdout.strip()
        assert f":{second.port}" in key_b and f":{first.port}" in key_a
        sockets = []
        for key, size in ((key_a, 3 * 2**20), (key_b, 5 * 2**20)):
            # A server that has not seen alice yet refuses her; the client retries within a
            # second or two, and start_veil_client waits until it is in.
            spec = f"0:127.0.0.1:{echo.port}"
            clients.append(procs.start_veil_client(tmp_path, key, socks=False, forwards=[spec]))
            sockets.append(send_through(clients[-1].forwards[spec], size))

        def alice() -> dict[str, int]:
            rows = json.loads(veil_user(first.state, "list", "--json").stdout)
            return next(r for r in rows if r["name"] == "alice")

        # Each server writes its usage every half second.
        used = wait_until(lambda: (row := alice())["down_bytes"] >= 8 * 2**20 and row, 10,
                          lambda: f"alice's usage from both servers: {alice()}", poll=0.25)
        # Each byte went up and came back down, through one server or the other.
        assert used["up_bytes"] >= 8 * 2**20 and used["down_bytes"] >= 8 * 2**20
        assert used["up_bytes"] < 8 * 2**20 * 1.05

        # Revoked through b's directory: both servers cut alice's sessions.
        veil_user(second.state, "revoke", "alice")
        start = time.monotonic()
        for sock in sockets:
            sock.settimeout(5)
            with sock:
                try:
                    while sock.recv(65536):
                        pass
                except (ConnectionResetError, TimeoutError):
                    pass
        assert time.monotonic() - start < 1.5

        # The database URL's password is in no log.
        password = url.split(":")[2].split("@")[0]
        for server in servers:
            assert password not in server.log.read_text()
    finally:
        for client in clients:
            procs.stop(client.proc)
        for server in servers:
            procs.stop(server.proc)
        echo.close()


def test_a_server_with_another_store_key_refuses_to_start(tmp_path: Path,
                                                          pg: PostgresServer) -> None:
    url = pg.create_database("fleet_wrong_key")
    first = procs.start_veil_server(tmp_path / "a", "--db", url)
    procs.stop(first.proc)
    second = subprocess.run(
        [*VEIL, "serve", "--self-signed", "--state", str(tmp_path / "b"), "--listen",
         "127.0.0.1:0", "--db", url],
        capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert "store key" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    password = url.split(":")[2].split("@")[0]
    assert password not in second.stderr


def test_any_servers_panel_shows_the_fleet_and_ends_a_session_on_another_server(
        tmp_path: Path, pg: PostgresServer) -> None:
    """Two `veil serve` processes on one PostgreSQL, the panel on the first: its /api/fleet
    lists both (each with its own live sessions), and ending a user's sessions there closes
    the one open on the second server within a second."""
    import urllib.request

    url = pg.create_database("fleet_panel")
    echo = TcpEcho()
    servers: list[VeilServer] = []
    client: procs.VeilClient | None = None
    admin_port = procs.unused_port()
    try:
        first = procs.start_veil_server(tmp_path / "a", "--db", url,
                                        "--admin", f"127.0.0.1:{admin_port}")
        servers.append(first)
        (tmp_path / "b" / "state").mkdir(parents=True, mode=0o700)
        shutil.copy(first.state / "store.key", tmp_path / "b" / "state" / "store.key")
        second = procs.start_veil_server(tmp_path / "b", "--db", url)
        servers.append(second)
        token = subprocess.run([*VEIL, "admin", "token", "--state", str(first.state)],
                               capture_output=True, text=True, check=True,
                               timeout=30).stdout.strip()

        def api(method: str, path: str) -> dict[str, object]:
            request = urllib.request.Request(f"http://127.0.0.1:{admin_port}{path}",
                                             method=method,
                                             headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=10) as reply:
                return json.loads(reply.read())  # type: ignore[no-any-return]

        veil_user(first.state, "add", "lee")
        key_b = veil_user(second.state, "show", "lee").stdout.strip()
        spec = f"0:127.0.0.1:{echo.port}"
        client = procs.start_veil_client(tmp_path, key_b, socks=False, forwards=[spec])
        sock = send_through(client.forwards[spec], 100_000)
        try:
            def fleet() -> list[dict[str, object]] | None:
                listed = api("GET", "/api/fleet")["servers"]
                assert isinstance(listed, list)
                by_port = {int(str(s["listen"]).rsplit(":", 1)[1]): s for s in listed}
                if set(by_port) == {first.port, second.port} and \
                        by_port[second.port]["sessions_active"] == 1:
                    return listed
                return None

            # Heartbeats come every 5 s.
            servers_seen = wait_until(fleet, 20, "both servers, lee's session on the second")
            assert all(s["responding"] for s in servers_seen)
            assert [s["this"] for s in servers_seen].count(True) == 1

            api("POST", "/api/users/lee/end-sessions")
            start = time.monotonic()
            sock.settimeout(5)
            try:
                while sock.recv(65536):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
            took = time.monotonic() - start
            print(f"end sessions on server a -> server b closed lee's session: {took:.2f} s")
            assert took < 1.5
        finally:
            sock.close()
    finally:
        if client is not None:
            procs.stop(client.proc)
        for server in servers:
            procs.stop(server.proc)
        echo.close()
